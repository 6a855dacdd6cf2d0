"""``DecorrFigureCallback``: the penalised layers' covariance as images in TensorBoard and W&B.

At each evaluation, [`DecorrTrainerMixin`][hf_decorr.DecorrTrainerMixin] keeps every penalised
layer's float64 covariance ``C (p, p)`` over the whole evaluation set in
``trainer.decorr_last_eval_covariances`` (the statistics behind ``eval_decorr_*``). This
callback turns each into two images, logged at the current ``global_step`` through the
Trainer's own reporting integrations (those of ``report_to``):

* ``decorr/<prefix>/<layer>/correlation``: ``|R|``, ``R = C / √(diag C diag Cᵀ)``, units ordered
  by decreasing variance (at most ``max_units`` of them), on a fixed ``[0, 1]`` scale;
* ``decorr/<prefix>/<layer>/spectrum``: the unit variances ``diag C`` as shares of ``tr C``,
  sorted (log scale), with the layer's UD_90% in the title.

TensorBoard: written with the ``SummaryWriter`` of the Trainer's ``TensorBoardCallback`` (the
same event files as the scalars). W&B: logged with ``wandb.Image`` through the Trainer's
``WandbCallback`` when that integration is active. With neither, nothing is logged.

Use it with ``decorr_log_figures=True`` in the training arguments (the trainer adds it), or
by hand::

    trainer = DecorrTrainer(model=model, args=args, ...)
    trainer.add_callback(DecorrFigureCallback(trainer))

Only the main process logs; matplotlib is required (``pip install 'hf-decorr[plots]'``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from .metrics import decorrelation_metrics

__all__ = ["DecorrFigureCallback", "layer_images"]


def layer_images(covariance: Any, layer: str, max_units: int = 256) -> dict[str, np.ndarray]:
    """``{"correlation": (H, W, 3) uint8, "spectrum": (H, W, 3) uint8}`` images of one layer's ``C (p, p)``."""
    import torch

    from . import plotting

    cov = torch.as_tensor(plotting.as_numpy(covariance))
    ud = decorrelation_metrics(cov)["ud"]
    fig, axes = plotting.new_figure(1, 1, panel_size=(4.2, 3.6))
    plotting.plot_correlation_map(cov, axes[0, 0], title=f"{layer}: |correlation|", max_units=max_units)
    correlation = plotting.figure_to_rgb(fig)
    fig, axes = plotting.new_figure(1, 1, panel_size=(4.2, 3.0))
    plotting.plot_spectrum_curves({layer: torch.diagonal(cov)}, axes[0, 0],
                                  title=f"{layer}: variance spectrum (UD_90% {ud:.0f}/{cov.shape[0]})")
    spectrum = plotting.figure_to_rgb(fig)
    return {"correlation": correlation, "spectrum": spectrum}


class DecorrFigureCallback(TrainerCallback):
    """Log the heat map and the variance spectrum of each penalised layer at every evaluation.

    Args:
        trainer: the [`DecorrTrainer`][hf_decorr.DecorrTrainer] (or any trainer with the mixin)
            whose ``decorr_last_eval_covariances`` are drawn.
        max_units: the heat maps show at most this many units (those of largest variance).

    Raises:
        ImportError: matplotlib is not installed.
    """

    def __init__(self, trainer: Any, max_units: int = 256) -> None:
        from .plotting import require_matplotlib

        require_matplotlib()
        self.trainer = trainer
        self.max_units = max_units
        self.logged_steps: list[int] = []

    def _writers(self) -> tuple[list[Any], list[Any]]:
        from transformers.integrations import TensorBoardCallback, WandbCallback

        tensorboard, wandb = [], []
        for callback in self.trainer.callback_handler.callbacks:
            if isinstance(callback, TensorBoardCallback) and getattr(callback, "tb_writer", None) is not None:
                tensorboard.append(callback.tb_writer)
            elif isinstance(callback, WandbCallback) and getattr(callback, "_wandb", None) is not None \
                    and getattr(callback, "_initialized", False):
                wandb.append(callback._wandb)
        return tensorboard, wandb

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs: Any,
    ) -> None:
        """Log each penalised layer's two images at ``state.global_step`` (main process only).

        Called by the Trainer after each evaluation. The image names take the evaluation's
        ``metric_key_prefix`` (``eval``, ``test``, ...) from ``metrics``. Does nothing when the
        evaluation kept no covariances or no TensorBoard / W&B writer is active.

        Args:
            args: the trainer's training arguments (unused).
            state: the ``TrainerState``; gives the step and whether this is the main process.
            control: the ``TrainerControl`` (unchanged).
            metrics: the evaluation's metrics, used for the key prefix.
            **kwargs: the Trainer's other callback arguments (unused).
        """
        if not state.is_world_process_zero:
            return
        covariances = getattr(self.trainer, "decorr_last_eval_covariances", None) or {}
        tensorboard, wandb = self._writers()
        if not covariances or not (tensorboard or wandb):
            return
        prefix = "eval"
        if metrics:  # eval_decorr_mapc, test_decorr_mapc, …: the evaluation's metric_key_prefix
            key = next((k for k in metrics if "_decorr_" in k), None)
            prefix = key.split("_decorr_")[0] if key else prefix
        images = {}
        for layer, covariance in covariances.items():
            for kind, image in layer_images(covariance, layer, self.max_units).items():
                images[f"decorr/{prefix}/{layer}/{kind}"] = image
        for writer in tensorboard:
            for tag, image in images.items():
                writer.add_image(tag, image, state.global_step, dataformats="HWC")
            writer.flush()
        for run in wandb:
            run.log({**{tag: run.Image(image) for tag, image in images.items()},
                     "train/global_step": state.global_step})
        self.logged_steps.append(state.global_step)
