"""Fake quantization of hidden states: how a representation survives low-precision activations.

Symmetric, uniform, dynamic quantization to signed ``bits``-bit integers, applied and undone at
once (the result is a floating tensor holding only representable values)::

    Q = 2^(bits−1) − 1,    s = max|h| / Q,    h' = clamp(round(h / s), −Q, Q) · s

with the scale ``s`` taken over the whole tensor (``granularity="tensor"``: one scale for the
batch, padding positions included, as a per-tensor int8 kernel would see it) or over the ``p``
units of each token (``"token"``: one scale per position, ``h`` of shape ``(..., p)``). A scale of 0
(an all-zero tensor or token) leaves the zeros. The arithmetic runs in float32 (float64 stays
float64) and the result has ``h``'s dtype. ``hf-decorr quantize`` measures a classifier's accuracy
with the outputs of chosen blocks quantized this way.
"""

from __future__ import annotations

import torch

__all__ = ["GRANULARITIES", "fake_quantize"]

GRANULARITIES = ("tensor", "token")
"""The scopes of one quantization scale: the whole tensor, or each token's ``p`` units."""


def fake_quantize(h: torch.Tensor, bits: int, granularity: str = "tensor") -> torch.Tensor:
    """``h`` quantized to symmetric ``bits``-bit integers and back (see the module docstring).

    Args:
        h: hidden states, shape ``(..., p)``, any floating dtype.
        bits: integer width, 2 to 16 (``8`` for int8, ``4`` for int4).
        granularity: ``"tensor"`` (one scale) or ``"token"`` (one scale per ``(..., ·)`` row).

    Returns:
        A tensor of ``h``'s shape and dtype.

    Raises:
        ValueError: ``bits`` or ``granularity`` out of range, or ``h`` not floating.
    """
    if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"bits must be an integer from 2 to 16, got {bits!r}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is not valid; choose one of {list(GRANULARITIES)}")
    if not h.is_floating_point():
        raise ValueError(f"fake_quantize needs floating-point hidden states, got {h.dtype}")
    x = h.to(torch.float64 if h.dtype == torch.float64 else torch.float32)
    levels = float(2 ** (bits - 1) - 1)
    peak = x.abs().amax() if granularity == "tensor" else x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(peak > 0, peak / levels, torch.ones_like(peak))
    return (torch.round(x / scale).clamp(-levels, levels) * scale).to(h.dtype)
