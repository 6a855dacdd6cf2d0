"""Replay of the penalty's gradient for cached losses (GradCache, ``CachedMultipleNegativesRankingLoss``).

A cached loss embeds every mini-batch twice: first without autograd inside the loss's forward,
then again with autograd during ``backward``. When every recorded call of a training step ran
without autograd, the trainer computes the penalty on detached copies of the recorded outputs
(`replay_leaves()`), takes its gradient with respect to them, and `attach_replay()` makes
the loss's backward arm a `PenaltyGradientReplay`, which adds those gradients to the same
modules' outputs in the grad-enabled replay. `check_replay()`, called at the start of the next
training step, fails if no replayed call received them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .capture import CapturedCall, HiddenStateCapture
from .errors import DecorrError

__all__ = ["PenaltyGradientReplay", "needs_replay", "replay_leaves", "attach_replay", "check_replay"]


def needs_replay(active: bool, calls: Sequence[CapturedCall]) -> bool:
    """Whether a training step's penalty must go through a replay: λ > 0 and every recorded call ran without
    autograd (a cached loss embeds again with autograd during backward)."""
    return active and bool(calls) and not any(call.grad for call in calls)


def replay_leaves(calls: Sequence[CapturedCall], loss: torch.Tensor, layer_names: Sequence[str]
                  ) -> list[CapturedCall]:
    """The recorded calls with their outputs as fresh leaves that require grad (the penalty's gradient
    is taken with respect to them). The loss itself must still train, or nothing will replay."""
    if not loss.requires_grad:
        raise DecorrError(
            "decorr_weight > 0, but no forward call of the model in this training step ran with autograd, "
            f"so the penalty cannot train anything through {list(layer_names)}: the model runs under "
            "torch.no_grad or inference_mode"
        )
    return [CapturedCall(c.inputs, True, {n: h.detach().requires_grad_(True) for n, h in c.outputs.items()})
            for c in calls]


class PenaltyGradientReplay:
    """Add the penalty's gradient to the outputs of a cached loss's grad-enabled replay.

    Cached losses (``CachedMultipleNegativesRankingLoss`` & co., GradCache) embed every
    mini-batch twice: first without autograd inside the loss's forward, then again with autograd
    during ``backward``, replaying the same random state. When only the first pass was recorded,
    the trainer computes the penalty ``P`` and its gradients ``∂P/∂h_c`` with respect to the
    recorded outputs ``h_c`` of each call ``c``; this object then adds ``upstream · ∂P/∂h_c`` to
    the gradient of the same module's output in the ``c``-th grad-enabled call of the replay,
    where ``upstream`` is the gradient that reached the loss (gradient accumulation, loss
    scaling). The result is the exact gradient of ``P`` computed over all calls at once.

    `arm()` attaches the hooks (called from the loss's backward); they remove themselves after
    the last expected call, and `disarm()` removes them in any case.
    """

    def __init__(self, capture: HiddenStateCapture, grads: Sequence[Mapping[str, torch.Tensor]]) -> None:
        self.capture = capture
        self.grads = list(grads)
        self.upstream: torch.Tensor | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._index = -1
        self._depth = 0
        self.injected = 0

    @property
    def armed(self) -> bool:
        """Whether the replay hooks are attached."""
        return bool(self._handles)

    def arm(self, upstream: torch.Tensor) -> None:
        """Attach the hooks; ``upstream`` is the gradient that reached the loss."""
        self.disarm()
        self.upstream = upstream
        self._index, self._depth = -1, 0
        root = self.capture.root
        if root is None:
            raise RuntimeError("PenaltyGradientReplay needs a capture with a root module")
        self._handles.append(root.register_forward_pre_hook(self._enter, with_kwargs=True))
        self._handles.append(root.register_forward_hook(self._exit, always_call=True))
        for name, module in self.capture.modules.items():
            self._handles.append(module.register_forward_hook(self._make_hook(name)))

    def disarm(self) -> None:
        """Remove the hooks (idempotent)."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _enter(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        self._depth += 1
        if self._depth == 1 and torch.is_grad_enabled():
            self._index += 1

    def _exit(self, module: nn.Module, args: tuple, output: object) -> None:
        self._depth = max(0, self._depth - 1)
        if self._depth == 0 and self._index >= len(self.grads) - 1:
            self.disarm()

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if self._depth == 0 or not torch.is_grad_enabled() or not 0 <= self._index < len(self.grads):
                return
            grad = self.grads[self._index].get(name)
            if grad is None:
                return
            tensor = self.capture.tensor_of(name, module, output)
            if tuple(tensor.shape) != tuple(grad.shape):
                raise RuntimeError(
                    f"decorr: the cached loss's replay of call {self._index} gave {name!r} the shape "
                    f"{tuple(tensor.shape)}, but its first pass gave {tuple(grad.shape)}; the penalty's gradient "
                    "cannot be applied (the loss must replay its mini-batches in the order of its first pass)"
                )
            if not tensor.requires_grad or self.upstream is None:
                return
            extra = grad * self.upstream.to(grad.dtype)
            tensor.register_hook(lambda g, extra=extra: g + extra.to(g.dtype))
            self.injected += 1

        return hook


class _ArmReplay(torch.autograd.Function):
    """Identity on the loss; its backward arms the replay hooks before the cached loss's own hook replays."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor, replay: PenaltyGradientReplay) -> torch.Tensor:
        ctx.replay = replay
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.replay.arm(grad.detach())
        return grad, None


def attach_replay(loss: torch.Tensor, term: torch.Tensor, calls: Sequence[CapturedCall],
                  capture: HiddenStateCapture) -> tuple[torch.Tensor, PenaltyGradientReplay]:
    """``loss + term`` whose backward replays ``∂term/∂(outputs of calls)`` into the cached loss's replay.

    ``calls`` are those of `replay_leaves()` (``term`` was computed from their outputs).
    Returns the new loss (``term`` enters it as a value only) and the armed-on-backward replay.
    """
    leaves = [(i, name, h) for i, call in enumerate(calls) for name, h in call.outputs.items()]
    grads = torch.autograd.grad(term, [h for _, _, h in leaves], allow_unused=True)
    per_call: list[dict[str, torch.Tensor]] = [{} for _ in calls]
    for (i, name, _), grad in zip(leaves, grads):
        if grad is not None:
            per_call[i][name] = grad
    replay = PenaltyGradientReplay(capture, per_call)
    return _ArmReplay.apply(loss, replay) + term.detach().to(loss.dtype), replay


def check_replay(replay: PenaltyGradientReplay | None, layer_names: Sequence[str]) -> None:
    """After a cached-loss step: its penalty gradient must have reached a grad-enabled replay of its calls."""
    if replay is None:
        return
    replay.disarm()
    if replay.upstream is not None and replay.injected == 0:
        raise DecorrError(
            "decorr_weight > 0, but no forward call of the model ran with autograd in the last training step: "
            "neither in the loss's forward nor replayed during its backward (as cached losses do), so the penalty "
            f"trained nothing through {list(layer_names)}. Run the model with autograd enabled"
        )
