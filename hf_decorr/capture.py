"""Find the layers to penalise and capture their outputs with forward hooks.

Layer specs (``decorr_layers``), resolved against the *unwrapped* model (no DDP, compile or
PEFT wrapper, so names look like ``bert.encoder.layer.5``):

* ``last``: the last block of each block stack; ``all``: every block of every stack.
* ``-1``, ``0``, …: Python-style index into each block stack.
* ``encoder:-1``, ``decoder:0``: an index into the stack(s) whose name contains that
  dotted component (for encoder-decoder models such as T5).
* anything else is a glob over dotted module names, where ``*`` matches within one name
  component and ``**`` across components: ``model.layers.*.mlp``, ``encoder.block.*``,
  ``**.mlp``, or an exact name such as ``code``.

A *block stack* is found without per-architecture tables: it is an ``nn.ModuleList`` whose
children all have the same class and own parameters, not nested inside another such list,
and holding at least half as many parameters as the largest one. That finds
``bert.encoder.layer``, ``transformer.h``, ``model.layers``, ``vit.layers`` (ViT) and both
``encoder.block`` and ``decoder.block`` of T5.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["BlockStack", "find_block_stacks", "resolve_layers", "first_tensor", "HiddenStateCapture"]

_INDEX = re.compile(r"^-?\d+$")
_QUALIFIED_INDEX = re.compile(r"^(?P<stack>[A-Za-z_][\w.]*):(?P<index>-?\d+)$")


@dataclass(frozen=True)
class BlockStack:
    """A stack of repeated blocks: its dotted name and its blocks' names in order."""

    name: str
    blocks: tuple[str, ...]


def _num_params(module: nn.Module) -> int:
    # DeepSpeed ZeRO-3 partitions parameters (numel() == 0 locally); ds_numel is the full size
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters())


def find_block_stacks(model: nn.Module) -> list[BlockStack]:
    """The model's stacks of repeated blocks (see the module docstring for the rule)."""
    candidates: list[tuple[str, nn.ModuleList, int]] = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        kinds = {type(child) for child in module}
        if len(kinds) != 1:
            continue
        size = _num_params(module)
        if size == 0:
            continue
        candidates.append((name, module, size))
    # keep the outermost stacks only (T5Block.layer lives inside encoder.block, for instance)
    outer = [c for c in candidates if not any(c[0].startswith(o[0] + ".") for o in candidates if o is not c)]
    if not outer:
        return []
    largest = max(size for _, _, size in outer)
    return [
        BlockStack(name, tuple(f"{name}.{i}" if name else str(i) for i in range(len(module))))
        for name, module, size in outer
        if size * 2 >= largest
    ]


def _glob_regex(pattern: str) -> re.Pattern:
    """``*`` matches inside one dotted component, ``**`` across components, ``?`` one character."""
    out = []
    i = 0
    while i < len(pattern):
        if pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append(r"[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append(r"[^.]")
            i += 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out) + r"\Z")


def _describe(model: nn.Module, stacks: Sequence[BlockStack]) -> str:
    lines = []
    if stacks:
        lines.append("block stacks: " + ", ".join(f"{s.name} ({len(s.blocks)} blocks)" for s in stacks))
    else:
        lines.append("no stack of repeated blocks was found in this model")
    top = [name for name, _ in model.named_modules() if name and name.count(".") <= 2][:40]
    if top:
        lines.append("modules include: " + ", ".join(top))
    else:
        lines.append(
            f"the model ({type(model).__name__}) has no sub-modules, so there is no layer to penalise: build it from "
            "sub-modules (e.g. self.encoder = nn.Linear(...)) and name one in decorr_layers"
        )
    return "; ".join(lines)


def _stack_matches(stack: BlockStack, key: str) -> bool:
    return f".{key}." in f".{stack.name}."


def _index(stack: BlockStack, index: int, spec: str, model: nn.Module, stacks: Sequence[BlockStack]) -> str:
    n = len(stack.blocks)
    if not -n <= index < n:
        raise ValueError(
            f"decorr_layers entry {spec!r}: index {index} is out of range for {stack.name!r}, which has {n} blocks "
            f"(valid: {-n} … {n - 1}); {_describe(model, stacks)}"
        )
    return stack.blocks[index]


def resolve_layers(model: nn.Module, specs: Iterable[str]) -> list[str]:
    """Turn ``decorr_layers`` specs into module names of ``model`` (ordered, without repeats).

    Raises ``ValueError`` naming ``decorr_layers`` and listing what exists when a spec
    matches nothing or an index is out of range.
    """
    stacks = find_block_stacks(model)
    names = dict(model.named_modules())
    resolved: list[str] = []

    def need_stacks(spec: str) -> Sequence[BlockStack]:
        if not stacks:
            raise ValueError(
                f"decorr_layers entry {spec!r} needs a stack of transformer blocks, but none was found; give module "
                f"names or globs instead. {_describe(model, stacks)}"
            )
        return stacks

    for raw in specs:
        spec = str(raw).strip()
        if spec == "all":
            resolved += [block for stack in need_stacks(spec) for block in stack.blocks]
        elif spec == "last":
            resolved += [stack.blocks[-1] for stack in need_stacks(spec)]
        elif _INDEX.match(spec) and (stacks or spec not in names):
            resolved += [_index(stack, int(spec), spec, model, stacks) for stack in need_stacks(spec)]
        elif (match := _QUALIFIED_INDEX.match(spec)) is not None:
            chosen = [s for s in need_stacks(spec) if _stack_matches(s, match["stack"])]
            if not chosen:
                raise ValueError(
                    f"decorr_layers entry {spec!r}: no block stack is named like {match['stack']!r}; "
                    f"{_describe(model, stacks)}"
                )
            resolved += [_index(stack, int(match["index"]), spec, model, stacks) for stack in chosen]
        else:
            regex = _glob_regex(spec)
            found = [name for name in names if name and regex.match(name)]
            if not found:
                raise ValueError(
                    f"decorr_layers entry {spec!r} matches no module (valid forms: 'last', 'all', an index such as "
                    f"'-1', 'encoder:-1', or a module-name glob); {_describe(model, stacks)}"
                )
            resolved += found
    unique = list(dict.fromkeys(resolved))
    # a module and one of its descendants would both be penalised: allowed, but usually a mistake
    return unique


def first_tensor(output: object) -> torch.Tensor | None:
    """The hidden-state tensor in a module's output.

    A tensor is returned as is; a ``ModelOutput`` (or any mapping) gives its
    ``last_hidden_state`` or else its first tensor value; a tuple or list gives its first
    tensor element. ``None`` when the output holds no tensor.
    """
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, Mapping):
        value = output.get("last_hidden_state")
        if isinstance(value, torch.Tensor):
            return value
        values: Iterable[object] = output.values()
    elif isinstance(output, (tuple, list)):
        values = output
    else:
        return None
    for value in values:
        if isinstance(value, torch.Tensor):
            return value
    return None


class HiddenStateCapture:
    """Forward hooks that record the outputs of named modules.

    Modes: ``"off"`` (hooks return at once), ``"train"`` (record outputs produced with
    autograd enabled; the first call of each module per step wins, so the replays of gradient
    checkpointing and no-grad reference passes are ignored) and ``"eval"`` (record the last
    call's output, detached). The recorded tensors are in :attr:`outputs`; :meth:`clear`
    empties it.

    Lifecycle: the hooks exist only between :meth:`attach` and :meth:`detach`; the trainer
    uses :meth:`recording`, which attaches them for one forward pass and always removes them,
    so the model holds no hook between steps (it stays picklable and deep-copyable, and
    several trainers on one model never stack hooks).
    """

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = dict(modules)
        self.mode = "off"
        self.outputs: dict[str, torch.Tensor] = {}
        self.ran_without_grad: set[str] = set()
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._warned_repeat = False

    def attach(self) -> None:
        if self._handles:
            return
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._make_hook(name)))

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self.outputs.clear()

    @property
    def attached(self) -> bool:
        """Whether the hooks are currently registered on the modules."""
        return bool(self._handles)

    @contextlib.contextmanager
    def recording(self, mode: str) -> Iterator[HiddenStateCapture]:
        """Attach the hooks in ``mode`` (``"train"`` or ``"eval"``) for the body of the ``with``.

        The outputs recorded so far are cleared on entry and kept after exit (until
        :meth:`clear`); the hooks are removed on exit, also when the body raises.
        """
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        if self._handles:
            raise RuntimeError("HiddenStateCapture.recording() is not re-entrant: the hooks are already attached")
        self.clear()
        self.attach()
        self.mode = mode
        try:
            yield self
        finally:
            self.mode = "off"
            for handle in self._handles:
                handle.remove()
            self._handles.clear()

    def clear(self) -> None:
        self.outputs.clear()
        self.ran_without_grad.clear()

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if self.mode == "off":
                return
            if self.mode == "train" and not torch.is_grad_enabled():
                self.ran_without_grad.add(name)
                return
            tensor = first_tensor(output)
            if tensor is None:
                raise TypeError(
                    f"decorr_layers: module {name!r} ({type(module).__name__}) returned {type(output).__name__}, "
                    "which holds no tensor; choose a module whose output is a hidden-state tensor"
                )
            if self.mode == "eval":
                self.outputs[name] = tensor.detach()
            elif name not in self.outputs:
                self.outputs[name] = tensor
            elif not self._warned_repeat:
                self._warned_repeat = True
                warnings.warn(
                    f"decorr_layers: module {name!r} ran more than once in one training forward; the penalty uses "
                    "its first output",
                    stacklevel=2,
                )

        return hook
