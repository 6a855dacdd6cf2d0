"""The evaluation statistics behind ``eval_decorr_*``: float64 sums over the whole evaluation set.

During an evaluation the trainer records every penalised layer's samples of every forward call
(`hf_decorr.samples`) and adds them to one [`CovarianceAccumulator`][hf_decorr.CovarianceAccumulator]
per layer (`add_eval_samples()`); at the end the accumulators are summed over processes and
turned into the paper's metrics per layer and their mean (`metrics_from_statistics()`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from transformers.trainer_pt_utils import find_batch_size

from .distributed import real_samples_in_batch, sum_accumulators
from .metrics import METRIC_NAMES, CovarianceAccumulator, decorrelation_metrics

__all__ = ["padded_batch_rows", "add_eval_samples", "metrics_from_statistics"]

Warn = Callable[[str, str], None]


def padded_batch_rows(accelerator: Any, inputs: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """``(keep, batch)``: how many of this evaluation batch's examples are real, or ``(None, None)``.

    With several processes and ``even_batches``, accelerate completes the last batch with samples from
    the start of the set, and ``gather_for_metrics`` keeps the first ``remainder`` samples of the
    rank-major concatenation. Keeping the same samples here counts every sample once.
    """
    state = accelerator.gradient_state
    if accelerator.num_processes > 1 and accelerator.even_batches and state.end_of_dataloader:
        batch = find_batch_size(inputs)
        if batch and state.remainder > 0:
            return real_samples_in_batch(state.remainder, accelerator.process_index, batch), batch
    return None, None


def add_eval_samples(stats: dict[str, CovarianceAccumulator], parts_by_layer, keep: int | None,
                     batch: int | None, warn: Warn) -> None:
    """Add every call's samples of each layer (``call_samples``' result) to the layer's one accumulator.

    ``keep`` of ``batch`` examples are real (see `padded_batch_rows()`); rows are example-major, so
    row ``k`` belongs to example ``k // (rows / batch)``.
    """
    for name, parts in parts_by_layer.items():
        for x, mask, _ in parts:
            if keep is not None and batch is not None and keep < batch:
                rows = x.shape[0]
                if rows % batch:
                    warn(f"eval-dup-{name}",
                         f"decorr: cannot tell which of the {rows} samples of {name!r} belong to which of the {batch} "
                         "examples of the padded last evaluation batch; its duplicated examples are counted")
                else:
                    real = torch.arange(rows, device=x.device) < keep * (rows // batch)
                    mask = real if mask is None else mask.to(torch.bool) & real
            stats.setdefault(name, CovarianceAccumulator()).update(x, mask)


def metrics_from_statistics(
    stats: Mapping[str, CovarianceAccumulator], layer_names: Sequence[str], device: torch.device, *, prefix: str,
    top_d: int, variance_share: float, per_layer: bool, warn: Warn,
) -> tuple[dict[str, float], dict[str, torch.Tensor]]:
    """Sum the statistics over processes, then the paper's metrics per layer and their mean.

    Returns ``({f"{prefix}_{metric}": mean over layers, f"{prefix}_{metric}/{layer}": …}, covariances)``,
    the covariances ``(p, p)`` float64 on the CPU. Every process must call this (collectives with several);
    a layer without any sample gets NaN metrics (0 samples and live units), never a perfect score.
    """
    stats = sum_accumulators(dict(stats), list(layer_names), device)
    covariances = {name: stats[name].covariance().cpu() for name in layer_names
                   if stats.get(name) is not None and not stats[name].empty}
    by_layer: dict[str, dict[str, float]] = {}
    for name in layer_names:
        acc = stats.get(name)
        if acc is None or acc.empty:
            warn(f"eval-empty-{name}",
                 f"decorr: no evaluation sample reached {name!r}, so its {prefix}_* metrics are NaN (an evaluation "
                 "without an evaluation dataset, e.g. one done by evaluators alone, runs no prediction step)")
            by_layer[name] = {key: 0.0 if key in ("live_units", "samples") else math.nan for key in METRIC_NAMES}
            continue
        by_layer[name] = decorrelation_metrics(acc.covariance(), top_d=top_d, variance_share=variance_share,
                                               samples=float(acc.statistics()[0]))
    out: dict[str, float] = {}
    if not by_layer:
        return out, covariances
    for key in next(iter(by_layer.values())):
        out[f"{prefix}_{key}"] = sum(m[key] for m in by_layer.values()) / len(by_layer)
    if per_layer and len(by_layer) > 1:
        for name, metrics in by_layer.items():
            out.update({f"{prefix}_{key}/{name}": value for key, value in metrics.items()})
    return out, covariances
