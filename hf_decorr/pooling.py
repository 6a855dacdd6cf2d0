"""From a captured layer output to the samples of the penalty (pure PyTorch).

A layer output is either ``(B, p)`` (each row is a sample: an MLP layer, a pooled output) or
``(B, T, p)`` with a ``(B, T)`` 0/1 mask of valid (non-padding) positions. ``decorr_pooling``:

* ``tokens``: every valid position is a sample: ``(B·T, p)`` rows with the flattened mask.
* ``mean``: the masked mean over positions, one sample per sequence.
* ``first``: the first valid position of each sequence (the ``[CLS]`` token with right padding).
* ``last``: the last valid position (for decoder LMs); needs the mask.

Everything is done with masks and gathers, never boolean indexing, so the shapes do not
depend on the data and the step never waits on the host.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["MASK_SOURCES", "POOLINGS", "MissingMaskError", "mask_from_inputs", "mask_like_keys", "pool_hidden"]

POOLINGS = ("tokens", "mean", "first", "last")
MASK_SOURCES = ("attention_mask", "labels")
IGNORE_INDEX = -100


class MissingMaskError(ValueError):
    """A ``(batch, sequence, p)`` output whose inputs hold masks, none of which is the one to use."""


def mask_like_keys(inputs: Mapping[str, object], decoder_side: bool = False) -> list[str]:
    """Keys of ``inputs`` that look like ``(B, T)`` masks of valid positions (``*mask*`` with a 2-D tensor).

    On the encoder side, keys naming the decoder are left out; on the decoder side only those are kept.
    Used to refuse counting padding when no usable mask was found.
    """
    found = []
    for key, value in inputs.items():
        name = str(key).lower()
        if "mask" not in name or not isinstance(value, torch.Tensor) or value.dim() != 2:
            continue
        if ("decoder" in name) == decoder_side:
            found.append(str(key))
    return found


def _gather_positions(hidden: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``hidden[b, index[b]]`` for every ``b``: ``(B, T, p), (B,) → (B, p)``."""
    return hidden.gather(1, index.view(-1, 1, 1).expand(-1, 1, hidden.shape[-1])).squeeze(1)


def pool_hidden(
    hidden: torch.Tensor, mask: torch.Tensor | None, pooling: str, layer: str = "layer"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Samples ``(N, p)`` and their 0/1 validity ``(N,)`` (``None``: all valid) of one layer output."""
    if hidden.dim() == 2:
        return hidden, None
    if hidden.dim() != 3:
        raise ValueError(
            f"decorr_layers: the output of {layer!r} has shape {tuple(hidden.shape)}; expected (batch, p) or "
            "(batch, sequence, p). Choose a layer whose output is a hidden-state tensor."
        )
    if pooling not in POOLINGS:
        raise ValueError(f"decorr_pooling={pooling!r} is not valid; choose one of {list(POOLINGS)}")
    batch, length, width = hidden.shape
    if mask is not None:
        if mask.shape != (batch, length):
            raise ValueError(
                f"decorr_pooling={pooling!r}: the mask of shape {tuple(mask.shape)} does not fit the output of "
                f"{layer!r} with shape {tuple(hidden.shape)} (expected a mask of shape {(batch, length)}); this layer "
                "does not keep one position per input token. Use a (batch, p) layer or another layer."
            )
        mask = mask.to(device=hidden.device, dtype=torch.bool)
    if pooling == "tokens":
        return hidden.reshape(batch * length, width), None if mask is None else mask.reshape(-1)
    if pooling == "mean":
        hidden = hidden.to(torch.promote_types(hidden.dtype, torch.float32))  # sums in at least float32
        if mask is None:
            return hidden.mean(dim=1), None
        counts = mask.sum(dim=1, keepdim=True)
        sums = torch.where(mask.unsqueeze(-1), hidden, 0.0).sum(dim=1)
        return sums / counts.clamp_min(1), counts.squeeze(-1) > 0
    if pooling == "first":
        if mask is None:
            return hidden[:, 0], None
        return _gather_positions(hidden, mask.int().argmax(dim=1)), mask.any(dim=1)
    # last
    if mask is None:
        raise ValueError(
            f"decorr_pooling='last' needs an attention mask to find the last non-padding token of {layer!r}, but the "
            "batch has none (no 'attention_mask'); pass one from your collator or use decorr_pooling='mean' or "
            "'tokens'"
        )
    positions = torch.arange(length, device=hidden.device)
    last = torch.where(mask, positions, -1).argmax(dim=1)
    return _gather_positions(hidden, last), mask.any(dim=1)


def mask_from_inputs(inputs: Mapping[str, object], decoder_side: bool = False, source: str = "attention_mask"):
    """The ``(B, T)`` validity mask of a batch for one side of the model, or ``None``.

    ``source="attention_mask"``: the batch's ``attention_mask`` (on the decoder side of an
    encoder-decoder model: ``decoder_attention_mask``, else ``labels != -100``).
    ``source="labels"``: the positions whose label is not ``-100`` (prompt and padding tokens
    excluded), combined with the attention mask when there is one.
    """
    if source not in MASK_SOURCES:
        raise ValueError(f"decorr_mask={source!r} is not valid; choose one of {list(MASK_SOURCES)}")
    given = inputs.get("labels")
    labels = given if isinstance(given, torch.Tensor) and given.dim() == 2 else None
    if decoder_side:
        mask = inputs.get("decoder_attention_mask")
        if mask is None and labels is not None:
            mask = labels != IGNORE_INDEX
        return mask
    mask = inputs.get("attention_mask")
    if source == "labels":
        if labels is None:
            raise ValueError(
                "decorr_mask='labels' needs token labels of shape (batch, sequence) in the batch, but it has "
                f"{'no labels' if inputs.get('labels') is None else 'labels of another shape'}; use "
                "decorr_mask='attention_mask'"
            )
        label_mask = labels != IGNORE_INDEX
        mask = label_mask if not isinstance(mask, torch.Tensor) else label_mask & mask.bool()
    return mask
