"""Decorrelation penalties on a batch of activations (pure PyTorch, no transformers import).

Notation: ``H ∈ R^{N×p}`` holds ``N`` samples (rows) of a layer with ``p`` units; a 0/1
mask ``m ∈ {0,1}^N`` marks the valid rows (padding rows are left out of every sum);
``n = Σ m`` is the number of valid samples and ``h̄ = Σ_k m_k H_k / n`` their mean.

* ``cov_l1`` (Kågebäck & Mogren 2017, the default):
  ``C = Σ_k m_k (H_k − h̄)ᵀ(H_k − h̄) / (n − 1)`` and ``L_Σ = (1/p²) Σ_{i,j} |C_ij|``,
  diagonal included.
* ``decov`` (Cogswell et al. 2016): ``C`` with ``1/n``, ``½ (‖C‖_F² − ‖diag C‖²)``.
* ``vicreg`` (Bardes et al. 2022, covariance term): ``C`` with ``1/(n − 1)``,
  ``Σ_{i≠j} C_ij² / p``.
* ``l1`` (the paper's baseline, L1 activation penalty): ``Σ_k m_k Σ_i |H_ki| / (n p)``.

Every function accepts a leading stack of layers: ``h`` of shape ``(L, N, p)`` and a mask of
shape ``(L, N)`` or ``(N,)`` give ``L`` penalties in one batched kernel, which is how the
trainer handles several layers of the same width. The arithmetic runs in at least float32
whatever the input dtype and with autocast disabled. With fewer than two valid samples the
covariance is exactly zero (the centred rows are zero and the divisor is clamped to 1), so
the penalty is 0, never NaN, and its gradient is finite; non-finite activations in valid rows
propagate into the penalty rather than being hidden.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = [
    "PENALTIES",
    "masked_covariance",
    "penalty_from_covariance",
    "covariance_correction",
    "cov_l1_penalty",
    "decov_penalty",
    "vicreg_covariance_penalty",
    "l1_activation_penalty",
    "decorrelation_penalty",
]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64 (for gradcheck); every other dtype is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _prepare(h: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Upcast ``h`` (…, N, p) and broadcast the mask to (…, N, 1) in the compute dtype.

    Masked-out rows of ``h`` are replaced by zeros with ``torch.where`` so that whatever
    they hold (even NaN) cannot reach the result or its gradient.
    """
    if h.dim() < 2:
        raise ValueError(f"activations must have shape (..., N, p), got {tuple(h.shape)}")
    h = h.to(_compute_dtype(h.dtype))
    if mask is None:
        m = torch.ones(h.shape[:-1], dtype=h.dtype, device=h.device)
    else:
        if mask.shape[-1] != h.shape[-2]:
            raise ValueError(f"mask of shape {tuple(mask.shape)} does not match activations {tuple(h.shape)}")
        m = mask.to(device=h.device, dtype=torch.bool)
        h = torch.where(m.unsqueeze(-1), h, h.new_zeros(()))
        m = m.to(h.dtype).expand(h.shape[:-1])
    return h, m.unsqueeze(-1)


class _CentredGram(torch.autograd.Function):
    """``C = Σ_k m_k (h_k − h̄)(h_k − h̄)ᵀ / divisor`` with a one-matmul backward.

    Autograd through ``centredᵀ @ centred`` would spend two matmuls on the backward; here
    ``∂/∂h_k = (G + Gᵀ) c_k / divisor`` (``c_k`` the masked centred row). The path through the
    mean vanishes exactly because the valid centred rows sum to zero.
    """

    @staticmethod
    def forward(ctx, h: torch.Tensor, m: torch.Tensor, divisor: torch.Tensor) -> torch.Tensor:
        n = m.sum(dim=-2, keepdim=True)
        centred = h - h.sum(dim=-2, keepdim=True) / n.clamp_min(1)
        centred.mul_(m)  # padding rows back to exactly zero
        ctx.save_for_backward(centred, divisor)
        return (centred.mT @ centred) / divisor

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        centred, divisor = ctx.saved_tensors
        return centred @ ((grad + grad.mT) / divisor), None, None


def masked_covariance(
    h: torch.Tensor, mask: torch.Tensor | None = None, correction: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Covariance of the valid rows of ``h``.

    Args:
        h: activations, shape ``(..., N, p)``.
        mask: 0/1 or bool, shape ``(..., N)`` or ``(N,)``; ``None`` means every row is valid.
        correction: ``1`` divides by ``n − 1`` (unbiased, the paper), ``0`` by ``n``.

    Returns:
        ``(C, n)``: ``C`` of shape ``(..., p, p)`` in float32 (float64 for float64 input) and
        the number of valid rows ``n`` of shape ``(...)``. The divisor is clamped to at least 1,
        so ``C`` is zero (not NaN) when ``n < 2``.
    """
    with torch.autocast(device_type=h.device.type, enabled=False):
        h, m = _prepare(h, mask)
        n = m.sum(dim=-2, keepdim=True)  # (..., 1, 1)
        cov = _CentredGram.apply(h, m, (n - correction).clamp_min(1))
        return cov, n[..., 0, 0]


def _off_diagonal_square_sum(cov: torch.Tensor) -> torch.Tensor:
    return cov.square().sum(dim=(-2, -1)) - torch.diagonal(cov, dim1=-2, dim2=-1).square().sum(dim=-1)


#: the penalties that are functions of the covariance alone: (function of C, its correction)
_OF_COVARIANCE: dict[str, tuple[Callable[[torch.Tensor], torch.Tensor], int]] = {
    "cov_l1": (lambda cov: cov.abs().sum(dim=(-2, -1)) / cov.shape[-1] ** 2, 1),
    "decov": (lambda cov: 0.5 * _off_diagonal_square_sum(cov), 0),
    "vicreg": (lambda cov: _off_diagonal_square_sum(cov) / cov.shape[-1], 1),
}


def covariance_correction(kind: str) -> int:
    """The covariance divisor ``n − correction`` that penalty ``kind`` is defined with."""
    return _OF_COVARIANCE[kind][1]


def penalty_from_covariance(cov: torch.Tensor, kind: str) -> torch.Tensor:
    """A covariance penalty (``cov_l1``, ``decov``, ``vicreg``) of ``cov`` (``(..., p, p)``); shape ``(...)``.

    ``cov`` must have been computed with :func:`covariance_correction` of ``kind``.
    """
    return _OF_COVARIANCE[kind][0](cov)


def _covariance_penalty(h: torch.Tensor, mask: torch.Tensor | None, kind: str) -> torch.Tensor:
    cov, _ = masked_covariance(h, mask, correction=covariance_correction(kind))
    return penalty_from_covariance(cov, kind)


def cov_l1_penalty(h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``L_Σ = (1/p²) Σ_{i,j} |C_ij|`` with ``C`` unbiased (``1/(n−1)``); shape ``(...)``."""
    return _covariance_penalty(h, mask, "cov_l1")


def decov_penalty(h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """DeCov: ``½ (‖C‖_F² − ‖diag C‖²)`` with ``C`` biased (``1/n``); shape ``(...)``."""
    return _covariance_penalty(h, mask, "decov")


def vicreg_covariance_penalty(h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """VICReg covariance term: ``Σ_{i≠j} C_ij² / p`` with ``C`` unbiased; shape ``(...)``."""
    return _covariance_penalty(h, mask, "vicreg")


def l1_activation_penalty(h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """L1 activation penalty: mean of ``|h|`` over valid rows and units; shape ``(...)``."""
    with torch.autocast(device_type=h.device.type, enabled=False):
        h, m = _prepare(h, mask)
        n = m.sum(dim=(-2, -1))
        return h.abs().sum(dim=(-2, -1)) / (n.clamp_min(1) * h.shape[-1])


@dataclass(frozen=True)
class Penalty:
    """A registered penalty: its function and a one-line description for docs and errors."""

    fn: Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]
    description: str


PENALTIES: dict[str, Penalty] = {
    "cov_l1": Penalty(cov_l1_penalty, "Kågebäck & Mogren L_Σ: (1/p²) Σ|C_ij|, 1/(N−1), diagonal included"),
    "decov": Penalty(decov_penalty, "DeCov: ½(‖C‖_F² − ‖diag C‖²), 1/N"),
    "vicreg": Penalty(vicreg_covariance_penalty, "VICReg covariance term: Σ_{i≠j} C_ij² / p, 1/(N−1)"),
    "l1": Penalty(l1_activation_penalty, "L1 activation penalty: mean |h| (the paper's baseline)"),
}


def decorrelation_penalty(h: torch.Tensor, mask: torch.Tensor | None = None, kind: str = "cov_l1") -> torch.Tensor:
    """Dispatch to the penalty named ``kind`` (one of :data:`PENALTIES`); shape ``(...)``."""
    try:
        penalty = PENALTIES[kind]
    except KeyError:
        raise ValueError(f"decorr_penalty={kind!r} is not a known penalty; choose one of {sorted(PENALTIES)}") from None
    return penalty.fn(h, mask)
