"""From a layer's output to positions of the batch: ``(B, T', p)`` batch-first, with the mask of its valid positions.

Most layers return ``(batch, sequence, p)`` with one position per input token, so the batch's
``(B, T)`` mask fits as it is. The others, and what a sample is for them:

* **parallel streams** ``(B, T, k, p)`` (hyper-connections: ``k`` residual streams per position), recognised
  when the first two axes are the mask's: each stream of a valid position is a sample.
* **feature maps** ``(B, C, H, W)`` (convolutional networks; channels first, PyTorch's convention)
  or ``(B, H, W, C)`` (channels last, recognised when the two spatial sizes are equal and differ from
  the third): one sample per spatial position, the channels are the units, ``(B, H·W, C)``. Images have
  no padding: every position is valid. 5-D maps ``(B, C, T, H, W)`` likewise, per space-time position.
* **sequence first** ``(T, B, p)`` (XLNet): transposed when the batch's mask tells the axes apart
  (or the architecture is registered as sequence-first, `LAYOUTS`).
* **internal padding** (Longformer, LED, Pegasus-X and BigBird-style models pad the sequence on the
  right to a multiple of their attention window or block): ``T' > T``; the positions past ``T`` are
  padding and never samples.
* **extra positions** registered per architecture (`LAYOUTS`): positions prepended before the
  input's (CPM-Ant's prompt) are not samples; ``k`` streams of the input's positions stacked along the
  sequence axis (ProphetNet's n-gram streams) take the mask ``k`` times.
* **downsampled** sequences ``T' < T`` (Funnel, Canine, the convolutional front end of speech models whose
  mask covers the raw signal): position ``t`` stands for input positions ``⌊t·T/T'⌋ … ⌊(t+1)·T/T'⌋ − 1``
  and is a sample only when every one of them is valid (a position that saw padding is never counted).

Pure PyTorch (no transformers import): the trainer looks up `LAYOUTS` by ``config.model_type``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["SequenceLayout", "DEFAULT_LAYOUT", "LAYOUTS", "register_layout", "layout_for", "to_positions"]


@dataclass(frozen=True)
class SequenceLayout:
    """How one layer's sequence axis relates to the batch's positions (see the module docstring).

    Attributes:
        sequence_first: the output is ``(T, B, p)``.
        prefix: positions prepended before the input's (not samples).
        streams: the sequence axis holds this many copies of the input's positions, one after the other.
        unmasked: the layer reads an input without padding (the image patches of a vision tower, whose
            positions are not the text's): every position is a sample and the batch's mask is not used.
    """

    sequence_first: bool = False
    prefix: int = 0
    streams: int = 1
    unmasked: bool = False


#: one position per input token, batch first
DEFAULT_LAYOUT = SequenceLayout()

#: ``model_type`` → ``(config, layer name) → SequenceLayout`` for the architectures whose layers lay out the
#: sequence in a way the shapes alone do not tell. Extend it with [`register_layout()`][hf_decorr.register_layout].
LAYOUTS: dict[str, Callable[[Any, str], SequenceLayout]] = {}


def register_layout(model_type: str, layout: Callable[[Any, str], SequenceLayout]) -> None:
    """Register the layout of an architecture's layers: ``layout(config, layer_name) → SequenceLayout``."""
    if not callable(layout):
        raise TypeError(f"register_layout({model_type!r}, ...) needs a callable (config, layer) -> SequenceLayout")
    LAYOUTS[model_type] = layout


def _decoder(name: str) -> bool:
    return any("decoder" in part for part in name.split("."))


register_layout("xlnet", lambda config, layer: SequenceLayout(sequence_first=True))
# the latent array's positions are not the input's: all of them are samples
register_layout("perceiver", lambda config, layer: SequenceLayout(unmasked=True))
register_layout("cpmant", lambda config, layer: SequenceLayout(prefix=int(config.prompt_length)))
for _type in ("prophetnet", "xlm-prophetnet"):
    register_layout(_type, lambda config, layer: SequenceLayout(streams=1 + int(config.ngram) if _decoder(layer)
                                                                else 1))


#: the ``main_input_name`` of models (and towers) whose inputs have no padding
UNPADDED_INPUTS = ("pixel_values", "pixel_values_videos")


def layout_for(model: torch.nn.Module, layer: str) -> SequenceLayout:
    """The layout of module ``layer`` of ``model``: registered for the architecture (`LAYOUTS`, by the
    ``model_type`` of the innermost enclosing module with a ``config``), and ``unmasked`` when that module's
    ``main_input_name`` is an image input (a vision tower, or an image model)."""
    owner: torch.nn.Module = model
    current: torch.nn.Module | None = model
    for part in ([] if layer == "." else layer.split(".")):
        current = getattr(current, part, None)
        if current is None:
            break
        if getattr(current, "config", None) is not None and hasattr(current, "main_input_name"):
            owner = current
    config = getattr(owner, "config", None)
    fn = LAYOUTS.get(getattr(config, "model_type", None) or "")
    layout = fn(config, layer) if fn is not None else DEFAULT_LAYOUT
    if getattr(owner, "main_input_name", None) in UNPADDED_INPUTS:
        layout = SequenceLayout(layout.sequence_first, layout.prefix, layout.streams, unmasked=True)
    return layout


def _feature_map(hidden: torch.Tensor) -> torch.Tensor:
    """``(B, C, *spatial)`` or ``(B, H, W, C)`` → ``(B, positions, C)``."""
    if hidden.dim() == 4:
        _, a, b, c = hidden.shape
        if a == b and c != a:  # (B, H, H, C): channels last
            return hidden.flatten(1, 2)
    return hidden.flatten(2).transpose(1, 2)


def _downsampled(mask: torch.Tensor, length: int) -> torch.Tensor:
    """``(B, T)`` → ``(B, length)``: a position is valid when every input position of its share is."""
    batch, total = mask.shape
    bounds = torch.arange(length + 1, device=mask.device) * total // length
    sums = torch.cat([mask.new_zeros(batch, 1, dtype=torch.long), mask.long().cumsum(dim=1)], dim=1)
    counts = sums[:, bounds[1:]] - sums[:, bounds[:-1]]
    widths = bounds[1:] - bounds[:-1]
    return (counts == widths) & (widths > 0)


def to_positions(hidden: torch.Tensor, mask: torch.Tensor | None, layer: str = "layer",
                 layout: SequenceLayout = DEFAULT_LAYOUT) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``hidden`` as ``(B, p)`` or batch-first positions ``(B, T', p)``, and the ``(B, T')`` bool mask of its valid
    positions (``None``: all valid, or no mask was given). ``ValueError`` naming the layer when the batch's
    ``(B, T)`` mask cannot be mapped onto the output's positions."""
    if hidden.dim() == 2:
        return hidden, None
    if hidden.dim() >= 4:
        if mask is not None and not layout.unmasked and tuple(hidden.shape[:2]) == tuple(mask.shape):
            # (B, T, k, p): k parallel streams per position (hyper-connections), each a sample of a valid position
            streams = hidden.shape[2:-1].numel()
            return hidden.flatten(1, -2), mask.to(device=hidden.device, dtype=torch.bool).repeat_interleave(streams, 1)
        return _feature_map(hidden), None
    if hidden.dim() != 3:
        raise ValueError(
            f"decorr_layers: the output of {layer!r} has shape {tuple(hidden.shape)}; expected (batch, p), "
            "(batch, sequence, p) or a feature map (batch, channels, height, width). Choose a layer whose output is "
            "a hidden-state tensor."
        )
    if mask is None or layout.unmasked:
        return (hidden.transpose(0, 1) if layout.sequence_first else hidden), None
    batch = mask.shape[0]
    if layout.sequence_first or (hidden.shape[0] != batch and hidden.shape[1] == batch):
        hidden = hidden.transpose(0, 1)
    if hidden.shape[0] != batch:
        raise ValueError(
            f"decorr_layers: the output of {layer!r} has shape {tuple(hidden.shape)}, which has no axis of the "
            f"batch's {batch} examples, so its positions cannot be mapped to the batch's mask; choose another layer, "
            "or override decorr_samples"
        )
    mask = mask.to(device=hidden.device, dtype=torch.bool)
    if layout.prefix:
        mask = torch.cat([mask.new_zeros(batch, layout.prefix), mask], dim=1)
    if layout.streams > 1:
        mask = mask.repeat(1, layout.streams)
    length = hidden.shape[1]
    if length > mask.shape[1]:  # internal padding on the right
        mask = torch.cat([mask, mask.new_zeros(batch, length - mask.shape[1])], dim=1)
    elif length < mask.shape[1]:
        mask = _downsampled(mask, length)
    return hidden, mask
