"""``hf-decorr ablate MODEL [MODEL ...] --data FILE --layer L``: what UD_90% means for the task.

For a sequence classifier and one layer ``L``: first one pass over the data gives the float64
mean ``μ`` and variance of each unit of ``L`` (over the samples of ``--pooling``, by default
every non-padding token) and the model's accuracy. Then, for each ``k`` of a grid, a forward
hook on ``L`` keeps the ``k`` units of largest variance and replaces every other unit by its
mean, at every position::

    h'_j = h_j  if j ∈ top-k(variance)   else  μ_j

and the accuracy on the same data is measured. The grid is ``--k`` or, by default, the powers
of two below the layer width, the width itself, and each model's UD_90% of ``L``.

Writes ``ablation.md`` / ``ablation.json`` (accuracy per ``k`` and model) and ``ablation.png``
(accuracy against ``k``, with each model's UD_90% marked). Several models are ablated on the
same grid (e.g. a baseline and its penalised twin).
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Sequence
from typing import Any

import torch

from ...analysis import classifier_accuracy, replace_units
from ...atomic import staged_directory, write_text_atomic
from ...metrics import CovarianceAccumulator
from ..outputs import write_json_atomic
from ..parser import RecipeError
from .common import LayerSamples, metrics_row
from .loading import (
    labels_of,
    load_model,
    load_texts,
    model_batches,
    quiet_transformers,
    resolve_model_layers,
    short_name,
)
from .options import (
    PROG,
    add_data_arguments,
    add_run_arguments,
    add_tokenizer_argument,
    check_command_output,
    check_figures,
    tokenizers_for,
)

__all__ = ["add_arguments", "run", "ABLATION_NAME"]

ABLATION_NAME = "ablation.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", metavar="MODEL", nargs="+",
                        help="one or more fine-tuned sequence classifiers (folder, Hub id)")
    add_data_arguments(parser, labels=True)
    parser.add_argument("--layer", required=True, help="the layer to ablate: an index into the blocks ('-1', '3') or "
                        "a module name; must match exactly one module")
    parser.add_argument("--k", nargs="+", type=int, metavar="K", help="units to keep (default: 1, 2, 4, … below the "
                        "width, the width, and each model's UD_90%%)")
    add_run_arguments(parser)
    add_tokenizer_argument(parser, several=True)
    parser.add_argument("--names", nargs="+", metavar="NAME", help="labels of the models (default: folder names)")
    parser.add_argument("--output_dir", required=True, help="folder for ablation.md, ablation.json, ablation.png")
    parser.add_argument("--no_figures", action="store_true", help="write the tables only (no matplotlib needed)")


def default_grid(width: int, extra: Sequence[int]) -> list[int]:
    """``1, 2, 4, …`` below ``width``, ``width``, and ``extra`` (each clipped to ``1..width``)."""
    grid = {width}
    k = 1
    while k < width:
        grid.add(k)
        k *= 2
    grid.update(min(max(1, int(e)), width) for e in extra)
    return sorted(grid)


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    started = time.perf_counter()
    check_command_output(args.output_dir, ABLATION_NAME)
    figures = check_figures(args.no_figures)
    if args.names and len(args.names) != len(args.models):
        raise RecipeError(f"--names gives {len(args.names)} names for {len(args.models)} models")
    if args.k is not None and any(k < 1 for k in args.k):
        raise RecipeError(f"--k values must be >= 1, got {args.k}")
    names = args.names or [short_name(m) for m in args.models]
    if len(set(names)) != len(names):
        names = [f"{i}: {n}" for i, n in enumerate(names)]
    tokenizers = tokenizers_for(args.tokenizer, len(args.models))
    with quiet_transformers():
        loaded = [load_model(spec, "MODEL", args.device, sequence_classifier=True, tokenizer=tokenizer)
                  for spec, tokenizer in zip(args.models, tokenizers)]
    layers = []
    for model in loaded:
        found = resolve_model_layers(model, [args.layer], option="--layer")
        if len(found) != 1:
            raise RecipeError(f"--layer {args.layer!r} matches {len(found)} modules of {model.spec!r} "
                              f"({', '.join(found[:5])}{', …' if len(found) > 5 else ''}); give exactly one")
        layers.append(found[0])
    rows, text_column = load_texts(args, label_column=args.label_column)
    texts = rows[text_column]

    runs = []
    for name, model, layer in zip(names, loaded, layers):
        labels = labels_of(rows, args.label_column, model.model)
        batches = model_batches(model, texts, args)
        acc = CovarianceAccumulator()
        correct = 0
        with LayerSamples(model.model, [layer], args.pooling) as capture:
            for batch_rows, inputs in batches:
                samples, output = capture.samples(inputs)
                acc.update(samples[layer])
                correct += int((output.logits.argmax(dim=-1).cpu() == labels[batch_rows]).sum())
        if acc.empty or float(acc.statistics()[0]) < 2:
            raise RecipeError(f"layer {layer!r} got fewer than 2 samples")
        metrics = metrics_row(acc)
        variance = torch.diagonal(acc.covariance()).cpu()
        count, total, _ = acc.statistics()
        mean = (total / count).cpu()
        runs.append({"name": name, "model": model.spec, "layer": layer, "width": int(variance.numel()),
                     "ud": int(metrics["ud"]), "mapc": metrics["mapc"], "full_accuracy": correct / len(labels),
                     "_order": torch.argsort(-variance, stable=True), "_mean": mean, "_batches": batches,
                     "_labels": labels, "_model": model.model, "_module": dict(model.model.named_modules())[layer]})
    width = max(r["width"] for r in runs)
    grid = sorted(set(args.k)) if args.k else default_grid(width, [r["ud"] for r in runs])
    for r in runs:
        r["accuracy"] = {}
        for k in grid:
            if k >= r["width"]:
                r["accuracy"][k] = r["full_accuracy"]
                continue
            keep = torch.zeros(r["width"], dtype=torch.bool)
            keep[r["_order"][:k]] = True
            handle = r["_module"].register_forward_hook(
                lambda module, inputs, output, keep=keep, mean=r["_mean"]: replace_units(output, keep, mean))
            try:
                r["accuracy"][k] = classifier_accuracy(r["_model"], r["_batches"], r["_labels"])
            finally:
                handle.remove()
    public = [{k: v for k, v in r.items() if not k.startswith("_")} for r in runs]
    report = {"command": command, "layer": args.layer, "pooling": args.pooling, "grid": grid, "texts": len(rows),
              "data": args.data or f"{args.dataset_name}:{args.dataset_config or ''}:{args.split}", "runs": public,
              "figures": []}
    with staged_directory(args.output_dir) as tmp:
        if figures:
            _figure(os.path.join(tmp, "ablation.png"), public, grid, args.layer)
            report["figures"] = ["ablation.png"]
        report["runtime_s"] = round(time.perf_counter() - started, 2)
        write_text_atomic(os.path.join(tmp, "ablation.md"), ablation_markdown(report))
        write_json_atomic(os.path.join(tmp, ABLATION_NAME), report)
    return report


def ablation_markdown(report: dict[str, Any]) -> str:
    runs = report["runs"]
    header = ["k (units kept)", *(f"accuracy {r['name']}" for r in runs)]
    lines = [
        f"# {PROG} ablate: layer {report['layer']}",
        "",
        f"Data: `{report['data']}` ({report['texts']} texts); unit variances and means over `{report['pooling']}` "
        f"samples. Command: `{report['command']}`",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for k in report["grid"]:
        cells = [str(k)]
        for r in runs:
            mark = " (UD_90%)" if k == r["ud"] else (" (all)" if k >= r["width"] else "")
            cells.append(f"{r['accuracy'][k]:.4f}{mark}")
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    for r in runs:
        within = [k for k in report["grid"] if r["accuracy"][k] >= r["full_accuracy"] - 0.01]
        lines.append(f"- {r['name']} (`{r['model']}`, layer `{r['layer']}`, {r['width']} units): accuracy "
                     f"{r['full_accuracy']:.4f} with every unit; UD_90% = {r['ud']}; MAPC {r['mapc']:.4f}; smallest "
                     f"k of the grid within 1 point of full accuracy: {min(within) if within else '–'}.")
    lines += ["", "The units of the layer not kept (those of smallest variance) are replaced by their mean over the "
              "data, at every position."]
    if report.get("figures"):
        lines += ["", "![ablation](ablation.png)"]
    return "\n".join(lines) + "\n"


def _figure(path: str, runs: list[dict], grid: list[int], layer: str) -> None:
    from ... import plotting

    fig, axes = plotting.new_figure(1, 1, panel_size=(5.0, 3.4))
    ax = axes[0, 0]
    for i, r in enumerate(runs):
        color = f"C{i}"
        ax.plot(grid, [r["accuracy"][k] for k in grid], marker="o", markersize=3.5, color=color,
                label=f"{r['name']} (UD_90% {r['ud']})")
        ax.axvline(r["ud"], color=color, linestyle=":", linewidth=1)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("units kept (largest variance first)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"ablation of layer {layer}")
    ax.legend(fontsize=7)
    plotting.save_figure(fig, path)
