"""Experiment 2 of Kågebäck & Mogren (2017): does L_Σ switch off the units XOR does not need?

Data: the four XOR points ``x ∈ {0, 1}²`` with ``y = x₁ XOR x₂``. Model:
:class:`hf_decorr.models.XorMLP` with two hidden layers of 4 logistic units (modules
``hidden.0`` and ``hidden.1``) and one logistic output, trained with binary cross-entropy on
the full batch of four points by ``DecorrTrainer``; the penalty (λ = 0.2, the paper's value) is
attached to both hidden layers through ``decorr_layers=["hidden.0", "hidden.1"]``. Every seed
trains twice from the same initial weights: with the penalty and without it (λ = 0).

Two definitions of an **active** unit, both from the (unbiased) variance ``v_i`` of its
activation over the four inputs, are reported side by side:

* absolute: ``v_i ≥ --active_threshold`` (default 0.01, a standard deviation of 0.1; a logistic
  unit can reach 1/3). This was the definition we fixed first;
* relative: ``v_i ≥ --active_share · Σ_j v_j`` (default 1% of the layer's total variance, the
  rule of the dimensionality recipe). L_Σ shrinks *every* variance of a layer (the next layer's
  weights grow to compensate), so units that still carry the XOR signal can fall under a fixed
  absolute threshold; the relative rule does not depend on that scale. A layer whose total
  variance is below ``CONSTANT_VARIANCE`` (1e-12, a standard deviation under 1e-6) is constant to
  float32 precision (activations in (0, 1) resolve about 6e-8) and has no active unit under this
  rule: its shares would be ratios of round-off.

The paper reports that with L_Σ the network uses exactly 2 units in layer 1 and 1 in layer 2
(the minimal XOR network); we count, over the seeds, the runs that end with exactly that, with
and without the penalty, under both definitions and at several thresholds.

Outputs in ``--output_dir``: ``results.json``, ``results.md``, ``xor_covariance.png`` (|C| of both
layers for one seed, with and without the penalty, like the paper's Figure 4) and
``xor_spectra.png`` (sorted unit variances of both layers for every seed, like Figure 5).

    python recipes/paper/xor.py --output_dir results/paper/xor
    python recipes/paper/xor.py --output_dir /tmp/xor --quick   # seconds
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from collections import Counter
from dataclasses import asdict, dataclass, field

import torch
from transformers import HfArgumentParser, set_seed

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from paper_common import (  # noqa: E402
    Stopwatch,
    TensorDictDataset,
    cpu_count,
    layer_covariances,
    runtime,
    train_and_evaluate,
    training_arguments,
)

from hf_decorr.app.outputs import write_json_atomic  # noqa: E402
from hf_decorr.app.reporting import aggregate, markdown_table  # noqa: E402
from hf_decorr.atomic import staged_directory, write_text_atomic  # noqa: E402
from hf_decorr.models import XorMLP, XorMLPConfig  # noqa: E402
from hf_decorr.plotting import new_figure, plot_covariance, plot_spectra, save_figure  # noqa: E402

LAYERS = ("hidden.0", "hidden.1")
CONDITIONS = ("none", "cov_l1")
CONDITION_LABELS = {"none": "no penalty", "cov_l1": "L_Σ"}


@dataclass
class XorArguments:
    """Settings of the XOR experiment (paper, Section 4.2)."""

    output_dir: str = field(default="results/paper/xor", metadata={"help": "Folder for results and figures."})
    num_seeds: int = field(
        default=10, metadata={"help": "Number of seeds (initial weights); each trains with and without L_Σ."}
    )
    decorr_weight: float = field(default=0.2, metadata={"help": "λ of L_Σ on both hidden layers (the paper: 0.2)."})
    hidden_size: int = field(default=4, metadata={"help": "Logistic units per hidden layer (the paper: 4)."})
    max_steps: int = field(default=3000, metadata={"help": "Full-batch Adam steps per run."})
    learning_rate: float = field(default=0.05, metadata={"help": "Adam learning rate (constant)."})
    active_threshold: float = field(
        default=0.01,
        metadata={"help": "Absolute rule: a unit is active when its activation variance over the 4 inputs is >= "
                  "this."},
    )
    active_share: float = field(
        default=0.01,
        metadata={
            "help": "Relative rule: a unit is active when its variance is >= this share of its layer's total variance."
        },
    )
    sensitivity_thresholds: list[float] = field(
        default_factory=lambda: [0.001, 0.01, 0.05],
        metadata={"help": "Absolute thresholds at which the counts are repeated (robustness of the definition)."},
    )
    sensitivity_shares: list[float] = field(
        default_factory=lambda: [0.01, 0.05, 0.1],
        metadata={"help": "Relative shares at which the counts are repeated."},
    )
    figure_seed: int = field(default=0, metadata={"help": "Seed whose covariance matrices are drawn."})
    seed: int = field(default=0, metadata={"help": "Base seed; run k uses seed + k."})
    num_threads: int = field(default=1, metadata={"help": "torch intra-op threads (1 is fastest for a tiny model)."})
    quick: bool = field(default=False, metadata={"help": "Tiny settings for smoke tests (2 seeds, 50 steps)."})

    def __post_init__(self) -> None:
        if self.quick:
            self.num_seeds, self.max_steps = 2, 50
        for name in ("num_seeds", "hidden_size", "max_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name} must be an integer >= 1, got {value!r}")
        if not (self.decorr_weight >= 0 and math.isfinite(self.decorr_weight)):
            raise ValueError(f"--decorr_weight must be a finite number >= 0, got {self.decorr_weight}")
        if not self.active_threshold > 0:
            raise ValueError(f"--active_threshold must be > 0, got {self.active_threshold}")
        if not 0 < self.active_share < 1:
            raise ValueError(f"--active_share must be in (0, 1), got {self.active_share}")
        if not 0 <= self.figure_seed < self.num_seeds:
            raise ValueError(
                f"--figure_seed must be in [0, num_seeds) = [0, {self.num_seeds}), got {self.figure_seed}"
            )


def xor_dataset() -> TensorDictDataset:
    """The four XOR points: ``input_values`` ``(4, 2)`` in {0, 1}, ``labels`` ``(4,)``."""
    x = torch.tensor([[0.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 1.0]])
    y = (x[:, 0] != x[:, 1]).float()
    return TensorDictDataset({"input_values": x, "labels": y})


def count_active(variances: list[float], threshold: float) -> int:
    """Units whose activation variance is at least ``threshold`` (absolute rule)."""
    return sum(v >= threshold for v in variances)


CONSTANT_VARIANCE = 1e-12
"""A layer whose unit variances sum to less than this is constant (float32 round-off, not signal)."""


def count_active_share(variances: list[float], share: float) -> int:
    """Units whose variance is at least ``share`` of the layer's total (relative rule).

    0 for a constant layer: total variance below :data:`CONSTANT_VARIANCE`.
    """
    total = sum(variances)
    return sum(v >= share * total for v in variances) if total >= CONSTANT_VARIANCE else 0


RULES = {"abs": count_active, "rel": count_active_share}


def run_one(args: XorArguments, seed: int, condition: str, data: TensorDictDataset, scratch: str) -> dict:
    """Train one network (``condition`` "none" or "cov_l1") and describe its hidden layers."""
    set_seed(args.seed + seed)  # the same initial weights with and without the penalty
    model = XorMLP(XorMLPConfig(hidden_sizes=[args.hidden_size, args.hidden_size], activation="sigmoid"))
    targs = training_arguments(
        scratch,
        max_steps=args.max_steps,
        per_device_train_batch_size=len(data),
        per_device_eval_batch_size=len(data),
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        logging_strategy="steps",
        logging_steps=max(1, args.max_steps // 20),
        seed=args.seed + seed,
        decorr_layers=list(LAYERS),
        decorr_penalty="cov_l1",
        decorr_weight=args.decorr_weight if condition == "cov_l1" else 0.0,
        decorr_top_d=2,
    )
    clock = Stopwatch()
    trainer, metrics = train_and_evaluate(model, targs, data, data)
    covs = layer_covariances(trainer.model, data, list(LAYERS))
    with torch.no_grad():
        logits = trainer.model(input_values=data.tensors["input_values"]).logits.squeeze(-1)
    accuracy = float(((logits > 0).float() == data.tensors["labels"]).float().mean())
    record = {
        "seed": seed,
        "condition": condition,
        "weight": targs.decorr_weight,
        "bce": metrics["eval_loss"],
        "accuracy": accuracy,
        "solved": accuracy == 1.0,
        "wall_s": clock.elapsed()["wall_s"],
    }
    for i, name in enumerate(LAYERS, start=1):
        var = torch.diagonal(covs[name]).clamp_min(0).tolist()
        record[f"layer{i}_variances"] = var
        record[f"layer{i}_covariance"] = covs[name].tolist()
        record[f"layer{i}_active_abs"] = count_active(var, args.active_threshold)
        record[f"layer{i}_active_rel"] = count_active_share(var, args.active_share)
        for metric in ("mapc", "cvr", "ud"):
            record[f"layer{i}_{metric}"] = metrics[f"eval_decorr_{metric}/{name}"]
    for rule in RULES:
        record[f"pattern_2_1_{rule}"] = record[f"layer1_active_{rule}"] == 2 and record[f"layer2_active_{rule}"] == 1
    return record


def summarise(records: list[dict], args: XorArguments) -> dict:
    """Per condition: runs with the 2 + 1 pattern under both rules and at every threshold, solved runs, patterns."""
    levels = {
        "abs": sorted(set(args.sensitivity_thresholds) | {args.active_threshold}),
        "rel": sorted(set(args.sensitivity_shares) | {args.active_share}),
    }
    out = {}
    for condition in CONDITIONS:
        runs = [r for r in records if r["condition"] == condition]
        entry = {
            "runs": len(runs),
            "solved": sum(r["solved"] for r in runs),
            "collapsed": sum(r["layer1_active_rel"] == 0 for r in runs),
        }
        for rule, count in RULES.items():
            patterns = Counter((r[f"layer1_active_{rule}"], r[f"layer2_active_{rule}"]) for r in runs)
            entry[f"runs_2_1_{rule}"] = sum(r[f"pattern_2_1_{rule}"] for r in runs)
            entry[f"patterns_{rule}"] = {f"{a}-{b}": n for (a, b), n in sorted(patterns.items())}
            entry[f"runs_2_1_{rule}_by_level"] = {
                f"{t:g}": sum(
                    count(r["layer1_variances"], t) == 2 and count(r["layer2_variances"], t) == 1 for r in runs
                )
                for t in levels[rule]
            }
        out[condition] = entry
    return out


def write_report(out: str, args: XorArguments, records: list[dict], summary: dict, timing: dict) -> None:
    scalar = [{k: v for k, v in r.items() if not k.endswith(("_variances", "_covariance"))} for r in records]
    table = aggregate(
        scalar,
        ["condition"],
        [
            "bce",
            "accuracy",
            "layer1_active_abs",
            "layer2_active_abs",
            "layer1_active_rel",
            "layer2_active_rel",
            "layer1_cvr",
            "layer2_cvr",
        ],
    )
    write_json_atomic(
        os.path.join(out, "results.json"),
        {
            "settings": asdict(args),
            "summary": summary,
            "table": table,
            "timing": timing,
            "runs": records,
        },
    )
    abs_rule = f"variance ≥ {args.active_threshold:g}"
    rel_rule = f"share ≥ {args.active_share:.0%}"

    def of(c: str, n: int) -> str:
        return f"{n} / {summary[c]['runs']}"

    rows = [
        {
            "condition": CONDITION_LABELS[c],
            "abs": of(c, summary[c]["runs_2_1_abs"]),
            "rel": of(c, summary[c]["runs_2_1_rel"]),
            "solved": of(c, summary[c]["solved"]),
            "collapsed": of(c, summary[c]["collapsed"]),
            "pat_abs": ", ".join(f"{k}: {v}" for k, v in summary[c]["patterns_abs"].items()),
            "pat_rel": ", ".join(f"{k}: {v}" for k, v in summary[c]["patterns_rel"].items()),
        }
        for c in CONDITIONS
    ]
    sensitivity = []
    for rule, name, fmt in (("abs", "variance ≥ {}", "{:g}"), ("rel", "share ≥ {}", "{:.0%}")):
        for level in summary[CONDITIONS[0]][f"runs_2_1_{rule}_by_level"]:
            sensitivity.append(
                {
                    "rule": name.format(fmt.format(float(level))),
                    **{c: of(c, summary[c][f"runs_2_1_{rule}_by_level"][level]) for c in CONDITIONS},
                }
            )
    per_run = []
    for r in sorted(records, key=lambda r: (CONDITIONS.index(r["condition"]), r["seed"])):
        row = {
            "seed": r["seed"],
            "condition": CONDITION_LABELS[r["condition"]],
            "solved": "yes" if r["solved"] else "no",
            "bce": r["bce"],
            "a": f"{r['layer1_active_abs']} + {r['layer2_active_abs']}",
            "r": f"{r['layer1_active_rel']} + {r['layer2_active_rel']}",
        }
        for i in (1, 2):
            row[f"v{i}"] = " ".join(f"{v:.2g}" for v in sorted(r[f"layer{i}_variances"], reverse=True))
        per_run.append(row)
    md = [
        "# XOR (Kågebäck & Mogren 2017, experiment 2)\n",
        f"Two hidden layers of {args.hidden_size} logistic units, one logistic output, BCE; full-batch Adam "
        f"(lr {args.learning_rate}, {args.max_steps} steps); L_Σ with λ = {args.decorr_weight:g} on both hidden "
        f"layers; {args.num_seeds} seeds, each trained with and without the penalty from the same initial weights. "
        "Active unit, absolute rule: the variance of its activation over the 4 inputs is "
        f"≥ {args.active_threshold:g}; "
        f"relative rule: it holds ≥ {args.active_share:.0%} of its layer's total variance, and a layer whose "
        f"total variance is below {CONSTANT_VARIANCE:g} is constant (no active unit). "
        "Collapsed: layer 1 constant.\n",
        markdown_table(
            rows,
            [
                ("condition", "condition"),
                ("abs", f"runs with 2 + 1 active ({abs_rule})"),
                ("rel", f"runs with 2 + 1 active ({rel_rule})"),
                ("solved", "runs that solve XOR"),
                ("collapsed", "collapsed runs"),
                ("pat_abs", f"active units L1 + L2: runs ({abs_rule})"),
                ("pat_rel", f"active units L1 + L2: runs ({rel_rule})"),
            ],
        ),
        "\n## Sensitivity to the threshold (runs with 2 + 1 active units)\n",
        markdown_table(sensitivity, [("rule", "rule")] + [(c, CONDITION_LABELS[c]) for c in CONDITIONS]),
        "\n## Means over seeds\n",
        markdown_table(
            [{**r, "condition": CONDITION_LABELS[r["condition"]]} for r in table],
            [
                ("condition", "condition"),
                ("bce", "BCE"),
                ("accuracy", "accuracy"),
                ("layer1_active_abs", f"active L1 ({abs_rule})"),
                ("layer2_active_abs", f"active L2 ({abs_rule})"),
                ("layer1_active_rel", f"active L1 ({rel_rule})"),
                ("layer2_active_rel", f"active L2 ({rel_rule})"),
                ("layer1_cvr", "CVR L1"),
                ("layer2_cvr", "CVR L2"),
            ],
            {"bce": ".3g", "accuracy": ".2f"},
            default_format=".2f",
        ),
        "\n## Every run (unit variances, sorted)\n",
        markdown_table(
            per_run,
            [
                ("seed", "seed"),
                ("condition", "condition"),
                ("solved", "solved"),
                ("bce", "BCE"),
                ("a", f"active ({abs_rule})"),
                ("r", f"active ({rel_rule})"),
                ("v1", "layer 1 variances"),
                ("v2", "layer 2 variances"),
            ],
            {"bce": ".3g"},
        ),
        f"\nTime: {timing['wall_s']:.1f} s wall, {timing['cpu_s']:.1f} s CPU (user + sys) on {timing['cpus']} CPUs.\n",
    ]
    write_text_atomic(os.path.join(out, "results.md"), "\n".join(md))


def draw_figures(out: str, args: XorArguments, records: list[dict]) -> None:
    fig, axes = new_figure(2, 2, panel_size=(3.6, 3.2))
    for row, condition in enumerate(CONDITIONS):
        run = next(r for r in records if r["condition"] == condition and r["seed"] == args.figure_seed)
        for col in range(2):
            plot_covariance(
                run[f"layer{col + 1}_covariance"],
                axes[row, col],
                annotate=True,
                title=f"{CONDITION_LABELS[condition]}: layer {col + 1} "
                f"({run[f'layer{col + 1}_active_rel']} active by share)",
            )
    fig.suptitle(f"XOR, |covariance| of the hidden layers over the 4 inputs (seed {args.figure_seed})", fontsize=9)
    save_figure(fig, os.path.join(out, "xor_covariance.png"))

    fig, axes = new_figure(2, 2, panel_size=(3.8, 0.35 * args.num_seeds + 1.4))
    for row, condition in enumerate(CONDITIONS):
        runs = sorted((r for r in records if r["condition"] == condition), key=lambda r: r["seed"])
        for col in range(2):
            plot_spectra(
                {f"seed {r['seed']}": r[f"layer{col + 1}_variances"] for r in runs},
                axes[row, col],
                normalise=False,
                title=f"{CONDITION_LABELS[condition]}: layer {col + 1} unit variances",
            )
    fig.suptitle("XOR, sorted unit variances per seed", fontsize=9)
    save_figure(fig, os.path.join(out, "xor_spectra.png"))


def main(argv: list[str] | None = None) -> dict:
    """Run the experiment; returns the summary, timing and records."""
    (args,) = HfArgumentParser(XorArguments).parse_args_into_dataclasses(args=argv)
    data = xor_dataset()
    records: list[dict] = []
    clock = Stopwatch()
    with runtime(args.num_threads), staged_directory(args.output_dir) as out, tempfile.TemporaryDirectory() as scratch:
        for seed in range(args.num_seeds):
            for condition in CONDITIONS:
                r = run_one(args, seed, condition, data, scratch)
                records.append(r)
                print(
                    f"seed {seed} {condition:>6}: BCE={r['bce']:.3g} solved={r['solved']} active (abs) "
                    f"{r['layer1_active_abs']}+{r['layer2_active_abs']}, (share) {r['layer1_active_rel']}+"
                    f"{r['layer2_active_rel']} ({r['wall_s']:.1f}s)",
                    flush=True,
                )
        summary = summarise(records, args)
        timing = {**clock.elapsed(), "cpus": cpu_count()}
        write_report(out, args, records, summary, timing)
        draw_figures(out, args, records)
    for condition in CONDITIONS:
        s = summary[condition]
        print(
            f"{CONDITION_LABELS[condition]}: runs with 2 + 1 active units: {s['runs_2_1_abs']}/{s['runs']} "
            f"(variance ≥ {args.active_threshold:g}), {s['runs_2_1_rel']}/{s['runs']} "
            f"(share ≥ {args.active_share:.0%}); "
            f"{s['solved']}/{s['runs']} solve XOR"
        )
    return {"summary": summary, "timing": timing, "records": records}


if __name__ == "__main__":
    main()
