"""``hf-decorr quantize MODEL [MODEL ...] --data FILE``: accuracy with low-precision block outputs.

For a sequence classifier: its accuracy on the data as it is, then with the output of every chosen
layer (``--layers``, default every block) fake-quantized by
[`hf_decorr.quantization.fake_quantize()`][hf_decorr.fake_quantize]
for each ``--bits`` (default 8 and 4) and ``--granularity`` (default ``tensor`` and ``token``):
symmetric, dynamic, ``h' = clamp(round(h / s), −Q, Q) · s`` with ``Q = 2^(bits−1) − 1`` and
``s = max|h| / Q`` over the whole output tensor of a batch or over each token's units. The rest of
the model runs in full precision. Writes ``quantize.md`` / ``quantize.json``.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from ...analysis import classifier_accuracy, quantized_outputs
from ...atomic import staged_directory, write_text_atomic
from ...quantization import GRANULARITIES
from ..outputs import write_json_atomic
from ..parser import RecipeError
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
    tokenizers_for,
)

__all__ = ["add_arguments", "run", "QUANTIZE_NAME"]

QUANTIZE_NAME = "quantize.json"


def _bits(value: str) -> int:
    try:
        bits = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"bits={value!r} must be an integer from 2 to 16") from None
    if not 2 <= bits <= 16:
        raise argparse.ArgumentTypeError(f"bits={bits} must be an integer from 2 to 16")
    return bits


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("models", metavar="MODEL", nargs="+",
                        help="one or more fine-tuned sequence classifiers (folder, Hub id)")
    add_data_arguments(parser, labels=True)
    parser.add_argument("--layers", nargs="+", default=["all"], metavar="SPEC",
                        help="layers whose outputs are quantized, as decorr_layers (default: all blocks)")
    parser.add_argument("--bits", nargs="+", type=_bits, default=[8, 4], metavar="B",
                        help="integer widths to try (default: 8 4)")
    parser.add_argument("--granularity", nargs="+", choices=list(GRANULARITIES), default=list(GRANULARITIES),
                        help="one scale per output tensor, or per token (default: both)")
    add_run_arguments(parser, pooling_default=None)
    add_tokenizer_argument(parser, several=True)
    parser.add_argument("--names", nargs="+", metavar="NAME", help="labels of the models (default: folder names)")
    parser.add_argument("--output_dir", required=True, help="folder for quantize.md and quantize.json")


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    started = time.perf_counter()
    check_command_output(args.output_dir, QUANTIZE_NAME)
    if args.names and len(args.names) != len(args.models):
        raise RecipeError(f"--names gives {len(args.names)} names for {len(args.models)} models")
    names = args.names or [short_name(m) for m in args.models]
    tokenizers = tokenizers_for(args.tokenizer, len(args.models))
    with quiet_transformers():
        loaded = [load_model(spec, "MODEL", args.device, sequence_classifier=True, tokenizer=tokenizer)
                  for spec, tokenizer in zip(args.models, tokenizers)]
    rows, text_column = load_texts(args, label_column=args.label_column)
    widths = sorted(set(args.bits), reverse=True)
    settings = [(bits, granularity) for bits in widths for granularity in args.granularity]
    runs = []
    for name, model in zip(names, loaded):
        layers = resolve_model_layers(model, args.layers, option="--layers")
        modules = dict(model.model.named_modules())
        labels = labels_of(rows, args.label_column, model.model)
        batches = model_batches(model, rows[text_column], args)
        accuracy = {"full": classifier_accuracy(model.model, batches, labels)}
        for bits, granularity in settings:
            with quantized_outputs([modules[layer] for layer in layers], bits, granularity):
                accuracy[f"int{bits}/{granularity}"] = classifier_accuracy(model.model, batches, labels)
        runs.append({"name": name, "model": model.spec, "layers": layers, "accuracy": accuracy})
    report = {"command": command, "texts": len(rows), "bits": widths,
              "granularity": list(args.granularity), "runs": runs,
              "data": args.data or f"{args.dataset_name}:{args.dataset_config or ''}:{args.split}"}
    with staged_directory(args.output_dir) as tmp:
        report["runtime_s"] = round(time.perf_counter() - started, 2)
        write_text_atomic(os.path.join(tmp, "quantize.md"), quantize_markdown(report))
        write_json_atomic(os.path.join(tmp, QUANTIZE_NAME), report)
    return report


def quantize_markdown(report: dict[str, Any]) -> str:
    """The report as a Markdown table: one row per model, one column per setting."""
    keys = list(report["runs"][0]["accuracy"]) if report["runs"] else ["full"]
    lines = [
        f"# {PROG} quantize",
        "",
        f"Data: `{report['data']}` ({report['texts']} texts). Command: `{report['command']}`",
        "",
        "| model | " + " | ".join("accuracy " + k for k in keys) + " |",
        "|---|" + "---|" * len(keys),
    ]
    for r in report["runs"]:
        lines.append(f"| {r['name']} | " + " | ".join(f"{r['accuracy'][k]:.4f}" for k in keys) + " |")
    lines += ["", "intB/tensor: the output of each quantized layer is rounded to symmetric B-bit integers with one "
              "scale, max|h| / (2^(B−1) − 1), over the batch's whole output tensor; intB/token: one scale per token "
              "(over its units). Quantized layers: " + "; ".join(f"{r['name']}: {', '.join(r['layers'])}"
                                                                 for r in report["runs"]) + "."]
    return "\n".join(lines) + "\n"
