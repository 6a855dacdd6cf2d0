#!/usr/bin/env python
"""Write docs/configuration.md: every field of ``hf_decorr.config.DecorrConfig`` with its type,
default, help text and choices, read from the dataclass itself.

    python scripts/make_config_reference.py           # rewrite docs/configuration.md
    python scripts/make_config_reference.py --check   # exit 1 if the committed page is out of date

tests/test_docs_site.py renders the page in memory and compares it with the committed file.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from hf_decorr.config import DecorrConfig  # noqa: E402
from hf_decorr.penalties import PENALTIES, PenaltyNames  # noqa: E402

PAGE = ROOT / "docs" / "configuration.md"
COMMAND = "python scripts/make_config_reference.py"

HEADER = f"""# Configuration reference

<!-- Generated from hf_decorr.config.DecorrConfig by {COMMAND}; do not edit by hand. -->

Every setting of the penalty is a field of `hf_decorr.DecorrConfig`, a dataclass mixed into the
training arguments of each integration (`DecorrTrainingArguments`, `DecorrSeq2SeqTrainingArguments`,
`hf_decorr.trl.DecorrSFTConfig`, `hf_decorr.sentence_transformers.DecorrSentenceTransformerTrainingArguments`).
The same names work as keyword arguments, as command-line flags through `HfArgumentParser`
(`--decorr_weight 0.1 --decorr_layers -1 -2`), in YAML and JSON argument files, and in the
`decorr_config.json` saved beside every checkpoint and final model. Invalid values are refused
when the arguments are built, with a `ValueError` that names the option and its valid values.
"""


def _type(f) -> str:
    """The field's annotation as written in the source (``float``, ``list[str]``, ``bool | None``): the class's
    ``__annotations__`` keep the text, while ``HfArgumentParser`` replaces ``Field.type`` by evaluated types."""
    from hf_decorr.config import DecorrConfig

    return str(DecorrConfig.__annotations__.get(f.name, f.type))


def _default(field: dataclasses.Field) -> object:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _code(value: object) -> str:
    if value is None:
        return "`None` (unset)"
    if isinstance(value, str):
        return f'`"{value}"`'
    return f"`{value!r}`"


def _choices(field: dataclasses.Field) -> list[str] | None:
    choices = field.metadata.get("choices")
    if choices is None:
        return None
    if isinstance(choices, PenaltyNames):
        # the registry is live: show the penalties hf_decorr itself registers, not those a program added
        return [name for name, penalty in PENALTIES.items() if penalty.fn.__module__ == "hf_decorr.penalties"]
    return [str(c) for c in choices]


def _help(field: dataclasses.Field) -> str:
    # argparse needs %% for a literal %; the page shows the text as the user reads it in --help
    return " ".join(field.metadata.get("help", "").replace("%%", "%").split())


def render() -> str:
    """The text of docs/configuration.md for the installed hf_decorr."""
    fields = dataclasses.fields(DecorrConfig)
    lines = [HEADER, "## Summary", "", "| field | type | default |", "|---|---|---|"]
    for f in fields:
        lines.append(f"| [`{f.name}`](#{f.name}) | `{_type(f)}` | {_code(_default(f))} |")
    lines += ["", "## Fields", ""]
    for f in fields:
        lines += [f"### `{f.name}`", "", f"- **Type:** `{_type(f)}`", f"- **Default:** {_code(_default(f))}"]
        choices = _choices(f)
        if choices is not None:
            extra = " (and any name added with `hf_decorr.register_penalty`)" if isinstance(
                f.metadata.get("choices"), PenaltyNames) else ""
            lines.append("- **Choices:** " + ", ".join(f"`{c}`" for c in choices) + extra)
        lines.append(f"- **Command line:** `--{f.name}`")
        lines += ["", _help(f), ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/configuration.md is out of date")
    args = parser.parse_args()
    text = render()
    if args.check:
        current = PAGE.read_text(encoding="utf-8") if PAGE.exists() else ""
        if current != text:
            print(f"{PAGE.relative_to(ROOT)} is out of date: run {COMMAND}", file=sys.stderr)
            return 1
        return 0
    PAGE.write_text(text, encoding="utf-8")
    print(f"wrote {PAGE.relative_to(ROOT)} ({len(dataclasses.fields(DecorrConfig))} fields)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
