#!/usr/bin/env python
"""Rebuild recipes/data/tinyshakespeare/input.txt, a seeded subset of Karpathy's tiny Shakespeare.

    python recipes/data/make_tinyshakespeare_subset.py --source <tiny Shakespeare's input.txt> \\
        --max_bytes 180000 --seed 0

The source text (1,115,394 characters, 40,000 lines) is cut into speeches at its blank lines
("First Citizen:\\nBefore we proceed any further, hear me speak.", ...). The speeches are visited
in the order ``random.Random(seed).shuffle`` gives, each kept while the total stays within
``max_bytes`` (UTF-8, counting the blank line between speeches), and the kept speeches are
written in their original order, separated by blank lines as in the source. The sha256 of the
source and of the result are printed; recipes/data/tinyshakespeare/README.md lists them.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def subset(text: str, max_bytes: int, seed: int) -> str:
    """The seeded subset of the module doc."""
    speeches = [s for s in text.strip("\n").split("\n\n") if s.strip()]
    order = list(range(len(speeches)))
    random.Random(seed).shuffle(order)
    kept, total = [], 0
    for i in order:
        size = len(speeches[i].encode("utf-8")) + 2
        if total + size <= max_bytes:
            kept.append(i)
            total += size
    return "\n\n".join(speeches[i] for i in sorted(kept)) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--source", required=True, help="tiny Shakespeare's input.txt")
    parser.add_argument("--dest", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "tinyshakespeare",
                                                       "input.txt"))
    parser.add_argument("--max_bytes", type=int, default=180_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with open(args.source, "rb") as f:
        raw = f.read()
    out = subset(raw.decode("utf-8"), args.max_bytes, args.seed).encode("utf-8")
    tmp = args.dest + ".tmp"
    with open(tmp, "wb") as f:
        f.write(out)
    os.replace(tmp, args.dest)
    print(f"source  {len(raw):>9,} bytes  sha256 {sha256(raw)}")
    print(f"subset  {len(out):>9,} bytes  sha256 {sha256(out)}  -> {args.dest}")


if __name__ == "__main__":
    main()
