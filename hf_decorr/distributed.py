"""The penalty over the samples of all processes, with correct gradients (pure PyTorch).

Under data parallelism each process holds a shard ``H_r`` of the batch. ``decorr_sync="global"``
computes the covariance of the concatenated batch on every process, through collectives whose
backward passes route gradients back to the shard that produced them:

* **statistics** (the default for token samples): every process computes its count ``n_r``,
  mean ``μ_r`` and centred scatter ``M_r = Σ_k m_k (h_k − μ_r)(h_k − μ_r)ᵀ``; an autograd
  all-reduce sums the ``M_r`` (``p²`` numbers) and an autograd all-gather collects the
  ``(n_r, μ_r)`` (``W·(p+1)`` numbers). The global covariance follows from the parallel
  (Chan et al.) combination

      n = Σ n_r,  μ = Σ n_r μ_r / n,  C = (Σ M_r + Σ n_r (μ_r − μ)(μ_r − μ)ᵀ) / (n − 1),

  which stays accurate in float32 because nothing is un-centred.
* **gather**: an autograd all-gather of the (padded) ``N × p`` samples, then the
  single-process penalty. It moves ``W·N·p`` numbers, fewer than ``p²`` when the samples are
  pooled sequences (``N`` = per-device batch) and ``W·N < p``.

Every process then holds the same global penalty ``P``. The collectives' backward sums the
incoming gradients over processes (``W · ∂P/∂H_r`` on process ``r``) and DDP's gradient
averaging divides by ``W``: the parameters get ``∂P/∂θ`` of the global loss. A plain
``all_gather`` without autograd, or re-inserting the local tensor into a gathered list, would
be off by the factor ``W``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.nn import functional as dist_fn

from .penalties import PENALTIES, _CentredGram, _prepare, decorrelation_penalty

__all__ = ["world_size", "global_penalty", "choose_strategy", "STRATEGIES", "all_reduce_sum"]

STRATEGIES = ("stats", "gather")
_CORRECTION = {"cov_l1": 1, "vicreg": 1, "decov": 0}


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def choose_strategy(width: int, rows_bound: int | None, world: int) -> str:
    """``gather`` when every process has at most ``rows_bound`` samples and ``W·rows_bound < p``.

    ``rows_bound`` must be the same on every process (the per-device batch size for pooled
    samples, ``None`` for token samples, whose count varies with the padding), so that all
    processes pick the same collective.
    """
    if rows_bound is not None and world * rows_bound < width:
        return "gather"
    return "stats"


def _stats_covariance(h: torch.Tensor, m: torch.Tensor, correction: int) -> torch.Tensor:
    """Global covariance ``(..., p, p)`` from local ``h (..., N, p)`` and mask ``m (..., N, 1)``."""
    n_local = m.sum(dim=-2)  # (..., 1)
    mean_local = h.sum(dim=-2) / n_local.clamp_min(1)  # (..., p)
    scatter = _CentredGram.apply(h, m, torch.ones_like(n_local).unsqueeze(-1))  # (..., p, p)
    scatter = dist_fn.all_reduce(scatter, op=dist.ReduceOp.SUM)
    counts = torch.stack(dist_fn.all_gather(n_local.contiguous()))  # (W, ..., 1)
    means = torch.stack(dist_fn.all_gather(mean_local.contiguous()))  # (W, ..., p)
    n = counts.sum(dim=0)
    mean = (counts * means).sum(dim=0) / n.clamp_min(1)
    dev = (means - mean) * counts.sqrt()
    between = torch.einsum("w...i,w...j->...ij", dev, dev)
    return (scatter + between) / (n - correction).clamp_min(1).unsqueeze(-1)


def global_penalty(
    h: torch.Tensor, mask: torch.Tensor | None, kind: str, strategy: str = "stats", rows_bound: int | None = None
) -> torch.Tensor:
    """The penalty ``kind`` over the samples of every process; same shape as the local one.

    ``h``: ``(..., N, p)`` local samples; ``mask``: ``(..., N)`` or ``(N,)``. With one process
    this is the local penalty. ``strategy="gather"`` needs ``rows_bound >= N`` (same on all ranks).
    """
    if kind not in PENALTIES:
        raise ValueError(f"decorr_penalty={kind!r} is not a known penalty; choose one of {sorted(PENALTIES)}")
    if world_size() == 1:
        return decorrelation_penalty(h, mask, kind)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if strategy == "gather":
        if rows_bound is None or h.shape[-2] > rows_bound:
            raise ValueError(f"gather needs rows_bound >= N on every process, got {rows_bound} for N={h.shape[-2]}")
        pad = rows_bound - h.shape[-2]
        m = torch.ones(h.shape[:-1], dtype=torch.bool, device=h.device) if mask is None else mask.bool()
        m = m.expand(h.shape[:-1])
        if pad:
            h = torch.cat([h, h.new_zeros(*h.shape[:-2], pad, h.shape[-1])], dim=-2)
            m = torch.cat([m, m.new_zeros(*m.shape[:-1], pad)], dim=-1)
        h_all = torch.cat(dist_fn.all_gather(h.contiguous()), dim=-2)
        m_all = [torch.empty_like(m) for _ in range(world_size())]
        dist.all_gather(m_all, m.contiguous())
        return decorrelation_penalty(h_all, torch.cat(m_all, dim=-1), kind)
    with torch.autocast(device_type=h.device.type, enabled=False):
        h, m = _prepare(h, mask)
        if kind == "l1":
            totals = torch.stack([h.abs().sum(dim=(-2, -1)), m.sum(dim=(-2, -1)) * h.shape[-1]])
            totals = dist_fn.all_reduce(totals, op=dist.ReduceOp.SUM)
            return totals[0] / totals[1].clamp_min(1)
        cov = _stats_covariance(h, m, _CORRECTION[kind])
        p = cov.shape[-1]
        if kind == "cov_l1":
            return cov.abs().sum(dim=(-2, -1)) / (p * p)
        off = cov.square().sum(dim=(-2, -1)) - torch.diagonal(cov, dim1=-2, dim2=-1).square().sum(dim=-1)
        return 0.5 * off if kind == "decov" else off / p


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a (non-differentiable) tensor over processes; identity with one process."""
    if world_size() == 1:
        return tensor
    tensor = tensor.clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor

