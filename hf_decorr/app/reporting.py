"""Metric tables for recipes: mean ± std aggregation, Markdown and JSON values, the baseline-vs-penalty comparison.

Nothing here knows about a particular experiment: a *record* is a flat ``dict`` of one run
(settings such as ``penalty`` or ``weight`` and metrics such as ``mse`` or ``tdv``), and the
helpers group, aggregate and print lists of them.

* `mean_std()`, `aggregate()` (from `hf_decorr.metrics`): ``mean = Σx/n`` and the
  sample standard deviation ``std = √(Σ(x − mean)² / (n − 1))`` (0 for a single value; NaN when
  a value is not finite), one row per group of records with ``<metric>_mean``, ``<metric>_std``
  and ``n``.
* `markdown_table()`, `format_mean_std()`: GitHub-flavoured Markdown.
* `to_jsonable()`: strict-JSON values (non-finite floats become ``null``); the files are
  written by `hf_decorr.app.outputs.write_json_atomic()` and `hf_decorr.atomic.write_text_atomic()`.
* `layer_metrics()`, `comparison_markdown()`, `log_series()` and
  `redacted_command()` build the recipes' comparison tables (baseline vs penalty).
"""

from __future__ import annotations

import math
import shlex
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from ..metrics import aggregate, mean_std

__all__ = [
    "mean_std",
    "aggregate",
    "format_value",
    "format_mean_std",
    "markdown_table",
    "to_jsonable",
    "layer_metrics",
    "log_series",
    "redacted_command",
    "comparison_markdown",
    "LAYER_COLUMNS",
]

Column = str | tuple[str, str]
Formatter = str | Callable[[Any], str]


def _as_float(value: Any) -> float:
    if hasattr(value, "item"):
        value = value.item()
    return float(value)


def format_value(value: Any, fmt: Formatter = ".4g") -> str:
    """``value`` formatted with ``fmt`` (a format spec or a callable); ``None`` → ``—``."""
    if value is None:
        return "—"
    if callable(fmt):
        return fmt(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not hasattr(value, "item"):
        return str(value)
    value = _as_float(value) if not isinstance(value, int) else value
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")
    return format(value, fmt)


def format_mean_std(mean: Any, std: Any, fmt: str = ".4g") -> str:
    """``"mean ± std"`` with both numbers formatted by ``fmt``."""
    return f"{format_value(mean, fmt)} ± {format_value(std, fmt)}"


def markdown_table(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[Column],
    formats: Mapping[str, Formatter] | None = None,
    default_format: Formatter = ".4g",
) -> str:
    """A GitHub-flavoured Markdown table of ``rows``.

    ``columns`` lists the keys to show, each a key or a ``(key, header)`` pair. A key ``m``
    whose rows hold ``m_mean`` and ``m_std`` (as `aggregate()` writes) but no ``m`` is
    printed as ``mean ± std``. ``formats`` maps a key to a format spec or a callable.
    Pipes in cells are escaped.
    """
    formats = dict(formats or {})
    spec = [(c, c) if isinstance(c, str) else (c[0], c[1]) for c in columns]

    def cell(row: Mapping[str, Any], key: str) -> str:
        fmt = formats.get(key, default_format)
        if key in row:
            text = format_value(row[key], fmt)
        elif f"{key}_mean" in row and f"{key}_std" in row:
            if callable(fmt):
                text = f"{fmt(row[f'{key}_mean'])} ± {fmt(row[f'{key}_std'])}"
            else:
                text = format_mean_std(row[f"{key}_mean"], row[f"{key}_std"], fmt)
        else:
            text = "—"
        return text.replace("|", "\\|")

    lines = [
        "| " + " | ".join(header.replace("|", "\\|") for _, header in spec) + " |",
        "|" + "|".join("---" for _ in spec) + "|",
    ]
    lines += ["| " + " | ".join(cell(row, key) for key, _ in spec) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def to_jsonable(obj: Any) -> Any:
    """``obj`` with tensors / NumPy values turned into Python numbers and lists, non-finite floats into ``None``."""
    if isinstance(obj, Mapping):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return to_jsonable(obj.tolist())
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def redacted_command(program: str, argv: Sequence[str]) -> str:
    """``python <program> <argv>`` as a shell line, with the value of any ``--*token*`` option hidden."""
    shown: list[str] = []
    hide_next = False
    for item in argv:
        if hide_next:
            shown.append("<redacted>")
            hide_next = False
        elif item.startswith("--") and "token" in item.lower():
            if "=" in item:
                shown.append(item.split("=", 1)[0] + "=<redacted>")
            else:
                shown.append(item)
                hide_next = True
        else:
            shown.append(item)
    return " ".join(["python", shlex.quote(program), *(shlex.quote(a) for a in shown)])


def log_series(log_history: Sequence[dict], key: str) -> list[float]:
    """The values of ``key`` in a Trainer's training logs (``trainer.state.log_history``), in order."""
    return [entry[key] for entry in log_history if key in entry and not any(k.startswith("eval_") for k in entry)]


def layer_metrics(metrics: dict[str, float], layer_names: Sequence[str], prefix: str = "eval") -> dict[str, dict]:
    """``{layer: {metric: value}}`` from a Trainer's ``<prefix>_decorr_<metric>[/<layer>]`` keys.

    With a single penalised layer only the mean keys exist; they are that layer's.
    """
    out: dict[str, dict] = {}
    start = f"{prefix}_decorr_"
    for key, value in metrics.items():
        if key.startswith(start):
            metric, _, layer = key[len(start):].partition("/")
            if layer:
                out.setdefault(layer, {})[metric] = value
    if not out and len(layer_names) == 1:
        out[layer_names[0]] = {
            key[len(start):]: value for key, value in metrics.items() if key.startswith(start) and "/" not in key
        }
    return out


def _short_layer(layer: str) -> str:
    parts = layer.split(".")
    return ".".join(parts[-2:]) if len(parts) >= 2 else layer


def _cell(value: Any, digits: int) -> str:
    if value is None:
        return "–"
    if isinstance(value, float) and not math.isfinite(value):
        return "nan"
    if isinstance(value, (int, float)):
        return f"{value:.{digits}f}"
    return str(value)


LAYER_COLUMNS = (("mapc", "MAPC", 4), ("cvr", "CVR", 2), ("ud", "UD_90%", 0))


def comparison_markdown(rows: Sequence[dict], task_columns: Sequence[tuple[str, str, int]], note: str = "") -> str:
    """A Markdown table with one row per run.

    Each row is a dict with ``run``, ``decorr_weight``, the keys of ``task_columns``
    (``(key, header, decimals)``), ``layers`` (``{layer: {"mapc", "cvr", "ud"}}``, see
    `layer_metrics()`), ``decorr_loss_first`` / ``decorr_loss_last`` (the logged penalty)
    and ``train_runtime`` (seconds). Columns whose values are all missing are left out.
    """
    layers = list(dict.fromkeys(layer for row in rows for layer in row.get("layers", {})))
    task_columns = [c for c in task_columns if any(row.get(c[0]) is not None for row in rows)]
    header = ["run", "λ", *(c[1] for c in task_columns)]
    header += [f"{label} {_short_layer(layer)}" for _, label, _ in LAYER_COLUMNS for layer in layers]
    header += ["L_Σ train (first → last log)", "train time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [str(row["run"]), _cell(row.get("decorr_weight"), 3)]
        cells += [_cell(row.get(key), digits) for key, _, digits in task_columns]
        for metric, _, digits in LAYER_COLUMNS:
            cells += [_cell(row.get("layers", {}).get(layer, {}).get(metric), digits) for layer in layers]
        first, last = row.get("decorr_loss_first"), row.get("decorr_loss_last")
        cells.append(f"{first:.4g} → {last:.4g}" if first is not None and last is not None else "–")
        cells.append(_cell(row.get("train_runtime"), 1))
        lines.append("| " + " | ".join(cells) + " |")
    footer = [
        "",
        "MAPC: mean absolute Pearson correlation between the units of a layer; CVR: ‖C‖₁ / tr C (1 = no "
        "covariance between units); UD_90%: units (ranked by variance) that hold 90% of the variance; all over "
        "every sample of the evaluation set. L_Σ: the penalty before λ, as logged during training.",
        "Layers: " + ", ".join(f"`{layer}`" for layer in layers) + ".",
    ]
    if note:
        footer.append(note)
    return "\n".join(lines + footer) + "\n"
