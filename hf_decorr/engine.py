"""The penalty engine: the one place that decides how each layer's penalty is computed.

Given the samples of every penalised layer ([`DecorrSamples`][hf_decorr.DecorrSamples]) it returns
the per-layer penalties ``(L,)`` in layer order, choosing for each layer:

* **token samples of a covariance penalty**: one layer at a time through the low-memory kernels
  of `hf_decorr.gram` (the backward keeps the layer output itself plus O(p²) state): the
  penalty's own fused ``kernel`` when it has one (``cov_l1``) and the covariance function is not
  overridden, else ``fn(lowmem_covariance(x))``; with ``decorr_sync="global"`` and several
  processes, the covariance of the samples of all processes
  (`global_covariance_penalties()`, bucketed all-reduces);
* **pooled samples** (few rows) and **penalties of the samples** (``l1``): stacked by group
  (same width, side and kind) into one batched call; with global sync through
  `global_penalty_with_count()`.

``decorr_max_samples`` draws its rows with a generator seeded by ``(seed, optimizer step,
micro-batch, layer)`` only, so a resumed run draws exactly what the uninterrupted run drew.

Nothing here imports the trainer: the trainer builds a `PenaltyEngine` from its settings
and its override points and calls `PenaltyEngine.penalties()` once per micro-batch.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .distributed import choose_strategy, global_covariance_penalties, global_penalty_with_count, world_size
from .errors import DecorrError
from .gram import lowmem_covariance
from .penalties import Penalty, decorrelation_penalty, get_penalty
from .samples import DecorrSamples

__all__ = ["EngineSettings", "PenaltyEngine", "resolve_penalty", "layer_weights", "subsample_rows", "draw_generator"]


@dataclass(frozen=True)
class EngineSettings:
    """The settings the engine reads (from [`DecorrConfig`][hf_decorr.DecorrConfig]).

    Attributes:
        sync: ``decorr_sync`` (``"global"`` or ``"local"``).
        chunk: ``decorr_chunk_size`` (``None``: automatic).
        precision: ``decorr_precision``.
        max_samples: ``decorr_max_samples`` (0: every valid token).
        seed: the training seed (``args.seed``), for the subsampling draws.
    """

    sync: str = "global"
    chunk: int | None = None
    precision: str = "fp32"
    max_samples: int = 0
    seed: int = 0


def resolve_penalty(fn: Penalty | Callable[[torch.Tensor], torch.Tensor] | None, configured: str,
                    overrider: str | None = None) -> Penalty:
    """The penalty a trainer uses: ``fn`` (a [`Penalty`][hf_decorr.Penalty], or a callable of the
    covariance, wrapped with divisor ``N − 1``) or else the registered penalty named ``configured``.

    ``overrider``: the name of a trainer class that overrides ``decorr_penalty`` (a function of the
    covariance); then the penalty must be one of the covariance.
    """
    if fn is None:
        penalty = get_penalty(configured)
    elif isinstance(fn, Penalty):
        penalty = fn
    elif callable(fn):
        name = getattr(fn, "__name__", type(fn).__name__)
        penalty = Penalty(f"custom:{name}", fn, of_covariance=True, correction=1,
                          description=f"custom penalty of the covariance ({name})")
    else:
        raise TypeError(
            f"decorr_penalty_fn must be a hf_decorr.Penalty or a callable of the covariance, got {type(fn).__name__}"
        )
    if overrider is not None and not penalty.of_covariance:
        raise ValueError(
            f"{overrider} overrides decorr_penalty (a function of the covariance), but the configured penalty "
            f"{penalty.name!r} is a function of the samples; set decorr_penalty to a covariance penalty such as "
            "'cov_l1' (its divisor is used for C)"
        )
    return penalty


def layer_weights(names: Sequence[str], weight_fn: Callable[[str, int], object], step: int) -> list[float]:
    """``[w_layer]`` at optimizer step ``step`` from ``weight_fn(layer, step)`` (the ``decorr_layer_weight``
    override point), each checked: a finite number ``≥ 0`` (Python, NumPy, or a 0-d floating tensor)."""
    weights = []
    for name in names:
        w = weight_fn(name, step)
        number = (isinstance(w, numbers.Real) and not isinstance(w, bool)) or (
            isinstance(w, torch.Tensor) and w.numel() == 1 and w.is_floating_point())
        value = float(w) if number else math.nan  # type: ignore[arg-type]  # a real number or a 0-d tensor
        if not value >= 0 or value == math.inf:
            raise ValueError(f"decorr_layer_weight({name!r}, {step}) must return a finite float >= 0 (a Python or "
                             f"NumPy number, or a 0-d tensor), got {w!r}")
        weights.append(value)
    return weights


def draw_generator(seed: int, step: int, micro: int, layer: int, device: torch.device) -> torch.Generator:
    """The generator of one layer's draws in one micro-batch: a function of its four arguments only."""
    key = (((seed * 1_000_003 + step) * 1_009 + micro) * 1_013 + layer) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(key)


def subsample_rows(x: torch.Tensor, mask: torch.Tensor | None, k: int, generator: torch.Generator):
    """``k`` random valid rows of ``x``: ``(index (k,) | None, validity (k,) | None)``, static shapes.

    Random keys, −1 for invalid rows, and ``topk``: no host sync. With fewer than ``k`` valid rows
    some invalid ones are drawn too and masked out; with at most ``k`` rows nothing is drawn.
    """
    if x.shape[0] <= k:
        return None, mask
    keys = torch.rand(x.shape[0], generator=generator, device=x.device)
    if mask is not None:
        keys = torch.where(mask, keys, keys.new_full((), -1.0))
    index = keys.topk(k, sorted=False).indices
    return index, None if mask is None else mask.index_select(0, index)


class PenaltyEngine:
    """Computes the per-layer penalties of one micro-batch.

    Args:
        penalty: the configured [`Penalty`][hf_decorr.Penalty].
        settings: `EngineSettings`.
        covariance_fn: an override of the covariance penalty (the trainer's ``decorr_penalty`` when a
            subclass overrides it), ``C (..., p, p) → (...)``; ``None`` uses ``penalty.fn`` and its kernel.
        source: how the user supplied the penalty, named in errors about what it returns.
        warn: ``warn(key, message)``, called once per key by the owner.
    """

    def __init__(self, penalty: Penalty, settings: EngineSettings,
                 covariance_fn: Callable[[torch.Tensor], torch.Tensor] | None = None, source: str = "",
                 warn: Callable[[str, str], None] | None = None) -> None:
        self.configured = penalty
        self.settings = settings
        self.source = source or f"the penalty {penalty.name!r}"
        self.warn = warn or (lambda key, message: None)
        if penalty.of_covariance:
            fn = self._checked(covariance_fn or penalty.fn)
            kernel = penalty.kernel if covariance_fn is None else None
            penalty = Penalty(penalty.name, fn, True, penalty.correction, penalty.description, kernel=kernel)
        else:
            penalty = Penalty(penalty.name, self._checked_samples_fn(penalty.fn), False, penalty.correction,
                              penalty.description, sums=penalty.sums)
        self.penalty = penalty

    @classmethod
    def from_config(cls, args, penalty_fn=None, covariance_override=None, owner: str = "trainer",
                    warn: Callable[[str, str], None] | None = None) -> PenaltyEngine:
        """The engine of a trainer: ``args`` a [`DecorrConfig`][hf_decorr.DecorrConfig] (``decorr_penalty``,
        ``decorr_sync``, ``decorr_chunk_size``, ``decorr_precision``, ``decorr_max_samples``, ``seed``),
        ``penalty_fn`` the ``decorr_penalty_fn`` argument, ``covariance_override`` the ``decorr_penalty``
        method of ``owner`` (a class name) when it overrides it."""
        penalty = resolve_penalty(penalty_fn, args.decorr_penalty,
                                  overrider=owner if covariance_override is not None else None)
        source = (f"{owner}.decorr_penalty" if covariance_override is not None else
                  "decorr_penalty_fn" if penalty_fn is not None else f"the registered penalty {penalty.name!r}")
        settings = EngineSettings(sync=args.decorr_sync, chunk=args.decorr_chunk_size or None,
                                  precision=args.decorr_precision, max_samples=args.decorr_max_samples,
                                  seed=getattr(args, "seed", 0))
        return cls(penalty, settings, covariance_fn=covariance_override, source=source, warn=warn)

    # ---- what the penalty returns ---------------------------------------------------------------

    def _check_value(self, value, shape: torch.Size, argument: str, depends: bool):
        lead = tuple(shape[:-2])
        expected = f"shape {lead} (one value per {argument}) for an input of shape {tuple(shape)}"
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{self.source} must return a tensor of {expected}; got {type(value).__name__}")
        if tuple(value.shape) != lead:
            raise ValueError(f"{self.source} must return {expected}; got {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{self.source} must return a floating-point tensor; got {value.dtype}")
        if depends and torch.is_grad_enabled() and not value.requires_grad:
            raise DecorrError(
                f"{self.source} returned a value that does not depend differentiably on the layer outputs (a "
                "constant, a detached or a rebuilt tensor), so decorr_weight > 0 would train nothing; return a "
                "differentiable function of its input"
            )
        return value

    def _checked(self, fn):
        def checked(cov: torch.Tensor) -> torch.Tensor:
            return self._check_value(fn(cov), cov.shape, "covariance (p, p)", cov.requires_grad)
        return checked

    def _checked_samples_fn(self, fn):
        def checked(h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
            return self._check_value(fn(h, mask), h.shape, "sample set (N, p)", h.requires_grad)
        return checked

    # ---- the per-layer penalties ----------------------------------------------------------------

    def _few(self, rows: int) -> None:
        if rows < 2:
            self.warn("few", f"decorr: a batch has {rows} sample(s); the penalty needs 2 and is 0 for it")

    def penalties(self, samples: Sequence[DecorrSamples], step: int = 0, micro: int = 0,
                  compact_cpu_tokens: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-layer penalties ``(L,)`` in layer order, and the number of layers with < 2 valid samples (0-d).

        ``step`` and ``micro`` (the optimizer step and the micro-batch within it) seed the
        ``decorr_max_samples`` draws. ``compact_cpu_tokens``: on the CPU, gather the valid token rows
        first (the same result with less work; it reads the mask on the host).
        """
        penalty, s = self.penalty, self.settings
        sync = world_size() > 1 and s.sync == "global"
        groups: dict[tuple, list[int]] = {}
        for i, sample in enumerate(samples):
            groups.setdefault(sample.group, []).append(i)
        values: list[torch.Tensor | None] = [None] * len(samples)
        few: list[torch.Tensor] = []
        token_global: list[tuple[int, tuple]] = []
        for members in groups.values():
            if penalty.of_covariance and not samples[members[0]].pooled:
                self._token_layers(samples, members, step, micro, sync, values, few, token_global,
                                   compact_cpu_tokens)
            else:
                self._stacked_layers(samples, members, sync, values, few)
        if token_global:
            results, counts = global_covariance_penalties(
                [item for _, item in token_global], penalty, chunk=s.chunk, precision=s.precision
            )
            for (i, _), value, count in zip(token_global, results, counts):
                values[i] = value
                few.append((count < 2).reshape(1).sum())
        done = [v for v in values if v is not None]  # every layer got its value above
        per_layer = torch.stack(done) if done else torch.zeros(0)
        few_count = torch.stack(few).sum() if few else torch.zeros((), device=per_layer.device)
        return per_layer, few_count

    def _token_layers(self, samples, members, step, micro, sync, values, few, token_global, compact) -> None:
        """Token samples of a covariance penalty: one layer at a time, never a copy of the activations."""
        penalty, s = self.penalty, self.settings
        xs = [samples[i].x for i in members]
        ms = [samples[i].mask for i in members]
        shared_index = None
        first = ms[0]
        if (not s.max_samples and compact and first is not None and first.device.type == "cpu"
                and all(m is not None and m.shape == first.shape and torch.equal(m, first) for m in ms)):
            shared_index = first.nonzero().squeeze(-1)  # CPU: the valid rows only, without copying them
        for i, x, m in zip(members, xs, ms):
            index, mask = (shared_index, None) if shared_index is not None else (None, m)
            if s.max_samples:
                index, mask = subsample_rows(x, m, s.max_samples, draw_generator(s.seed, step, micro, i, x.device))
            if mask is None:
                if not sync:
                    self._few(x.shape[0] if index is None else index.shape[0])
            elif not sync:
                few.append((mask.sum() < 2).reshape(1).sum())
            if sync:
                token_global.append((i, (x, mask, index)))
            elif penalty.kernel is not None:
                values[i] = penalty.kernel(x, mask, index=index, chunk=s.chunk, precision=s.precision)
            else:
                cov, _ = lowmem_covariance(x, mask, penalty.correction, index=index, chunk=s.chunk,
                                           precision=s.precision)
                values[i] = penalty.fn(cov)

    def _stacked_layers(self, samples, members, sync, values, few) -> None:
        """Pooled samples, or a penalty of the samples: the group's layers stacked into one batched call."""
        penalty = self.penalty
        xs = [samples[i].x for i in members]
        ms = [samples[i].mask for i in members]
        h = xs[0].unsqueeze(0) if len(xs) == 1 else torch.stack(xs)
        if all(m is None for m in ms):
            mask = None
            if not sync:
                self._few(h.shape[-2])
        else:
            mask = torch.stack([torch.ones(h.shape[-2], dtype=torch.bool, device=h.device) if m is None else m
                                for m in ms])
            if not sync:
                few.append((mask.sum(dim=-1) < 2).sum())
        if sync:
            # every process issues the same collectives in the same order: the groups are keyed and ordered
            # rank-independently and the strategy depends only on rank-independent shapes
            bound = samples[members[0]].rows_bound
            strategy = choose_strategy(h.shape[-1], bound, world_size())
            result, count = global_penalty_with_count(h, mask, penalty, strategy=strategy, rows_bound=bound)
            few.append((count < 2).sum())
        else:
            result = decorrelation_penalty(h, mask, penalty)
        for j, i in enumerate(members):
            values[i] = result[j]
