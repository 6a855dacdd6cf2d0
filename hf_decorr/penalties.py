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

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .gram import AbsSumFunction, cov_l1_lowmem, lowmem_covariance

__all__ = [
    "PENALTIES",
    "Penalty",
    "PenaltyNames",
    "register_penalty",
    "get_penalty",
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


def masked_covariance(
    h: torch.Tensor,
    mask: torch.Tensor | None = None,
    correction: int = 1,
    *,
    chunk: int | None = None,
    precision: str = "fp32",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Covariance of the valid rows of ``h``.

    Args:
        h: activations, shape ``(..., N, p)``, any floating dtype (kept as is: no float32 copy).
        mask: 0/1 or bool, shape ``(..., N)`` or ``(N,)``; ``None`` means every row is valid.
        correction: ``1`` divides by ``n − 1`` (unbiased, the paper), ``0`` by ``n``.
        chunk: rows processed at a time (default `default_chunk()`).
        precision: the Gram's matmul precision on CUDA (`PRECISIONS`); float32
            (float64 for float64 input) elsewhere.

    Returns:
        ``(C, n)``: ``C`` of shape ``(..., p, p)`` in float32 (float64 for float64 input) and
        the number of valid rows ``n`` of shape ``(...)``. The divisor is clamped to at least 1,
        so ``C`` is zero (not NaN) when ``n < 2``. For the backward only ``h`` itself, the mask and
        the mean are kept (see `hf_decorr.gram`).
    """
    return lowmem_covariance(h, mask, correction, chunk=chunk, precision=precision)


def _off_diagonal_square_sum(cov: torch.Tensor) -> torch.Tensor:
    return cov.square().sum(dim=(-2, -1)) - torch.diagonal(cov, dim1=-2, dim2=-1).square().sum(dim=-1)


def _cov_l1_of_covariance(cov: torch.Tensor) -> torch.Tensor:
    # Σ|C_ij| / p², keeping only the packed signs of C (p²/4 bytes) for the backward instead of C itself
    return AbsSumFunction.apply(cov, 1.0 / cov.shape[-1] ** 2)


def _decov_of_covariance(cov: torch.Tensor) -> torch.Tensor:
    return 0.5 * _off_diagonal_square_sum(cov)


def _vicreg_of_covariance(cov: torch.Tensor) -> torch.Tensor:
    return _off_diagonal_square_sum(cov) / cov.shape[-1]


def covariance_correction(kind: str | Penalty) -> int:
    """The covariance divisor ``n − correction`` that penalty ``kind`` is defined with."""
    penalty = get_penalty(kind)
    if not penalty.of_covariance:
        raise ValueError(f"penalty {penalty.name!r} is not a function of the covariance")
    return penalty.correction


def penalty_from_covariance(cov: torch.Tensor, kind: str | Penalty) -> torch.Tensor:
    """A covariance penalty of ``cov`` (``(..., p, p)``); shape ``(...)``.

    ``cov`` must have been computed with `covariance_correction()` of ``kind``.
    """
    penalty = get_penalty(kind)
    if not penalty.of_covariance:
        raise ValueError(f"penalty {penalty.name!r} is not a function of the covariance")
    return penalty.fn(cov)


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
    """A registered penalty.

    Attributes:
        name: the value of ``decorr_penalty`` that selects it.
        fn: with ``of_covariance=True`` a function of the covariance ``C`` (``(..., p, p)`` →
            ``(...)``), computed with divisor ``n − correction``; otherwise a function of the
            samples and their mask, ``fn(h (..., N, p), mask (..., N) | None) → (...)``.
        of_covariance: whether ``fn`` takes ``C``. Such penalties run on the covariance of the
            samples of all processes under ``decorr_sync="global"`` (exactly, from p × p statistics).
        correction: ``1`` for ``C`` with ``1/(n − 1)``, ``0`` for ``1/n``.
        description: one line with the formula, shown in ``--help``, errors and model cards.
        kernel: optional fast path of a covariance penalty computed straight from the samples,
            ``kernel(h (..., N, p), mask, *, index=None, chunk=None, precision="fp32") → (...)``, equal
            to ``fn(C)`` (``cov_l1`` has the fused, tiled one of `cov_l1_lowmem()`).
            Used whenever the penalty is computed from local samples and ``fn`` is not overridden.
        sums: optional form of a penalty of the samples as a ratio of sums, ``sums(h, mask) → (3, ...)``
            holding ``(numerator, denominator, valid rows)``, with ``fn(h, mask) = numerator / denominator``.
            Such a penalty runs exactly over the samples of all processes under ``decorr_sync="global"``
            (the three sums are summed over processes); ``l1`` has one.
    """

    name: str
    fn: Callable[..., torch.Tensor]
    of_covariance: bool
    correction: int = 1
    description: str = ""
    kernel: Callable[..., torch.Tensor] | None = None
    sums: Callable[..., torch.Tensor] | None = None

    def __call__(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The penalty of samples ``h`` (``(..., N, p)``) with validity ``mask``; shape ``(...)``."""
        if self.kernel is not None:
            return self.kernel(h, mask)
        if self.of_covariance:
            cov, _ = masked_covariance(h, mask, correction=self.correction)
            return self.fn(cov)
        return self.fn(h, mask)


class _Registry(dict):
    """``name → Penalty``; entries are added only through [`register_penalty()`][hf_decorr.register_penalty]."""

    def __setitem__(self, key, value):  # noqa: D105
        raise TypeError("add penalties with hf_decorr.register_penalty(name, fn, of_covariance=..., ...)")


PENALTIES: dict[str, Penalty] = _Registry()
"""Every registered [`Penalty`][hf_decorr.Penalty] by name (read-only: add entries with
[`register_penalty()`][hf_decorr.register_penalty]).

Config validation, the command-line choices, model cards and the distributed path read it when
they run, so a penalty registered before the arguments are built is accepted everywhere.
Built in: ``cov_l1`` (the paper's L_Σ), ``decov``, ``vicreg`` and ``l1``.
"""


def register_penalty(
    name: str,
    fn: Callable[..., torch.Tensor],
    *,
    of_covariance: bool,
    correction: int = 1,
    description: str = "",
    kernel: Callable[..., torch.Tensor] | None = None,
    sums: Callable[..., torch.Tensor] | None = None,
) -> Penalty:
    """Register a penalty under ``name`` (then usable as ``decorr_penalty=name``); returns it.

    Args:
        name: a new name; registering a name twice raises ``ValueError``.
        fn: see [`Penalty`][hf_decorr.Penalty]: ``fn(C) → (...)`` when ``of_covariance``, else ``fn(h, mask) → (...)``.
        of_covariance: whether ``fn`` is a function of the covariance alone.
        correction: the covariance divisor ``n − correction`` (``1`` unbiased, ``0`` biased).
        description: one line with the formula.
        kernel: a fast path of a covariance penalty from the samples (see [`Penalty`][hf_decorr.Penalty]).
        sums: the ratio-of-sums form of a penalty of the samples (see [`Penalty`][hf_decorr.Penalty]).

    Example::

        register_penalty("barlow_offdiag", lambda c: (c.square().sum((-2, -1)) - c.diagonal(0, -2, -1)
                         .square().sum(-1)) / c.shape[-1], of_covariance=True, description="Σ_{i≠j} C_ij² / p")
    """
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise ValueError(f"a penalty name must be a non-empty string without surrounding spaces, got {name!r}")
    if name in PENALTIES:
        raise ValueError(f"a penalty named {name!r} is already registered; choose another name")
    if not callable(fn):
        raise TypeError(f"penalty {name!r}: fn must be callable, got {type(fn).__name__}")
    if correction not in (0, 1):
        raise ValueError(f"penalty {name!r}: correction must be 0 (1/n) or 1 (1/(n−1)), got {correction!r}")
    if kernel is not None and (not of_covariance or not callable(kernel)):
        raise ValueError(f"penalty {name!r}: kernel must be callable and is for penalties of the covariance only")
    if sums is not None and (of_covariance or not callable(sums)):
        raise ValueError(f"penalty {name!r}: sums must be callable and is for penalties of the samples only")
    penalty = Penalty(name, fn, bool(of_covariance), int(correction), description, kernel=kernel, sums=sums)
    dict.__setitem__(PENALTIES, name, penalty)
    return penalty


def get_penalty(kind: str | Penalty) -> Penalty:
    """The registered penalty named ``kind`` (a [`Penalty`][hf_decorr.Penalty] is returned as is)."""
    if isinstance(kind, Penalty):
        return kind
    try:
        return PENALTIES[kind]
    except (KeyError, TypeError):
        raise ValueError(
            f"decorr_penalty={kind!r} is not a registered penalty; choose one of {sorted(PENALTIES)} "
            "(or add one with hf_decorr.register_penalty)"
        ) from None


class PenaltyNames(Sequence):
    """A live, read-only view of the registered names (used as ``choices`` of ``decorr_penalty``)."""

    def __getitem__(self, index):
        return list(PENALTIES)[index]

    def __len__(self) -> int:
        return len(PENALTIES)

    def __contains__(self, name: object) -> bool:
        return name in PENALTIES

    def __repr__(self) -> str:
        return repr(list(PENALTIES))


register_penalty("cov_l1", _cov_l1_of_covariance, of_covariance=True, correction=1, kernel=cov_l1_lowmem,
                 description="Kågebäck & Mogren L_Σ = (1/p²) Σ_ij |C_ij|, C with 1/(N−1), diagonal included")
register_penalty("decov", _decov_of_covariance, of_covariance=True, correction=0,
                 description="DeCov (Cogswell et al. 2016): ½(‖C‖_F² − ‖diag C‖²), C with 1/N")
register_penalty("vicreg", _vicreg_of_covariance, of_covariance=True, correction=1,
                 description="VICReg covariance term (Bardes et al. 2022): Σ_{i≠j} C_ij² / p, C with 1/(N−1)")


def _l1_of_samples(h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    return l1_activation_penalty(h, mask)


def _l1_sums(h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(Σ_k m_k Σ_i |H_ki|, n p, n)``, shape ``(3, ...)``: the L1 penalty is the first over the second."""
    with torch.autocast(device_type=h.device.type, enabled=False):
        h, m = _prepare(h, mask)
        n = m.sum(dim=(-2, -1))
        return torch.stack([h.abs().sum(dim=(-2, -1)), n * h.shape[-1], n])


register_penalty("l1", _l1_of_samples, of_covariance=False, sums=_l1_sums,
                 description="L1 activation penalty (the paper's baseline): mean |h| over valid samples and units")


def decorrelation_penalty(
    h: torch.Tensor, mask: torch.Tensor | None = None, kind: str | Penalty = "cov_l1"
) -> torch.Tensor:
    """The penalty ``kind`` (a name in [`PENALTIES`][hf_decorr.PENALTIES] or a [`Penalty`][hf_decorr.Penalty]) of
    samples ``h``; shape ``(...)``."""
    return get_penalty(kind)(h, mask)
