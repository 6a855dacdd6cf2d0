"""Experiment 3 of Kågebäck & Mogren (2017): L_Σ on the code of a convolutional autoencoder.

The paper trains a LeNet-like autoencoder (encoder: 2 conv + 2 dense layers, 84-unit code,
about 500k parameters) on CIFAR-10 (45k / 5k / 10k split, batch 100, Adam lr 1e-3, early
stopping on validation MSE, λ = 0.08, 5 runs) and reports CVR, UD_90% and MSE of the code for
L_Σ, the L1 activation penalty and no regulariser (its Table 1).

Here :class:`hf_decorr.models.ConvAutoencoder` is trained by ``DecorrTrainer`` with the penalty
on the code through ``decorr_layers=["code"]``:

* ``--dataset digits`` (default, offline): scikit-learn's bundled 8×8 digits (1,797 images,
  grey levels scaled to [0, 1]), split once (fixed permutation) into 1,257 train / 180
  validation / 360 test images; 3×3 convolutions with 16 and 32 channels, dense 120, code 84
  (about 61k parameters).
* ``--dataset cifar10``: ``datasets.load_dataset("cifar10")`` (needs the Hugging Face Hub or a
  local cache), 45k / 5k / 10k, 5×5 convolutions with 16 and 32 channels, dense 120, code 84
  (about 520k parameters). Offline it stops at once with an error that says so.

Every seed trains the unregularised model and, for each penalty (``cov_l1`` = L_Σ, ``l1``), one
model per λ of ``--weights``; all models of a seed start from the same weights. Training stops
early on the validation MSE (``eval_loss``, the task loss: the trainer keeps the penalty out
of it), and the best checkpoint is restored. The test set gives MSE (``eval_loss``), CVR
(``‖C‖₁ / tr C``, without the paper's printed ``1/p²``), UD_90% (units ranked by variance)
and the PCA-based UD.

Outputs in ``--output_dir``: ``results.json``, ``results.md`` (the Table-1 analogue at
``--table_weight`` with mean ± std over seeds, and the λ sweep), ``image_ae_tradeoff.png`` (CVR
and UD_90% against test MSE, one curve per regulariser) and ``image_ae_code.png`` (|covariance|
of the code and its sorted unit-variance shares, for the three regularisers, first seed).

    python recipes/paper/image_autoencoder.py --output_dir results/paper/image_autoencoder
    python recipes/paper/image_autoencoder.py --output_dir /tmp/iae --quick   # seconds
"""

from __future__ import annotations

import math
import os
import sys
import tempfile
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from transformers import EarlyStoppingCallback, HfArgumentParser, set_seed

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
from hf_decorr.models import ConvAutoencoder, ConvAutoencoderConfig  # noqa: E402
from hf_decorr.penalties import PENALTIES  # noqa: E402
from hf_decorr.plotting import (  # noqa: E402
    new_figure,
    plot_covariance,
    plot_metric_curves,
    plot_spectra,
    save_figure,
)

DATASETS = ("digits", "cifar10")
METRICS = ("mse", "cvr", "ud", "pca_ud", "mapc", "live_units", "epochs")
PENALTY_LABELS = {"none": "none", "cov_l1": "L_Σ", "l1": "L1 activation", "decov": "DeCov", "vicreg": "VICReg cov."}
SPLIT_SEED = 1234  # the data split is fixed, independent of the training seeds

# the architecture per data set: (config kwargs); everything else is shared
ARCHITECTURES = {
    "digits": dict(image_size=8, num_channels=1, conv_channels=[16, 32], kernel_size=3),
    "cifar10": dict(image_size=32, num_channels=3, conv_channels=[16, 32], kernel_size=5),
}


@dataclass
class ImageAutoencoderArguments:
    """Settings of the convolutional-autoencoder experiment (paper, Section 4.3)."""

    output_dir: str = field(
        default="results/paper/image_autoencoder", metadata={"help": "Folder for results and figures."}
    )
    dataset: str = field(
        default="digits",
        metadata={
            "help": "'digits' (scikit-learn's bundled 8×8 images, offline) or 'cifar10' (needs the Hub).",
            "choices": list(DATASETS),
        },
    )
    num_seeds: int = field(default=3, metadata={"help": "Seeds per (regulariser, λ) (mean ± std over them)."})
    weights: list[float] = field(
        default_factory=lambda: [0.02, 0.08, 0.3],
        metadata={"help": "λ values swept for each penalty (the table uses --table_weight, which must be one)."},
    )
    table_weight: float = field(default=0.08, metadata={"help": "λ of the Table-1 analogue (the paper: 0.08)."})
    penalties: list[str] = field(
        default_factory=lambda: ["cov_l1", "l1"],
        metadata={"help": "Penalties on the code: 'cov_l1' (L_Σ) and the 'l1' activation baseline."},
    )
    code_size: int = field(default=84, metadata={"help": "Units of the code (the paper: 84)."})
    hidden_size: int = field(default=120, metadata={"help": "Units of the dense layer before the code."})
    max_epochs: int = field(
        default=400, metadata={"help": "Upper bound on epochs (early stopping usually ends sooner)."}
    )
    patience: int = field(default=10, metadata={"help": "Early stopping: epochs without a better validation MSE."})
    batch_size: int = field(default=100, metadata={"help": "Training batch size (the paper: 100)."})
    learning_rate: float = field(default=1e-3, metadata={"help": "Adam learning rate (the paper: 1e-3)."})
    seed: int = field(default=0, metadata={"help": "Base seed; seed k trains with seed + k."})
    num_threads: int = field(default=1, metadata={"help": "torch intra-op threads."})
    limit_train: int | None = field(
        default=None, metadata={"help": "Use only the first N training images (smoke tests)."}
    )
    quick: bool = field(
        default=False, metadata={"help": "Tiny settings for smoke tests (1 seed, 2 λ, 2 epochs, 200 images)."}
    )

    def __post_init__(self) -> None:
        if self.quick:
            self.num_seeds, self.weights, self.table_weight = 1, [0.08, 0.5], 0.08
            self.max_epochs, self.patience, self.limit_train = 2, 1, 200
            self.code_size, self.hidden_size = 16, 32
        if self.dataset not in DATASETS:
            raise ValueError(f"--dataset {self.dataset!r} is not valid; choose one of {list(DATASETS)}")
        for name in ("num_seeds", "code_size", "hidden_size", "max_epochs", "patience", "batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"--{name} must be an integer >= 1, got {value!r}")
        if not self.weights or any(not (w > 0 and math.isfinite(w)) for w in self.weights):
            raise ValueError(f"--weights must be positive numbers, got {self.weights}")
        if self.table_weight not in self.weights:
            raise ValueError(f"--table_weight {self.table_weight} must be one of --weights {self.weights}")
        unknown = [p for p in self.penalties if p not in PENALTIES]
        if not self.penalties or unknown:
            raise ValueError(f"--penalties {unknown or self.penalties} is not valid; choose from {sorted(PENALTIES)}")
        if self.limit_train is not None and self.limit_train < 2:
            raise ValueError(f"--limit_train must be >= 2, got {self.limit_train}")


def _dataset(images: torch.Tensor) -> TensorDictDataset:
    return TensorDictDataset({"pixel_values": images, "labels": images})


def load_digits_splits() -> dict[str, torch.Tensor]:
    """scikit-learn's 8×8 digits as ``(N, 1, 8, 8)`` in [0, 1], split 1257 / 180 / 360 (fixed)."""
    from sklearn.datasets import load_digits

    images = torch.tensor(load_digits().images, dtype=torch.float32).unsqueeze(1) / 16.0
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(SPLIT_SEED))
    test, val, train = order[:360], order[360:540], order[540:]
    return {"train": images[train], "validation": images[val], "test": images[test]}


def load_cifar10_splits() -> dict[str, torch.Tensor]:
    """CIFAR-10 as ``(N, 3, 32, 32)`` in [0, 1]: 45k / 5k of the training set (fixed), 10k test."""
    try:
        from datasets import load_dataset

        ds = load_dataset("cifar10")
    except Exception as err:  # offline, no cache, or the Hub refused
        raise RuntimeError(
            "--dataset cifar10 needs the Hugging Face Hub (or a local cache of it): "
            f"datasets.load_dataset('cifar10') failed with {type(err).__name__}: {err}. "
            "Offline, use --dataset digits."
        ) from err

    def to_tensor(split) -> torch.Tensor:
        column = "img" if "img" in split.column_names else "image"
        arrays = np.stack([np.asarray(im.convert("RGB"), dtype=np.uint8) for im in split[column]])
        return torch.from_numpy(arrays).permute(0, 3, 1, 2).float() / 255.0

    train_all = to_tensor(ds["train"])
    order = torch.randperm(len(train_all), generator=torch.Generator().manual_seed(SPLIT_SEED))
    return {"train": train_all[order[:45_000]], "validation": train_all[order[45_000:]], "test": to_tensor(ds["test"])}


def load_splits(args: ImageAutoencoderArguments) -> dict[str, TensorDictDataset]:
    tensors = load_digits_splits() if args.dataset == "digits" else load_cifar10_splits()
    if args.limit_train is not None:
        tensors["train"] = tensors["train"][: args.limit_train]
    return {name: _dataset(t) for name, t in tensors.items()}


def model_config(args: ImageAutoencoderArguments) -> ConvAutoencoderConfig:
    return ConvAutoencoderConfig(
        **ARCHITECTURES[args.dataset],
        hidden_size=args.hidden_size,
        code_size=args.code_size,
        activation="relu",
        code_activation="relu",
    )


def run_one(
    args: ImageAutoencoderArguments, seed: int, penalty: str, weight: float, splits: dict, scratch: str
) -> dict:
    """Train one autoencoder with early stopping; returns its test metrics."""
    set_seed(args.seed + seed)  # the same initial weights for every regulariser of a seed
    model = ConvAutoencoder(model_config(args))
    run_dir = os.path.join(scratch, f"s{seed}-{penalty}-{weight:g}")
    targs = training_arguments(
        run_dir,
        num_train_epochs=args.max_epochs,
        per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=1000,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",
        eval_strategy="epoch",
        save_strategy="epoch",
        save_total_limit=1,
        save_only_model=True,
        load_best_model_at_end=True,
        metric_for_best_model="eval_loss",
        greater_is_better=False,
        seed=args.seed + seed,
        decorr_layers=["code"],
        decorr_penalty="cov_l1" if penalty == "none" else penalty,
        decorr_weight=weight,
    )
    clock = Stopwatch()
    trainer, _ = train_and_evaluate(
        model,
        targs,
        splits["train"],
        splits["validation"],
        callbacks=[EarlyStoppingCallback(early_stopping_patience=args.patience)],
    )
    test = trainer.evaluate(splits["test"], metric_key_prefix="test")
    history = eval_history(trainer, ["eval_loss", "eval_decorr_cvr", "eval_decorr_ud"])
    cov = layer_covariances(trainer.model, splits["test"], ["code"], batch_size=1000)["code"]
    return {
        "seed": seed,
        "penalty": penalty,
        "weight": weight,
        "mse": test["test_loss"],
        **{m: test[f"test_decorr_{m}"] for m in ("cvr", "ud", "pca_ud", "mapc", "live_units")},
        "best_val_mse": trainer.state.best_metric,
        "epochs": float(history[-1]["epoch"]) if history else 0.0,
        "wall_s": clock.elapsed()["wall_s"],
        "history": history,
        "covariance": cov.tolist() if seed == 0 and weight in (0.0, args.table_weight) else None,
    }


def write_report(out: str, args: ImageAutoencoderArguments, records: list[dict], timing: dict, params: int) -> None:
    scalar = [{k: v for k, v in r.items() if k not in ("history", "covariance")} for r in records]
    summary = aggregate(scalar, ["penalty", "weight"], list(METRICS))
    table = [r for r in summary if r["penalty"] == "none" or r["weight"] == args.table_weight]
    order = {p: i for i, p in enumerate(["cov_l1", *args.penalties, "none"])}
    table.sort(key=lambda r: order.get(r["penalty"], 99))
    write_json_atomic(
        os.path.join(out, "results.json"),
        {
            "settings": asdict(args),
            "parameters": params,
            "table": table,
            "summary": summary,
            "timing": timing,
            "runs": records,
        },
    )
    fmt = {
        "weight": "g",
        "mse": ".4f",
        "cvr": ".2f",
        "ud": ".2f",
        "pca_ud": ".2f",
        "mapc": ".3f",
        "live_units": ".1f",
        "epochs": ".0f",
    }
    label = lambda rows: [{**r, "penalty": PENALTY_LABELS.get(r["penalty"], r["penalty"])} for r in rows]  # noqa: E731
    columns = [
        ("penalty", "regulariser"),
        ("weight", "λ"),
        ("cvr", "CVR"),
        ("ud", "UD_90%"),
        ("mse", "MSE"),
        ("pca_ud", "PCA-UD_90%"),
        ("mapc", "MAPC"),
        ("live_units", "live units"),
        ("epochs", "epochs"),
        ("n", "seeds"),
    ]
    md = [
        f"# Convolutional autoencoder on {args.dataset} (Kågebäck & Mogren 2017, experiment 3)\n",
        f"{params:,} parameters; code of {args.code_size} ReLU units; batch {args.batch_size}, Adam lr "
        f"{args.learning_rate}, early stopping on validation MSE (patience {args.patience}, at most {args.max_epochs} "
        f"epochs, best checkpoint restored). Test-set metrics, mean ± std over {args.num_seeds} seeds. "
        "CVR = ‖C‖₁ / tr C "
        "(no 1/p²); UD_90% over units ranked by variance; PCA-UD over principal components.\n",
        f"## Table 1 analogue (λ = {args.table_weight:g})\n",
        markdown_table(label(table), columns, fmt),
        "\n## λ sweep\n",
        markdown_table(label(summary), columns, fmt),
        f"\nTime: {timing['wall_s']:.1f} s wall, {timing['cpu_s']:.1f} s CPU (user + sys) on {timing['cpus']} CPUs.\n",
    ]
    write_text_atomic(os.path.join(out, "results.md"), "\n".join(md))


def draw_figures(out: str, args: ImageAutoencoderArguments, records: list[dict]) -> None:
    shared = [r for r in records if r["penalty"] == "none"]
    swept = [r for r in records if r["penalty"] != "none"]
    fig, axes = new_figure(1, 2, panel_size=(4.6, 3.6))
    for ax, metric, label in (
        (axes[0, 0], "cvr", "CVR = ‖C‖₁ / tr C"),
        (axes[0, 1], "ud", "UD_90% (units by variance)"),
    ):
        plot_metric_curves(
            swept,
            x="mse",
            y=metric,
            group="penalty",
            order="weight",
            ax=ax,
            shared=shared,
            labels=PENALTY_LABELS,
            annotate=True,
            xlabel="test MSE",
            ylabel=label,
            title=f"{label} vs MSE",
        )
    fig.suptitle(f"Conv. autoencoder on {args.dataset}, mean ± std over {args.num_seeds} seeds; labels: λ", fontsize=9)
    save_figure(fig, os.path.join(out, "image_ae_tradeoff.png"))

    shown = [
        r
        for r in records
        if r["covariance"] is not None and (r["penalty"] == "none" or r["weight"] == args.table_weight)
    ]
    fig, axes = new_figure(1, len(shown) + 1, panel_size=(3.6, 3.2))
    for ax, r in zip(axes[0], shown):
        plot_covariance(
            r["covariance"],
            ax,
            title=f"{PENALTY_LABELS.get(r['penalty'], r['penalty'])} (λ={r['weight']:g})\n"
            f"CVR {r['cvr']:.2f}, UD {r['ud']:.0f}, MSE {r['mse']:.4f}",
        )
    plot_spectra(
        {PENALTY_LABELS.get(r["penalty"], r["penalty"]): r["covariance"] for r in shown},
        axes[0, -1],
        title="sorted unit-variance shares",
    )
    fig.suptitle(f"|covariance| of the {args.code_size}-unit code on the test set (seed {args.seed})", fontsize=9)
    save_figure(fig, os.path.join(out, "image_ae_code.png"))


def main(argv: list[str] | None = None) -> dict:
    """Run the experiment; returns the records and timing."""
    (args,) = HfArgumentParser(ImageAutoencoderArguments).parse_args_into_dataclasses(args=argv)
    splits = load_splits(args)  # fails here, before any training, when CIFAR-10 is unreachable
    params = sum(p.numel() for p in ConvAutoencoder(model_config(args)).parameters())
    runs = [("none", 0.0)] + [(p, w) for p in args.penalties for w in args.weights]
    records: list[dict] = []
    clock = Stopwatch()
    with runtime(args.num_threads), staged_directory(args.output_dir) as out, tempfile.TemporaryDirectory() as scratch:
        for seed in range(args.num_seeds):
            for penalty, weight in runs:
                r = run_one(args, seed, penalty, weight, splits, scratch)
                records.append(r)
                print(
                    f"seed {seed} {penalty:>6} λ={weight:<5g} MSE={r['mse']:.4f} CVR={r['cvr']:.2f} UD={r['ud']:.0f} "
                    f"epochs={r['epochs']:.0f} ({r['wall_s']:.1f}s)",
                    flush=True,
                )
        timing = {**clock.elapsed(), "cpus": cpu_count()}
        write_report(out, args, records, timing, params)
        draw_figures(out, args, records)
    print(f"wrote {args.output_dir}")
    return {"records": records, "timing": timing}


if __name__ == "__main__":
    main()
