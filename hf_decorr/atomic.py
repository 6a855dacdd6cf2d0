"""Complete-or-absent files: write to a temporary name beside the target, then rename.

A crash or an exception leaves either the old file or the new one, never half of one; the
temporary file is removed on failure. The result gets ordinary permissions (0644), not the
private ones ``mkstemp`` gives.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

__all__ = ["atomic_write", "write_text_atomic", "staged_directory"]


def atomic_write(path: str | os.PathLike, write: Callable[[IO], object], binary: bool = False) -> Path:
    """Call ``write(f)`` on a temporary file next to ``path``, then rename it to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8") as f:
            write(f)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically; returns the path."""
    return atomic_write(path, lambda f: f.write(text))


@contextlib.contextmanager
def staged_directory(path: str | os.PathLike, overwrite: bool = True) -> Iterator[Path]:
    """Yield a fresh temporary folder next to ``path``; on success it becomes ``path``.

    The folder is renamed into place only if the ``with`` block finishes without an error, so
    ``path`` holds either a complete set of outputs or whatever it held before. An existing
    ``path`` is replaced when ``overwrite`` is true; otherwise ``FileExistsError`` is raised
    before anything runs. On an error the temporary folder is removed.
    """
    final = Path(path)
    if final.exists() and not overwrite:
        raise FileExistsError(f"output folder {str(final)!r} exists (pass overwrite=True to replace it)")
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.staging-"))
    os.chmod(staging, 0o755)  # mkdtemp makes it private; the result is an ordinary output folder
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = None
    if final.exists():
        old = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.old-"))
        os.replace(final, old / "previous")
    os.replace(staging, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
