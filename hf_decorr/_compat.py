"""Workarounds for particular versions of accelerate / transformers, each behind a version gate.

Every workaround here names the versions that need it (read from their sources) and does
nothing on the others, so it can be deleted once the oldest supported version no longer needs it.

* `undo_eval_only_prepare()` — accelerate ≥ 1.14 (``prepare_model`` returns a model marked
  ``_is_accelerate_prepared`` unchanged, huggingface/accelerate#3977) with transformers' Trainer
  (``evaluation_loop`` prepares a model that no training has prepared with
  ``prepare_model(model, evaluation_mode=True)``, which under DDP does not wrap it but marks it
  prepared). An ``evaluate()`` before ``train()`` on several processes then makes ``train()``
  skip the DDP wrapper, and the processes silently stop averaging their gradients. Read in
  accelerate 1.14.0 / 1.15.0 and transformers 5.24.0; accelerate ≤ 1.13 wraps it again and
  needs nothing.
* `CHECKPOINTING_RENAMES`, `checkpointing_option()`, `checkpointing_args()` —
  ``TrainingArguments.activation_checkpointing[_kwargs]`` is the name in transformers 5.24, where
  ``gradient_checkpointing[_kwargs]`` is a deprecated alias (a ``FutureWarning``, removal in v6);
  transformers 5.17 / 5.18 have only ``gradient_checkpointing[_kwargs]``. Code and configs use the
  new name; these map it to the old one where the installed transformers lacks it.
* `sync_gradients_now()` — transformers' training loop marks the last micro-batch of each
  optimizer step by setting accelerate's ``GradientState.sync_gradients`` *before* calling
  ``training_step`` (5.25 sets it by hand for each micro-batch; earlier 5.x through
  ``accelerator.accumulate``). The divergence guard reads the complete, unclipped gradients there.
* `trainer_divides_loss()` — ``Trainer.training_step`` divides the loss that ``compute_loss``
  returns by the accumulation steps unless it is "already scaled": ``loss_is_scaled_for_ga`` when
  set (5.19+), else ``(model_accepts_loss_kwargs and num_items_in_batch is not None) or
  compute_loss_func is not None``. The penalty must be divided exactly when the Trainer will not,
  so this mirrors that rule (read in transformers 5.24 / 5.25).
* `hidden_state_classes()` — transformers 5.x models that record their outputs with hooks declare,
  in the private class attribute ``_can_record_outputs``, which module classes produce the
  ``hidden_states`` (a class, an ``OutputRecorder`` with ``target_class``, or a list of them; read in
  transformers 5.25: 2 of 3 registered task models declare it). The block-stack rule uses it to leave out
  stacks that do not carry hidden states (the convolutional feature encoder of wav2vec2 beside its
  transformer layers). A model that declares nothing, or a version that drops the attribute, falls
  back to the shape rules alone.
* [`deepspeed_process_state()`][hf_decorr.deepspeed_process_state], `deepspeed_miscounts_processes()` — accelerate
  (read in 1.16.0) starts a
  DeepSpeed run with ``PartialState(use_deepspeed)``, which on a machine without accelerators gets no backend:
  DeepSpeed's own process group has every process (gloo, through its CPU accelerator), but accelerate records
  ``num_processes == 1`` and rank 0 everywhere, so the Trainer does not shard the data (each process reads every
  row) and ``train_batch_size: "auto"`` fails DeepSpeed's batch check. The supported way around it is a state
  configured before the arguments: ``PartialState(backend="gloo")`` with ``ACCELERATE_USE_DEEPSPEED=true``, and
  ``TrainingArguments(accelerator_config={"use_configured_state": True})``, which makes the Trainer use it
  ([`deepspeed_process_state()`][hf_decorr.deepspeed_process_state] does the first). The trainer refuses a mis-counted
  run
  (`deepspeed_miscounts_processes()`). Tested in tests/test_deepspeed.py.
* `total_grad_norm()` — the gradient norm through ``torch.nn.utils.get_total_norm`` (one
  foreach pass; torch 2.6+; the declared floor is 2.7.1), float16 tensors measured in float32.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

from packaging import version

__all__ = [
    "accelerate_version",
    "needs_eval_prepare_undo",
    "undo_eval_only_prepare",
    "CHECKPOINTING_RENAMES",
    "checkpointing_option",
    "checkpointing_args",
    "sync_gradients_now",
    "trainer_divides_loss",
    "total_grad_norm",
    "hidden_state_classes",
    "deepspeed_process_state",
    "deepspeed_miscounts_processes",
]

#: the first accelerate release whose ``prepare_model`` skips a model marked ``_is_accelerate_prepared``
ACCELERATE_SKIPS_PREPARED_MODELS = version.Version("1.14.0")


def accelerate_version() -> version.Version:
    """The installed accelerate version."""
    import accelerate

    return version.Version(accelerate.__version__)


def needs_eval_prepare_undo(accelerate: str | version.Version | None = None) -> bool:
    """Whether ``accelerate`` (default: the installed one) needs `undo_eval_only_prepare()`.

    Pre-releases of 1.14 (``1.14.0.dev0``) count as 1.14: the guard landed before the release.
    """
    installed = accelerate_version() if accelerate is None else version.Version(str(accelerate))
    return installed.release >= ACCELERATE_SKIPS_PREPARED_MODELS.release


@contextlib.contextmanager
def undo_eval_only_prepare(trainer: Any) -> Iterator[None]:
    """Around ``Trainer.evaluation_loop``: forget an evaluation-only ``prepare_model`` before training.

    When the installed accelerate needs it (`needs_eval_prepare_undo()`), the trainer runs on
    several processes without DeepSpeed or FSDP, is not training, and its model has not been
    prepared yet, then after the evaluation the model's ``_is_accelerate_prepared`` mark and its
    entry in ``accelerator._models`` are removed, so that ``train()`` prepares (DDP-wraps) it.
    Anything else (one process, a model already wrapped by training) is left alone.
    """
    model = trainer.model
    undo = (
        needs_eval_prepare_undo()
        and trainer.accelerator.num_processes > 1 and not trainer.is_in_train
        and not trainer.is_deepspeed_enabled and not trainer.is_fsdp_enabled
        and trainer.model_wrapped is model and not getattr(model, "_is_accelerate_prepared", False)
    )
    try:
        yield
    finally:
        if undo and trainer.model_wrapped is model and "_is_accelerate_prepared" in vars(model):
            del model._is_accelerate_prepared
            if model in trainer.accelerator._models:
                trainer.accelerator._models.remove(model)


# ---------------------------------------------------------------------- activation checkpointing

#: the current name of each TrainingArguments checkpointing option → its name before transformers 5.23.0 (the rename)
CHECKPOINTING_RENAMES = {
    "activation_checkpointing": "gradient_checkpointing",
    "activation_checkpointing_kwargs": "gradient_checkpointing_kwargs",
}


def checkpointing_option(name: str = "activation_checkpointing", known: Any = None) -> str:
    """The name under which ``known`` (option names; default: ``TrainingArguments``'s fields) takes ``name``.

    ``name`` itself when it is known, else its pre-5.23 name (``gradient_checkpointing[_kwargs]``)
    when that one is; any other name is returned unchanged.
    """
    if known is None:
        from transformers import TrainingArguments

        known = {f.name for f in dataclasses.fields(TrainingArguments)}
    if name in known or name not in CHECKPOINTING_RENAMES:
        return name
    old = CHECKPOINTING_RENAMES[name]
    return old if old in known else name


def checkpointing_args(enabled: bool = True, **kwargs: Any) -> dict[str, Any]:
    """``TrainingArguments`` keywords that switch activation checkpointing on (or off) with ``kwargs``.

    ``{"activation_checkpointing": True, "activation_checkpointing_kwargs": {...}}`` on transformers
    5.24, the ``gradient_checkpointing`` names on versions without the new ones.
    """
    out: dict[str, Any] = {checkpointing_option("activation_checkpointing"): enabled}
    if kwargs:
        out[checkpointing_option("activation_checkpointing_kwargs")] = kwargs
    return out


# ---------------------------------------------------------------------- gradient norm


def total_grad_norm(tensors: list[Any]) -> Any:
    """``‖(g₁, …, g_n)‖₂`` as a 0-d float32 tensor on the first tensor's device, without a host sync.

    float16 tensors are measured in float32 (their own range ends at 65504, and a large but finite
    norm is not a divergence); the others through ``torch.nn.utils.get_total_norm``.
    """
    import torch

    device = tensors[0].device
    half = [t for t in tensors if t.dtype == torch.float16]
    rest = [t for t in tensors if t.dtype != torch.float16]
    norms = [torch.linalg.vector_norm(t, dtype=torch.float32).to(device) for t in half]
    if rest:
        norms.append(torch.nn.utils.get_total_norm(rest, norm_type=2.0).float().to(device))
    return torch.linalg.vector_norm(torch.stack(norms))


def sync_gradients_now(accelerator: Any) -> bool:
    """Whether the micro-batch now in ``training_step`` is the last of its optimizer step.

    Reads ``accelerator.sync_gradients``, which the Trainer sets before ``training_step`` (checked
    by ``tests/test_compat.py::test_assumption_sync_gradients_marks_the_last_micro_batch``).
    """
    return bool(accelerator.sync_gradients)


def trainer_divides_loss(trainer: Any, num_items_in_batch: Any) -> bool:
    """Whether ``trainer.training_step`` will divide ``compute_loss``'s result by the accumulation steps.

    Mirrors the Trainer's rule (checked by
    ``tests/test_compat.py::test_assumption_training_step_divides_as_mirrored``).
    """
    scaled = getattr(trainer, "loss_is_scaled_for_ga", None)
    if scaled is None:
        scaled = (trainer.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
            trainer.compute_loss_func is not None
        )
    return not scaled


def hidden_state_classes(model: Any) -> tuple[type, ...]:
    """The module classes that ``model`` and its sub-models declare as producing ``hidden_states``
    (``_can_record_outputs``, transformers 5.x); empty when none declares any."""
    found: list[type] = []
    for module in model.modules():
        declared = getattr(type(module), "_can_record_outputs", None)
        if not isinstance(declared, dict):
            continue
        value = declared.get("hidden_states")
        for item in value if isinstance(value, (list, tuple)) else [value]:
            target = item if isinstance(item, type) else getattr(item, "target_class", None)
            if isinstance(target, type) and target not in found:
                found.append(target)
    return tuple(found)


def deepspeed_process_state(backend: str = "gloo") -> Any:
    """Configure accelerate's process state for DeepSpeed on CPU processes, before the training arguments.

    Returns the ``PartialState`` (every process counted, DeepSpeed's process group on ``backend``). Pass
    ``accelerator_config={"use_configured_state": True}`` to the arguments so that the Trainer uses it. A state
    left by an earlier run in the same process is reset first (accelerate's ``AcceleratorState._reset_state``,
    as ``TrainingArguments`` itself does when it builds a new state).
    """
    import os

    from accelerate import PartialState
    from accelerate.state import AcceleratorState

    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    AcceleratorState._reset_state(reset_partial_state=True)
    return PartialState(backend=backend)


def deepspeed_miscounts_processes(trainer: Any) -> bool:
    """Whether a DeepSpeed run has more processes in its process group than accelerate counts (see above)."""
    import torch.distributed as dist

    return bool(getattr(trainer, "is_deepspeed_enabled", False) and dist.is_available() and dist.is_initialized()
                and dist.get_world_size() > trainer.accelerator.num_processes)
