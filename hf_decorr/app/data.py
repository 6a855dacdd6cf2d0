"""Loading a recipe's data with ``datasets``, with one clear error per kind of bad input.

Two sources, never mixed:

* a data set on the Hub (or a local data-set folder): ``dataset_name`` (+ ``dataset_config``),
  loaded with ``datasets.load_dataset(dataset_name, dataset_config)``;
* local files, one per split: ``.csv``, ``.tsv`` (tab-separated, no quoting, as GLUE ships
  SST-2), ``.json`` / ``.jsonl`` (JSON lines), ``.parquet`` or ``.txt`` (one row per line, line
  breaks kept, column ``text``).

Every failure (a missing file, an unknown extension, a data set that cannot be reached, a
column that does not exist) raises :class:`~hf_decorr.app.parser.RecipeError` naming the option.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from .parser import RecipeError, one_line

__all__ = ["LOCAL_FORMATS", "load_text_datasets", "require_columns"]

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
    try:
        return load_dataset(builder, data_files={split: path}, split=split, **kwargs)
    except Exception as err:  # noqa: BLE001 - a file datasets cannot parse is bad input
        raise RecipeError(f"{option}={path!r}: cannot be read as {extension} data: {one_line(err)}") from None


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

    Raises :class:`RecipeError` such as ``text_column='sentnce' is not a column of the 'train'
    split (its columns: sentence, label)``.
    """
    for split in splits if splits is not None else list(datasets):
        names = datasets[split].column_names
        for option, column in columns.items():
            if column is not None and column not in names:
                raise RecipeError(
                    f"{option}={column!r} is not a column of the {split!r} split (its columns: {', '.join(names)})"
                )
