"""Pieces shared by the paper-reproduction recipes (dimensionality, XOR, image autoencoder).

* :class:`TensorDictDataset`: a map-style dataset over a dict of equally long tensors whose
  ``__getitems__`` returns a whole batch at once (``DataLoader`` then skips the per-sample
  collation, which would cost more than the tiny models' forward passes).
* :func:`training_arguments`: ``DecorrTrainingArguments`` with the settings every recipe shares
  (CPU-friendly, no checkpoints, no reporting integrations, loss-only evaluation).
* :func:`train_and_evaluate`: build a ``DecorrTrainer``, train, ``evaluate()``, and return the
  trainer with the final metrics (``eval_loss`` is the task loss; ``eval_decorr_*`` the paper's
  metrics over the whole evaluation set).
* :func:`layer_covariances`: the covariance of named layers over a dataset, with the library's
  :class:`~hf_decorr.capture.HiddenStateCapture` and
  :class:`~hf_decorr.metrics.CovarianceAccumulator` (the same statistics the trainer's metrics
  use), for heat maps and spectra.
* :func:`eval_history`: the per-evaluation metrics recorded in ``trainer.state.log_history``.
"""

from __future__ import annotations

import gc
import os
import resource
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from transformers import PreTrainedModel, TrainerCallback
from transformers.trainer_callback import PrinterCallback

from hf_decorr import DecorrTrainer, DecorrTrainingArguments
from hf_decorr.capture import HiddenStateCapture
from hf_decorr.metrics import CovarianceAccumulator

__all__ = [
    "TensorDictDataset",
    "batch_collator",
    "training_arguments",
    "train_and_evaluate",
    "layer_covariances",
    "eval_history",
    "Stopwatch",
    "cpu_count",
    "quiet_transformers",
    "runtime",
]


class TensorDictDataset(torch.utils.data.Dataset):
    """Rows of a dict of tensors that share their first dimension ``N``.

    ``dataset[i]`` is ``{key: tensor[i]}``; ``dataset.__getitems__(indices)`` is
    ``{key: tensor[indices]}``, which ``torch.utils.data.DataLoader`` calls with a whole batch
    of indices. Use it with :func:`batch_collator`.
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if not tensors:
            raise ValueError("TensorDictDataset needs at least one tensor")
        lengths = {key: len(t) for key, t in tensors.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"all tensors must have the same first dimension, got {lengths}")
        self.tensors = dict(tensors)
        self._length = next(iter(lengths.values()))

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {key: t[index] for key, t in self.tensors.items()}

    def __getitems__(self, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return {key: t[index] for key, t in self.tensors.items()}


def batch_collator(
    batch: Mapping[str, torch.Tensor] | Sequence[Mapping[str, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """Pass a batch from :meth:`TensorDictDataset.__getitems__` through; stack a list of rows."""
    if isinstance(batch, Mapping):
        return dict(batch)
    return {key: torch.stack([row[key] for row in batch]) for key in batch[0]}


def quiet_transformers() -> None:
    """Keep transformers' per-run info and warnings out of the recipes' output."""
    from transformers.utils import logging

    logging.set_verbosity_error()
    logging.disable_progress_bar()  # e.g. "Writing model shards" at every checkpoint


@contextmanager
def runtime(num_threads: int) -> Iterator[None]:
    """Settings for many short runs of tiny models in one process, undone on exit.

    * ``torch.set_num_threads(num_threads)``: the models are far too small to gain from
      intra-op parallelism, and on a shared machine extra threads mostly wait for each other
      (one thread was 5× faster than two here under load).
    * quiet transformers logging.
    * ``gc.freeze()`` (after a collection): move the objects alive now (the imported
      libraries) out of the garbage collector's view, so the ``gc.collect()`` that accelerate
      runs after every training does not walk them again (0.3 s per run otherwise).
    """
    if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
        raise ValueError(f"--num_threads must be an integer >= 1, got {num_threads!r}")
    threads = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    quiet_transformers()
    gc.collect()
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()
        torch.set_num_threads(threads)


def training_arguments(output_dir: str, **overrides: Any) -> DecorrTrainingArguments:
    """``DecorrTrainingArguments`` for the recipes' small models; ``overrides`` win.

    Defaults: CPU, no checkpoints (``save_strategy="no"``), no reporting integrations, no
    progress bars, per-epoch logging, loss-only evaluation, whole-dataset batches kept as
    given (``remove_unused_columns=False`` because the datasets are not ``datasets.Dataset``).
    """
    settings: dict[str, Any] = dict(
        output_dir=output_dir,
        use_cpu=True,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        logging_strategy="epoch",
        prediction_loss_only=True,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        weight_decay=0.0,
        warmup_steps=0,
        decorr_log_per_layer=True,
    )
    settings.update(overrides)
    return DecorrTrainingArguments(**settings)


def train_and_evaluate(
    model: PreTrainedModel,
    args: DecorrTrainingArguments,
    train_dataset: torch.utils.data.Dataset,
    eval_dataset: torch.utils.data.Dataset,
    callbacks: Sequence[TrainerCallback] = (),
) -> tuple[DecorrTrainer, dict[str, float]]:
    """Train ``model`` with a ``DecorrTrainer`` and return it with ``trainer.evaluate()``'s metrics."""
    trainer = DecorrTrainer(
        model=model,
        args=args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=batch_collator,
        callbacks=list(callbacks),
    )
    trainer.remove_callback(PrinterCallback)  # the recipes print their own one-line summaries
    trainer.train()
    metrics = trainer.evaluate()
    return trainer, metrics


@torch.no_grad()
def layer_covariances(
    model: PreTrainedModel,
    dataset: TensorDictDataset,
    layers: Sequence[str],
    batch_size: int = 4096,
) -> dict[str, torch.Tensor]:
    """Covariance ``(p, p)`` (float64, ``1/(n−1)``) of each named module's output over ``dataset``.

    The model runs in eval mode on its device; outputs of shape ``(batch, p)`` are the samples.
    """
    modules = dict(model.named_modules())
    missing = [name for name in layers if name not in modules]
    if missing:
        raise ValueError(f"layers {missing} are not modules of {type(model).__name__}")
    capture = HiddenStateCapture({name: modules[name] for name in layers})
    stats = {name: CovarianceAccumulator() for name in layers}
    was_training = model.training
    model.eval()
    capture.attach()
    capture.mode = "eval"
    device = next(model.parameters()).device
    try:
        for start in range(0, len(dataset), batch_size):
            batch = dataset.__getitems__(range(start, min(start + batch_size, len(dataset))))
            capture.clear()
            model(**{k: v.to(device) for k, v in batch.items()})
            outputs = {name: out for call in capture.sample_calls() for name, out in call.outputs.items()}
            for name in layers:
                out = outputs[name]
                stats[name].update(out.reshape(out.shape[0], -1))
    finally:
        capture.mode = "off"
        capture.detach()
        model.train(was_training)
    return {name: acc.covariance() for name, acc in stats.items()}


def eval_history(trainer: DecorrTrainer, keys: Sequence[str]) -> list[dict[str, float]]:
    """The evaluations logged *during* training (not a later ``evaluate()``):
    ``[{"epoch": e, "step": s, key: value, …}, …]``."""
    out = []
    for entry in trainer.state.log_history:
        if "train_runtime" in entry:  # the end-of-training summary: later entries are evaluate() calls
            break
        if "eval_loss" not in entry:
            continue
        row = {"epoch": float(entry.get("epoch", 0.0)), "step": int(entry.get("step", 0))}
        row.update({key: float(entry[key]) for key in keys if key in entry})
        out.append(row)
    return out


def _cpu_seconds() -> float:
    own = resource.getrusage(resource.RUSAGE_SELF)
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


class Stopwatch:
    """Started on creation; :meth:`elapsed` gives wall-clock and CPU seconds (user + system,
    this process and its waited-for children) since then."""

    def __init__(self) -> None:
        self._wall = time.perf_counter()
        self._cpu = _cpu_seconds()

    def elapsed(self) -> dict[str, float]:
        return {"wall_s": time.perf_counter() - self._wall, "cpu_s": _cpu_seconds() - self._cpu}


def cpu_count() -> int:
    """CPUs this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
