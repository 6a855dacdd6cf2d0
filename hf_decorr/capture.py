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

A *block stack* is found without per-architecture tables: it is an ``nn.ModuleList`` of *blocks*
(modules that own parameters, are not containers such as another ``nn.ModuleList``, and are not
embedding tables), either all of one class or, in hybrid stacks (attention beside linear-attention
or Mamba layers), of several classes that each have sub-modules; not nested inside another stack;
and holding at least half as many parameters as the largest stack. That finds
``bert.encoder.layer``, ``transformer.h``, ``model.layers`` (hybrid ones included), ``vit.layers``
(ViT), both ``encoder.block`` and ``decoder.block`` of T5, and the stages of convolutional networks,
never the 50 xpath-embedding tables of MarkupLM. Where the model declares which module classes
produce its ``hidden_states`` (transformers 5.x, `hf_decorr._compat.hidden_state_classes()`),
stacks that hold none of them are left out (the convolutional feature encoder of wav2vec2).

Towers that do not run. A multimodal model fine-tuned on text holds stacks (a vision or audio
tower) that the batch never runs. When ``decorr_layers`` uses block stacks and the model has more
than one candidate stack, the choice is *settled by the first forward pass*
([`LayerChoice`][hf_decorr.LayerChoice]): the blocks of every candidate stack are recorded once, the stacks none
of whose blocks ran are left out, and the size rule is applied to the stacks that ran.
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ._compat import hidden_state_classes

__all__ = [
    "BlockStack",
    "CapturedCall",
    "HiddenStateCapture",
    "LayerChoice",
    "candidate_stacks",
    "uses_stacks",
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


_CONTAINERS = (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)
_TABLES = (nn.Embedding, nn.EmbeddingBag)


def _is_table(module: nn.Module) -> bool:
    """An embedding table, or a module whose parameters all belong to embedding tables."""
    if isinstance(module, _TABLES):
        return True
    tables = [m for m in module.modules() if isinstance(m, _TABLES)]
    return bool(tables) and sum(_num_params(t) for t in tables) == _num_params(module)


def _is_block(module: nn.Module) -> bool:
    return not isinstance(module, _CONTAINERS) and _num_params(module) > 0 and not _is_table(module)


def _is_stack(module: nn.Module) -> bool:
    if not isinstance(module, nn.ModuleList) or len(module) == 0 or not all(_is_block(c) for c in module):
        return False
    if len({type(child) for child in module}) == 1:
        return True
    # a hybrid stack: blocks of several classes, each a composite module (not a bare Linear or Conv)
    return all(any(True for _ in child.children()) for child in module)


def candidate_stacks(model: nn.Module) -> list[tuple[BlockStack, int]]:
    """Every outermost stack of blocks with its parameter count, before the size rule (module docstring)."""
    candidates: list[tuple[str, nn.ModuleList, int]] = []
    for name, module in model.named_modules():
        if _is_stack(module):
            candidates.append((name, module, _num_params(module)))
    # keep the outermost stacks only (T5Block.layer lives inside encoder.block, for instance)
    outer = [c for c in candidates if not any(c[0].startswith(o[0] + ".") for o in candidates if o is not c)]
    # where the model declares which modules produce its hidden states, only stacks holding them carry them
    declared = hidden_state_classes(model)
    if declared:
        carrying = [c for c in outer if any(isinstance(m, declared) for m in c[1].modules())]
        outer = carrying or outer
    return [(BlockStack(name, tuple(f"{name}.{i}" if name else str(i) for i in range(len(module)))), size)
            for name, module, size in outer]


def find_block_stacks(model: nn.Module, ran: Collection[str] | None = None) -> list[BlockStack]:
    """The model's stacks of repeated blocks (see the module docstring for the rule).

    ``ran``: the names of the stacks that ran in a forward pass; the others are left out before the
    size rule is applied ([`LayerChoice`][hf_decorr.LayerChoice]).
    """
    outer = candidate_stacks(model)
    if ran is not None:
        outer = [(stack, size) for stack, size in outer if stack.name in ran]
    if not outer:
        return []
    largest = max(size for _, size in outer)
    return [stack for stack, size in outer if size * 2 >= largest]


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
    """``{dotted name: module}`` of ``model``'s sub-modules, plus `ROOT` (``"."``) for the model itself."""
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


def resolve_layers(model: nn.Module, specs: Iterable[str],
                   stacks: Sequence[BlockStack] | None = None) -> list[str]:
    """Turn ``decorr_layers`` specs into module names of ``model`` (ordered, without repeats).

    ``stacks``: the block stacks that ``last``, ``all`` and indices refer to (default:
    [`find_block_stacks()`][hf_decorr.find_block_stacks]). Raises ``ValueError`` naming ``decorr_layers`` and listing
    what
    exists when a spec matches nothing or an index is out of range.
    """
    stacks = find_block_stacks(model) if stacks is None else list(stacks)
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


def uses_stacks(specs: Iterable[str]) -> bool:
    """Whether any ``decorr_layers`` spec refers to block stacks (``last``, ``all``, ``-1``, ``encoder:0``)."""
    return any(spec in ("last", "all") or _INDEX.match(spec) or _QUALIFIED_INDEX.match(spec)
               for spec in (str(raw).strip() for raw in specs))


@dataclass
class LayerChoice:
    """``decorr_layers`` resolved on a model; settled by the first forward pass when a tower may not run.

    When the specs use block stacks and the model has several candidate stacks (a multimodal model:
    a vision or audio tower beside the language model), which of them carry the batch's hidden states
    is only known once the model has run: until then the choice is *pending* and `names` holds
    the blocks of every candidate stack. The first forward pass records
    [`probe_names()`][hf_decorr.LayerChoice.probe_names];
    [`settle()`][hf_decorr.LayerChoice.settle] then keeps the stacks that ran (the size rule applied among them).

    Attributes:
        specs: the ``decorr_layers`` specs.
        names: the module names to penalise (while pending: those of every candidate stack).
        stack_of: block name → the name of its stack, for every block of every candidate stack.
        pending: the first forward pass has not settled the choice yet.
    """

    specs: tuple[str, ...]
    names: list[str]
    stack_of: dict[str, str]
    pending: bool = False

    @classmethod
    def resolve(cls, model: nn.Module, specs: Iterable[str]) -> LayerChoice:
        """Resolve ``specs`` on ``model``; pending when they use stacks and there are several candidates."""
        specs = tuple(str(spec).strip() for spec in specs)
        candidates = [stack for stack, _ in candidate_stacks(model)]
        stack_of = {block: stack.name for stack in candidates for block in stack.blocks}
        pending = uses_stacks(specs) and len(candidates) > 1
        names = resolve_layers(model, specs, stacks=candidates if pending else None)
        return cls(specs, names, stack_of, pending)

    def probe_names(self) -> list[str]:
        """What the first forward pass records: the layers, and every block of every candidate stack."""
        return list(dict.fromkeys([*self.names, *self.stack_of]))

    def settle(self, model: nn.Module, ran: Collection[str]) -> str | None:
        """Keep the stacks of which a block is in ``ran`` (the modules that ran in the first forward pass).

        Returns one line naming what was chosen and what was left out (``None`` when nothing was pending);
        ``ValueError`` naming ``decorr_layers`` when none of the stacks ran.
        """
        if not self.pending:
            return None
        ran_stacks = {self.stack_of[name] for name in ran if name in self.stack_of}
        every = list(dict.fromkeys(self.stack_of.values()))
        stacks = find_block_stacks(model, ran=ran_stacks)
        if not stacks:
            raise ValueError(
                f"decorr_layers={list(self.specs)}: none of the block stacks ({', '.join(every)}) ran in the first "
                "forward pass; name the modules to penalise (a module-name glob such as 'model.layers.*')"
            )
        self.names = resolve_layers(model, self.specs, stacks=stacks)
        self.pending = False
        chosen = [stack.name for stack in stacks]
        left = [name for name in every if name not in chosen]
        line = (f"decorr_layers={list(self.specs)}: penalising {', '.join(self.names)} "
                f"(block stacks {', '.join(chosen)})")
        if left:
            line += f"; left out: {', '.join(left)} (did not run on the first batch, or under half the largest size)"
        return line


def decoder_side(model: nn.Module, names: Iterable[str]) -> dict[str, bool]:
    """Per module name, whether it is on the decoder side of an encoder-decoder model (a dotted component that
    contains ``decoder``: ``decoder.block.0``, SeamlessM4T's ``text_decoder.layers.0``)."""
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    return {name: encoder_decoder and any("decoder" in part for part in name.split(".")) for name in names}


def first_tensor(output: object, min_dim: int = 0) -> torch.Tensor | None:
    """The hidden-state tensor in a module's output.

    A tensor is returned as is; a ``ModelOutput`` (or any mapping) gives its
    ``last_hidden_state`` or else its first tensor value; a tuple or list gives its first
    tensor element (looking into nested tuples, as in ``((hidden,), height, width)``). ``min_dim``
    skips tensors of fewer dimensions (the model's own output,
    `ROOT`, is read with 2: its 0-d ``loss`` comes first). ``None`` when there is none.
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
        if isinstance(value, (tuple, list)):  # a nested tuple: ((hidden,), height, width) in PVT-v2
            nested = first_tensor(value, min_dim)
            if nested is not None:
                return nested
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
        inputs: the call's inputs as `call_inputs()` finds them (``input_ids``,
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
    [`CapturedCall`][hf_decorr.CapturedCall] for every call of the model and keeps that call's mask-bearing inputs,
    so each captured output can later be pooled with *its own* mask: sentence-transformers runs
    the model once per text column (and once per mini-batch with cached losses), each call
    padded to its own length. Outputs produced outside any call of the root (a module run
    directly, or a root whose ``forward`` is called without ``__call__``, as PEFT does) go to one
    extra call whose ``inputs`` is ``None`` (the trainer then uses the batch).

    Modes: ``"off"`` (hooks return at once), ``"train"`` and ``"eval"``. In ``"train"`` every call is
    kept with its autograd state; [`sample_calls()`][hf_decorr.HiddenStateCapture.sample_calls] then prefers the
    grad-enabled calls (the
    no-grad pass of a cached loss or a reference model is then left out). In ``"eval"`` outputs
    are detached. `ran_without_grad` names the modules that ran without autograd in a
    ``"train"`` recording.

    ``output_keys`` maps a module name to the key of the tensor to take when the module returns
    a mapping (sentence-transformers modules return the features dict: ``"token_embeddings"``,
    ``"sentence_embedding"``); other outputs go through `first_tensor()`.

    Lifecycle: the hooks exist only between [`attach()`][hf_decorr.HiddenStateCapture.attach] and
        [`detach()`][hf_decorr.HiddenStateCapture.detach]; the trainer
    uses [`recording()`][hf_decorr.HiddenStateCapture.recording], which attaches them for one pass and always removes
    them, so the
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
        #: modules recorded only to know whether they ran (a first pass's probe): an output without a tensor
        #: is then noted in `ran_only` instead of raising
        self.lenient: set[str] = set()
        self.ran_only: set[str] = set()
        self.calls: list[CapturedCall] = []
        self._orphans: dict[bool, CapturedCall] = {}  # outputs outside any call of the root, by autograd state
        self._depth = 0
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._warned_repeat = False

    def attach(self) -> None:
        """Register the hooks (idempotent); they record only while `mode` is not ``"off"``."""
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
        [`clear()`][hf_decorr.HiddenStateCapture.clear]); the hooks are removed on exit, also when the body raises.
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
        self.ran_only.clear()
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
        `first_tensor()`); ``TypeError`` naming the module when there is none."""
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
            if name in self.lenient:
                tensor = first_tensor(output)
                if tensor is None:
                    self.ran_only.add(name)
                    return
            else:
                tensor = self.tensor_of(name, module, output)
            if self.mode == "train" and not grad:
                self.ran_without_grad.add(name)
            if self._depth > 0 and self.calls:
                call = self.calls[-1]
            else:
                key = grad and self.mode == "train"
                if key not in self._orphans:
                    self._orphans[key] = CapturedCall(None, key)
                call = self._orphans[key]
            if self.mode == "train" and call.grad and not grad:
                # inside a grad-enabled call but without autograd: a reentrant checkpointing region
                call.no_grad_layers.add(name)
                call.outputs.setdefault(name, tensor.detach())
                return
            if self.mode == "eval" and call.inputs is None:
                call.outputs[name] = tensor.detach()  # the last output wins, as in a single pass
                return
            if name in call.no_grad_layers and grad and self.mode == "train":
                # ran without autograd first (a no-grad refinement loop), now with it: this output trains
                call.no_grad_layers.discard(name)
                call.outputs[name] = tensor
                return
            if name in call.outputs:
                if not self._warned_repeat:
                    self._warned_repeat = True
                    warnings.warn(
                        f"decorr_layers: module {name!r} ran more than once in one forward call of the model; the "
                        "penalty uses its first output of that call (the first with autograd in training)",
                        stacklevel=2,
                    )
                return
            call.outputs[name] = tensor if (grad and self.mode == "train") else tensor.detach()

        return hook
