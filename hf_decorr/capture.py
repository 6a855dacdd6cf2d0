"""Find the layers to penalise and capture their outputs with forward hooks.

Layer specs (``decorr_layers``), resolved against the *unwrapped* model (no DDP, compile or
PEFT wrapper, so names look like ``bert.encoder.layer.5``):

* ``last``: the last block of each block stack; ``all``: every block of every stack.
* ``-1``, ``0``, …: Python-style index into each block stack.
* ``encoder:-1``, ``decoder:0``: an index into the stack(s) whose name contains that
  dotted component (for encoder-decoder models such as T5).
* ``.``: the model itself (its own output), for models without sub-modules to choose from.
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
from dataclasses import dataclass, field

import torch
from torch import nn

__all__ = [
    "BlockStack",
    "CapturedCall",
    "HiddenStateCapture",
    "call_inputs",
    "decoder_side",
    "find_block_stacks",
    "modules_by_name",
    "ROOT",
    "first_tensor",
    "resolve_layers",
]

#: the ``decorr_layers`` spec (and the layer name) of the model itself
ROOT = "."

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


def modules_by_name(model: nn.Module) -> dict[str, nn.Module]:
    """``{dotted name: module}`` of ``model``'s sub-modules, plus :data:`ROOT` (``"."``) for the model itself."""
    modules = {name: module for name, module in model.named_modules() if name}
    modules[ROOT] = model
    return modules


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
            f"the model ({type(model).__name__}) has no sub-modules, so there is no layer to penalise: penalise the "
            f"model's own output with decorr_layers=[{ROOT!r}], or build it from sub-modules (e.g. self.encoder = "
            "nn.Linear(...)) and name one in decorr_layers"
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
                f"names or globs instead; {_describe(model, stacks)}"
            )
        return stacks

    for raw in specs:
        spec = str(raw).strip()
        if spec == ROOT:
            resolved.append(ROOT)
        elif spec == "all":
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


def decoder_side(model: nn.Module, names: Iterable[str]) -> dict[str, bool]:
    """Per module name, whether it is on the decoder side of an encoder-decoder model (a ``decoder*`` component)."""
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    return {name: encoder_decoder and any(part.startswith("decoder") for part in name.split(".")) for name in names}


def first_tensor(output: object, min_dim: int = 0) -> torch.Tensor | None:
    """The hidden-state tensor in a module's output.

    A tensor is returned as is; a ``ModelOutput`` (or any mapping) gives its
    ``last_hidden_state`` or else its first tensor value; a tuple or list gives its first
    tensor element. ``min_dim`` skips tensors of fewer dimensions (the model's own output,
    :data:`ROOT`, is read with 2: its 0-d ``loss`` comes first). ``None`` when there is none.
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
        if isinstance(value, torch.Tensor) and value.dim() >= min_dim:
            return value
    return None


#: Keyword arguments with which a call continues an earlier computation (cached decoding inside
#: ``generate``, a decoder run on precomputed encoder states): such a call brings no new samples.
CONTINUATION_KEYS = ("past_key_values", "encoder_outputs")


def call_inputs(args: tuple, kwargs: Mapping[str, object]) -> Mapping[str, object]:
    """The mask-bearing inputs of one forward call: its keyword arguments, or else the mapping
    passed as its first positional argument (the ``features`` dict of sentence-transformers)."""
    if any(isinstance(value, torch.Tensor) for value in kwargs.values()):
        return dict(kwargs)
    if args and isinstance(args[0], Mapping):
        return args[0]
    return dict(kwargs)


@dataclass
class CapturedCall:
    """One forward call of the model (the *root* module) during a recorded pass.

    Attributes:
        inputs: the call's inputs as :func:`call_inputs` finds them (``input_ids``,
            ``attention_mask``, ...; for sentence-transformers the features dict of one text
            column or mini-batch); ``None`` for outputs produced outside any call of the root.
        grad: whether autograd was enabled when the call began.
        outputs: penalised module name → its output in this call (``(B, p)`` or ``(B, T, p)``);
            detached when the call ran without autograd or in ``"eval"`` mode.
        no_grad_layers: modules that ran without autograd inside a grad-enabled call (a reentrant
            gradient-checkpointing region); their outputs are kept detached.
    """

    inputs: Mapping[str, object] | None
    grad: bool
    outputs: dict[str, torch.Tensor] = field(default_factory=dict)
    no_grad_layers: set[str] = field(default_factory=set)

    @property
    def continues_earlier_call(self) -> bool:
        """Whether the call continues an earlier one (``past_key_values`` / ``encoder_outputs`` given)."""
        return self.inputs is not None and any(self.inputs.get(k) is not None for k in CONTINUATION_KEYS)


class HiddenStateCapture:
    """Forward hooks that record the outputs of named modules, per forward call of the model.

    With a ``root`` module (the unwrapped model), a forward pre-hook on the root opens a
    :class:`CapturedCall` for every call of the model and keeps that call's mask-bearing inputs,
    so each captured output can later be pooled with *its own* mask: sentence-transformers runs
    the model once per text column (and once per mini-batch with cached losses), each call
    padded to its own length. Outputs produced outside any call of the root (a module run
    directly, or a root whose ``forward`` is called without ``__call__``, as PEFT does) go to one
    extra call whose ``inputs`` is ``None`` (the trainer then uses the batch).

    Modes: ``"off"`` (hooks return at once), ``"train"`` and ``"eval"``. In ``"train"`` every call is
    kept with its autograd state; :meth:`sample_calls` then prefers the grad-enabled calls (the
    no-grad pass of a cached loss or a reference model is then left out). In ``"eval"`` outputs
    are detached. :attr:`ran_without_grad` names the modules that ran without autograd in a
    ``"train"`` recording.

    ``output_keys`` maps a module name to the key of the tensor to take when the module returns
    a mapping (sentence-transformers modules return the features dict: ``"token_embeddings"``,
    ``"sentence_embedding"``); other outputs go through :func:`first_tensor`.

    Lifecycle: the hooks exist only between :meth:`attach` and :meth:`detach`; the trainer
    uses :meth:`recording`, which attaches them for one pass and always removes them, so the
    model holds no hook between steps (it stays picklable and deep-copyable, and several
    trainers on one model never stack hooks).
    """

    def __init__(
        self,
        modules: Mapping[str, nn.Module],
        root: nn.Module | None = None,
        output_keys: Mapping[str, str] | None = None,
    ) -> None:
        self.modules = dict(modules)
        self.root = root
        self.output_keys = dict(output_keys or {})
        self.mode = "off"
        self.ran_without_grad: set[str] = set()
        self.calls: list[CapturedCall] = []
        self._orphans: dict[bool, CapturedCall] = {}  # outputs outside any call of the root, by autograd state
        self._depth = 0
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._warned_repeat = False

    def attach(self) -> None:
        """Register the hooks (idempotent); they record only while :attr:`mode` is not ``"off"``."""
        if self._handles:
            return
        self._depth = 0
        if self.root is not None:
            self._handles.append(self.root.register_forward_pre_hook(self._enter_call, with_kwargs=True))
            self._handles.append(self.root.register_forward_hook(self._exit_call, always_call=True))
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._make_hook(name)))

    def detach(self) -> None:
        """Remove the hooks and forget what was recorded."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._depth = 0
        self.clear()

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
            self._depth = 0

    def clear(self) -> None:
        """Forget the recorded calls (the hooks stay as they are)."""
        self.ran_without_grad.clear()
        self.calls.clear()
        self._orphans = {}

    def all_calls(self) -> list[CapturedCall]:
        """Every recorded call that captured something, in order (the outside-of-any-call one last)."""
        calls = [c for c in self.calls if c.outputs or c.no_grad_layers]
        return calls + [c for c in self._orphans.values() if c.outputs or c.no_grad_layers]

    def sample_calls(self) -> list[CapturedCall]:
        """The calls whose outputs are the samples of this pass.

        Calls that continue an earlier call (``past_key_values`` or ``encoder_outputs`` given, as
        in ``generate``) are left out. In ``"train"`` recordings, the grad-enabled calls when
        there is one (a cached loss's no-grad embedding pass is then ignored), else every call.
        Outputs from outside any call of the root are used only for modules that no call of the
        root captured.
        """
        calls = [c for c in self.calls if (c.outputs or c.no_grad_layers) and not c.continues_earlier_call]
        covered = {name for c in calls for name in (*c.outputs, *c.no_grad_layers)}
        for orphan in self._orphans.values():
            rest = {k: v for k, v in orphan.outputs.items() if k not in covered}
            if rest:
                calls.append(CapturedCall(None, orphan.grad, rest))
        if self._recorded_mode == "train":
            with_grad = [c for c in calls if c.grad]
            calls = with_grad or calls
        return calls

    _recorded_mode = "off"

    def _enter_call(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if self.mode == "off":
            return
        self._depth += 1
        if self._depth == 1:
            self._recorded_mode = self.mode
            self.calls.append(CapturedCall(call_inputs(args, kwargs), torch.is_grad_enabled()))

    def _exit_call(self, module: nn.Module, args: tuple, output: object) -> None:
        if self._depth > 0:
            self._depth -= 1

    def tensor_of(self, name: str, module: nn.Module, output: object) -> torch.Tensor:
        """The hidden-state tensor in the output of module ``name`` (its ``output_keys`` entry, else
        :func:`first_tensor`); ``TypeError`` naming the module when there is none."""
        key = self.output_keys.get(name)
        if key is not None and isinstance(output, Mapping):
            tensor = output.get(key)
        else:
            tensor = first_tensor(output, min_dim=2 if name == ROOT else 0)
        if not isinstance(tensor, torch.Tensor):
            what = f"no tensor under {key!r}" if key is not None else "no tensor"
            raise TypeError(
                f"decorr_layers: module {name!r} ({type(module).__name__}) returned {type(output).__name__}, "
                f"which holds {what}; choose a module whose output is a hidden-state tensor"
            )
        return tensor

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: object) -> None:
            if self.mode == "off":
                return
            self._recorded_mode = self.mode
            grad = torch.is_grad_enabled()
            tensor = self.tensor_of(name, module, output)
            if self.mode == "train" and not grad:
                self.ran_without_grad.add(name)
            if self._depth > 0 and self.calls:
                call = self.calls[-1]
            else:
                key = grad and self.mode == "train"
                call = self._orphans.get(key)
                if call is None:
                    call = self._orphans[key] = CapturedCall(None, key)
            if self.mode == "train" and call.grad and not grad:
                # inside a grad-enabled call but without autograd: a reentrant checkpointing region
                call.no_grad_layers.add(name)
                call.outputs.setdefault(name, tensor.detach())
                return
            if self.mode == "eval" and call.inputs is None:
                call.outputs[name] = tensor.detach()  # the last output wins, as in a single pass
                return
            if name in call.outputs:
                if not self._warned_repeat:
                    self._warned_repeat = True
                    warnings.warn(
                        f"decorr_layers: module {name!r} ran more than once in one forward call of the model; the "
                        "penalty uses its first output of that call",
                        stacklevel=2,
                    )
                return
            call.outputs[name] = tensor if (grad and self.mode == "train") else tensor.detach()

        return hook
