"""The penalty over the samples of all processes, with correct gradients (pure PyTorch).

Under data parallelism with ``W`` processes, process ``r`` holds a shard ``H_r`` (``N_r × p``,
with a 0/1 row mask) of the batch. ``decorr_sync="global"`` computes, on every process, the
penalty ``P`` of the concatenated batch ``H = [H_1; …; H_W]`` through collectives whose backward
routes the gradient back to the shard that produced it. Two strategies give the same ``P``:

* ``"stats"`` (token samples, wide layers): process ``r`` computes its count ``n_r``, mean
  ``μ_r`` and centred scatter ``M_r = Σ_k m_k (h_k − μ_r)(h_k − μ_r)ᵀ`` (``p × p``); one
  all-reduce sums the ``M_r`` and one all-gather collects the ``(n_r, μ_r)``. Chan et al.'s
  parallel combination gives the covariance of the whole batch,

      n = Σ n_r,   μ = Σ n_r μ_r / n,   C = (Σ M_r + Σ n_r (μ_r − μ)(μ_r − μ)ᵀ) / (n − c),

  (``c = 1``, or ``0`` for DeCov), accurate in float32 because nothing is un-centred.
  Per process it moves the ``p²`` scatter (ring all-reduce: ``2(W−1)/W · p²`` values sent and
  received) plus ``W(p+1)`` values.
* ``"gather"`` (pooled samples, ``W · rows_bound < p``): the rows, padded to ``rows_bound`` and
  with the mask as an extra column, are all-gathered (``(W−1) · rows_bound · (p+1)`` values
  received per process, in the activations' dtype) and the single-process penalty is applied.

Gradients. Every process ends with the same ``P``. The gradient of the sum over processes
of their (identical) losses with respect to ``H_r`` is ``W · ∂P/∂H_r``; DDP (and FSDP / ZeRO)
average the parameter gradients over processes, dividing by ``W``, so the parameters receive
exactly ``∂P/∂θ`` of the global penalty. The collectives' backward must therefore *sum* the
incoming gradients over processes. Because every process back-propagates the same function of
the collective's result, that sum is ``W ×`` the local incoming gradient, and the backward
needs no communication (``replicated_loss=True``, the trainer's case); ``replicated_loss=False``
performs the sum with one more collective, for callers whose loss differs between processes.
A plain ``all_gather`` without autograd, or re-inserting the local tensor into a gathered list,
gives gradients off by the factor ``W``.

Sufficient statistics of the evaluation set (`sum_accumulators()`) are summed over
processes in float64, so metrics do not depend on how the data was sharded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
import torch.distributed as dist

from .gram import GramFunction, default_chunk, lowmem_covariance, resolve_precision
from .metrics import CovarianceAccumulator
from .penalties import Penalty, decorrelation_penalty, get_penalty

__all__ = [
    "DEFAULT_BUCKET_BYTES",
    "STRATEGIES",
    "all_reduce_sum",
    "choose_strategy",
    "communication_volume",
    "global_covariance_penalties",
    "global_penalty",
    "global_penalty_with_count",
    "rank",
    "real_samples_in_batch",
    "sum_accumulators",
    "world_size",
]

STRATEGIES = ("stats", "gather")


def world_size() -> int:
    """Number of processes of the default process group; 1 when torch.distributed is not initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """Rank of this process in the default process group; 0 when torch.distributed is not initialised."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


# ---- autograd-aware collectives ------------------------------------------------------------------


class _SumOverRanks(torch.autograd.Function):
    """``y = Σ_r x_r`` on every process. Backward: ``∂/∂x_r = Σ_r' g_r'`` (the incoming gradients summed)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, replicated: bool) -> torch.Tensor:
        ctx.replicated = replicated
        y = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.replicated:  # every process holds the same g: Σ_r' g_r' = W g
            return grad * world_size(), None
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad, None


class _GatherOverRanks(torch.autograd.Function):
    """``y = stack_r x_r`` of shape ``(W, *x.shape)`` (equal shapes). Backward: ``∂/∂x_r = Σ_r' g_r'[r]``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, replicated: bool) -> torch.Tensor:
        ctx.replicated = replicated
        parts = [torch.empty_like(x, memory_format=torch.contiguous_format) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.stack(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.replicated:
            return grad[rank()] * world_size(), None
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[rank()], None


def _sum_over_ranks(x: torch.Tensor, replicated: bool) -> torch.Tensor:
    return _SumOverRanks.apply(x, replicated)


def _gather_over_ranks(x: torch.Tensor, replicated: bool) -> torch.Tensor:
    return _GatherOverRanks.apply(x, replicated)


# ---- strategy ----------------------------------------------------------------------------------


def choose_strategy(width: int, rows_bound: int | None, world: int) -> str:
    """``"gather"`` when every process has at most ``rows_bound`` samples and ``W · rows_bound < p``, else ``"stats"``.

    ``rows_bound`` must be the same on every process (the trainer passes the per-device batch
    size for pooled samples and ``None`` for token samples, whose count varies with the
    padding), so that all processes issue the same collectives. Per process, ``gather``
    receives ``(W−1)·rows_bound·(p+1)`` values and ``stats`` moves about ``2p²`` (see
    `communication_volume()`); ``W·rows_bound < p`` keeps ``gather`` under half of that
    with room for its larger redundant covariance (``W·rows_bound`` rows on every process).
    """
    if rows_bound is not None and world * rows_bound < width:
        return "gather"
    return "stats"


def communication_volume(strategy: str, width: int, rows: int, world: int, layers: int = 1) -> dict[str, float]:
    """Values one process sends and receives per training step for ``global`` sync (forward + backward).

    ``rows`` is the per-process sample count (``rows_bound`` for ``gather``). Ring all-reduce of
    ``n`` values: ``2(W−1)/W · n`` sent and as many received; all-gather of ``n`` values per
    process: ``(W−1) · n`` received, ``(W−1) · n`` sent. The backward moves nothing (see the
    module docstring). Returns ``{"sent": …, "received": …, "payload": …}`` in values
    (multiply by the bytes of the dtype: 4 for the float32 statistics; the activations' dtype
    for ``gather``); ``payload`` is the size of the tensors handed to the collectives.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    w, p = world, width
    if strategy == "stats":
        reduce = layers * p * p
        gather = layers * (p + 1)
        moved = 2 * (w - 1) / w * reduce + (w - 1) * gather
        return {"sent": moved, "received": moved, "payload": float(reduce + gather)}
    gather = layers * rows * (p + 1)
    return {"sent": float((w - 1) * gather), "received": float((w - 1) * gather), "payload": float(gather)}


# ---- the global penalty --------------------------------------------------------------------------


#: default size of one all-reduce bucket of the ``stats`` strategy (float32 scatter matrices of several layers)
DEFAULT_BUCKET_BYTES = 64 << 20


class _AsyncSumOverRanks(torch.autograd.Function):
    """Like `_SumOverRanks`, but the all-reduce is started asynchronously: the caller must call
    ``work[0].wait()`` (appended to the list ``work``) before reading the result. On NCCL the wait only makes
    the compute stream wait for the communication stream, so the Grams of the next bucket overlap with it."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, replicated: bool, work: list) -> torch.Tensor:
        ctx.replicated = replicated
        y = x.clone(memory_format=torch.contiguous_format)
        work.append(dist.all_reduce(y, op=dist.ReduceOp.SUM, async_op=True))
        return y

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.replicated:
            return grad * world_size(), None, None
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad, None, None


def _local_count_and_mean(h, m, index, chunk):
    """``n (...)`` (no gradient) and ``μ (..., p)`` (differentiable, float32/float64), summed by row chunks."""
    cdtype = torch.float64 if h.dtype == torch.float64 else torch.float32
    rows = h.shape[-2] if index is None else index.shape[0]
    total = None
    for start in range(0, rows, chunk):
        x = h[..., start : start + chunk, :] if index is None else h.index_select(-2, index[start : start + chunk])
        x = x.to(cdtype)
        if m is not None:
            x = torch.where(m[..., start : start + chunk].unsqueeze(-1), x, x.new_zeros(()))
        part = x.sum(dim=-2)
        total = part if total is None else total + part
    lead = h.shape[:-2]
    if total is None:
        total = torch.zeros(*lead, h.shape[-1], dtype=cdtype, device=h.device)
    total = total.expand(*lead, h.shape[-1])
    n = torch.full(lead, float(rows), dtype=cdtype, device=h.device) if m is None else \
        m.to(cdtype).sum(dim=-1).expand(lead)
    return n, total / n.clamp_min(1).unsqueeze(-1)


def global_covariance_penalties(
    items: Sequence[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]],
    kind: str | Penalty,
    *,
    chunk: int | None = None,
    precision: str = "fp32",
    bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    replicated_loss: bool = True,
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """A covariance penalty of each of several layers over the samples of every process (strategy ``stats``).

    ``items``: per layer ``(h (..., N, p), mask (..., K) | None, index (K,) | None)`` as in
    `lowmem_covariance()` (widths, ``N`` and ``K`` may differ between layers; the number of
    layers, their widths and order must be the same on every process). Collectives: one all-gather of every
    layer's ``(n_r, μ_r)`` and one all-reduce per bucket of float32 scatter matrices ``M_r`` (``4·p²`` bytes per
    layer, buckets of at most ``bucket_bytes``, one layer at least). A bucket's all-reduce is started
    asynchronously and finished after the next bucket's Grams are computed, so that computation and
    communication overlap; at most two buckets of scatter matrices are alive at once. Returns the per-layer
    penalties (shape ``(...)`` each) and global counts.
    """
    penalty = get_penalty(kind)
    if not penalty.of_covariance:
        raise ValueError(f"penalty {penalty.name!r} is not a function of the covariance")
    if world_size() == 1:
        local_values, local_counts = [], []
        for h, mask, index in items:
            cov, n = lowmem_covariance(h, mask, penalty.correction, index=index, chunk=chunk, precision=precision)
            local_values.append(penalty.fn(cov))
            local_counts.append(n)
        return local_values, local_counts
    prepared = []
    with torch.autocast(device_type=items[0][0].device.type, enabled=False):
        for h, mask, index in items:
            m = None if mask is None else mask.to(device=h.device, dtype=torch.bool)
            prepared.append((h, m, index, chunk or default_chunk(h.shape[-1])))
        stats = [_local_count_and_mean(h, m, index, c) for h, m, index, c in prepared]
        packed = torch.cat([torch.cat([n.detach().unsqueeze(-1), mean], dim=-1).reshape(-1) for n, mean in stats])
        gathered = _gather_over_ranks(packed, replicated_loss)  # (W, Σ (...)·(1 + p)): one all-gather
        buckets: list[list[int]] = []
        current: list[int] = []
        size = 0
        for i, (h, *_rest) in enumerate(prepared):
            layer_bytes = 4 * h.shape[-1] ** 2 * max(1, h[..., 0, 0].numel())
            if current and size + layer_bytes > bucket_bytes:
                buckets.append(current)
                current, size = [], 0
            current.append(i)
            size += layer_bytes
        if current:
            buckets.append(current)
        values: list[torch.Tensor | None] = [None] * len(items)
        counts: list[torch.Tensor | None] = [None] * len(items)
        offsets, offset = [], 0
        for n, mean in stats:
            offsets.append(offset)
            offset += n.numel() * (1 + mean.shape[-1])

        def finish(bucket, summed, work):
            work[0].wait()
            start = 0
            for i in bucket:
                h = prepared[i][0]
                lead, p = h.shape[:-2], h.shape[-1]
                size = max(1, h[..., 0, 0].numel()) * p * p
                scatter = summed[start : start + size].reshape(*lead, p, p)
                start += size
                rows = gathered[:, offsets[i] : offsets[i] + stats[i][0].numel() * (1 + p)].reshape(-1, *lead, 1 + p)
                cnt, means = rows[..., :1].detach(), rows[..., 1:]  # counts carry no gradient
                n = cnt.sum(dim=0)  # (..., 1)
                mu = (cnt * means).sum(dim=0) / n.clamp_min(1)
                dev = (means - mu) * cnt.sqrt()
                between = torch.einsum("w...i,w...j->...ij", dev, dev)
                cov = (scatter + between) / (n - penalty.correction).clamp_min(1).unsqueeze(-1)
                values[i], counts[i] = penalty.fn(cov), n[..., 0].detach()

        pending = None
        for bucket in buckets:
            scatters = []
            for i in bucket:
                h, m, index, c = prepared[i]
                ones = torch.ones(h.shape[:-2], dtype=stats[i][1].dtype, device=h.device)
                resolved = resolve_precision(precision, h.device, h.dtype)
                scatters.append(GramFunction.apply(h, m, index, ones, c, resolved, False).reshape(-1))
            work: list = []
            summed = _AsyncSumOverRanks.apply(torch.cat(scatters) if len(scatters) > 1 else scatters[0],
                                             replicated_loss, work)
            del scatters
            if pending is not None:
                finish(*pending)
            pending = (bucket, summed, work)
        if pending is not None:
            finish(*pending)
    return [v for v in values if v is not None], [c for c in counts if c is not None]


def global_penalty_with_count(
    h: torch.Tensor,
    mask: torch.Tensor | None,
    kind: str | Penalty,
    strategy: str = "stats",
    rows_bound: int | None = None,
    *,
    replicated_loss: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The penalty ``kind`` over the samples of every process, and the global number of valid samples.

    Args:
        h: local samples ``(..., N, p)`` (a leading stack of layers is allowed).
        mask: 0/1 validity ``(..., N)`` or ``(N,)``; ``None``: every row is valid.
        kind: a registered penalty name ([`PENALTIES`][hf_decorr.PENALTIES]) or a
            [`Penalty`][hf_decorr.Penalty]. A penalty of the covariance runs on the global
            covariance under either strategy; one of the samples needs ``"gather"`` (``l1`` also
            runs under ``"stats"``, from global sums).
        strategy: ``"stats"`` or ``"gather"`` (identical on every process; see `choose_strategy()`).
        rows_bound: for ``"gather"``, an upper bound of ``N`` that is the same on every process.
        replicated_loss: every process back-propagates the same function of the result (see
            the module docstring); ``False`` sums the gradients with a collective instead.

    Returns:
        ``(P, n)``: the penalty of shape ``(...)`` (float32, float64 for float64 input), the same
        on every process, and the global count ``n`` of valid samples, shape ``(...)``. With one
        process this is [`decorrelation_penalty()`][hf_decorr.decorrelation_penalty] and the local count.
    """
    penalty = get_penalty(kind)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    world = world_size()
    if world == 1:
        if mask is None:
            count = torch.full(h.shape[:-2], h.shape[-2], dtype=torch.float32, device=h.device)
        else:
            count = mask.to(device=h.device, dtype=torch.bool).expand(h.shape[:-1]).sum(dim=-1).float()
        return decorrelation_penalty(h, mask, penalty), count
    if strategy == "gather":
        if rows_bound is None or h.shape[-2] > rows_bound:
            raise ValueError(
                f"decorr_sync='global' (gather): a process has {h.shape[-2]} samples, more than the bound of "
                f"{rows_bound} that every process must respect (the per-device batch size for pooled samples). "
                "This happens when the model folds extra axes into the batch (e.g. multiple choice); use "
                "decorr_pooling='tokens' there."
            )
        m = torch.ones(h.shape[:-1], dtype=torch.bool, device=h.device) if mask is None else mask.bool()
        m = m.to(h.device).expand(h.shape[:-1])
        rows = torch.cat([h, m.unsqueeze(-1).to(h.dtype)], dim=-1)  # (..., N, p + 1): the mask rides along
        pad = rows_bound - h.shape[-2]
        if pad:
            rows = torch.cat([rows, rows.new_zeros(*rows.shape[:-2], pad, rows.shape[-1])], dim=-2)
        gathered = _gather_over_ranks(rows, replicated_loss)  # (W, ..., rows_bound, p + 1)
        gathered = gathered.movedim(0, -3).flatten(-3, -2)  # (..., W · rows_bound, p + 1)
        m_all = gathered[..., -1] > 0.5
        return decorrelation_penalty(gathered[..., :-1], m_all, penalty), m_all.sum(dim=-1)
    if penalty.sums is not None:  # a ratio of sums (l1): exact from the summed sums
        with torch.autocast(device_type=h.device.type, enabled=False):
            totals = _sum_over_ranks(penalty.sums(h, mask), replicated_loss)
            return totals[0] / totals[1].clamp_min(1), totals[2].detach()
    if not penalty.of_covariance:
        raise ValueError(
            f"decorr_penalty={penalty.name!r} is a function of the samples, not of their covariance, so it cannot "
            "be computed from the per-process statistics of decorr_sync='global' with token samples; use "
            "decorr_sync='local', pooled samples (decorr_pooling='mean'/'first'/'last', gathered rows), or a "
            "penalty registered with of_covariance=True"
        )
    values, counts = global_covariance_penalties([(h, mask, None)], penalty, replicated_loss=replicated_loss)
    return values[0], counts[0]


def global_penalty(
    h: torch.Tensor,
    mask: torch.Tensor | None,
    kind: str,
    strategy: str = "stats",
    rows_bound: int | None = None,
    *,
    replicated_loss: bool = True,
) -> torch.Tensor:
    """The penalty over the samples of every process, shape ``(...)`` (see `global_penalty_with_count()`)."""
    return global_penalty_with_count(h, mask, kind, strategy, rows_bound, replicated_loss=replicated_loss)[0]


# ---- evaluation statistics -----------------------------------------------------------------------


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a (non-differentiable) tensor over processes; identity with one process."""
    if world_size() == 1:
        return tensor
    tensor = tensor.detach().clone()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def real_samples_in_batch(remainder: int, process_index: int, batch_size: int) -> int:
    """How many leading examples of this process's last batch are real, not padding duplicates.

    With ``even_batches`` accelerate completes the last global batch with examples from the
    start of the data set, and ``gather_for_metrics`` keeps the first ``remainder`` examples of
    the rank-major concatenation of the (equal-sized) per-process batches: process ``r`` keeps
    ``clamp(remainder − r · batch_size, 0, batch_size)`` examples.
    """
    return max(0, min(batch_size, remainder - process_index * batch_size))


def sum_accumulators(
    stats: Mapping[str, CovarianceAccumulator], names: Sequence[str], device: torch.device | str
) -> dict[str, CovarianceAccumulator]:
    """Sum the float64 statistics ``(n, Σh, Σhhᵀ)`` of each layer in ``names`` over processes.

    Every process must call this with the same ``names`` (in the same order); a layer may be
    missing or empty on some processes (it then contributes zeros). Two collectives in all:
    one for the layer widths, one for the statistics packed into a single float64 tensor on
    ``device`` (the device of the process group's backend: CUDA for NCCL). Returns new
    accumulators for the layers seen by at least one process; with one process, the
    non-empty inputs.
    """
    if world_size() == 1:
        return {name: stats[name] for name in names if name in stats and not stats[name].empty}
    local = [stats.get(name) for name in names]
    widths = torch.tensor([0 if a is None or a.empty else a.width for a in local], dtype=torch.int64, device=device)
    seen, widths_sum = all_reduce_sum(torch.stack([widths.clamp(max=1), widths]))
    out: dict[str, CovarianceAccumulator] = {}
    packed, layout = [], []
    for name, acc, total, times in zip(names, local, widths_sum.tolist(), seen.tolist()):
        if times == 0:
            continue
        width = total // times
        if acc is not None and not acc.empty and acc.width != width:
            raise ValueError(f"layer {name!r} has width {acc.width} on this process but not on every other one")
        if acc is None or acc.empty:
            packed.append(torch.zeros(1 + width + width * width, dtype=torch.float64, device=device))
        else:
            count, total, outer = acc.statistics()
            packed.append(torch.cat([count.reshape(1), total.reshape(-1), outer.reshape(-1)]).to(device))
        layout.append((name, width))
    if not packed:
        return out
    flat = all_reduce_sum(torch.cat(packed))
    offset = 0
    for name, width in layout:
        acc = CovarianceAccumulator()
        acc.count = flat[offset]
        acc.sum = flat[offset + 1 : offset + 1 + width]
        acc.outer = flat[offset + 1 + width : offset + 1 + width + width * width].view(width, width)
        offset += 1 + width + width * width
        out[name] = acc
    return out
