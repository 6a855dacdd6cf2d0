"""Experiment 1 of Kågebäck & Mogren (2017): does L_Σ find the dimensionality of the data?

Data (one *draw* per seed): ``z ∈ R⁴ ~ N(0, Σ)`` with ``Σ = diag(latent_variances)``, observed
as ``x = Ω z ∈ R^D`` through a random ``Ω ∈ R^{D×4}`` with ``N(0, 1)`` entries; ``num_samples``
training rows and a held-out set of ``eval_samples`` rows from the same ``Ω``.

Model: :class:`hf_decorr.models.LinearAutoencoder` (linear ``code`` layer with ``code_dim``
units, linear decoder, MSE). Each draw trains one unregularised run (λ = 0) and, for each
penalty (``cov_l1`` = the paper's L_Σ, ``l1`` = its L1 activation baseline), one run per λ of
``num_weights`` log-spaced values in ``[weight_min, weight_max]``; all runs of a draw start
from the same initial weights. The penalty is attached by ``DecorrTrainer`` through
``decorr_layers=["code"]``; the metrics are ``trainer.evaluate()``'s ``eval_loss`` (MSE) and
``eval_decorr_*`` (MAPC, CVR, TdV with d = 4, UD_90% over units ranked by variance, and the
PCA-based UD as an extra) on the held-out set.

Claim checked (issue 4): at the recommended λ, UD_90% ∈ {3, 4} and TdV ≥ 0.95 in at least 80%
of the draws, at an MSE within 2× of the λ = 0 run; and L1 has a lower TdV at equal MSE.
The recommended λ is, unless ``--recommended_weight`` is given, the smallest λ of the grid at
which the first part holds (the cheapest λ that does the job).

Outputs in ``--output_dir``: ``results.json`` (settings, every run with its per-epoch history,
the aggregated table, the claim check, timings), ``results.md``, ``dimensionality_fig2.png``
(MAPC and CVR against MSE), ``dimensionality_fig3.png`` (TdV and UD_90% against MSE),
``dimensionality_convergence.png`` (held-out MSE and TdV per epoch, first draw) and
``dimensionality_covariance.png`` (|C| of the code of the first draw: λ = 0, L_Σ at the
recommended λ, L1 at the λ whose MSE is closest).

    python recipes/paper/dimensionality.py --output_dir results/paper/dimensionality
    python recipes/paper/dimensionality.py --output_dir /tmp/dim --quick   # seconds
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from transformers import HfArgumentParser, set_seed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from paper_common import (  # noqa: E402
    Stopwatch,
    TensorDictDataset,
    cpu_count,
    eval_history,
    layer_covariances,
    runtime,
    train_and_evaluate,
    training_arguments,
)

from hf_decorr.app.outputs import write_json_atomic  # noqa: E402
from hf_decorr.app.reporting import aggregate, markdown_table  # noqa: E402
from hf_decorr.atomic import staged_directory, write_text_atomic  # noqa: E402
from hf_decorr.metrics import decorrelation_metrics  # noqa: E402
from hf_decorr.models import LinearAutoencoder, LinearAutoencoderConfig  # noqa: E402
from hf_decorr.penalties import PENALTIES  # noqa: E402
from hf_decorr.plotting import (  # noqa: E402
    new_figure,
    plot_covariance,
    plot_histories,
    plot_metric_curves,
    save_figure,
)

METRICS = ("mse", "rel_mse", "mapc", "mapc_active", "cvr", "tdv", "ud", "pca_ud", "active_units")
ACTIVE_SHARE = 0.01  # a unit is "active" when it holds at least 1% of the layer's total variance
L1_MARGIN = 0.01  # "L1 worse" means a TdV lower by more than this at equal MSE
PENALTY_LABELS = {"none": "none", "cov_l1": "L_Σ", "l1": "L1 activation", "decov": "DeCov", "vicreg": "VICReg cov."}


@dataclass
class DimensionalityArguments:
    """Settings of the dimensionality-discovery experiment (paper, Section 4.1)."""

    output_dir: str = field(
        default="results/paper/dimensionality", metadata={"help": "Folder for results.json, results.md and figures."}
    )
    num_draws: int = field(
        default=10, metadata={"help": "Number of random draws of Ω (and of the data and initial weights)."}
    )
    num_samples: int = field(default=10_000, metadata={"help": "Training samples per draw."})
    eval_samples: int = field(default=2_000, metadata={"help": "Held-out samples per draw (same Ω) for the metrics."})
    input_dim: int = field(default=10, metadata={"help": "D, the dimension of the observed x = Ωz."})
    latent_variances: list[float] = field(
        default_factory=lambda: [1.0, 0.8, 0.6, 0.4],
        metadata={
            "help": "The diagonal of Σ (the true dimensionality is their number). Distinct, so the axes are "
            "identifiable; each holds ≥ 10 percent of the variance, so 4 is also the true UD_90."
        },
    )
    code_dim: int = field(default=10, metadata={"help": "Units of the linear coding layer."})
    num_weights: int = field(default=8, metadata={"help": "Number of log-spaced λ values (besides λ = 0)."})
    weight_min: float = field(default=0.001, metadata={"help": "Smallest λ of the sweep."})
    weight_max: float = field(default=1.0, metadata={"help": "Largest λ of the sweep."})
    penalties: list[str] = field(
        default_factory=lambda: ["cov_l1", "l1"],
        metadata={
            "help": "Penalties to sweep: 'cov_l1' (the paper's L_Σ) and the 'l1' activation baseline "
            "(also 'decov', 'vicreg')."
        },
    )
    epochs: int = field(default=20, metadata={"help": "Training epochs per run (the paper: 10,000; see docs)."})
    batch_size: int = field(default=100, metadata={"help": "Training batch size (samples per covariance estimate)."})
    learning_rate: float = field(default=0.01, metadata={"help": "Adam learning rate."})
    lr_scheduler_type: str = field(default="linear", metadata={"help": "transformers learning-rate schedule."})
    min_tdv: float = field(default=0.95, metadata={"help": "Claim threshold: TdV (d = number of latent factors)."})
    min_share_of_draws: float = field(default=0.8, metadata={"help": "Claim threshold: share of draws to pass."})
    max_mse_ratio: float = field(default=2.0, metadata={"help": "Claim threshold: MSE(λ) / MSE(0) at most this."})
    recommended_weight: float | None = field(
        default=None,
        metadata={"help": "λ at which to check the claim; default: the smallest λ of the grid that passes."},
    )
    seed: int = field(default=0, metadata={"help": "Base seed; draw k uses seed + k."})
    num_threads: int = field(default=1, metadata={"help": "torch intra-op threads (1 is fastest for a tiny model)."})
    quick: bool = field(default=False, metadata={"help": "Tiny settings for smoke tests (2 draws, 2 λ, 2 epochs)."})

    def __post_init__(self) -> None:
        if self.quick:
            self.num_draws, self.num_samples, self.eval_samples = 2, 400, 200
            self.num_weights, self.weight_min, self.weight_max, self.epochs = 2, 0.01, 1.0, 2
        for name in (
            "num_draws",
            "num_samples",
            "eval_samples",
            "input_dim",
            "code_dim",
            "num_weights",
            "epochs",
            "batch_size",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name} must be an integer >= 1, got {value!r}")
        if self.eval_samples < 2 or self.num_samples < 2:
            raise ValueError("--num_samples and --eval_samples must be >= 2 (a covariance needs two samples)")
        if not self.latent_variances or any(not (v > 0 and math.isfinite(v)) for v in self.latent_variances):
            raise ValueError(f"--latent_variances must be positive numbers, got {self.latent_variances}")
        if not 0 < self.weight_min <= self.weight_max:
            raise ValueError(
                f"--weight_min and --weight_max must satisfy 0 < min <= max, got {self.weight_min}, {self.weight_max}"
            )
        unknown = [p for p in self.penalties if p not in PENALTIES]
        if not self.penalties or unknown:
            raise ValueError(f"--penalties {unknown or self.penalties} is not valid; choose from {sorted(PENALTIES)}")
        if not 0 < self.min_share_of_draws <= 1:
            raise ValueError(f"--min_share_of_draws must be in (0, 1], got {self.min_share_of_draws}")
        if self.recommended_weight is not None and self.recommended_weight not in self.weights():
            raise ValueError(f"--recommended_weight {self.recommended_weight} is not in the λ grid {self.weights()}")

    def weights(self) -> list[float]:
        """The λ grid: ``num_weights`` log-spaced values in ``[weight_min, weight_max]`` (rounded to 6 digits)."""
        grid = np.geomspace(self.weight_min, self.weight_max, self.num_weights)
        return [float(f"{w:.6g}") for w in grid]


def make_draw(args: DimensionalityArguments, draw: int) -> tuple[TensorDictDataset, TensorDictDataset, torch.Tensor]:
    """Training and held-out sets of draw ``draw``, and its ``Ω`` ``(D, k)``."""
    g = torch.Generator().manual_seed(args.seed + draw)
    k = len(args.latent_variances)
    omega = torch.randn(args.input_dim, k, generator=g)
    std = torch.tensor(args.latent_variances).sqrt()

    def sample(n: int) -> TensorDictDataset:
        x = (torch.randn(n, k, generator=g) * std) @ omega.T
        return TensorDictDataset({"input_values": x, "labels": x})

    return sample(args.num_samples), sample(args.eval_samples), omega


def run_one(args: DimensionalityArguments, draw: int, penalty: str, weight: float, data: tuple, scratch: str) -> dict:
    """Train and evaluate one (draw, penalty, λ); returns the run's record."""
    train, held_out, _ = data
    set_seed(args.seed + draw)  # the same initial weights for every run of a draw
    model = LinearAutoencoder(LinearAutoencoderConfig(input_dim=args.input_dim, code_dim=args.code_dim))
    targs = training_arguments(
        scratch,
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=max(len(held_out), 1),
        learning_rate=args.learning_rate,
        lr_scheduler_type=args.lr_scheduler_type,
        eval_strategy="epoch",
        seed=args.seed + draw,
        decorr_layers=["code"],
        decorr_penalty="cov_l1" if penalty == "none" else penalty,
        decorr_weight=weight,
        decorr_top_d=len(args.latent_variances),
    )
    clock = Stopwatch()
    trainer, metrics = train_and_evaluate(model, targs, train, held_out)
    wall_s = clock.elapsed()["wall_s"]
    keys = ["eval_loss", "eval_decorr_tdv", "eval_decorr_ud", "eval_decorr_cvr", "eval_decorr_mapc"]
    history = [
        {
            "epoch": h["epoch"],
            "mse": h["eval_loss"],
            "tdv": h["eval_decorr_tdv"],
            "ud": h["eval_decorr_ud"],
            "cvr": h["eval_decorr_cvr"],
            "mapc": h["eval_decorr_mapc"],
        }
        for h in eval_history(trainer, keys)
    ]
    cov = layer_covariances(trainer.model, held_out, ["code"])["code"]
    x = held_out.tensors["input_values"].double()
    record = {
        "draw": draw,
        "penalty": penalty,
        "weight": weight,
        "mse": metrics["eval_loss"],
        "rel_mse": metrics["eval_loss"] / float(x.var(dim=0).mean()),
        **{m: metrics[f"eval_decorr_{m}"] for m in ("mapc", "cvr", "tdv", "ud", "pca_ud", "live_units")},
        **active_unit_metrics(cov),
        "train_loss": next((h["train_loss"] for h in trainer.state.log_history if "train_loss" in h), None),
        "wall_s": wall_s,
        "history": history,
        "covariance": cov.tolist() if draw == 0 else None,  # for the heat maps
    }
    record.update(convergence_stats(history))
    return record


def active_unit_metrics(cov: torch.Tensor) -> dict:
    """Units holding ≥ ACTIVE_SHARE of the total variance, and the MAPC among them only.

    The paper's MAPC averages over every unit with non-zero variance, so units that the
    penalty has shrunk to a negligible (but non-zero) variance still count with whatever
    correlation their residue has; restricting it to active units shows the correlation of
    the units that carry the code.
    """
    var = torch.diagonal(cov).clamp_min(0)
    total = float(var.sum())
    active = (var >= ACTIVE_SHARE * total).nonzero().squeeze(-1) if total > 0 else torch.zeros(0, dtype=torch.long)
    sub = cov[active][:, active]
    return {
        "active_units": float(len(active)),
        "mapc_active": decorrelation_metrics(sub)["mapc"] if len(active) >= 2 else 0.0,
    }


def convergence_stats(history: list[dict]) -> dict:
    """Change over the last quarter of training: ``|ΔTdV|``, ``MSE_end / MSE_¾`` and whether UD changed."""
    if len(history) < 2:
        return {"last_quarter_dtdv": None, "last_quarter_mse_ratio": None, "last_quarter_ud_changed": None}
    ref = history[max(0, math.ceil(0.75 * len(history)) - 1)]
    end = history[-1]
    return {
        "last_quarter_dtdv": abs(end["tdv"] - ref["tdv"]),
        "last_quarter_mse_ratio": end["mse"] / ref["mse"] if ref["mse"] > 0 else None,
        "last_quarter_ud_changed": end["ud"] != ref["ud"],
    }


def passes(record: dict, args: DimensionalityArguments) -> bool:
    """The per-draw structural criterion: UD_90% ∈ {k − 1, k} and TdV ≥ min_tdv (k = true dimensionality)."""
    k = len(args.latent_variances)
    return record["ud"] in (k - 1, k) and record["tdv"] >= args.min_tdv


def _interp_log_x(x: float, xs: list[float], ys: list[float]) -> float | None:
    """Linear interpolation of ``y`` at ``x`` in ``log x`` along points sorted by ``x``; None outside."""
    pts = sorted((a, b) for a, b in zip(xs, ys) if a > 0)
    if not pts or x <= 0 or not pts[0][0] <= x <= pts[-1][0]:
        return None
    return float(np.interp(math.log(x), [math.log(a) for a, _ in pts], [b for _, b in pts]))


def check_claim(records: list[dict], args: DimensionalityArguments) -> dict:
    """Evaluate issue 4's criteria on the runs (see the module docstring)."""
    weights = args.weights()
    draws = sorted({r["draw"] for r in records})
    need = math.ceil(args.min_share_of_draws * len(draws))
    base = {r["draw"]: r["mse"] for r in records if r["penalty"] == "none"}
    mean_base = float(np.mean(list(base.values())))
    per_weight = []
    for w in weights:
        runs = [r for r in records if r["penalty"] == "cov_l1" and r["weight"] == w]
        if not runs:
            continue
        ratios = [r["mse"] / base[r["draw"]] if base[r["draw"]] > 0 else math.inf for r in runs]
        per_weight.append(
            {
                "weight": w,
                "draws_passing": sum(passes(r, args) for r in runs),
                "draws_ud_3_or_4": sum(
                    r["ud"] in (len(args.latent_variances) - 1, len(args.latent_variances)) for r in runs
                ),
                "draws_tdv_ok": sum(r["tdv"] >= args.min_tdv for r in runs),
                "draws": len(runs),
                "mean_mse": float(np.mean([r["mse"] for r in runs])),
                "mse_ratio_of_means": float(np.mean([r["mse"] for r in runs])) / mean_base
                if mean_base > 0
                else math.inf,
                "draws_mse_within_ratio": sum(q <= args.max_mse_ratio for q in ratios),
                "median_mse_ratio": float(np.median(ratios)),
            }
        )
    if args.recommended_weight is not None:
        chosen, rule = args.recommended_weight, "given by --recommended_weight"
    else:
        ok = [p["weight"] for p in per_weight if p["draws_passing"] >= need]
        if ok:
            chosen, rule = min(ok), f"smallest λ with UD_90% ∈ {{3, 4}} and TdV ≥ {args.min_tdv} in ≥ {need} draws"
        else:
            best = max(per_weight, key=lambda p: (p["draws_passing"], -p["weight"])) if per_weight else None
            chosen = best["weight"] if best else None
            rule = "no λ passes; showing the λ with the most passing draws"
    at = next((p for p in per_weight if p["weight"] == chosen), None)

    # L1 at equal MSE: interpolate L1's mean curve (from λ = 0 upwards) at L_Σ's mean MSE
    comparison = None
    if at is not None and "l1" in args.penalties:
        comparison = {"mse": at["mean_mse"], "margin": L1_MARGIN}
        ours = [r for r in records if r["penalty"] == "cov_l1" and r["weight"] == chosen]
        curve = [r for r in records if r["penalty"] in ("none", "l1")]
        means = aggregate(curve, ["penalty", "weight"], ["mse", "tdv", "cvr"])
        for metric in ("tdv", "cvr"):
            comparison[f"{metric}_cov_l1"] = float(np.mean([r[metric] for r in ours]))
            comparison[f"{metric}_l1_at_equal_mse"] = _interp_log_x(
                at["mean_mse"], [m["mse_mean"] for m in means], [m[f"{metric}_mean"] for m in means]
            )
        l1_tdv = comparison["tdv_l1_at_equal_mse"]
        comparison["l1_worse"] = None if l1_tdv is None else l1_tdv < comparison["tdv_cov_l1"] - L1_MARGIN
        comparison["note"] = None if l1_tdv is not None else "L_Σ's MSE lies outside the range of L1's curve"
    structure_ok = at is not None and at["draws_passing"] >= need
    mse_ok = at is not None and at["mse_ratio_of_means"] <= args.max_mse_ratio
    return {
        "recommended_weight": chosen,
        "rule": rule,
        "draws_needed": need,
        "per_weight": per_weight,
        "at_recommended": at,
        "structure_reproduced": structure_ok,
        "mse_within_ratio": mse_ok,
        "l1_comparison": comparison,
        "reproduced": bool(structure_ok and mse_ok and comparison is not None and comparison["l1_worse"]),
    }


def write_report(out: str, args: DimensionalityArguments, records: list[dict], claim: dict, timing: dict) -> None:
    summary = aggregate(records, ["penalty", "weight"], list(METRICS))
    write_json_atomic(
        os.path.join(out, "results.json"),
        {
            "settings": asdict(args),
            "weights": args.weights(),
            "summary": summary,
            "claim": claim,
            "timing": timing,
            "runs": records,
        },
    )
    fmt = {
        "weight": ".3g",
        "mse": ".3g",
        "rel_mse": ".2g",
        "mapc": ".3f",
        "mapc_active": ".3f",
        "cvr": ".3f",
        "tdv": ".3f",
        "ud": ".2f",
        "pca_ud": ".2f",
        "active_units": ".2f",
    }
    rows = [{**r, "penalty": PENALTY_LABELS.get(r["penalty"], r["penalty"])} for r in summary]
    lines = [
        "# Dimensionality discovery (Kågebäck & Mogren 2017, experiment 1)\n",
        f"{args.num_draws} draws of Ω; x = Ωz, z ∈ R^{len(args.latent_variances)}, Σ = diag({args.latent_variances}); "
        f"D = {args.input_dim}; {args.num_samples} training / {args.eval_samples} held-out samples; "
        f"{args.code_dim}-unit linear code; {args.epochs} epochs, batch {args.batch_size}, Adam lr "
        f"{args.learning_rate} ({args.lr_scheduler_type} schedule). Metrics on the held-out set, mean ± std over "
        f"draws; TdV with d = {len(args.latent_variances)}; UD over units ranked by variance, PCA-UD over "
        "principal components; CVR = ‖C‖₁ / tr C (no 1/p²).\n",
        markdown_table(
            rows,
            [
                ("penalty", "regulariser"),
                ("weight", "λ"),
                ("mse", "MSE"),
                ("rel_mse", "MSE / var(x)"),
                ("mapc", "MAPC"),
                ("mapc_active", "MAPC (active)"),
                ("cvr", "CVR"),
                ("tdv", "TdV"),
                ("ud", "UD_90%"),
                ("pca_ud", "PCA-UD_90%"),
                ("active_units", "active units"),
                ("n", "draws"),
            ],
            fmt,
        ),
        f"\nMSE / var(x): MSE over the mean per-feature variance of x. Active units: units holding ≥ "
        f"{ACTIVE_SHARE:.0%} of the code's variance; MAPC (active): MAPC among those only.\n",
        "\n## Claim check (L_Σ)\n",
        markdown_table(
            claim["per_weight"],
            [
                ("weight", "λ"),
                ("draws_passing", f"draws with UD ∈ {{3,4}} and TdV ≥ {args.min_tdv}"),
                ("draws_ud_3_or_4", "UD ∈ {3,4}"),
                ("draws_tdv_ok", f"TdV ≥ {args.min_tdv}"),
                ("mse_ratio_of_means", "MSE / MSE(λ=0)"),
                ("median_mse_ratio", "median per-draw MSE ratio"),
                ("draws_mse_within_ratio", f"draws with ratio ≤ {args.max_mse_ratio:g}"),
            ],
            {"weight": ".3g", "mse_ratio_of_means": ".3g", "median_mse_ratio": ".3g"},
        ),
        f"\nRecommended λ = {claim['recommended_weight']} ({claim['rule']}).\n",
        f"- structure (UD_90% ∈ {{3, 4}} and TdV ≥ {args.min_tdv} in ≥ {claim['draws_needed']} of {args.num_draws} "
        f"draws): **{'yes' if claim['structure_reproduced'] else 'no'}**",
        f"- MSE within {args.max_mse_ratio:g}× of λ = 0: **{'yes' if claim['mse_within_ratio'] else 'no'}**"
        + (f" (ratio of means {claim['at_recommended']['mse_ratio_of_means']:.3g})"
           if claim["at_recommended"] else ""),
    ]
    comp = claim["l1_comparison"]
    if comp is not None:

        def show(v):
            return "n/a" if v is None else f"{v:.3f}"

        verdict = "n/a" if comp["l1_worse"] is None else ("L1 worse" if comp["l1_worse"] else "L1 not worse")
        lines.append(
            f"- L1 at equal MSE ({comp['mse']:.3g}, interpolated along L1's mean curve): TdV "
            f"{show(comp['tdv_l1_at_equal_mse'])} against L_Σ's {show(comp['tdv_cov_l1'])}, CVR "
            f"{show(comp['cvr_l1_at_equal_mse'])} against {show(comp['cvr_cov_l1'])}: **{verdict}** "
            f"(worse = TdV lower by more than {comp['margin']})" + (f" ({comp['note']})" if comp["note"] else "")
        )
    lines.append(f"- all parts reproduced: **{'yes' if claim['reproduced'] else 'no'}**\n")
    conv = [r for r in records if r["last_quarter_dtdv"] is not None]
    if conv:
        lines += [
            "## Convergence (last quarter of the epochs)\n",
            f"- largest |ΔTdV|: {max(r['last_quarter_dtdv'] for r in conv):.4f}; median "
            f"{float(np.median([r['last_quarter_dtdv'] for r in conv])):.4f}",
            f"- runs whose UD_90% changed: {sum(bool(r['last_quarter_ud_changed']) for r in conv)} of {len(conv)}",
            "- MSE_end / MSE at ¾ of training: median "
            f"{float(np.median([r['last_quarter_mse_ratio'] for r in conv if r['last_quarter_mse_ratio']])):.3g}\n",
        ]
    lines.append(
        f"Time: {timing['wall_s']:.1f} s wall, {timing['cpu_s']:.1f} s CPU (user + sys) on {timing['cpus']} CPUs.\n"
    )
    write_text_atomic(os.path.join(out, "results.md"), "\n".join(lines))


def draw_figures(out: str, args: DimensionalityArguments, records: list[dict], claim: dict) -> None:
    shared = [r for r in records if r["penalty"] == "none"]
    swept = [r for r in records if r["penalty"] != "none"]
    k = len(args.latent_variances)
    for name, panels in (
        ("dimensionality_fig2.png", [("mapc", "MAPC", None), ("cvr", "CVR = ‖C‖₁ / tr C", 1.0)]),
        ("dimensionality_fig3.png", [("tdv", f"TdV (d = {k})", 1.0), ("ud", "UD_90% (units by variance)", float(k))]),
    ):
        fig, axes = new_figure(1, len(panels), panel_size=(4.6, 3.6))
        for ax, (metric, label, ref) in zip(axes[0], panels):
            plot_metric_curves(
                swept,
                x="mse",
                y=metric,
                group="penalty",
                order="weight",
                ax=ax,
                shared=shared,
                labels=PENALTY_LABELS,
                xlabel="held-out MSE",
                ylabel=label,
                reference=ref,
                annotate=True,
                title=f"{label} vs MSE",
            )
        fig.suptitle(f"Linear AE, x = Ωz (z ∈ R^{k}), mean ± std over {args.num_draws} draws; labels: λ", fontsize=9)
        save_figure(fig, os.path.join(out, name))
    first = [r for r in records if r["draw"] == min(r["draw"] for r in records)]
    fig, axes = new_figure(1, 2, panel_size=(4.6, 3.6))
    for ax, metric, logy in ((axes[0, 0], "mse", True), (axes[0, 1], "tdv", False)):
        histories = {
            f"{PENALTY_LABELS.get(r['penalty'], r['penalty'])} λ={r['weight']:.2g}": [
                (h["epoch"], h[metric]) for h in r["history"]
            ]
            for r in first
            if r["penalty"] in ("none", "cov_l1")
        }
        plot_histories(
            histories,
            ax,
            logy=logy,
            ylabel=f"held-out {metric.upper() if metric == 'mse' else 'TdV'}",
            title=f"L_Σ runs of draw 0: {metric} per epoch",
        )
    save_figure(fig, os.path.join(out, "dimensionality_convergence.png"))

    # |C| of the code in draw 0: λ = 0, L_Σ at the recommended λ, L1 at the λ of closest MSE
    chosen = claim["recommended_weight"]
    panels = [r for r in first if r["penalty"] == "none"]
    ours = [r for r in first if r["penalty"] == "cov_l1" and r["weight"] == chosen]
    panels += ours
    if ours:
        l1 = [r for r in first if r["penalty"] == "l1"]
        if l1:
            panels.append(min(l1, key=lambda r: abs(math.log(r["mse"] / ours[0]["mse"]))))
    fig, axes = new_figure(1, len(panels), panel_size=(3.6, 3.2))
    for ax, r in zip(axes[0], panels):
        plot_covariance(
            r["covariance"],
            ax,
            title=f"{PENALTY_LABELS.get(r['penalty'], r['penalty'])} λ={r['weight']:.2g}\n"
            f"MSE {r['mse']:.2g}, TdV {r['tdv']:.2f}, UD {r['ud']:.0f}",
        )
    fig.suptitle("|covariance| of the 10-unit code, draw 0 (held-out set)", fontsize=9)
    save_figure(fig, os.path.join(out, "dimensionality_covariance.png"))


def main(argv: list[str] | None = None) -> dict:
    """Run the experiment; returns the content of ``results.json``'s claim and timing."""
    (args,) = HfArgumentParser(DimensionalityArguments).parse_args_into_dataclasses(args=argv)
    records: list[dict] = []
    runs = [("none", 0.0)] + [(p, w) for p in args.penalties for w in args.weights()]
    clock = Stopwatch()
    with runtime(args.num_threads), staged_directory(args.output_dir) as out, tempfile.TemporaryDirectory() as scratch:
        for draw in range(args.num_draws):
            data = make_draw(args, draw)
            for penalty, weight in runs:
                record = run_one(args, draw, penalty, weight, data, scratch)
                records.append(record)
                print(
                    f"draw {draw} {penalty:>6} λ={weight:<8g} MSE={record['mse']:.3g} MAPC={record['mapc']:.3f} "
                    f"CVR={record['cvr']:.3f} TdV={record['tdv']:.3f} UD={record['ud']:.0f} "
                    f"({record['wall_s']:.1f}s)",
                    flush=True,
                )
        claim = check_claim(records, args)
        timing = {**clock.elapsed(), "cpus": cpu_count()}
        write_report(out, args, records, claim, timing)
        draw_figures(out, args, records, claim)
    print(f"wrote {args.output_dir}: recommended λ = {claim['recommended_weight']}, "
          f"reproduced = {claim['reproduced']}")
    return {"claim": claim, "timing": timing, "records": records}


if __name__ == "__main__":
    main()
