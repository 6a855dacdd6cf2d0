"""Command-line parsing for recipes: ``--config recipe.yaml`` plus CLI overrides, one-line errors.

`DecorrArgumentParser` is an ``HfArgumentParser`` that works like TRL's ``TrlParser``:

    python recipes/text_classification.py --config recipes/configs/sst2_minilm_default.yaml \
        --decorr_weight 0.3 --seed 43

The YAML mapping (read with ``yaml.safe_load``) replaces the dataclass defaults, and every
flag given on the command line wins over the file. ``activation_checkpointing[_kwargs]`` (the
name since transformers 5.2x) is passed as ``gradient_checkpointing[_kwargs]`` to an older
transformers that lacks it. Unlike ``TrlParser`` it does not need TRL,
and bad input never ends in a traceback: an unknown key in the file or on the command line, a
value of the wrong type, a missing config file or a value rejected by a dataclass's
``__post_init__`` exits with status 2 and one line ``<prog>: error: <what is wrong>``.

`RecipeError` is what recipes raise for bad input found later (a missing data file, a
wrong column name, a model path that cannot be loaded); `run_recipe()` prints it as one
line and exits with status 1.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn, TypeVar

import yaml
from transformers import HfArgumentParser

from .._compat import checkpointing_option

__all__ = [
    "DecorrArgumentParser",
    "RecipeError",
    "run_recipe",
    "split_config_flag",
    "read_config_file",
    "one_line",
]

T = TypeVar("T")


class RecipeError(Exception):
    """Bad recipe input, reported to the user as one line (no traceback)."""


def one_line(err: BaseException, limit: int = 300) -> str:
    """The message of ``err`` on one line (whitespace collapsed), cut to ``limit`` characters."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def split_config_flag(argv: Sequence[str]) -> tuple[str | None, list[str]]:
    """Remove ``--config PATH`` (or ``--config=PATH``) from ``argv``; returns ``(PATH or None, rest)``."""
    rest: list[str] = []
    path: str | None = None
    items = list(argv)
    i = 0
    while i < len(items):
        item = items[i]
        if item == "--config":
            if i + 1 >= len(items) or items[i + 1].startswith("--"):
                raise RecipeError("--config needs a path to a YAML file")
            path = items[i + 1]
            i += 2
            continue
        if item.startswith("--config="):
            path = item.split("=", 1)[1]
            i += 1
            continue
        rest.append(item)
        i += 1
    return path, rest


def read_config_file(path: str) -> dict[str, Any]:
    """The YAML mapping in ``path`` (``yaml.safe_load``); `RecipeError` when absent or malformed."""
    if not os.path.isfile(path):
        raise RecipeError(f"--config {path}: no such file (relative paths start at {os.getcwd()})")
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except yaml.YAMLError as err:
        problem = " ".join(str(err).split())
        raise RecipeError(f"--config {path}: not valid YAML: {problem}") from None
    if config is None:
        return {}
    if not isinstance(config, dict):
        raise RecipeError(f"--config {path}: expected a mapping of option: value, got a {type(config).__name__}")
    return config


class DecorrArgumentParser(HfArgumentParser):
    """``HfArgumentParser`` with ``--config recipe.yaml`` (CLI flags win) and one-line errors."""

    def error(self, message: str) -> NoReturn:  # argparse's hook for bad command lines
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")

    def option_names(self) -> list[str]:
        """Every option this parser accepts, without the leading dashes."""
        return sorted({action.dest for action in self._actions if action.dest != "help"})

    def _unknown_key_message(self, keys: Iterable[str], source: str) -> str:
        known = self.option_names()
        parts = []
        for key in keys:
            close = difflib.get_close_matches(key, known, n=1)
            parts.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        return f"{source}: unknown option{'s' if len(parts) > 1 else ''} " + ", ".join(parts)

    def _current_flag(self, item: str) -> str:
        """``--activation_checkpointing[_kwargs]`` as ``--gradient_checkpointing…`` where transformers predates it."""
        if not item.startswith("--"):
            return item
        name, sep, value = item[2:].partition("=")
        return f"--{checkpointing_option(name, {action.dest for action in self._actions})}{sep}{value}"

    def apply_config(self, config: dict[str, Any], source: str) -> None:
        """Make the values of ``config`` the parser's defaults; unknown keys are an error."""
        actions: dict[str, list] = {}
        for action in self._actions:  # a bool field has two actions on one dest: --flag and --no_flag
            actions.setdefault(action.dest, []).append(action)
        config = {checkpointing_option(key, actions): value for key, value in config.items()}
        unknown = [key for key in config if key not in actions or key == "help"]
        if unknown:
            self.error(self._unknown_key_message(unknown, source))
        for key, value in config.items():
            takes_list = any(action.nargs in ("+", "*") for action in actions[key])
            if isinstance(value, (list, tuple)) and not takes_list:
                self.error(f"{source}: option {key!r} takes one value, got a list {value!r}")
            for action in actions[key]:
                action.default = value
                action.required = False

    def parse_args_and_config(self, args: Sequence[str] | None = None) -> tuple[Any, ...]:
        """Parse ``--config`` and the command line into the dataclasses (CLI wins over the file)."""
        argv = list(sys.argv[1:] if args is None else args)
        try:
            config_path, argv = split_config_flag(argv)
            if config_path is not None:
                self.apply_config(read_config_file(config_path), f"--config {config_path}")
        except RecipeError as err:
            self.error(str(err))
        argv = [self._current_flag(item) for item in argv]
        namespace, remaining = self.parse_known_args(argv)
        if remaining:
            flags = [item.lstrip("-").split("=", 1)[0] for item in remaining if item.startswith("-")]
            if flags:
                self.error(self._unknown_key_message(flags, "command line"))
            self.error(f"unexpected value(s) on the command line: {' '.join(remaining)}")
        outputs = []
        for dtype in self.dataclass_types:
            keys = {f.name for f in dataclasses.fields(dtype) if f.init}
            inputs = {k: v for k, v in vars(namespace).items() if k in keys}
            try:
                outputs.append(dtype(**inputs))
            except (ValueError, TypeError) as err:
                message = " ".join(str(err).split())
                self.error(f"invalid {dtype.__name__}: {message}")
        return tuple(outputs)


def run_recipe(main: Callable[[Sequence[str] | None], T], args: Sequence[str] | None = None) -> T:
    """Call ``main(args)``; a `RecipeError` becomes one line on stderr and exit status 1.

    So does a [`hf_decorr.DecorrError`][hf_decorr.DecorrError] of the library (a diverged training run, a penalised
    layer that does not run): a fault the user acts on, whose message says what to change.
    Set ``HF_DECORR_DEBUG=1`` to get the traceback instead.
    """
    from ..errors import DecorrError

    try:
        return main(args)
    except (RecipeError, DecorrError) as err:
        if os.environ.get("HF_DECORR_DEBUG"):
            raise
        prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "recipe"
        print(f"{prog}: error: {' '.join(str(err).split())}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None
