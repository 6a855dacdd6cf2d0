"""A recipe's output folder, complete or absent as a whole, and resuming an interrupted run.

While a recipe runs, everything it writes (checkpoints, logs, each run's ``model/`` and
``results.json``, ``comparison.{json,md}``) goes to ``<output_dir>.partial``; when every run has
finished, that folder replaces ``<output_dir>`` in one rename. So ``output_dir`` always holds a
complete output, the previous one or the new one, never old and new parts side by side, and a
crashed run (an exception, a kill, a full disk) leaves only ``<output_dir>.partial``, which says
by its name that it is unfinished.

``--resume_from_checkpoint true`` (or ``last``) continues such a run: each run of the recipe
resumes from the last ``checkpoint-*`` in its folder of ``<output_dir>.partial`` (a run without a
checkpoint starts over); if no partial folder exists, a finished ``<output_dir>`` is moved back
to ``<output_dir>.partial`` and continued (for example with a larger ``num_train_epochs``).
``--resume_from_checkpoint PATH`` resumes from that checkpoint (one run only). Without it, a
left-over ``<output_dir>.partial`` is removed and the run starts over.
"""

from __future__ import annotations

import errno
import os
import shutil
import sys
import tempfile

from .parser import RecipeError

__all__ = ["PARTIAL_SUFFIX", "StagedOutput", "check_output_dir", "last_checkpoint", "parse_resume"]

PARTIAL_SUFFIX = ".partial"
_TRUE = ("true", "last", "yes", "1")
_FALSE = ("", "false", "no", "0", "none")


def parse_resume(value: str | bool | None) -> bool | str | None:
    """``--resume_from_checkpoint`` as given: ``None`` (off), ``True`` (the last checkpoint) or a checkpoint folder.

    A folder must exist and hold a checkpoint (``trainer_state.json``); else `RecipeError`.
    """
    if value is None or value is False:
        return None
    if value is True:
        return True
    text = str(value).strip()
    if text.lower() in _FALSE:
        return None
    if text.lower() in _TRUE:
        return True
    path = os.path.expanduser(text)
    if not os.path.isdir(path):
        raise RecipeError(f"resume_from_checkpoint={text!r}: no such folder; give a checkpoint folder "
                          "(…/checkpoint-N) or 'true' for the last checkpoint of this output_dir")
    if not os.path.isfile(os.path.join(path, "trainer_state.json")):
        raise RecipeError(f"resume_from_checkpoint={text!r} is not a checkpoint (it has no trainer_state.json); "
                          "give a …/checkpoint-N folder or 'true'")
    return path


def check_output_dir(output_dir: str, option: str = "output_dir") -> None:
    """One `RecipeError` when ``output_dir`` (or the folder beside it) cannot hold the output.

    Checked before any data is read or model loaded: ``output_dir`` is empty, an existing file,
    under a file, or it or the nearest existing folder above it cannot be written (the output is
    staged beside ``output_dir``); the check creates and removes an empty folder there.
    ``option`` names the setting in the message (``output_dir`` for the recipes, ``--output_dir``
    for the ``hf-decorr`` commands).
    """
    if not output_dir:
        raise RecipeError(f"{option} is required" if output_dir is None else
                          f"{option}={output_dir!r} is empty; give the folder for the output")
    path = os.path.abspath(os.path.expanduser(output_dir))
    if os.path.exists(path) and not os.path.isdir(path):
        raise RecipeError(f"{option}={output_dir!r} is a file, not a folder; choose another {option}")
    parent = os.path.dirname(path.rstrip(os.sep)) or os.sep
    probe = parent
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if not os.path.isdir(probe):
        raise RecipeError(f"{option}={output_dir!r}: {probe} is a file, so the folder cannot be created")
    for folder in (probe, path) if os.path.isdir(path) and path != probe else (probe,):
        try:  # a real write, so that read-only file systems are found for root too
            os.rmdir(tempfile.mkdtemp(dir=folder, prefix=".hf_decorr-write-test-"))
        except OSError as err:
            raise RecipeError(
                f"{option}={output_dir!r} cannot be written: {folder}: {err.strerror or err}"
            ) from None


def last_checkpoint(folder: str) -> str | None:
    """The ``checkpoint-N`` folder of ``folder`` with the largest N that holds a trainer state, or ``None``."""
    if not os.path.isdir(folder):
        return None
    found = []
    for name in os.listdir(folder):
        prefix, _, step = name.partition("-")
        path = os.path.join(folder, name)
        if prefix == "checkpoint" and step.isdigit() and os.path.isfile(os.path.join(path, "trainer_state.json")):
            found.append((int(step), path))
    return max(found)[1] if found else None


class StagedOutput:
    """``output_dir`` written through ``<output_dir>.partial`` (see the module doc)."""

    def __init__(self, output_dir: str) -> None:
        self.final = os.path.abspath(os.path.expanduser(output_dir)).rstrip(os.sep)
        self.partial = self.final + PARTIAL_SUFFIX
        self.shown = output_dir

    def begin(self, resume: bool | str | None) -> str:
        """Prepare ``<output_dir>.partial`` for this run (see the module doc); returns its path."""
        if resume is True and not os.path.isdir(self.partial):
            if not os.path.isdir(self.final):
                raise RecipeError(
                    f"resume_from_checkpoint=true: there is nothing to resume, neither {self.partial} (an unfinished "
                    f"run) nor {self.final} exists; drop resume_from_checkpoint to start a new run"
                )
            print(f"resuming the finished output {self.final}: it is moved to {self.partial} until this run "
                  "completes", flush=True)
            os.replace(self.final, self.partial)
        elif not resume and os.path.exists(self.partial):
            print(f"note: removing the unfinished run in {self.partial} and starting over (continue it instead with "
                  "--resume_from_checkpoint true)", file=sys.stderr, flush=True)
            shutil.rmtree(self.partial)
        try:
            os.makedirs(self.partial, exist_ok=True)
        except OSError as err:
            raise RecipeError(f"output_dir={self.shown!r}: cannot create {self.partial}: {err.strerror}") from None
        return self.partial

    def staged(self, final_path: str) -> str:
        """Where ``final_path`` (inside ``output_dir``) is written while the run is unfinished."""
        rel = os.path.relpath(os.path.abspath(final_path), self.final)
        return self.partial if rel == "." else os.path.join(self.partial, rel)

    def final_path(self, staged_path: str) -> str:
        """The path ``staged_path`` (inside the partial folder) will have once the output is complete."""
        rel = os.path.relpath(os.path.abspath(staged_path), self.partial)
        return self.final if rel == "." else os.path.join(self.final, rel)

    def commit(self) -> None:
        """Put the complete output in place of ``output_dir`` (the old one, if any, is removed)."""
        parent = os.path.dirname(self.final)
        old = None
        if os.path.lexists(self.final):
            old = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(self.final)}.old-")
            os.replace(self.final, os.path.join(old, "previous"))
        os.replace(self.partial, self.final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def describe_os_error(err: OSError, where: str) -> str:
    """One line for a failed write: what, where, and a hint for a full disk."""
    reason = err.strerror or str(err)
    hint = "; free some space (or choose another output_dir) and resume with --resume_from_checkpoint true" \
        if err.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    target = f" ({err.filename})" if err.filename else ""
    return f"cannot write the output to {where}{target}: [Errno {err.errno}] {reason}{hint}"
