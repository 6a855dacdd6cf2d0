"""What the trainer watches between logging steps: the log window and the divergence guard.

Both keep device tensors that each training micro-batch adds to without waiting on the host,
and are read once where the Trainer syncs anyway (a logging, evaluation or save step).

**Log window** (`LogWindow`): sums of the task loss, the per-layer penalties and the count of
layers with fewer than 2 samples, flushed into the logged values at each logging step.

**Divergence guard** (`DivergenceMonitor`, `DivergenceCallback`):

Training has diverged when, at some optimizer step, the training loss, the penalty **or the
gradient norm** ``‖g‖₂`` (over this process's gradients, before clipping) is NaN or infinite,
whatever the optimizer then does with the step (skip it, zero it, or write NaN into the weights),
or when the trained weights themselves hold NaN or infinite values.

Under fp16 loss scaling (a ``GradScaler``) a non-finite gradient is normal: the scaler skips the
step and lowers its scale. There a non-finite gradient norm counts as divergence only when
`SCALER_PATIENCE` optimizer steps in a row have one (the scale has then been halved that many
times, from 2¹⁶ to below 2⁻⁸, and still overflows).

Nothing here waits on the host: each observation ORs device booleans into a small state tensor;
`DivergenceMonitor.status()` is the one read, done at logging, evaluation and save steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from transformers import TrainerCallback

from ._compat import total_grad_norm
from .errors import DivergenceError

__all__ = ["LogWindow", "DivergenceMonitor", "DivergenceCallback", "SCALER_PATIENCE", "local_shard",
           "weights_nonfinite"]

#: consecutive optimizer steps with a non-finite gradient norm after which fp16 loss scaling counts as diverged
SCALER_PATIENCE = 25

#: what each flag of the state means, in the order of the message
_WHAT = ("the training loss", "the decorrelation penalty", "the gradient norm")


def local_shard(param: torch.Tensor) -> torch.Tensor:
    """This process's part of a tensor (DeepSpeed ZeRO-3 keeps it in ``ds_tensor``; FSDP2 in a DTensor)."""
    shard = getattr(param, "ds_tensor", None)
    if shard is not None:
        return shard
    return param.to_local() if hasattr(param, "to_local") else param


def weights_nonfinite(model: torch.nn.Module | None, device: torch.device) -> torch.Tensor:
    """Whether any trainable parameter of this process (its shard) holds NaN or inf: a device bool, no sync."""
    bad = torch.zeros((), dtype=torch.bool, device=device)
    for param in model.parameters() if model is not None else ():
        shard = local_shard(param)
        if param.requires_grad and shard.numel():
            bad = bad | (~torch.isfinite(shard).all()).to(device)
    return bad


class LogWindow:
    """Device-side sums of the values logged at the next logging step."""

    def __init__(self) -> None:
        self.task: torch.Tensor | None = None
        self.layers: torch.Tensor | None = None
        self.few: torch.Tensor | None = None
        self.micro = 0
        self.weight_sum = 0.0
        self.start_step: int | None = None

    def add(self, task: torch.Tensor, layers: torch.Tensor, few: torch.Tensor, weight: float, step: int) -> None:
        """One micro-batch: its task loss (already divided as ``training_step`` will), per-layer penalties ``(L,)``,
        count of layers with < 2 samples, mean layer weight, and the optimizer step it belongs to."""
        if self.micro == 0 or self.task is None or self.layers is None or self.few is None:
            self.task, self.layers, self.few, self.start_step = task, layers, few, step
        else:
            self.task, self.layers, self.few = self.task + task, self.layers + layers, self.few + few
        self.micro += 1
        self.weight_sum += weight

    def flush(self, step: int, layer_names: Sequence[str], per_layer: bool,
              gather_mean: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[dict[str, float], bool]:
        """The logged values, and whether some batch had fewer than 2 samples in a layer (one host read).

        ``task_loss`` is the mean over the optimizer steps of the window, ``decorr_loss`` (``Σ_layers P``) and
        ``decorr_loss/<layer>`` the mean over its micro-batches, ``decorr_weight`` the mean ``λ_t``;
        ``gather_mean`` averages the values over processes (``None``: one process).
        """
        if self.task is None or self.layers is None or self.few is None:
            raise ValueError("LogWindow.flush() before any micro-batch was added")
        stacked = torch.cat([self.task.reshape(1), self.layers, self.few.float().reshape(1).to(self.task)])
        if gather_mean is not None:
            stacked = gather_mean(stacked)
        values: list[float] = stacked.tolist()
        optimizer_steps = max(1, step - (self.start_step or 0))
        layers = [v / self.micro for v in values[1:-1]]
        logs = {
            "task_loss": values[0] / optimizer_steps,
            "decorr_loss": sum(layers),
            "decorr_weight": self.weight_sum / self.micro,
        }
        if per_layer and len(layers) > 1:
            logs.update({f"decorr_loss/{name}": v for name, v in zip(layer_names, layers)})
        return logs, values[-1] > 0


class DivergenceMonitor:
    """Device-side flags: which of loss, penalty and gradient norm went non-finite, and at which step first.

    State (one float64 tensor on the training device, created at the first observation):
    ``[loss_bad, penalty_bad, grad_bad, first_step (−1: none), scaler_streak]``.
    """

    def __init__(self) -> None:
        self.state: torch.Tensor | None = None

    def _state(self, device: torch.device) -> torch.Tensor:
        if self.state is None:
            self.state = torch.tensor([0.0, 0.0, 0.0, -1.0, 0.0], dtype=torch.float64, device=device)
        return self.state

    def _record(self, bad: torch.Tensor, step: int) -> None:
        """OR ``bad (3,)`` into the flags; the first step with any flag is kept."""
        state = self._state(bad.device)
        flags = torch.maximum(state[:3], bad.to(state.dtype))
        first = torch.where((state[3] < 0) & bad.any(), state.new_tensor(float(step)), state[3])
        self.state = torch.cat([flags, first.reshape(1), state[4:]])

    def observe_loss(self, loss: torch.Tensor, per_layer: torch.Tensor, step: int) -> None:
        """One micro-batch's loss and per-layer penalties (no host sync)."""
        false = torch.zeros((), dtype=torch.bool, device=loss.device)
        bad = torch.stack([~torch.isfinite(loss).all(), ~torch.isfinite(per_layer.to(loss.device)).all(), false])
        self._record(bad, step)

    def observe_gradients(self, parameters, step: int, scaled: bool, device: torch.device) -> None:
        """The gradients of one optimizer step, before clipping: their norm must be finite.

        ``scaled``: fp16 loss scaling is on; then only `SCALER_PATIENCE` non-finite steps in a
        row count. Each process looks at its own gradients (its shards under FSDP / ZeRO); the
        flags are combined over processes when they are read.
        """
        grads = [local_shard(p.grad) for p in parameters if p.grad is not None]
        grads = [g for g in grads if g.numel()]
        if not grads:
            return
        norm = total_grad_norm(grads).to(device)
        nonfinite = ~torch.isfinite(norm)
        state = self._state(device)
        if scaled:
            streak = torch.where(nonfinite, state[4] + 1, torch.zeros_like(state[4]))
            self.state = torch.cat([state[:4], streak.reshape(1)])
            nonfinite = streak >= SCALER_PATIENCE
        false = torch.zeros((), dtype=torch.bool, device=device)
        self._record(torch.stack([false, false, nonfinite]), step)

    def status(self, device: torch.device) -> torch.Tensor:
        """``[loss_bad, penalty_bad, grad_bad, first_step, weights_bad]`` (float64, ``weights_bad`` = 0)."""
        state = self.state.to(device) if self.state is not None else None
        out = torch.tensor([0.0, 0.0, 0.0, -1.0, 0.0], dtype=torch.float64, device=device)
        if state is not None:
            out[:4] = state[:4]
        return out

    @staticmethod
    def combine(gathered: torch.Tensor) -> torch.Tensor:
        """One status from the statuses of all processes ``(W, 5)``: any flag, the earliest first step."""
        steps = gathered[:, 3]
        first = steps[steps >= 0].min() if bool((steps >= 0).any()) else steps.new_tensor(-1.0)
        return torch.cat([gathered[:, :3].amax(dim=0), first.reshape(1), gathered[:, 4:].amax(dim=0)])

    @staticmethod
    def error(status: list[float], step: int, weight: float, learning_rate: float, max_grad_norm: float,
              scaled: bool) -> DivergenceError | None:
        """The [`DivergenceError`][hf_decorr.DivergenceError] that a read ``status`` (see `status()`) calls for, or
        ``None``."""
        *bad, first, weights_bad = status
        what = [name for name, flag in zip(_WHAT, bad) if flag]
        if not what and not weights_bad:
            return None
        if what:
            named = what[0] if len(what) == 1 else f"{', '.join(what[:-1])} and {what[-1]}"
            found = f"{named} became NaN or infinite at optimizer step {int(first) + 1}"
            if bad[2] and scaled:
                found += f" (and at {SCALER_PATIENCE} optimizer steps in a row under fp16 loss scaling)"
        else:
            found = f"the trained weights hold NaN or infinite values after optimizer step {step}"
        clip = f"clip gradients with max_grad_norm > 0 (now {max_grad_norm:g}), " if not max_grad_norm > 0 else ""
        return DivergenceError(
            f"training diverged: {found} (detected at step {step}); nothing is saved from these weights. Lower "
            f"decorr_weight (now {weight:g}) or learning_rate (now {learning_rate:g}), {clip}or check the data for "
            "bad values; decorr_stop_on_nonfinite=False trains on regardless",
            step=step, first_step=int(first) + 1 if what else None,
        )


class DivergenceCallback(TrainerCallback):
    """Reads the trainer's divergence flags at logging, evaluation and save steps and at the last step.

    Added by [`DecorrTrainerMixin`][hf_decorr.DecorrTrainerMixin] when the guard is on
    (``decorr_stop_on_nonfinite``; by default whenever ``decorr_weight > 0``), so
    ``trainer.callback_handler.callbacks`` then holds one more callback than a plain ``Trainer``'s.
    ``DefaultFlowCallback`` has set ``control.should_log / should_evaluate / should_save`` before this
    runs, and ``Trainer`` logs, evaluates and saves only after ``on_step_end``: a diverged run stops
    before anything is saved from it. The steps in between never wait on the host.
    """

    def __init__(self, trainer) -> None:
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        last = state.max_steps > 0 and state.global_step >= state.max_steps
        if control.should_log or control.should_evaluate or control.should_save or last:
            self.trainer.decorr_raise_if_diverged(weights=control.should_save or last)

    def on_epoch_end(self, args, state, control, **kwargs):
        if control.should_log or control.should_evaluate or control.should_save:
            self.trainer.decorr_raise_if_diverged(weights=control.should_save)
