"""Uploading a finished output folder to the Hub, and the recipes' push step.

`push_folder_to_hub()` uploads a finished output folder (weights, tokenizer,
``decorr_config.json``, ``README.md``) with ``HfApi.create_repo`` + ``HfApi.upload_folder``; a
failure (no network, no permission) is returned as a `PushResult` with ``ok=False`` and
the reason, and the local folder is left untouched. The folder loads with plain
``transformers``: nothing in it needs hf_decorr. `push_final_model()` is the recipes' push:
on failure it says why and how to retry, and exits with status 3.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from dataclasses import dataclass, field
from typing import Any

from huggingface_hub import HfApi

from ..config import DECORR_CONFIG_NAME

__all__ = ["UPLOAD_IGNORE_PATTERNS", "PushResult", "push_folder_to_hub", "push_final_model"]

# what never goes to the Hub from an output folder: intermediate checkpoints, logs, temporaries
UPLOAD_IGNORE_PATTERNS = ["checkpoint-*", "checkpoint-*/**", "runs/**", "*.tmp", ".*", "**/.*"]


@dataclass
class PushResult:
    """What `push_folder_to_hub()` did: ``ok``, the repository ``url``, or the ``error``."""

    ok: bool
    repo_id: str
    folder: str
    url: str | None = None
    error: str | None = None
    files: list[str] = field(default_factory=list)


def _files_to_upload(folder: str) -> list[str]:
    from huggingface_hub.utils import filter_repo_objects

    paths = sorted(
        os.path.relpath(os.path.join(root, name), folder).replace(os.sep, "/")
        for root, _, names in os.walk(folder)
        for name in names
    )
    return list(filter_repo_objects(paths, ignore_patterns=UPLOAD_IGNORE_PATTERNS))


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload model trained with hf_decorr",
) -> PushResult:
    """Create ``repo_id`` if needed and upload the finished output ``folder`` to it.

    The folder must hold a saved model (``config.json``), ``decorr_config.json`` and a
    ``README.md`` card. Network and permission failures are caught and returned (``ok=False``,
    ``error`` says what happened); the token is never printed or stored.
    """
    folder = os.path.abspath(os.fspath(folder))
    missing = [name for name in ("config.json", DECORR_CONFIG_NAME, "README.md")
               if not os.path.isfile(os.path.join(folder, name))]
    if missing:
        raise ValueError(f"{folder} is not a finished hf_decorr output folder: it lacks {', '.join(missing)}")
    files = _files_to_upload(folder)
    api = HfApi(token=token)
    try:
        repo_url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            repo_type="model",
            revision=revision,
            commit_message=commit_message,
            ignore_patterns=list(UPLOAD_IGNORE_PATTERNS),
        )
    except Exception as err:  # noqa: BLE001 - the network boundary: every failure is reported, none is fatal
        reason = " ".join(str(err).split()) or type(err).__name__
        return PushResult(False, repo_id, folder, error=f"{type(err).__name__}: {reason}", files=files)
    url = str(getattr(repo_url, "url", repo_url) or f"https://huggingface.co/{repo_id}")
    return PushResult(True, repo_id, folder, url=url, files=files)


def push_final_model(folder: str, hub_model_id: str, token: str | None, training_args: Any) -> dict:
    """Push ``folder`` to the Hub; on failure say why and how to retry, then exit with status 3.

    The local output is complete before this is called, so a failed upload loses nothing.
    Returns the outcome as a dict (for the run's summary).
    """
    outcome = push_folder_to_hub(folder, hub_model_id, token=token, private=training_args.hub_private_repo,
                                 revision=training_args.hub_revision)
    if not outcome.ok:
        print(f"push to the Hub failed ({outcome.error}); the local output in {folder} is complete; retry with "
              f"`hf upload {hub_model_id} {folder}`", file=sys.stderr, flush=True)
        raise SystemExit(3)
    print(f"pushed {folder} to {outcome.url} ({len(outcome.files)} files)", flush=True)
    return dataclasses.asdict(outcome)
