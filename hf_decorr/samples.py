"""Per-call sample assembly: from the recorded forward calls to each penalised layer's samples ``(N, p)``.

A step may call the model several times (sentence-transformers runs it once per text column, a
cached loss once per mini-batch), each call padded to its own length. For every penalised layer,
`call_samples()` applies a *samples function* ``(layer, output, inputs) → (x (N, p), mask (N,) | None)``
to the layer's output in each call, with that call's own inputs; `assemble_samples()` then
concatenates the calls' samples into one [`DecorrSamples`][hf_decorr.DecorrSamples] per layer. The trainer passes its
[`decorr_samples()`][hf_decorr.DecorrTrainerMixin.decorr_samples] override point; ``hf-decorr inspect``
passes a plain pooling function. What a samples function returns is checked here (shape, dtype,
device, and at λ > 0 that it still depends on the layer's output), with messages naming ``decorr_samples``.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ._compat import checkpointing_option
from .capture import CapturedCall
from .errors import DecorrError
from .layouts import DEFAULT_LAYOUT, SequenceLayout, to_positions
from .pooling import MissingMaskError, mask_from_inputs, mask_like_keys, pool_hidden

__all__ = ["DecorrSamples", "SamplesFn", "default_samples", "call_samples", "assemble_samples", "check_trainable",
           "no_autograd_message", "FEW_SAMPLES_WARNING"]

#: ``(layer, output (B, p) | (B, T, p), inputs of the call) → (x (N, p), mask (N,) | None)``
SamplesFn = Callable[[str, torch.Tensor, Mapping[str, Any]], tuple[torch.Tensor, torch.Tensor | None]]

#: the one warning for batches whose layer had fewer than 2 valid samples (its penalty is 0 there)
FEW_SAMPLES_WARNING = "decorr: some batches had fewer than 2 valid samples in a layer; the penalty was 0 for them"


@dataclass
class DecorrSamples:
    """One penalised layer's samples in one step.

    Attributes:
        layer: the module name (relative to the unwrapped model).
        x: samples, shape ``(N, p)``.
        mask: validity of the rows, bool ``(N,)``; ``None`` when every row is valid.
        pooled: ``True`` when the rows are one per sequence (bounded by the batch size), ``False``
            for token samples (their count depends on the padding).
        decoder: whether the layer is on the decoder side of an encoder-decoder model.
        rows_bound: an upper bound of ``N`` that holds on every process (pooled rows of one call:
            the per-device batch size), or ``None``.
    """

    layer: str
    x: torch.Tensor
    mask: torch.Tensor | None
    pooled: bool = False
    decoder: bool = False
    rows_bound: int | None = field(default=None, repr=False)

    @property
    def group(self) -> tuple:
        """Rank-independent key: pooled layers with equal keys are stacked into one batched kernel."""
        return (self.x.shape[-1], self.decoder, self.pooled, self.x.dtype, self.x.device)


def default_samples(layer: str, output: torch.Tensor, inputs: Mapping[str, Any], *, pooling: str, mask_source: str,
                    decoder: bool = False, layout: SequenceLayout = DEFAULT_LAYOUT
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The trainer's default samples of one call: the output as batch positions
    ([`hf_decorr.layouts.to_positions()`][hf_decorr.to_positions]: feature maps, sequence-first, internally padded,
    prefixed and
    downsampled layouts, per ``layout``), the mask named by ``mask_source`` (``decorr_mask``) mapped onto them,
    pooled per ``pooling`` (``decorr_pooling``).
    ``MissingMaskError`` when a ``(B, T, p)`` output has no mask while the inputs hold keys that look like one
    (padding is never counted as samples)."""
    if output.dim() >= 4 and (layout.unmasked or output.shape[1] != _mask_length(inputs, decoder, mask_source)):
        if pooling in ("first", "last"):
            raise ValueError(
                f"decorr_pooling={pooling!r} takes one position of a sequence, but the output of {layer!r} is a "
                f"feature map of shape {tuple(output.shape)}; use decorr_pooling='tokens' (one sample per position, "
                "the channels are the units) or 'mean' (one per example)"
            )
        return pool_hidden(to_positions(output, None, layer)[0], None, pooling, layer)
    mask = None if layout.unmasked else mask_from_inputs(inputs, decoder_side=decoder, source=mask_source)
    if mask is None and output.dim() == 3 and not layout.unmasked:
        candidates = mask_like_keys(inputs, decoder_side=decoder)
        if candidates:
            raise MissingMaskError(
                f"decorr: the (batch, sequence, p) output of {layer!r} needs a mask of its valid positions, but its "
                f"forward call has no {'decoder_attention_mask or labels' if decoder else 'attention_mask'}; keys "
                f"that look like masks: {candidates}. Padding is never counted as samples: pass the mask to the "
                "model as attention_mask, or override decorr_samples to choose it"
            )
    hidden, mask = to_positions(output, mask, layer, layout)
    return pool_hidden(hidden, mask, pooling, layer)


def _mask_length(inputs: Mapping[str, Any], decoder: bool, mask_source: str) -> int | None:
    try:
        mask = mask_from_inputs(inputs, decoder_side=decoder, source=mask_source)
    except ValueError:
        return None
    return mask.shape[-1] if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None


def no_autograd_message(name: str) -> str:
    """The error for a penalised module that ran without autograd inside the training forward."""
    return (
        f"decorr_layers: module {name!r} ran without autograd in the training forward, so the penalty cannot train "
        "anything through it: it runs inside a reentrant gradient-checkpointing region (use "
        f"{checkpointing_option('activation_checkpointing_kwargs')}={{'use_reentrant': False}}, or penalise the whole "
        "block) or under torch.no_grad"
    )


def check_trainable(calls: Sequence[CapturedCall]) -> None:
    """At λ > 0: every recorded output must carry the graph, or the penalty would train nothing through it."""
    for call in calls:
        for name, hidden in call.outputs.items():
            if name in call.no_grad_layers:
                raise DecorrError(no_autograd_message(name))
            if not hidden.requires_grad:
                raise DecorrError(
                    f"decorr_layers: the output of {name!r} does not require grad, so the penalty cannot train "
                    "anything through it: no trainable parameter feeds it (frozen layers, or PEFT adapters only "
                    "above it)"
                )


def _check_returned(name: str, hidden: torch.Tensor, x: Any, mask: Any, need_grad: bool) -> None:
    """What a samples function returned must be usable samples of ``hidden``: raise naming ``decorr_samples``."""
    where = f"decorr_samples({name!r})"
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{where} must return (x, mask) with x a tensor of shape (N, p); got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{where} must return floating-point samples; got {x.dtype} (integer samples have no "
                        "gradient)")
    if mask is not None and not isinstance(mask, torch.Tensor):
        raise TypeError(f"{where} must return a mask tensor of shape (N,) or None; got {type(mask).__name__}")
    if x.dim() != 2 or (mask is not None and tuple(mask.shape) != tuple(x.shape[:1])):
        raise ValueError(
            f"decorr_samples({name!r}) must return samples of shape (N, p) and a mask of shape (N,) or None; got "
            f"{tuple(x.shape)} and {None if mask is None else tuple(mask.shape)}"
        )
    if x.device != hidden.device:
        raise ValueError(f"{where} returned samples on {x.device}, but the layer's output is on {hidden.device}")
    if mask is not None and mask.is_floating_point():
        raise TypeError(f"{where} must return a bool or 0/1 integer mask; got {mask.dtype} (a float mask such as 0.3 "
                        "would be read as True)")
    if need_grad and hidden.requires_grad and not x.requires_grad:
        raise DecorrError(
            f"{where} returned samples that do not depend on the layer's output (detached, or built anew), so the "
            "penalty would train nothing although decorr_weight > 0; return a differentiable function of output"
        )


def call_samples(
    calls: Sequence[CapturedCall],
    inputs: Mapping[str, Any],
    layer_names: Sequence[str],
    samples_fn: SamplesFn,
    *,
    pooling: str,
    strict: bool,
    need_grad: bool = False,
    ran_without_grad: set[str] | frozenset[str] = frozenset(),
    warn: Callable[[str, str], None] | None = None,
    absent_ok: Collection[str] = frozenset(),
) -> dict[str, list[tuple[torch.Tensor, torch.Tensor | None, bool]]]:
    """``layer → [(x, mask, pooled) per call]``: ``samples_fn`` on every recorded output, with its call's inputs.

    Args:
        calls: the recorded calls ([`sample_calls()`][hf_decorr.HiddenStateCapture.sample_calls]).
        inputs: the batch, used for a call whose own inputs were not observed.
        pooling: ``decorr_pooling``; rows are pooled (one per sequence) unless it is ``"tokens"``
            and the output is ``(B, T, p)``.
        strict: training: a layer that did not run, or a samples function that fails, raises. Evaluation
            (``False``): such a layer is skipped for the batch with a warning (``warn(key, message)``).
        need_grad: λ > 0: samples must depend differentiably on the layer's output.
        ran_without_grad: layers that ran only without autograd (named in the error).
        absent_ok: layers that may not run in a pass, even when ``strict`` (left out of the result): the
            trainer's layers of known width (LayerDrop, a tower that some batches do not use).
    """
    out: dict[str, list[tuple[torch.Tensor, torch.Tensor | None, bool]]] = {}
    for name in layer_names:
        parts = []
        seen = False
        for call in calls:
            hidden = call.outputs.get(name)
            if hidden is None:
                continue
            seen = True
            try:
                x, mask = samples_fn(name, hidden, call.inputs if call.inputs is not None else inputs)
            except MissingMaskError:
                raise
            except ValueError:
                if strict:
                    raise
                if warn is not None:
                    warn(f"eval-shape-{name}",
                         f"decorr: skipping {name!r} for an evaluation batch whose output shape {tuple(hidden.shape)} "
                         "does not fit the batch's mask (e.g. a generation step)")
                continue
            _check_returned(name, hidden, x, mask, need_grad)
            if mask is not None:
                mask = mask.to(device=x.device, dtype=torch.bool)
            parts.append((x, mask, hidden.dim() == 2 or pooling != "tokens"))
        if not seen:
            if name in absent_ok:
                continue
            if strict and name in ran_without_grad:
                raise DecorrError(no_autograd_message(name))
            if strict:
                raise DecorrError(
                    f"decorr_layers: module {name!r} did not run during the forward pass, so it cannot be "
                    "penalised; choose a module that the model's forward uses"
                )
            continue
        if parts:
            out[name] = parts
    return out


def assemble_samples(
    parts_by_layer: Mapping[str, list[tuple[torch.Tensor, torch.Tensor | None, bool]]],
    *,
    decoder_side: Mapping[str, bool],
    pooled_rows_bound: int | None,
) -> list[DecorrSamples]:
    """One [`DecorrSamples`][hf_decorr.DecorrSamples] per layer (in the order of ``parts_by_layer``): its calls'
    samples concatenated.

    ``pooled_rows_bound``: the per-device batch size, a bound of the pooled rows of a single call
    on every process (several calls are not bounded by it).
    """
    out = []
    for name, parts in parts_by_layer.items():
        x, mask, pooled = parts[0]
        if len(parts) > 1:
            x = torch.cat([part[0] for part in parts])
            if any(part[1] is not None for part in parts):
                mask = torch.cat([
                    torch.ones(part[0].shape[0], dtype=torch.bool, device=x.device) if part[1] is None else part[1]
                    for part in parts
                ])
        rows_bound = pooled_rows_bound if pooled and len(parts) == 1 else None
        out.append(DecorrSamples(name, x, mask, pooled, decoder_side.get(name, False), rows_bound))
    return out
