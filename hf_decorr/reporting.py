"""Metric tables: mean ± std aggregation, Markdown and JSON writers, atomic output folders.

Nothing here knows about a particular experiment: a *record* is a flat ``dict`` of one run
(settings such as ``penalty`` or ``weight`` and metrics such as ``mse`` or ``tdv``), and the
helpers group, aggregate and print lists of them.

* :func:`mean_std`: ``mean = Σx/n`` and the sample standard deviation
  ``std = √(Σ(x − mean)² / (n − 1))`` (0 for a single value). A non-finite value makes both
  NaN: a diverged run is reported, never averaged away.
* :func:`aggregate`: one row per group of records with ``<metric>_mean``, ``<metric>_std``
  and ``n``.
* :func:`markdown_table`, :func:`format_mean_std`: GitHub-flavoured Markdown.
* :func:`write_json`, :func:`write_text`: atomic writes (a temporary file in the same folder,
  then ``os.replace``), so a file is complete or absent. Non-finite floats become ``null`` in
  JSON (strict JSON has no NaN).
* :func:`staged_directory`: build a whole output folder under a temporary name and rename it
  into place only when everything was written.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from .atomic import staged_directory, write_text_atomic

__all__ = [
    "mean_std",
    "aggregate",
    "format_value",
    "format_mean_std",
    "markdown_table",
    "to_jsonable",
    "write_json",
    "write_text",
    "staged_directory",
]

Column = str | tuple[str, str]
Formatter = str | Callable[[Any], str]


def _as_float(value: Any) -> float:
    if hasattr(value, "item"):
        value = value.item()
    return float(value)


def mean_std(values: Iterable[Any]) -> tuple[float, float, int]:
    """``(mean, sample std (ddof=1), n)`` of ``values``; NaN, NaN if any value is not finite.

    ``n = 0`` gives ``(nan, nan, 0)``; ``n = 1`` gives a standard deviation of 0.
    """
    xs = [_as_float(v) for v in values]
    n = len(xs)
    if n == 0 or not all(math.isfinite(x) for x in xs):
        return math.nan, math.nan, n
    mean = math.fsum(xs) / n
    if n == 1:
        return mean, 0.0, 1
    var = math.fsum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, math.sqrt(var), n


def aggregate(records: Sequence[Mapping[str, Any]], by: Sequence[str], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Group ``records`` by the values of the keys ``by`` (in order of first appearance).

    Each output row holds the ``by`` keys, ``<metric>_mean`` and ``<metric>_std`` for every
    name in ``metrics`` (see :func:`mean_std`) and ``n``, the number of records in the group.
    A record that lacks a metric raises ``KeyError`` naming it.
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for record in records:
        missing = [key for key in by if key not in record]
        if missing:
            raise KeyError(f"record {dict(record)!r} lacks the grouping key(s) {missing}")
        groups.setdefault(tuple(record[key] for key in by), []).append(record)
    rows = []
    for key, members in groups.items():
        row: dict[str, Any] = dict(zip(by, key))
        for metric in metrics:
            try:
                values = [member[metric] for member in members]
            except KeyError:
                raise KeyError(f"a record of group {dict(zip(by, key))} lacks the metric {metric!r}") from None
            row[f"{metric}_mean"], row[f"{metric}_std"], _ = mean_std(values)
        row["n"] = len(members)
        rows.append(row)
    return rows


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
    whose rows hold ``m_mean`` and ``m_std`` (as :func:`aggregate` writes) but no ``m`` is
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


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented, strict JSON (see :func:`to_jsonable`) atomically; returns the path."""
    return write_text_atomic(path, json.dumps(to_jsonable(obj), indent=2, allow_nan=False) + "\n")


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) atomically; returns the path."""
    return write_text_atomic(path, text)
