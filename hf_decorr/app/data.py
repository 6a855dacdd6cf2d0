"""Loading a recipe's data with ``datasets``, with one clear error per kind of bad input.

Two sources, never mixed:

* a data set on the Hub (or a local data-set folder): ``dataset_name`` (+ ``dataset_config``),
  loaded with ``datasets.load_dataset(dataset_name, dataset_config)``;
* local files, one per split: ``.csv``, ``.tsv`` (tab-separated, no quoting, as GLUE ships
  SST-2), ``.json`` / ``.jsonl`` (JSON lines), ``.parquet`` or ``.txt`` (one row per line, line
  breaks kept, column ``text``).

For causal language models, `tokenize_into_blocks()` (a corpus: tokenize, concatenate, cut
into blocks, as transformers' ``run_clm.py``) and `tokenize_prompt_completion()` (instruction
data: labels -100 on the prompt).

Every failure (a missing file, an unknown extension, a data set that cannot be reached, a
column that does not exist) raises `RecipeError` naming the option.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from ..pooling import IGNORE_INDEX
from .datacheck import check_local_file
from .parser import RecipeError, one_line

__all__ = [
    "LOCAL_FORMATS",
    "load_text_datasets",
    "require_columns",
    "select_splits",
    "tokenize_into_blocks",
    "tokenize_prompt_completion",
]

# extension -> (datasets builder, builder kwargs)
LOCAL_FORMATS: dict[str, tuple[str, dict]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t", "quoting": 3}),  # 3 = csv.QUOTE_NONE
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
    ".txt": ("text", {"keep_linebreaks": True}),  # a corpus keeps its line structure
}


def _load_local_split(option: str, path: str, split: str):
    from datasets import load_dataset

    if not os.path.isfile(path):
        where = "" if os.path.isabs(path) else f" (relative paths start at {os.getcwd()})"
        raise RecipeError(f"{option}={path!r}: no such file{where}")
    extension = os.path.splitext(path)[1].lower()
    if extension not in LOCAL_FORMATS:
        raise RecipeError(
            f"{option}={path!r}: unsupported file type {extension or '(none)'!r}; use one of {sorted(LOCAL_FORMATS)}"
        )
    builder, kwargs = LOCAL_FORMATS[extension]
    check_local_file(option, path, extension)  # empty, not UTF-8, a header without rows: the real cause
    try:
        dataset = load_dataset(builder, data_files={split: path}, split=split, **kwargs)
    except Exception as err:  # noqa: BLE001 - a file datasets cannot parse is bad input
        raise RecipeError(f"{option}={path!r}: cannot be read as {extension} data: {one_line(err)}") from None
    if len(dataset) == 0:
        raise RecipeError(f"{option}={path!r} holds no rows")
    return dataset


def load_text_datasets(
    dataset_name: str | None = None,
    dataset_config: str | None = None,
    data_files: Mapping[str, tuple[str, str | None]] | None = None,
):
    """A ``DatasetDict`` from a Hub data set or from local files.

    ``data_files`` maps a split name to ``(option name, path or None)``, e.g.
    ``{"train": ("train_file", "data/train.tsv"), "validation": ("validation_file", None)}``;
    the option name is only used in error messages. Splits whose path is ``None`` are left out.
    """
    from datasets import DatasetDict, load_dataset

    files = {split: (option, path) for split, (option, path) in (data_files or {}).items() if path}
    if dataset_name and files:
        options = ", ".join(option for option, _ in files.values())
        raise RecipeError(f"give either dataset_name={dataset_name!r} or local files ({options}), not both")
    if dataset_name:
        try:
            loaded = load_dataset(dataset_name, dataset_config)
        except Exception as err:  # noqa: BLE001 - unreachable or unknown data sets are bad input
            config = f", dataset_config={dataset_config!r}" if dataset_config else ""
            offline = os.environ.get("HF_DATASETS_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0")).lower() in (
                "1", "true", "yes",
            )
            hint = " (the Hub is switched off: HF_HUB_OFFLINE=1)" if offline else ""
            raise RecipeError(f"dataset_name={dataset_name!r}{config} could not be loaded{hint}: {one_line(err)}") \
                from None
        if not isinstance(loaded, DatasetDict):
            loaded = DatasetDict({"train": loaded})
        return loaded
    if not files:
        raise RecipeError("no data: give dataset_name (a Hub data set) or train_file (a local csv/tsv/json/txt file)")
    return DatasetDict({split: _load_local_split(option, path, split) for split, (option, path) in files.items()})


def require_columns(datasets, columns: Mapping[str, str | None], splits: list[str] | None = None) -> None:
    """Check that every named column exists in every split (``columns``: option name → column).

    Raises `RecipeError` such as ``text_column='sentnce' is not a column of the 'train'
    split (its columns: sentence, label)``.
    """
    for split in splits if splits is not None else list(datasets):
        names = datasets[split].column_names
        for option, column in columns.items():
            if column is not None and column not in names:
                raise RecipeError(
                    f"{option}={column!r} is not a column of the {split!r} split (its columns: {', '.join(names)})"
                )


def select_splits(datasets, dataset_name: str, wanted: Mapping[str, str | None], optional: Sequence[str] = ()) -> dict:
    """``{role: datasets[split]}`` for ``wanted`` (role → split name of ``dataset_name``; ``None`` skips the role).

    A split that does not exist raises ``RecipeError`` (``train_split='trian' is not a split of
    'nyu-mll/glue' (its splits: …)``), unless its role is in ``optional``.
    """
    out = {}
    for role, split in wanted.items():
        if split is None or (split not in datasets and role in optional):
            continue
        if split not in datasets:
            raise RecipeError(f"{role}_split={split!r} is not a split of {dataset_name!r} (its splits: "
                              f"{', '.join(datasets)})")
        out[role] = datasets[split]
    return out


def tokenize_into_blocks(datasets: Mapping, tokenizer, text_column: str, block_size: int) -> dict:
    """Tokenize, concatenate and cut into blocks of ``block_size`` tokens (the remainder is dropped).

    Every block is a training example with ``labels = input_ids``.
    """

    def encode(batch):
        return tokenizer([str(t) if t is not None else "" for t in batch[text_column]])

    def group(batch):
        ids = [token for row in batch["input_ids"] for token in row]
        usable = (len(ids) // block_size) * block_size
        blocks = [ids[i: i + block_size] for i in range(0, usable, block_size)]
        return {"input_ids": blocks, "attention_mask": [[1] * block_size for _ in blocks],
                "labels": [list(b) for b in blocks]}

    out = {}
    for split, ds in datasets.items():
        tokens = ds.map(encode, batched=True, remove_columns=ds.column_names, desc=f"Tokenizing {split}")
        blocks = tokens.map(group, batched=True, batch_size=1000, remove_columns=tokens.column_names,
                            desc=f"Blocks of {block_size} tokens ({split})")
        if len(blocks) == 0:
            raise RecipeError(f"the {split!r} split has fewer than block_size={block_size} tokens; lower block_size")
        out[split] = blocks
    return out


def tokenize_prompt_completion(datasets: Mapping, tokenizer, prompt_column: str, completion_column: str,
                               max_length: int) -> dict:
    """``prompt + completion + eos`` with labels -100 on the prompt; truncated to ``max_length`` tokens.

    Examples whose completion is cut away entirely are dropped.
    """
    eos = tokenizer.eos_token_id

    def encode(batch):
        out = {"input_ids": [], "attention_mask": [], "labels": []}
        for prompt, completion in zip(batch[prompt_column], batch[completion_column]):
            prompt_ids = tokenizer(str(prompt or ""))["input_ids"]
            completion_ids = tokenizer(str(completion or ""), add_special_tokens=False)["input_ids"]
            if eos is not None:
                completion_ids = completion_ids + [eos]
            ids = (prompt_ids + completion_ids)[:max_length]
            labels = ([IGNORE_INDEX] * len(prompt_ids) + completion_ids)[:max_length]
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
            raise RecipeError(f"no {split!r} example keeps a completion token within block_size={max_length}")
        out[split] = encoded
    return out
