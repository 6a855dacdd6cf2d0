"""The ``hf-decorr`` console command (also ``python -m hf_decorr``): see a model layer by layer.

    hf-decorr inspect MODEL --data FILE --output_dir DIR      the paper's metrics of every layer, figures
    hf-decorr compare A B [--data FILE] --output_dir DIR      two models (or two inspect outputs), linear CKA
    hf-decorr ablate MODEL [MODEL ...] --data FILE --layer L --output_dir DIR
                                                              accuracy with only the top-k units of L kept
    hf-decorr quantize MODEL [MODEL ...] --data FILE --output_dir DIR
                                                              accuracy with block outputs in int8 / int4

Bad input (an unknown model, a model folder without a tokenizer, a missing column, blank texts,
a layer spec that matches nothing, an empty data set, an ``--output_dir`` that cannot be written,
a ``--device`` this machine lacks, a missing matplotlib) ends with one line ``hf-decorr: error: …``
and a non-zero exit status: 2 for a bad command line, 1 for everything found later. ``HF_DECORR_DEBUG=1`` shows the
traceback instead.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from collections.abc import Sequence
from typing import NoReturn

from ...version import __version__
from ..parser import RecipeError
from .ablate import add_arguments as _ablate_arguments
from .ablate import run as _ablate
from .compare import add_arguments as _compare_arguments
from .compare import run as _compare
from .inspect import add_arguments as _inspect_arguments
from .inspect import run as _inspect
from .options import PROG
from .quantize import add_arguments as _quantize_arguments
from .quantize import run as _quantize

__all__ = ["main", "build_parser", "COMMANDS"]

# name: (add the arguments, run, help)
COMMANDS = {
    "inspect": (_inspect_arguments, _inspect,
                "the paper's decorrelation metrics of every layer of a model, with figures"),
    "compare": (_compare_arguments, _compare,
                "two models (linear CKA per layer) or two inspect outputs, side by side"),
    "ablate": (_ablate_arguments, _ablate,
               "accuracy of a sequence classifier when only the top-k units of a layer are kept"),
    "quantize": (_quantize_arguments, _quantize,
                 "accuracy of a sequence classifier when block outputs are fake-quantized to int8 / int4"),
}


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{PROG}: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="See what the covariance penalty did: inspect, compare and ablate the "
                     "layers of Hugging Face models.")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name, (add_arguments, _, help_text) in COMMANDS.items():
        add_arguments(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``hf-decorr`` with ``argv`` (default: ``sys.argv[1:]``); returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # --help, --version, or a bad command line (already reported)
        return stop.code if isinstance(stop.code, int) else (0 if stop.code is None else 2)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    run = COMMANDS[args.command][1]
    command = " ".join([PROG, *(shlex.quote(a) for a in argv)])
    try:
        run(args, command)
    except RecipeError as err:
        if os.environ.get("HF_DECORR_DEBUG"):
            raise
        print(f"{PROG}: error: {err}", file=sys.stderr, flush=True)
        return 1
    print(f"{PROG} {args.command}: wrote {args.output_dir}", flush=True)
    return 0
