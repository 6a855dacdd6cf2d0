"""The paper's decorrelation metrics from streamed sufficient statistics (pure PyTorch).

A [`CovarianceAccumulator`][hf_decorr.CovarianceAccumulator] keeps, in float64, the count ``n``, the sum ``s = Σ h``
and
the scatter ``S = Σ h hᵀ`` of every valid sample it is shown, so that the covariance of a whole
evaluation set,

    C = (S − s sᵀ / n) / (n − 1),

does not depend on how the set was split into batches (nor, once the statistics are summed,
on how it was split across processes). [`decorrelation_metrics()`][hf_decorr.decorrelation_metrics] turns ``C`` into
the
paper's numbers (Kågebäck & Mogren 2017, Section 3.1). With ``v = diag C`` the unit
variances and ``p`` the layer width:

* ``mapc``: mean absolute Pearson correlation ``2/(p²−p) Σ_{i<j} |C_ij| / √(C_ii C_jj)``.
  The paper notes it is ill-defined for a unit with zero variance; here such *dead* units
  (``v_i ≤ 1e-10 · max v``) are left out and the mean runs over the pairs of live units
  (NaN when fewer than two units are alive).
* ``cvr``: covariance/variance ratio ``‖C‖₁ / tr C``, **without** the ``1/p²`` printed in the
  paper, which its reported values (4–20) do not fit; 1 is the optimum (a diagonal C).
* ``tdv``: share of the total variance held by the ``d`` units of largest variance.
* ``ud``: the number of units, ranked by variance, needed to hold ``variance_share`` (90% by
  default, the paper's UD_90%) of the total variance.
* ``pca_ud``: the same count over the eigenvalues of ``C`` (principal components, an effective
  rank); an extra that the paper does not use.
* ``cov_l1``: the paper's ``L_Σ = ‖C‖₁ / p²`` of the whole-set covariance.
* ``live_units``: the number of units that are not dead, and ``samples``: ``n``.

Undefined is NaN, never a perfect score: non-finite activations give NaN for every metric; a
layer with fewer than two live units (a constant or collapsed layer, ``tr C = 0``) or fewer
than two samples has NaN ``mapc``, ``cvr``, ``tdv``, ``ud`` and ``pca_ud`` (with fewer than two
samples also ``cov_l1``), while ``live_units`` and ``samples`` keep their counts. NaN never wins
a ``metric_for_best_model`` comparison in ``Trainer`` (it starts from ±inf and NaN compares
false), so a collapsed checkpoint is never chosen as the best one.

Over repeated runs, `mean_std()` (``mean = Σx/n``, sample std ``√(Σ(x − mean)²/(n − 1))``,
NaN when a value is not finite: a diverged run is reported, never averaged away) and
`aggregate()` (one row of ``<metric>_mean`` / ``<metric>_std`` / ``n`` per group of records).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

__all__ = ["CovarianceAccumulator", "decorrelation_metrics", "METRIC_NAMES", "mean_std", "aggregate"]

METRIC_NAMES = ("mapc", "cvr", "tdv", "ud", "pca_ud", "cov_l1", "live_units", "samples")
DEAD_UNIT_RTOL = 1e-10


class CovarianceAccumulator:
    """Streaming float64 sufficient statistics ``(n, Σh, Σhhᵀ)`` of one layer.

    Updates stay on the activations' device and never synchronise with the host.
    """

    def __init__(self) -> None:
        self.count: torch.Tensor | None = None
        self.sum: torch.Tensor | None = None
        self.outer: torch.Tensor | None = None

    @property
    def empty(self) -> bool:
        """Whether no row has been added yet (no [`update()`][hf_decorr.CovarianceAccumulator.update] or
        [`merge_()`][hf_decorr.CovarianceAccumulator.merge_] with rows)."""
        return self.count is None

    @property
    def width(self) -> int | None:
        """The number of units ``p`` of the rows added so far; ``None`` while
        [`empty`][hf_decorr.CovarianceAccumulator.empty]."""
        return None if self.sum is None else self.sum.shape[-1]

    def update(self, h: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Add the valid rows of ``h`` (shape ``(N, p)``; ``mask`` 0/1 of shape ``(N,)``)."""
        if h.dim() != 2:
            raise ValueError(f"expected activations of shape (N, p), got {tuple(h.shape)}")
        h = h.detach().to(torch.float64)
        if mask is None:
            w = torch.ones(h.shape[0], dtype=torch.float64, device=h.device)
        else:
            m = mask.to(device=h.device, dtype=torch.bool)
            h = torch.where(m.unsqueeze(-1), h, h.new_zeros(()))
            w = m.to(torch.float64)
        count, total, outer = w.sum(), h.sum(dim=0), h.T @ h
        if self.count is None or self.sum is None or self.outer is None:
            self.count, self.sum, self.outer = count, total, outer
            return
        if total.shape != self.sum.shape:
            raise ValueError(f"layer width changed from {self.sum.shape[-1]} to {total.shape[-1]}")
        self.count = self.count + count
        self.sum = self.sum + total
        self.outer = self.outer + outer

    def statistics(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(n, Σh (p,), Σhhᵀ (p, p))`` in float64; ``ValueError`` while
        [`empty`][hf_decorr.CovarianceAccumulator.empty]."""
        if self.count is None or self.sum is None or self.outer is None:
            raise ValueError("no samples were accumulated")
        return self.count, self.sum, self.outer

    def merge_(self, other: CovarianceAccumulator) -> CovarianceAccumulator:
        """Add another accumulator's statistics into this one (in place)."""
        if other.empty:
            return self
        count, total, outer = other.statistics()
        if self.empty:
            self.count, self.sum, self.outer = count.clone(), total.clone(), outer.clone()
        else:
            mine = self.statistics()
            self.count, self.sum, self.outer = mine[0] + count, mine[1] + total, mine[2] + outer
        return self

    def covariance(self, correction: int = 1) -> torch.Tensor:
        """``C = (S − s sᵀ/n) / (n − correction)`` in float64; zeros when ``n ≤ correction``."""
        n, total, outer = self.statistics()
        cov = outer - torch.outer(total, total) / n.clamp_min(1)
        cov = cov / (n - correction).clamp_min(1)
        return torch.where(n > correction, cov, torch.zeros_like(cov))


def _units_for_share(sorted_desc: torch.Tensor, share: float) -> int:
    total = sorted_desc.sum()
    if total <= 0:
        return 0
    cumulative = torch.cumsum(sorted_desc, dim=0) / total
    # smallest k with cumulative[k-1] >= share (a tiny tolerance absorbs float64 rounding)
    return int(torch.searchsorted(cumulative, torch.tensor(share - 1e-12, dtype=cumulative.dtype)).item()) + 1


def decorrelation_metrics(
    cov: torch.Tensor, top_d: int = 10, variance_share: float = 0.9, samples: int | float | None = None
) -> dict[str, float]:
    """The paper's metrics of one covariance matrix ``cov`` of shape ``(p, p)`` (see module doc)."""
    if cov.dim() != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"expected a square covariance matrix, got {tuple(cov.shape)}")
    if not 0.0 < variance_share <= 1.0:
        raise ValueError(f"variance_share must be in (0, 1], got {variance_share}")
    cov = cov.detach().to(device="cpu", dtype=torch.float64)
    cov = 0.5 * (cov + cov.T)
    p = cov.shape[0]
    few_samples = samples is not None and not float(samples) >= 2
    if not bool(torch.isfinite(cov).all()) or few_samples:
        # non-finite activations, or too few samples for a covariance: reported, never hidden
        out = {key: math.nan for key in METRIC_NAMES if key != "samples"}
        if few_samples and bool(torch.isfinite(cov).all()):
            out["live_units"] = 0.0
        if samples is not None:
            out["samples"] = float(samples)
        return out
    var = torch.diagonal(cov).clamp_min(0)
    total = float(var.sum())
    abs_cov = cov.abs()

    live = var > DEAD_UNIT_RTOL * float(var.max()) if total > 0 else torch.zeros(p, dtype=torch.bool)
    n_live = int(live.sum())
    if n_live >= 2:
        idx = live.nonzero().squeeze(-1)
        sub = abs_cov[idx][:, idx]
        std = var[idx].sqrt()
        corr = sub / torch.outer(std, std)
        off = corr.sum() - torch.diagonal(corr).sum()
        mapc = float(off) / (n_live * n_live - n_live)
    else:
        # fewer than two live units: no correlation, spread or dimension to measure (a collapsed layer)
        out = {key: math.nan for key in ("mapc", "cvr", "tdv", "ud", "pca_ud")}
        out.update({"cov_l1": float(abs_cov.sum()) / (p * p), "live_units": float(n_live)})
        if samples is not None:
            out["samples"] = float(samples)
        return out

    sorted_var = torch.sort(var, descending=True).values
    eig = torch.linalg.eigvalsh(cov).clamp_min(0).flip(0)
    cvr = float(abs_cov.sum()) / total
    tdv = float(sorted_var[: min(top_d, p)].sum()) / total
    out = {
        "mapc": mapc,
        "cvr": cvr,
        "tdv": tdv,
        "ud": float(_units_for_share(sorted_var, variance_share)),
        "pca_ud": float(_units_for_share(eig, variance_share)),
        "cov_l1": float(abs_cov.sum()) / (p * p),
        "live_units": float(n_live),
    }
    if samples is not None:
        out["samples"] = float(samples)
    return out


# ------------------------------------------------------------------------- over repeated runs


def _as_float(value: Any) -> float:
    if hasattr(value, "item"):
        value = value.item()
    return float(value)


def mean_std(values: Iterable[Any]) -> tuple[float, float, int]:
    """``(mean, sample std (ddof=1), n)`` of ``values``; NaN, NaN if any value is not finite.

    ``n = 0`` gives ``(nan, nan, 0)``; ``n = 1`` gives a standard deviation of 0.
    """
    xs = [_as_float(v) for v in values]
    n = len(xs)
    if n == 0 or not all(math.isfinite(x) for x in xs):
        return math.nan, math.nan, n
    mean = math.fsum(xs) / n
    if n == 1:
        return mean, 0.0, 1
    var = math.fsum((x - mean) ** 2 for x in xs) / (n - 1)
    return mean, math.sqrt(var), n


def aggregate(records: Sequence[Mapping[str, Any]], by: Sequence[str], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Group ``records`` by the values of the keys ``by`` (in order of first appearance).

    Each output row holds the ``by`` keys, ``<metric>_mean`` and ``<metric>_std`` for every
    name in ``metrics`` (see `mean_std()`) and ``n``, the number of records in the group.
    A record that lacks a metric raises ``KeyError`` naming it.
    """
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for record in records:
        missing = [key for key in by if key not in record]
        if missing:
            raise KeyError(f"record {dict(record)!r} lacks the grouping key(s) {missing}")
        groups.setdefault(tuple(record[key] for key in by), []).append(record)
    rows = []
    for key, members in groups.items():
        row: dict[str, Any] = dict(zip(by, key))
        for metric in metrics:
            try:
                values = [member[metric] for member in members]
            except KeyError:
                raise KeyError(f"a record of group {dict(zip(by, key))} lacks the metric {metric!r}") from None
            row[f"{metric}_mean"], row[f"{metric}_std"], _ = mean_std(values)
        row["n"] = len(members)
        rows.append(row)
    return rows
