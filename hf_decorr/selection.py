"""The layers a trainer penalises, from the first forward pass on.

`PenalisedLayers` holds, for one model, the [`LayerChoice`][hf_decorr.LayerChoice] and what follows from
it: per layer its side (encoder / decoder), its [`SequenceLayout`][hf_decorr.SequenceLayout] and, once it has run,
the width of its samples. The first recorded pass (`PenalisedLayers.settle()`) keeps the stacks that ran
(one line says which), refuses a layer that did not run and that no block of its stack stands in for, and stops
recording the probe modules. Afterwards a layer that does not run in a step (LayerDrop, a tower that the batch does
not use) is given zero valid rows of its known width (`PenalisedLayers.complete()`): its penalty is 0 there and
every process still computes the same layers, so the collectives of ``decorr_sync="global"`` stay in step.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .capture import ROOT, HiddenStateCapture, LayerChoice, decoder_side, modules_by_name
from .errors import DecorrError
from .layouts import DEFAULT_LAYOUT, SequenceLayout, layout_for, to_positions
from .samples import DecorrSamples

__all__ = ["PenalisedLayers", "ABSENT_WARNING", "processes_union"]

#: the one warning for a layer that did not run in a training step
ABSENT_WARNING = ("decorr: {name!r} did not run in a training step (LayerDrop, or a tower that the batch does not "
                  "use); its penalty was 0 there")


class PenalisedLayers:
    """The penalised layers of ``model`` (see the module docstring).

    Args:
        model: the unwrapped model.
        choice: the resolved ``decorr_layers``.
        pooling: ``decorr_pooling`` (it decides whether a layer's rows are pooled).
    """

    def __init__(self, model: nn.Module, choice: LayerChoice, pooling: str) -> None:
        self.model = model
        self.choice = choice
        self.pooling = pooling
        self.first_pass = True
        self.widths: dict[str, tuple[int, bool, torch.dtype]] = {}  # layer → (p, pooled, dtype) once known
        self._set(choice.names)

    @classmethod
    def resolve(cls, model: nn.Module, specs: Sequence[str], names: Sequence[str], pooling: str) -> PenalisedLayers:
        """The layers of ``model``: ``names`` from the trainer's ``decorr_resolve_layers``. When they are the
        default's, the [`LayerChoice`][hf_decorr.LayerChoice] of ``specs`` (pending where a tower may not run);
        an override's own names are used as they are."""
        try:
            choice = LayerChoice.resolve(model, specs)
        except ValueError:  # specs that only an override understands (sentence-transformers' "embedding")
            choice = None
        if choice is None or list(names) != choice.names:
            stacks = choice.stack_of if choice is not None else LayerChoice.resolve(model, []).stack_of
            choice = LayerChoice(tuple(specs or ()), list(names), stacks)
        return cls(model, choice, pooling)

    def capture(self, output_keys: dict[str, str] | None = None) -> HiddenStateCapture:
        """The hooks of the first pass: on the layers and on every probe module (only noting that a probe ran)."""
        modules = modules_by_name(self.model)
        probe = [name for name in self.probe() if name in modules]
        capture = HiddenStateCapture({name: modules[name] for name in probe}, root=self.model, output_keys=output_keys)
        capture.lenient = set(probe) - set(self.names)
        return capture

    def _set(self, names: Sequence[str]) -> None:
        self.names = list(names)
        self.decoder_side = decoder_side(self.model, self.names)
        self.layouts = {name: layout_for(self.model, name) for name in self.names}

    def probe(self) -> list[str]:
        """The modules the first pass records (the layers; every block of every candidate stack)."""
        return self.choice.probe_names()

    def width_of(self, name: str, hidden: torch.Tensor) -> tuple[int, bool, torch.dtype]:
        """``(p, pooled, dtype)`` of the samples that the output ``hidden`` of layer ``name`` gives."""
        layout = self.layouts.get(name, DEFAULT_LAYOUT)
        positions = to_positions(hidden, None, name, SequenceLayout(layout.sequence_first))[0] \
            if hidden.dim() > 2 else hidden
        pooled = positions.dim() == 2 or self.pooling != "tokens"
        dtype = positions.dtype
        if pooled and self.pooling == "mean":
            dtype = torch.promote_types(dtype, torch.float32)
        return positions.shape[-1], pooled, dtype

    def settle_first(self, capture: HiddenStateCapture, accelerator: Any, device: torch.device) -> None:
        """`settle()` after the first recorded pass, every process on the same layers (`processes_union()`);
        nothing afterwards. The line it returns goes to the ``hf_decorr`` logger at ``INFO``."""
        if self.first_pass:
            line = self.settle(capture, processes_union(accelerator, device))
            if line is not None:
                logging.getLogger(__name__).info(line)

    def settle(self, capture: HiddenStateCapture, union: Callable[[list[str], set[str]], set[str]] | None = None
               ) -> str | None:
        """After the first recorded pass: settle the choice, remember widths, record only the layers from now on.

        ``union(probe, ran)``: with several processes, the modules that ran on any of them (every process must
        settle on the same layers). Returns the line that says what was chosen (``None`` when nothing was pending);
        ``DecorrError`` for a layer that did not run.
        """
        self.first_pass = False
        choice = self.choice
        outputs: dict[str, torch.Tensor] = {}
        ran: set[str] = capture.ran_without_grad | capture.ran_only
        for call in capture.all_calls():
            ran.update(call.no_grad_layers)
            for name, hidden in call.outputs.items():
                ran.add(name)
                outputs.setdefault(name, hidden)
        if union is not None:
            ran = union(list(capture.modules), ran)
        line = choice.settle(self.model, ran)
        ran_stacks = {choice.stack_of[name] for name in ran if name in choice.stack_of}
        for name in choice.names:
            if name in ran or choice.stack_of.get(name) in ran_stacks:
                continue
            message = (f"decorr_layers: module {name!r} did not run during the forward pass, so it cannot be "
                       "penalised; choose a module that the model's forward uses")
            if name in choice.stack_of:
                around = choice.stack_of[name].rpartition(".")[0] or ROOT
                message += (" (a model that calls its blocks' forward directly, which forward hooks do not see, is "
                            f"penalised through a module around them, e.g. decorr_layers=[{around!r}])")
            raise DecorrError(message)
        self._set(choice.names)
        # widths: of each layer that ran, else of a block of the same stack that ran (LayerDrop skipped it)
        by_stack: dict[str, tuple[int, bool, torch.dtype]] = {}
        for name, hidden in outputs.items():
            width = self.width_of(name, hidden)
            if name in choice.stack_of:
                by_stack.setdefault(choice.stack_of[name], width)
            if name in self.names:
                self.widths[name] = width
        for name in self.names:
            if name not in self.widths and choice.stack_of.get(name) in by_stack:
                self.widths[name] = by_stack[choice.stack_of[name]]
        keep = set(self.names)
        capture.modules = {name: module for name, module in capture.modules.items() if name in keep}
        for call in capture.all_calls():
            call.outputs = {name: hidden for name, hidden in call.outputs.items() if name in keep}
            call.no_grad_layers &= keep
        capture.ran_without_grad &= keep
        capture.lenient = set()
        return line

    def complete(self, samples: list[DecorrSamples], device: torch.device, batch_size: int,
                 warn: Callable[[str, str], None]) -> list[DecorrSamples]:
        """``samples`` in layer order, each layer that did not run given zero valid rows of its known width."""
        for sample in samples:
            self.widths.setdefault(sample.layer, (sample.x.shape[-1], sample.pooled, sample.x.dtype))
        by_name = {sample.layer: sample for sample in samples}
        missing = [name for name in self.names if name not in by_name]
        if not missing:
            return samples
        warn("absent", ABSENT_WARNING.format(name=missing[0]))
        for name in missing:
            width, pooled, dtype = self.widths[name]
            decoder = self.decoder_side.get(name, False)
            peers = [s for s in samples if s.group == (width, decoder, pooled, dtype, torch.device(device))]
            rows = peers[0].x.shape[0] if peers else (batch_size if pooled else 2)
            by_name[name] = DecorrSamples(name, torch.zeros(rows, width, dtype=dtype, device=device),
                                          torch.zeros(rows, dtype=torch.bool, device=device), pooled, decoder,
                                          batch_size if pooled else None)
        return [by_name[name] for name in self.names]


def processes_union(accelerator: Any, device: torch.device) -> Callable[[list[str], set[str]], set[str]] | None:
    """``union(probe, ran)`` for `PenalisedLayers.settle()`: the probe modules that ran on any process (one
    all-reduce of a flag per module); ``None`` with one process."""
    if accelerator.num_processes == 1:
        return None

    def union(probe: list[str], ran: set[str]) -> set[str]:
        flags = torch.tensor([float(name in ran) for name in probe], device=device)
        flags = accelerator.reduce(flags, reduction="sum")
        return {name for name, flag in zip(probe, flags.tolist()) if flag > 0}

    return union
