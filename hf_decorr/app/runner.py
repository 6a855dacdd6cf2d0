"""The recipes' shared main loop: push settings, the baseline and penalised runs, the comparison files, the push.

* :func:`take_push_settings`: the recipes push once, after the local output is complete.
* :func:`run_baseline_and_penalty`: train without (λ = 0) and with the penalty from the same seed.
* :func:`write_comparison`: ``comparison.json`` and ``comparison.md``, complete or absent.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

from .outputs import write_json_atomic, write_text_atomic
from .parser import RecipeError

__all__ = ["take_push_settings", "run_baseline_and_penalty", "write_comparison"]


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
