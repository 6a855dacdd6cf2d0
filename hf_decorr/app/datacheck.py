"""Checks of local data files and text columns that name the real cause of bad data in one line.

* `check_local_file()` (before ``datasets`` parses a file): an empty or blank file, text that
  is not UTF-8 (the byte, its offset and line), a csv/tsv with a header and no rows.
* `refuse_missing_texts()` (after loading): rows whose text is missing (``None``) or empty
  are refused, with their count and the first row numbers, rather than trained as ``""``.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Mapping

from .parser import RecipeError

__all__ = ["TEXT_EXTENSIONS", "check_local_file", "refuse_missing_texts"]

TEXT_EXTENSIONS = (".csv", ".tsv", ".json", ".jsonl", ".txt")
_CHUNK = 1 << 20


def check_local_file(option: str, path: str, extension: str) -> None:
    """Raise `RecipeError` for a text data file that is empty, not UTF-8, or a header without rows."""
    if extension not in TEXT_EXTENSIONS:
        if os.path.getsize(path) == 0:
            raise RecipeError(f"{option}={path!r} is empty (0 bytes)")
        return
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line, nonblank, head = 0, 1, 0, ""
    with open(path, "rb") as f:
        while True:
            chunk = f.read(_CHUNK)
            final = not chunk
            try:
                text = decoder.decode(chunk, final=final)
            except UnicodeDecodeError as err:
                bad_at = offset + err.start
                f.seek(0)
                before = f.read(bad_at)
                line = before.count(b"\n") + 1
                byte = f.read(1)
                raise RecipeError(
                    f"{option}={path!r} is not UTF-8 text: byte 0x{byte.hex()} at offset {bad_at} (line {line}) "
                    "cannot be decoded; re-save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)"
                ) from None
            offset += len(chunk)
            if nonblank < 2:
                for row in text.splitlines():
                    if row.strip():
                        nonblank += 1
                        if nonblank == 1:
                            head = row
                        if nonblank == 2:
                            break
            if final:
                break
    if nonblank == 0:
        raise RecipeError(f"{option}={path!r} is empty" + (" (only blank lines)" if offset else " (0 bytes)"))
    if extension in (".csv", ".tsv") and nonblank == 1:
        columns = ", ".join(c.strip() for c in head.lstrip("\ufeff").split("\t" if extension == ".tsv" else ","))
        raise RecipeError(f"{option}={path!r} has a header ({columns}) but no rows")


def refuse_missing_texts(datasets: Mapping, columns: Mapping[str, str | None], shown: int = 5) -> None:
    """Refuse rows whose text column is missing (``None``) or empty / blank.

    ``columns`` maps an option name to a column (``{"text_column": "sentence"}``); ``None``
    columns are skipped. Raises `RecipeError` such as ``text_column='sentence': 3 of the 5
    rows of the 'train' split are missing or empty (rows 1, 2, 4)`` (rows counted from 0).
    """
    for split in datasets:
        dataset = datasets[split]
        for option, column in columns.items():
            if column is None or column not in dataset.column_names:
                continue
            bad = [i for i, value in enumerate(dataset[column]) if value is None or not str(value).strip()]
            if bad:
                rows = ", ".join(map(str, bad[:shown])) + (", …" if len(bad) > shown else "")
                raise RecipeError(
                    f"{option}={column!r}: {len(bad)} of the {len(dataset)} rows of the {split!r} split are missing "
                    f"or empty (rows {rows}); remove or fill them"
                )
