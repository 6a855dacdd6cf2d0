#!/usr/bin/env python
"""Rebuild the SST-2 files shipped in recipes/data/sst2 from the GLUE SST-2 tsv files.

    python recipes/data/make_sst2_subset.py --source <folder with GLUE SST-2 tsv files> --train_size 3000 --seed 0

* ``train.tsv``: ``train_size`` rows drawn without replacement from the 67,349 GLUE training
  phrases with ``random.Random(seed).sample``, written in their original order;
* ``dev.tsv``: the full 872-sentence GLUE validation set (copied unchanged);
* ``test.tsv``: the full 1,821-sentence SST-2 test set with labels (copied unchanged).

All files keep the GLUE format (``sentence<TAB>label`` with a header). The sha256 of each file is
printed; ``recipes/data/sst2/README.md`` lists the values of the shipped files.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import shutil


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="folder with GLUE's train.tsv, dev.tsv and test.tsv")
    parser.add_argument("--dest", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "sst2"))
    parser.add_argument("--train_size", type=int, default=3000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    with open(os.path.join(args.source, "train.tsv"), encoding="utf-8") as f:
        header, *rows = f.read().splitlines(keepends=True)
    if args.train_size > len(rows):
        raise SystemExit(f"--train_size {args.train_size} exceeds the {len(rows)} training rows")
    chosen = sorted(random.Random(args.seed).sample(range(len(rows)), args.train_size))
    os.makedirs(args.dest, exist_ok=True)
    tmp = os.path.join(args.dest, ".train.tsv.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(header)
        f.writelines(rows[i] for i in chosen)
    os.replace(tmp, os.path.join(args.dest, "train.tsv"))
    for name in ("dev.tsv", "test.tsv"):
        shutil.copyfile(os.path.join(args.source, name), os.path.join(args.dest, name))
    for name in ("train.tsv", "dev.tsv", "test.tsv"):
        path = os.path.join(args.dest, name)
        with open(path, encoding="utf-8") as f:
            count = sum(1 for _ in f) - 1
        print(f"{name}: {count} rows, sha256 {sha256(path)}")


if __name__ == "__main__":
    main()
