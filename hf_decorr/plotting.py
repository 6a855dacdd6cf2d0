"""Figures of a layer's covariance: heat maps, spectra and metric-versus-loss curves.

Matplotlib is an optional dependency (``pip install hf-decorr[plots]``); it is imported inside
the functions, and figures are built with ``matplotlib.figure.Figure`` (no ``pyplot``), so
nothing here touches a global backend or opens a window, and it works in threads and on
headless machines. Inputs may be NumPy arrays, torch tensors or nested lists.

* `correlation_from_covariance()`: ``R_ij = C_ij / √(C_ii C_jj)``; rows and columns of
  *dead* units (``C_ii ≤ 1e-10 · max C_ii``, the rule of `hf_decorr.metrics`) are 0.
* `spectrum()`: the unit variances ``diag C`` (the paper's "dimensions") or the
  eigenvalues of ``C`` (principal components), sorted in decreasing order.
* `plot_matrix()` / `plot_covariance()`: heat map of ``|C|`` (or ``C``, or ``|R|``).
* `plot_spectrum()`: one spectrum as bars or as a one-row heat map ("strip").
* `plot_spectra()`: many spectra (one per run) as the rows of a heat map.
* `plot_metric_curves()`: a metric against the task loss, one curve per regulariser,
  points ordered by λ, with mean ± std error bars over repeated runs (the paper's Figs. 2–3).
* `plot_histories()`: values against training step or epoch (convergence checks).
* `new_figure()`, `save_figure()` (atomic PNG write).
* Layer by layer (``hf-decorr`` command, recipes, TensorBoard): `plot_correlation_map()`
  (``|R|`` with units ordered by variance), `plot_spectrum_curves()` (spectra as lines),
  `plot_layer_metrics()` (metrics over depth, one line per run), `plot_layer_pair()`
  (one layer of several runs side by side), `figure_to_rgb()` (an image array),
  `save_layer_figures()` (one such figure per layer, written as a complete folder).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .atomic import atomic_write
from .metrics import DEAD_UNIT_RTOL, aggregate

if TYPE_CHECKING:  # pragma: no cover
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "as_numpy",
    "correlation_from_covariance",
    "spectrum",
    "new_figure",
    "save_figure",
    "plot_matrix",
    "plot_covariance",
    "plot_spectrum",
    "plot_spectra",
    "plot_metric_curves",
    "plot_histories",
    "require_matplotlib",
    "variance_order",
    "plot_correlation_map",
    "plot_spectrum_curves",
    "plot_layer_metrics",
    "plot_layer_pair",
    "figure_to_rgb",
    "save_layer_figures",
]

SPECTRUM_KINDS = ("variance", "eigenvalues")


def _require_matplotlib():
    try:
        import matplotlib
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError("hf_decorr.plotting needs matplotlib: pip install 'hf-decorr[plots]'") from err
    return matplotlib


def as_numpy(x: Any) -> np.ndarray:
    """A float64 NumPy copy of an array, tensor or nested list."""
    if hasattr(x, "detach"):
        x = x.detach().to("cpu").double().numpy()
    return np.array(x, dtype=np.float64)


def _square(cov: Any) -> np.ndarray:
    c = as_numpy(cov)
    if c.ndim != 2 or c.shape[0] != c.shape[1]:
        raise ValueError(f"expected a square (p, p) matrix, got shape {c.shape}")
    return 0.5 * (c + c.T)


def correlation_from_covariance(cov: Any) -> np.ndarray:
    """``R = C / √(diag C diag Cᵀ)`` of shape ``(p, p)``, with dead units' rows and columns set to 0."""
    c = _square(cov)
    var = np.clip(np.diag(c), 0.0, None)
    live = var > DEAD_UNIT_RTOL * var.max() if var.max() > 0 else np.zeros_like(var, dtype=bool)
    std = np.where(live, np.sqrt(np.where(live, var, 1.0)), 1.0)
    r = c / np.outer(std, std)
    r[~live, :] = 0.0
    r[:, ~live] = 0.0
    return r


def spectrum(cov: Any, kind: str = "variance") -> np.ndarray:
    """``diag C`` (``kind="variance"``) or the eigenvalues of ``C`` (``"eigenvalues"``), descending, ≥ 0."""
    if kind not in SPECTRUM_KINDS:
        raise ValueError(f"kind={kind!r} is not valid; choose one of {list(SPECTRUM_KINDS)}")
    c = _square(cov)
    values = np.diag(c) if kind == "variance" else np.linalg.eigvalsh(c)
    return np.sort(np.clip(values, 0.0, None))[::-1]


def new_figure(
    nrows: int = 1, ncols: int = 1, panel_size: tuple[float, float] = (4.0, 3.2)
) -> tuple[Figure, np.ndarray]:
    """A ``Figure`` with an ``(nrows, ncols)`` array of axes, each about ``panel_size`` inches."""
    _require_matplotlib()
    from matplotlib.figure import Figure

    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout="constrained")
    axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _axes(ax: Axes | None) -> Axes:
    if ax is not None:
        return ax
    return new_figure()[1][0, 0]


def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 100) -> Path:
    """Save ``fig`` to ``path`` (format from the suffix, PNG by default) atomically; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fmt = path.suffix.lstrip(".").lower() or "png"
    return atomic_write(path, lambda f: fig.savefig(f, format=fmt, dpi=dpi), binary=True)


def plot_matrix(
    matrix: Any,
    ax: Axes | None = None,
    *,
    title: str | None = None,
    absolute: bool = True,
    cmap: str | None = None,
    vmin: float | None = None,
    vmax: float | None = None,
    colorbar: bool = True,
    tick_labels: Sequence[str] | None = None,
    annotate: bool = False,
) -> Axes:
    """Heat map of a ``(p, q)`` matrix (``|M|`` when ``absolute``); returns the axes.

    Signed maps use a diverging colour map centred on 0. ``annotate`` writes each value in
    its cell (for small matrices).
    """
    m = as_numpy(matrix)
    if m.ndim != 2:
        raise ValueError(f"expected a 2-D matrix, got shape {m.shape}")
    ax = _axes(ax)
    if absolute:
        m = np.abs(m)
        cmap = cmap or "viridis"
        vmin = 0.0 if vmin is None else vmin
    else:
        cmap = cmap or "RdBu_r"
        bound = float(np.nanmax(np.abs(m))) if m.size else 1.0
        vmin = -bound if vmin is None else vmin
        vmax = bound if vmax is None else vmax
    image = ax.imshow(m, cmap=cmap, vmin=vmin, vmax=vmax, interpolation="nearest", aspect="equal")
    if colorbar:
        ax.figure.colorbar(image, ax=ax, shrink=0.85)
    if tick_labels is not None:
        ax.set_xticks(range(m.shape[1]), tick_labels, rotation=90)
        ax.set_yticks(range(m.shape[0]), tick_labels)
    elif max(m.shape) <= 16:
        ax.set_xticks(range(m.shape[1]))
        ax.set_yticks(range(m.shape[0]))
    if annotate:
        top = float(np.nanmax(np.abs(m))) if m.size else 0.0
        for (i, j), value in np.ndenumerate(m):
            ax.text(
                j,
                i,
                f"{value:.2g}",
                ha="center",
                va="center",
                fontsize=7,
                color="white" if absolute and abs(value) < 0.5 * top else "black",
            )
    if title:
        ax.set_title(title)
    return ax


def plot_covariance(
    cov: Any,
    ax: Axes | None = None,
    *,
    correlation: bool = False,
    absolute: bool = True,
    title: str | None = None,
    **kwargs: Any,
) -> Axes:
    """Heat map of a covariance matrix ``C`` ``(p, p)``, or of its correlation matrix when ``correlation``.

    Extra keyword arguments go to `plot_matrix()`.
    """
    m = correlation_from_covariance(cov) if correlation else _square(cov)
    if correlation and absolute:
        kwargs.setdefault("vmax", 1.0)
    return plot_matrix(m, ax, title=title, absolute=absolute, **kwargs)


def _spectrum_values(values: Any, kind: str, normalise: bool) -> np.ndarray:
    v = as_numpy(values)
    if v.ndim == 2:
        v = spectrum(v, kind)
    elif v.ndim == 1:
        v = np.sort(np.clip(v, 0.0, None))[::-1]
    else:
        raise ValueError(f"expected a covariance matrix (p, p) or a vector of values (p,), got shape {v.shape}")
    if normalise:
        total = v.sum()
        v = v / total if total > 0 else v
    return v


def plot_spectrum(
    values: Any,
    ax: Axes | None = None,
    *,
    kind: str = "variance",
    normalise: bool = True,
    style: str = "bar",
    threshold: float | None = None,
    title: str | None = None,
    log: bool = False,
) -> Axes:
    """One spectrum: ``values`` is a covariance ``(p, p)`` (its `spectrum()` of ``kind``) or a vector.

    ``normalise`` divides by the sum (shares of the total variance). ``style="bar"`` draws
    bars against the rank, with an optional horizontal ``threshold`` line; ``style="strip"``
    draws a one-row heat map like the paper's spectra.
    """
    if style not in ("bar", "strip"):
        raise ValueError(f"style={style!r} is not valid; choose one of ['bar', 'strip']")
    v = _spectrum_values(values, kind, normalise)
    ax = _axes(ax)
    if style == "strip":
        image = ax.imshow(v[None, :], cmap="viridis", vmin=0.0, aspect="auto", interpolation="nearest")
        ax.figure.colorbar(image, ax=ax, shrink=0.85)
        ax.set_yticks([])
        ax.set_xticks(range(len(v)))
    else:
        ax.bar(np.arange(1, len(v) + 1), v, color="tab:blue")
        if threshold is not None:
            ax.axhline(threshold, color="tab:red", linestyle="--", linewidth=1)
        if log:
            ax.set_yscale("log")
        ax.set_ylabel("share of variance" if normalise else ("variance" if kind == "variance" else "eigenvalue"))
    ax.set_xlabel("unit (by variance)" if kind == "variance" else "principal component")
    if title:
        ax.set_title(title)
    return ax


def plot_spectra(
    spectra: Mapping[str, Any],
    ax: Axes | None = None,
    *,
    kind: str = "variance",
    normalise: bool = True,
    title: str | None = None,
    cmap: str = "viridis",
) -> Axes:
    """Several spectra as the rows of one heat map (row label → covariance ``(p, p)`` or vector ``(p,)``).

    Rows shorter than the longest are padded with 0.
    """
    if not spectra:
        raise ValueError("plot_spectra needs at least one spectrum")
    rows = [_spectrum_values(v, kind, normalise) for v in spectra.values()]
    width = max(len(r) for r in rows)
    grid = np.zeros((len(rows), width))
    for i, r in enumerate(rows):
        grid[i, : len(r)] = r
    ax = _axes(ax)
    image = ax.imshow(grid, cmap=cmap, vmin=0.0, aspect="auto", interpolation="nearest")
    ax.figure.colorbar(image, ax=ax, shrink=0.85, label="share of variance" if normalise else None)
    ax.set_yticks(range(len(rows)), list(spectra.keys()))
    ticks = range(width) if width <= 20 else sorted({int(round(t)) for t in np.linspace(0, width - 1, 8)})
    ax.set_xticks(list(ticks), [str(i + 1) for i in ticks])
    ax.set_xlabel("unit (by variance)" if kind == "variance" else "principal component")
    if title:
        ax.set_title(title)
    return ax


def plot_metric_curves(
    records: Sequence[Mapping[str, Any]],
    *,
    x: str,
    y: str,
    group: str,
    order: str,
    ax: Axes | None = None,
    logx: bool = True,
    logy: bool = False,
    errorbars: bool = True,
    annotate: bool = False,
    annotate_format: str = ".2g",
    labels: Mapping[Any, str] | None = None,
    shared: Sequence[Mapping[str, Any]] = (),
    title: str | None = None,
    xlabel: str | None = None,
    ylabel: str | None = None,
    reference: float | None = None,
) -> Axes:
    """``y`` against ``x``, one curve per value of ``group``, points sorted by ``order``.

    Records with equal ``(group, order)`` (repeated runs) are averaged, with ``mean ± std``
    error bars on both axes when ``errorbars``. ``shared`` records (e.g. the unregularised
    λ = 0 runs) are added to every curve. ``annotate`` writes the ``order`` value (formatted with
    ``annotate_format``) next to each point; ``reference`` draws a horizontal dashed line (an
    optimum or a target).
    """
    if not records:
        raise ValueError("plot_metric_curves needs at least one record")
    ax = _axes(ax)
    groups = list(dict.fromkeys(r[group] for r in records))
    for name in groups:
        members = [r for r in records if r[group] == name] + [{**r, group: name} for r in shared]
        rows = sorted(aggregate(members, [order], [x, y]), key=lambda r: r[order])
        xs = np.array([r[f"{x}_mean"] for r in rows], dtype=float)
        ys = np.array([r[f"{y}_mean"] for r in rows], dtype=float)
        label = (labels or {}).get(name, str(name))
        if errorbars and any(r["n"] > 1 for r in rows):
            ax.errorbar(
                xs,
                ys,
                xerr=[r[f"{x}_std"] for r in rows],
                yerr=[r[f"{y}_std"] for r in rows],
                marker="o",
                markersize=4,
                capsize=2,
                linewidth=1.2,
                label=label,
            )
        else:
            ax.plot(xs, ys, marker="o", markersize=4, linewidth=1.2, label=label)
        if annotate:
            for r, xv, yv in zip(rows, xs, ys):
                ax.annotate(
                    format(r[order], annotate_format), (xv, yv), textcoords="offset points", xytext=(3, 3), fontsize=6
                )
    if reference is not None:
        ax.axhline(reference, color="gray", linestyle="--", linewidth=1)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel or x)
    ax.set_ylabel(ylabel or y)
    if title:
        ax.set_title(title)
    ax.legend(fontsize=8)
    return ax


def plot_histories(
    histories: Mapping[str, Sequence[tuple[float, float]]],
    ax: Axes | None = None,
    *,
    logy: bool = False,
    title: str | None = None,
    xlabel: str = "epoch",
    ylabel: str | None = None,
) -> Axes:
    """One line per label through its ``(x, value)`` points (a loss or a metric during training)."""
    ax = _axes(ax)
    for label, points in histories.items():
        if not points:
            continue
        xs, ys = zip(*points)
        ax.plot(xs, ys, linewidth=1.2, label=label)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    if ylabel:
        ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    if len(histories) > 1:
        ax.legend(fontsize=7)
    return ax


# ------------------------------------------------------------------------- layer-by-layer figures


def require_matplotlib() -> None:
    """Raise ``ImportError`` with the install command (``pip install 'hf-decorr[plots]'``) if matplotlib is missing."""
    _require_matplotlib()


def variance_order(cov: Any) -> np.ndarray:
    """Unit indices ``(p,)`` sorted by decreasing variance ``diag C`` (ties keep their order)."""
    c = _square(cov)
    return np.argsort(-np.diag(c), kind="stable")


def plot_correlation_map(
    cov: Any,
    ax: Axes | None = None,
    *,
    title: str | None = None,
    order_by_variance: bool = True,
    max_units: int | None = None,
    colorbar: bool = True,
    gamma: float = 0.5,
) -> Axes:
    """Heat map of ``|R|`` (``R = C / √(diag C diag Cᵀ)``, dead units 0) on a fixed ``[0, 1]`` scale.

    ``cov`` is ``(p, p)``. With ``order_by_variance`` the rows and columns are the units sorted by
    decreasing variance, so the units that carry the variance come first (top-left);
    ``max_units`` keeps only that many of them. The colours follow ``|R|^gamma`` (0.5 by default:
    a square-root scale that makes the small correlations of a wide layer visible; 1 is linear),
    the colour bar is labelled in ``|R|``.
    """
    _require_matplotlib()
    from matplotlib.colors import PowerNorm

    c = _square(cov)
    if order_by_variance:
        order = variance_order(c)
        c = c[np.ix_(order, order)]
    if max_units is not None:
        c = c[:max_units, :max_units]
    r = np.abs(correlation_from_covariance(c))
    ax = _axes(ax)
    image = ax.imshow(r, cmap="magma", norm=PowerNorm(gamma, vmin=0.0, vmax=1.0), interpolation="nearest",
                      aspect="equal")
    if colorbar:
        bar = ax.figure.colorbar(image, ax=ax, shrink=0.85)
        bar.set_label("|R|" + (f" (scale |R|^{gamma:g})" if gamma != 1 else ""))
    if order_by_variance:
        ax.set_xlabel("unit (by variance)")
        ax.set_ylabel("unit (by variance)")
    if title:
        ax.set_title(title)
    return ax


def plot_spectrum_curves(
    spectra: Mapping[str, Any],
    ax: Axes | None = None,
    *,
    kind: str = "variance",
    normalise: bool = True,
    cumulative: bool = False,
    log: bool = True,
    threshold: float | None = None,
    title: str | None = None,
    colors: Sequence[Any] | None = None,
    linestyles: Sequence[str] | None = None,
) -> Axes:
    """Several spectra as lines against the rank (label → covariance ``(p, p)`` or values ``(p,)``).

    ``normalise`` plots shares of the total; ``cumulative`` the running sum (then ``threshold``,
    e.g. 0.9, marks the share that defines UD_90%); ``log`` a logarithmic value axis (ignored
    when ``cumulative``), on which values below ``1e-10`` times the largest (dead units, null
    directions) are not drawn.
    """
    if not spectra:
        raise ValueError("plot_spectrum_curves needs at least one spectrum")
    ax = _axes(ax)
    for i, (label, values) in enumerate(spectra.items()):
        v = _spectrum_values(values, kind, normalise)
        if cumulative:
            v = np.cumsum(v)
        elif log and v.size and v[0] > 0:
            v = np.where(v > DEAD_UNIT_RTOL * v[0], v, np.nan)  # dead units / null directions: not drawn
        style = {}
        if colors is not None:
            style["color"] = colors[i % len(colors)]
        if linestyles is not None:
            style["linestyle"] = linestyles[i % len(linestyles)]
        ax.plot(np.arange(1, len(v) + 1), v, linewidth=1.2, label=label, **style)
    if threshold is not None:
        ax.axhline(threshold, color="gray", linestyle="--", linewidth=1)
    if log and not cumulative:
        ax.set_yscale("log")
    unit = "unit (by variance)" if kind == "variance" else "principal component"
    ax.set_xlabel(f"rank of {unit}")
    what = "share of variance" if normalise else ("variance" if kind == "variance" else "eigenvalue")
    ax.set_ylabel(f"cumulative {what}" if cumulative else what)
    if title:
        ax.set_title(title)
    if len(spectra) > 1:
        ax.legend(fontsize=7)
    return ax


def plot_layer_metrics(
    runs: Mapping[str, Sequence[Mapping[str, float]]],
    metrics: Sequence[tuple[str, str]],
    *,
    layer_labels: Sequence[str] | None = None,
    extra: Mapping[str, Sequence[float]] | None = None,
    ncols: int = 3,
    title: str | None = None,
) -> Figure:
    """Metrics over depth: one panel per ``(key, label)`` of ``metrics``, one line per run.

    ``runs`` maps a run label to its per-layer metric dicts in layer order. ``extra`` adds one
    panel per entry (label → one value per layer), e.g. the linear CKA between two models.
    """
    if not runs:
        raise ValueError("plot_layer_metrics needs at least one run")
    panels: list[tuple[str, dict[str, Sequence[float]]]] = [
        (label, {run: [m.get(key, math.nan) for m in layers] for run, layers in runs.items()})
        for key, label in metrics
    ]
    for label, values in (extra or {}).items():
        panels.append((label, {"": list(values)}))
    ncols = max(1, min(ncols, len(panels)))
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = new_figure(nrows, ncols, panel_size=(3.4, 2.6))
    depth = max(len(layers) for layers in runs.values())
    ticks = list(range(depth))
    for i, ax in enumerate(axes.flat):
        if i >= len(panels):
            ax.set_visible(False)
            continue
        label, lines = panels[i]
        for j, (run, values) in enumerate(lines.items()):
            ax.plot(range(len(values)), values, marker="o", markersize=3.5, linewidth=1.2, label=run or None,
                    color=None if run else "tab:purple", linestyle="-" if j == 0 else "--")
        ax.set_title(label, fontsize=10)
        ax.set_xticks(ticks, list(layer_labels) if layer_labels is not None else [str(t) for t in ticks],
                      fontsize=7, rotation=45 if depth > 8 else 0)
        ax.set_xlabel("layer", fontsize=8)
        if len(lines) > 1 and i == 0:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return fig


def plot_layer_pair(
    covariances: Mapping[str, Any],
    *,
    title: str | None = None,
    max_units: int | None = None,
    spectra: Mapping[str, Any] | None = None,
) -> Figure:
    """One layer of one or more runs side by side: an ``|R|`` heat map per run (units by variance) and
    one panel with their variance spectra (shares of the total, log scale).

    ``covariances`` maps a run label to the layer's ``(p, p)`` covariance; ``spectra`` (label →
    unit variances ``(p,)``) replaces ``diag C`` in the spectrum panel, e.g. when ``covariances``
    hold only the units of largest variance.
    """
    if not covariances:
        raise ValueError("plot_layer_pair needs at least one covariance")
    n = len(covariances)
    fig, axes = new_figure(1, n + 1, panel_size=(3.6, 3.1))
    for ax, (label, cov) in zip(axes[0], covariances.items()):
        plot_correlation_map(cov, ax, title=f"{label}: |correlation|", max_units=max_units,
                             colorbar=ax is axes[0, n - 1])
    plot_spectrum_curves(spectra or covariances, axes[0, n], title="variance spectrum", linestyles=["-", "--", ":"])
    if title:
        fig.suptitle(title)
    return fig


def figure_to_rgb(fig: Figure) -> np.ndarray:
    """The rendered figure as an ``(H, W, 3)`` uint8 array (for TensorBoard's ``add_image`` / W&B images)."""
    _require_matplotlib()
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba())[..., :3].copy()


def save_layer_figures(
    folder: str | os.PathLike,
    covariances: Mapping[str, Mapping[str, Any]],
    *,
    max_units: int | None = 512,
) -> list[Path]:
    """One PNG per layer in ``folder``: the runs side by side (`plot_layer_pair()`).

    ``covariances`` maps a run label (``"baseline"``, ``"decorr"``) to ``{layer: C (p, p)}``;
    layers missing from a run are drawn for the runs that have them. The folder is written
    completely or not at all (`hf_decorr.atomic.staged_directory()`); files are named
    ``<i>_<layer>.png`` in layer order. Returns the paths.
    """
    from .atomic import staged_directory

    _require_matplotlib()
    layers = list(dict.fromkeys(layer for per_run in covariances.values() for layer in per_run))
    names = []
    with staged_directory(folder) as tmp:
        for i, layer in enumerate(layers):
            runs = {run: per_run[layer] for run, per_run in covariances.items() if layer in per_run}
            fig = plot_layer_pair(runs, title=f"{layer}", max_units=max_units)
            name = f"{i:02d}_{layer.replace('/', '_')}.png"
            save_figure(fig, Path(tmp) / name)
            names.append(name)
    return [Path(folder) / name for name in names]
