"""Complete-or-absent outputs for recipes and commands: strict-JSON files and whole folders.

Built on `hf_decorr.atomic` (the temporary-name-then-rename writes; text files go through
`hf_decorr.atomic.write_text_atomic()` directly). JSON is written with
`hf_decorr.app.reporting.to_jsonable()` (tensors and NumPy values become numbers, NaN / inf
become ``null``) and sorted keys.
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..atomic import staged_directory, write_text_atomic
from .reporting import to_jsonable

__all__ = ["write_json_atomic", "atomic_directory"]


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    """Write ``data`` as indented, strict JSON (NaN → null, sorted keys) to ``path`` atomically; returns the path."""
    return write_text_atomic(path, json.dumps(to_jsonable(data), indent=2, sort_keys=True, allow_nan=False) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[str]:
    """Yield a fresh temporary folder next to ``path``; on success it replaces ``path``.

    On an exception the temporary folder is removed and ``path`` is left as it was
    (`hf_decorr.atomic.staged_directory()`, as a string path).
    """
    with staged_directory(path) as tmp:
        yield str(tmp)
