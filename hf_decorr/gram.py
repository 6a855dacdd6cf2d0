"""Low-memory covariance kernels for LLM-scale penalties (pure PyTorch, no transformers import).

Notation as in `hf_decorr.penalties`: ``H (..., N, p)`` with a 0/1 row mask ``m``, optionally a
row selection ``index (K,)`` (the rows ``H[..., index, :]`` are the samples, ``m`` then has shape
``(..., K)``), ``n = Σ m``, ``μ = Σ_k m_k h_k / n``, centred rows ``c_k = m_k (h_k − μ)``.

Memory. Autograd through ``cᵀc`` keeps the float32 centred copy of ``H`` (``4·N·p`` bytes per layer)
whatever the model's dtype. The functions here keep for the backward only

* ``H`` itself, the tensor the caller passed (no copy: for a transformer block's output it is
  the next block's input, which gradient checkpointing keeps anyway), the mask / index, and
* ``μ`` (``4·p`` bytes) and, for `cov_l1_lowmem()`, the signs of ``C`` packed as two bit planes
  (``p²/4`` bytes; `GramFunction` saves nothing of size ``p²``: its caller's ``f(C)`` does).

The centring is recomputed in the backward. Rows are processed in chunks of ``chunk`` rows and,
for ``cov_l1``, the columns of ``C`` in blocks of ``chunk`` columns, so the float32 transients are
``≤ 4·chunk·p`` bytes for a chunk of centred rows plus ``4·p·chunk`` for a block of ``C`` — bounded
for any ``N`` and any width (an MLP's 14,336 units included).

Precision of the Gram matmuls (``precision``):

* ``"fp32"``: IEEE float32 products (TF32 disabled for these matmuls). The CPU path always.
* ``"tf32"``: inputs rounded to TF32 (10-bit mantissa) on tensor cores, float32 accumulation, forward
  and backward.
* ``"bf16"``: the forward splits each centred value into ``hi + lo`` (both bfloat16) and sums three
  bf16 products ``hiᵀhi + hiᵀlo + loᵀhi`` with float32 accumulation (about float32 accuracy, so the
  signs of small ``C_ij`` are right); the backward multiplies bfloat16 centred rows by ``dP/dC``
  (for ``cov_l1`` a matrix of ``0, ±1`` times a scalar, exact in bfloat16) with float32 accumulation.

On CUDA these use the tensor cores; elsewhere (or with ``emulate=True``) the roundings are emulated by
rounding the float32 inputs (`round_to_precision()`) and multiplying in float32, which is how the
error table of docs/PERFORMANCE.md was measured. float64 input is computed exactly in float64.
"""

from __future__ import annotations

import contextlib

import torch

__all__ = [
    "DEFAULT_CUDA_PRECISION",
    "PRECISIONS",
    "AbsSumFunction",
    "CovL1Function",
    "GramFunction",
    "cov_l1_lowmem",
    "default_chunk",
    "lowmem_covariance",
    "pack_signs",
    "resolve_precision",
    "round_to_precision",
    "unpack_signs",
]

#: the values of ``decorr_precision``
PRECISIONS = ("auto", "fp32", "tf32", "bf16")
#: what ``"auto"`` means on CUDA (chosen by the emulated error table in docs/PERFORMANCE.md)
DEFAULT_CUDA_PRECISION = "bf16"
#: the float32 bytes of one chunk of centred rows (and one column block of C) when ``chunk`` is not given
DEFAULT_CHUNK_BYTES = 1 << 25


def round_to_precision(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """Round float32 ``x`` to the nearest value of format ``fmt`` (``"tf32"``: 10-bit mantissa, ``"bf16"``:
    7-bit mantissa; round-to-nearest-even), returned as float32. ``"fp32"``/float64 input: ``x`` unchanged."""
    if fmt == "fp32" or x.dtype == torch.float64:
        return x
    if fmt == "bf16":
        return x.to(torch.bfloat16).to(x.dtype)
    if fmt != "tf32":
        raise ValueError(f"unknown format {fmt!r}; expected 'fp32', 'tf32' or 'bf16'")
    bits = x.float().contiguous().view(torch.int32)
    drop = 13  # 23 − 10 mantissa bits
    lsb = (bits >> drop) & 1
    rounded = (bits + ((1 << (drop - 1)) - 1) + lsb) & ~((1 << drop) - 1)
    finite = torch.isfinite(x)
    return torch.where(finite, rounded.view(torch.float32), x.float())


def resolve_precision(precision: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """The precision actually used: ``"fp64"`` for float64 input, ``"fp32"`` off CUDA (the CPU keeps its exact
    path), and on CUDA ``precision`` with ``"auto"`` meaning `DEFAULT_CUDA_PRECISION`."""
    if precision not in PRECISIONS:
        raise ValueError(f"decorr_precision={precision!r} is not valid; choose one of {list(PRECISIONS)}")
    if dtype == torch.float64:
        return "fp64"
    if torch.device(device).type != "cuda":
        return "fp32"
    return DEFAULT_CUDA_PRECISION if precision == "auto" else precision


def default_chunk(width: int) -> int:
    """Rows per chunk (and columns per block of ``C``): ``DEFAULT_CHUNK_BYTES`` of float32, a multiple of 8."""
    return max(8, (DEFAULT_CHUNK_BYTES // (4 * max(width, 1))) // 8 * 8)


# ---- matmuls in a given precision -------------------------------------------------------------------------


@contextlib.contextmanager
def _cuda_tf32(enabled: bool):
    """TF32 on or off for CUDA float32 matmuls inside the block (torch's new ``fp32_precision`` API when present:
    mixing it with the legacy ``allow_tf32`` flag is an error in recent torch)."""
    backend = torch.backends.cuda.matmul
    old: object
    value: object
    try:
        old, attr, value = backend.fp32_precision, "fp32_precision", ("tf32" if enabled else "ieee")
    except (AttributeError, RuntimeError):
        old, attr, value = backend.allow_tf32, "allow_tf32", enabled
    setattr(backend, attr, value)
    try:
        yield
    finally:
        setattr(backend, attr, old)


def _bf16_mm(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` of bfloat16 ``a``, ``b`` with a float32 result (float32 accumulation)."""
    if a.is_cuda:
        if a.dim() == 2 and b.dim() == 2:
            return torch.mm(a, b, out_dtype=torch.float32)
        lead = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        a3 = a.expand(*lead, *a.shape[-2:]).reshape(-1, *a.shape[-2:])
        b3 = b.expand(*lead, *b.shape[-2:]).reshape(-1, *b.shape[-2:])
        out = torch.bmm(a3, b3, out_dtype=torch.float32)
        return out.reshape(*lead, *out.shape[-2:])
    return a.float() @ b.float()  # emulation: bf16 × bf16 products are exact in float32


def _matmul(a: torch.Tensor, b: torch.Tensor, mode: str, emulate: bool) -> torch.Tensor:
    """``a @ b`` (float32 or float64 operands) with the products of ``mode`` (``fp64``/``fp32``/``tf32``/``bf16``)
    and float32 accumulation; ``mode="bf16x3"`` splits both operands into bf16 ``hi + lo``."""
    if mode in ("fp64", "fp32") or (not a.is_cuda and not emulate):
        if a.is_cuda:
            with _cuda_tf32(False):
                return a @ b
        return a @ b
    if mode == "tf32":
        if a.is_cuda and not emulate:
            with _cuda_tf32(True):
                return a @ b
        return round_to_precision(a, "tf32") @ round_to_precision(b, "tf32")
    if mode == "bf16":
        return _bf16_mm(a.to(torch.bfloat16), b.to(torch.bfloat16))
    if mode == "bf16x3":
        a_hi, b_hi = a.to(torch.bfloat16), b.to(torch.bfloat16)
        a_lo, b_lo = (a - a_hi.float()).to(torch.bfloat16), (b - b_hi.float()).to(torch.bfloat16)
        return _bf16_mm(a_hi, b_hi) + (_bf16_mm(a_hi, b_lo) + _bf16_mm(a_lo, b_hi))
    raise ValueError(f"unknown matmul mode {mode!r}")


def _forward_mode(precision: str) -> str:
    return "bf16x3" if precision == "bf16" else precision


# ---- rows, chunks and centring ------------------------------------------------------------------------------


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _rows(h: torch.Tensor, index: torch.Tensor | None, start: int, stop: int) -> torch.Tensor:
    if index is None:
        return h[..., start:stop, :]
    return h.index_select(-2, index[start:stop])


def _centred(h, m, index, mean, start, stop, cdtype) -> torch.Tensor:
    """``c = m ⊙ (h − μ)`` for rows ``start:stop`` of the samples, in ``cdtype`` (masked rows exactly 0, NaN too).

    One new ``(..., rows, p)`` tensor: the upcast copy is centred and masked in place.
    """
    c = _rows(h, index, start, stop).to(cdtype, copy=True)
    mean = mean.unsqueeze(-2)
    c = c.sub_(mean) if torch.broadcast_shapes(c.shape, mean.shape) == c.shape else c - mean
    if m is not None:
        invalid = ~m[..., start:stop].unsqueeze(-1)
        c = c.masked_fill_(invalid, 0.0) if torch.broadcast_shapes(c.shape, invalid.shape) == c.shape \
            else c.masked_fill(invalid, 0.0)
    return c


def _count_and_mean(h, m, index, chunk, cdtype) -> tuple[torch.Tensor, torch.Tensor]:
    """``n (...)`` and ``μ (..., p)`` in ``cdtype``, summing ``chunk`` rows at a time."""
    rows = h.shape[-2] if index is None else index.shape[0]
    lead = torch.broadcast_shapes(h.shape[:-2], m.shape[:-1]) if m is not None else h.shape[:-2]
    total = torch.zeros(*lead, h.shape[-1], dtype=cdtype, device=h.device)
    for start in range(0, rows, chunk):
        x = _rows(h, index, start, start + chunk).to(cdtype)
        if m is not None:
            x = torch.where(m[..., start : start + chunk].unsqueeze(-1), x, x.new_zeros(()))
        total = total + x.sum(dim=-2)
    if m is None:
        n = torch.full(lead, float(rows), dtype=cdtype, device=h.device)
    else:
        n = m.to(cdtype).sum(dim=-1).expand(lead)
    return n, total / n.clamp_min(1).unsqueeze(-1)


def _check(h: torch.Tensor, m: torch.Tensor | None, index: torch.Tensor | None) -> None:
    if h.dim() < 2:
        raise ValueError(f"activations must have shape (..., N, p), got {tuple(h.shape)}")
    rows = h.shape[-2] if index is None else index.shape[0]
    if m is not None and m.shape[-1] != rows:
        raise ValueError(f"mask of shape {tuple(m.shape)} does not match {rows} sample rows of {tuple(h.shape)}")


def _grad_into(grad_h, index, start, stop, value) -> None:
    """Write the gradient of sample rows ``start:stop`` into ``grad_h`` (rows of ``h``; selected rows summed)."""
    if index is None:
        grad_h[..., start:stop, :].copy_(value)
    else:
        grad_h.index_add_(-2, index[start:stop], value.to(grad_h.dtype))


# ---- the general Gram: C = Σ c cᵀ / divisor, full p × p --------------------------------------------------------


class GramFunction(torch.autograd.Function):
    """``C = Σ_k c_k c_kᵀ / divisor`` ``(..., p, p)`` in float32 (float64 for float64 ``h``), rows in chunks.

    Saved for the backward: ``h`` (no copy), mask, index, ``μ``. Backward, chunk by chunk:
    ``∂/∂h_k = m_k (G + Gᵀ) c_k / divisor`` with ``c_k`` recomputed; the path through ``μ`` vanishes because
    the valid centred rows sum to zero. Arguments: ``(h, m (..., K) bool | None, index (K,) | None,
    divisor (...) tensor, chunk, precision, emulate)``.
    """

    @staticmethod
    def forward(ctx, h, m, index, divisor, chunk, precision, emulate):
        cdtype = _compute_dtype(h.dtype)
        _, mean = _count_and_mean(h, m, index, chunk, cdtype)
        rows = h.shape[-2] if index is None else index.shape[0]
        mode = _forward_mode(precision)
        cov = None
        for start in range(0, rows, chunk):
            c = _centred(h, m, index, mean, start, start + chunk, cdtype)
            part = _matmul(c.mT, c, mode, emulate)
            cov = part if cov is None else cov.add_(part)
        if cov is None:
            cov = torch.zeros(*mean.shape, mean.shape[-1], dtype=cdtype, device=h.device)
        ctx.save_for_backward(h, m, index, mean, divisor)
        ctx.chunk, ctx.precision, ctx.emulate = chunk, precision, emulate
        ctx.has_mask, ctx.has_index = m is not None, index is not None
        return cov / divisor.to(cdtype)[..., None, None]

    @staticmethod
    def backward(ctx, grad):
        h, m, index, mean, divisor = ctx.saved_tensors
        m = m if ctx.has_mask else None
        index = index if ctx.has_index else None
        cdtype = mean.dtype
        sym = (grad + grad.mT).to(cdtype) / divisor.to(cdtype)[..., None, None]
        grad_h = torch.zeros_like(h) if index is not None else torch.empty_like(h)
        if sym.shape[:-2] != h.shape[:-2]:  # a mask with a stack the activations lack: sum over the stack
            grad_h = torch.zeros(*sym.shape[:-2], *h.shape[-2:], dtype=h.dtype, device=h.device)
        rows = h.shape[-2] if index is None else index.shape[0]
        mode = "bf16" if ctx.precision == "bf16" else ctx.precision
        for start in range(0, rows, ctx.chunk):
            c = _centred(h, m, index, mean, start, start + ctx.chunk, cdtype)
            _grad_into(grad_h, index, start, start + ctx.chunk, _matmul(c, sym, mode, ctx.emulate))
        if grad_h.shape != h.shape:
            grad_h = grad_h.sum_to_size(h.shape)
        return grad_h, None, None, None, None, None, None


def lowmem_covariance(
    h: torch.Tensor,
    mask: torch.Tensor | None = None,
    correction: int = 1,
    *,
    index: torch.Tensor | None = None,
    chunk: int | None = None,
    precision: str = "fp32",
    emulate: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(C (..., p, p), n (...))``: the covariance of the valid sample rows, ``C = Σ c cᵀ / max(n − correction, 1)``.

    ``mask`` (``(..., K)``, bool or 0/1) marks valid rows among the samples, which are the rows of ``h`` or,
    with ``index (K,)``, the rows ``h[..., index, :]``. ``chunk``: rows per chunk (default
    `default_chunk()`). ``precision``: see the module docstring (``"auto"`` resolved by
    `resolve_precision()`; off CUDA only ``emulate=True`` rounds).
    """
    m, chunk, precision = _gram_arguments(h, mask, index, chunk, precision, emulate)
    with torch.autocast(device_type=h.device.type, enabled=False):
        n = _valid_count(h, m, index)
        cov = GramFunction.apply(h, m, index, (n - correction).clamp_min(1), chunk, precision, emulate)
    return cov, n


def _gram_arguments(h, mask, index, chunk, precision, emulate):
    """Checked inputs of the Gram functions: the bool mask, the rows per chunk and the resolved precision."""
    _check(h, mask, index)
    m = None if mask is None else mask.to(device=h.device, dtype=torch.bool)
    chunk = chunk or default_chunk(h.shape[-1])
    if not emulate:
        precision = resolve_precision(precision, h.device, h.dtype)
    elif h.dtype == torch.float64:
        precision = "fp64"
    return m, int(chunk), precision


def _valid_count(h, m, index) -> torch.Tensor:
    """The number of valid sample rows ``n``, shape ``(...)``, in the compute dtype."""
    cdtype = _compute_dtype(h.dtype)
    rows = h.shape[-2] if index is None else index.shape[0]
    if m is None:
        return torch.full(h.shape[:-2], float(rows), dtype=cdtype, device=h.device)
    lead = torch.broadcast_shapes(h.shape[:-2], m.shape[:-1])
    return m.to(cdtype).sum(dim=-1).expand(lead)


# ---- signs of C as two bit planes ------------------------------------------------------------------------------

def _bit_weights(device) -> torch.Tensor:
    return (1 << torch.arange(8, device=device, dtype=torch.uint8))


def pack_signs(x: torch.Tensor) -> torch.Tensor:
    """``sign(x)`` of ``x (..., r, q)`` as ``(2, ..., r, ⌈q/8⌉)`` uint8: bit planes of ``x > 0`` and ``x < 0``."""
    q = x.shape[-1]
    pad = (-q) % 8
    planes = torch.stack([x > 0, x < 0])
    if pad:
        planes = torch.nn.functional.pad(planes, (0, pad))
    planes = planes.reshape(*planes.shape[:-1], -1, 8).to(torch.uint8)
    return (planes * _bit_weights(x.device)).sum(dim=-1, dtype=torch.uint8)


def unpack_signs(packed: torch.Tensor, q: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of `pack_signs()`: ``(..., r, q)`` of ``{−1, 0, 1}`` in ``dtype``."""
    bits = (packed.unsqueeze(-1) & _bit_weights(packed.device)) != 0
    bits = bits.reshape(*bits.shape[:-2], -1)[..., :q]
    return bits[0].to(dtype).sub_(bits[1].to(dtype))


class AbsSumFunction(torch.autograd.Function):
    """``Σ_ij |C_ij| · scale`` over the last two axes, saving only the packed signs of ``C`` (``p²/4`` bytes) for
    the backward (``∂/∂C = sign(C) · scale``, 0 where ``C_ij = 0``, like ``torch.abs``)."""

    @staticmethod
    def forward(ctx, cov: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.save_for_backward(pack_signs(cov))
        ctx.q, ctx.scale, ctx.dtype = cov.shape[-1], scale, cov.dtype
        return cov.abs().sum(dim=(-2, -1)) * scale

    @staticmethod
    def backward(ctx, grad):
        (packed,) = ctx.saved_tensors
        return unpack_signs(packed, ctx.q, ctx.dtype) * (grad * ctx.scale)[..., None, None], None


# ---- cov_l1 fused and tiled: never the whole C -----------------------------------------------------------------


class CovL1Function(torch.autograd.Function):
    """``L_Σ = Σ_ij |C_ij| / p²``, ``C = Σ c cᵀ / divisor``, computed by column blocks of ``C`` and row chunks.

    Forward: for each block ``J`` of ``chunk`` columns, ``C[:, J] = Σ_chunks c_chunkᵀ c_chunk[:, J]``; its signs
    are packed (`pack_signs()`) and its ``|·|`` summed. Saved: ``h`` (no copy), mask, index, ``μ``, the
    packed signs. Backward: ``∂L/∂h_k = m_k (S + Sᵀ) c_k · g / (p² · divisor)`` with ``S = sign(C)``, by the same
    blocks. Arguments: ``(h, m, index, divisor, chunk, precision, emulate)``.
    """

    @staticmethod
    def forward(ctx, h, m, index, divisor, chunk, precision, emulate):
        cdtype = _compute_dtype(h.dtype)
        _, mean = _count_and_mean(h, m, index, chunk, cdtype)
        p = h.shape[-1]
        rows = h.shape[-2] if index is None else index.shape[0]
        mode = _forward_mode(precision)
        lead = mean.shape[:-1]
        packed = torch.zeros(2, *lead, p, (p + 7) // 8, dtype=torch.uint8, device=h.device)
        total = torch.zeros(lead, dtype=cdtype, device=h.device)
        for j0 in range(0, p, chunk):
            j1 = min(p, j0 + chunk)
            block = None
            for start in range(0, rows, chunk):
                c = _centred(h, m, index, mean, start, start + chunk, cdtype)
                part = _matmul(c.mT, c[..., j0:j1], mode, emulate)
                block = part if block is None else block.add_(part)
            if block is None:
                continue
            total = total + block.abs().sum(dim=(-2, -1))
            packed[..., j0 // 8 : (j1 + 7) // 8] = pack_signs(block)
        scale = 1.0 / (p * p)
        ctx.save_for_backward(h, m, index, mean, divisor, packed)
        ctx.chunk, ctx.precision, ctx.emulate = chunk, precision, emulate
        ctx.has_mask, ctx.has_index = m is not None, index is not None
        return total * scale / divisor.to(cdtype)

    @staticmethod
    def backward(ctx, grad):
        h, m, index, mean, divisor, packed = ctx.saved_tensors
        m = m if ctx.has_mask else None
        index = index if ctx.has_index else None
        cdtype = mean.dtype
        p = h.shape[-1]
        rows = h.shape[-2] if index is None else index.shape[0]
        coef = (grad.to(cdtype) / (divisor.to(cdtype) * p * p))[..., None, None]
        lead = mean.shape[:-1]
        grad_h = torch.zeros(*lead, *h.shape[-2:], dtype=h.dtype, device=h.device)
        mode = "bf16" if ctx.precision == "bf16" else ctx.precision
        chunk = ctx.chunk
        for j0 in range(0, p, chunk):
            j1 = min(p, j0 + chunk)
            cols = unpack_signs(packed[..., j0 // 8 : (j1 + 7) // 8], j1 - j0, torch.int8)  # S[:, J] (j0 % 8 == 0)
            rows_t = unpack_signs(packed[:, ..., j0:j1, :], p, torch.int8).mT  # S[J, :]ᵀ = (Sᵀ)[:, J]
            sym = (cols + rows_t).to(cdtype)  # (S + Sᵀ)[:, J]: small integers, exact in bfloat16
            del cols, rows_t
            for start in range(0, rows, chunk):
                c = _centred(h, m, index, mean, start, start + chunk, cdtype)
                value = _matmul(c, sym, mode, ctx.emulate).mul_(coef)  # · g / (p² divisor)
                del c
                if index is None:
                    grad_h[..., start : start + chunk, j0:j1].copy_(value)
                else:
                    grad_h[..., j0:j1].index_add_(-2, index[start : start + chunk], value.to(grad_h.dtype))
        if grad_h.shape != h.shape:
            grad_h = grad_h.sum_to_size(h.shape)
        return grad_h, None, None, None, None, None, None


def cov_l1_lowmem(
    h: torch.Tensor,
    mask: torch.Tensor | None = None,
    *,
    index: torch.Tensor | None = None,
    chunk: int | None = None,
    precision: str = "fp32",
    emulate: bool = False,
) -> torch.Tensor:
    """``L_Σ = (1/p²) Σ_ij |C_ij|`` (``C`` unbiased) of the valid sample rows, shape ``(...)``, by
    `CovL1Function` (same arguments as `lowmem_covariance()`)."""
    m, chunk, precision = _gram_arguments(h, mask, index, chunk, precision, emulate)
    if chunk % 8:
        raise ValueError(f"chunk must be a multiple of 8 (the signs are packed by bytes), got {chunk}")
    with torch.autocast(device_type=h.device.type, enabled=False):
        divisor = (_valid_count(h, m, index) - 1).clamp_min(1)
        return CovL1Function.apply(h, m, index, divisor, chunk, precision, emulate)
