"""Errors of the library that a user acts on: each message is one line saying what went wrong and what to do.

* [`DecorrError`][hf_decorr.DecorrError]: a fault found while training or evaluating (a penalised layer that did
  not run in the forward, or ran without autograd, or is fed by no trainable parameter).
* [`DivergenceError`][hf_decorr.DivergenceError]: training diverged (a non-finite loss, penalty or weight); raised
  when ``decorr_stop_on_nonfinite`` is on (the default), before anything is saved from the
  diverged weights.

Both subclass ``RuntimeError``. Application code (the recipes) reports them as one line.
"""

from __future__ import annotations

__all__ = ["DecorrError", "DivergenceError"]


class DecorrError(RuntimeError):
    """A fault of the decorrelation training that the user must fix; the message says what and how."""


class DivergenceError(DecorrError):
    """Training diverged: the loss, the penalty or the trained weights became NaN or infinite.

    Attributes:
        step: the optimizer step at which it was detected.
        first_step: the first optimizer step whose loss or penalty was non-finite (``None`` when
            only the weights were found non-finite).
    """

    def __init__(self, message: str, step: int | None = None, first_step: int | None = None) -> None:
        super().__init__(message)
        self.step = step
        self.first_step = first_step
