"""Measure a model's layers the way the guide and the ``hf-decorr`` commands do: the public analysis API.

* [`LayerSamples`][hf_decorr.analysis.LayerSamples] — each batch's valid samples ``(N, p)`` of chosen layers,
  laid out, masked and pooled exactly as the trainer's default ``decorr_samples`` (feature maps, padding, towers
  that do not run);
* [`layer_statistics`][hf_decorr.analysis.layer_statistics] — float64 statistics ``(n, Σh, Σhhᵀ)`` of those
  samples streamed over a data set, one [`CovarianceAccumulator`][hf_decorr.CovarianceAccumulator] per layer
  (``decorrelation_metrics(acc.covariance())`` gives the paper's metrics);
* [`PairedStatistics`][hf_decorr.analysis.PairedStatistics] — linear CKA between two layers on the same samples;
* [`replace_units`][hf_decorr.analysis.replace_units], [`keep_units`][hf_decorr.analysis.keep_units],
  [`quantized_outputs`][hf_decorr.analysis.quantized_outputs] — a layer's output edited in a forward hook (unit
  ablation to the mean, fake quantization to int8 / int4);
* [`classifier_accuracy`][hf_decorr.analysis.classifier_accuracy] — a sequence classifier's accuracy on batches;
* [`paired_differences`][hf_decorr.analysis.paired_differences], [`sign_test`][hf_decorr.analysis.sign_test] —
  what the penalty study reports of paired runs (mean, std, 95% t interval, sign counts and test).

``hf-decorr inspect / compare / ablate / quantize`` and ``recipes/penalty_study.py`` are built on these.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .capture import HiddenStateCapture, LayerChoice, first_tensor, modules_by_name
from .layouts import layout_for
from .metrics import CovarianceAccumulator, mean_std
from .pooling import POOLINGS
from .quantization import fake_quantize
from .samples import assemble_samples, call_samples, default_samples

__all__ = [
    "LayerSamples",
    "layer_statistics",
    "PairedStatistics",
    "edit_hidden",
    "replace_units",
    "keep_units",
    "quantized_outputs",
    "classifier_accuracy",
    "sign_test",
    "paired_differences",
]

#: two-sided 97.5% quantiles of Student's t by degrees of freedom (1.96 beyond the table)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
        11: 2.201, 12: 2.179, 13: 2.160, 14: 2.145, 15: 2.131, 16: 2.120, 17: 2.110, 18: 2.101, 19: 2.093,
        20: 2.086}


class LayerSamples:
    """Forward hooks on named modules of a model, giving each batch's valid samples per layer.

    Use as a context manager. ``samples(inputs)`` runs the model on ``inputs`` (a mapping of tensors, e.g. a
    tokenizer's output) without autograd and returns ``({layer: (n_valid, p)}, the model's output)``: each
    forward call's outputs laid out, masked with the call's own ``attention_mask`` and pooled per ``pooling``
    (``"tokens"``, ``"mean"``, ``"first"``, ``"last"``) as the trainer's default ``decorr_samples`` does, the invalid
    rows removed. ``names`` may be a [`LayerChoice`][hf_decorr.LayerChoice]: a pending one (a tower that the batch
    may not run) is settled by the first batch as the trainer settles it, and ``chosen`` holds the line that says
    what was chosen.

    Raises ``ValueError`` naming ``decorr_layers`` / ``decorr_pooling`` when a layer did not run or its output does
    not fit the batch, and ``TypeError`` when the model does not accept ``inputs``.
    """

    #: the line that says which layers a pending choice settled on (``None`` until then, or without a choice)
    chosen: str | None

    def __init__(self, model: nn.Module, names: Sequence[str] | LayerChoice, pooling: str = "tokens") -> None:
        if pooling not in POOLINGS:
            raise ValueError(f"decorr_pooling={pooling!r} is not valid; choose one of {list(POOLINGS)}")
        modules = modules_by_name(model)
        self.model = model
        self.choice = names if isinstance(names, LayerChoice) else None
        self.names = list(names.names if isinstance(names, LayerChoice) else names)
        self.pooling = pooling
        self.chosen = None
        probe = self.choice.probe_names() if self.choice is not None and self.choice.pending else self.names
        unknown = [name for name in probe if name not in modules]
        if unknown:
            raise ValueError(f"decorr_layers: {unknown[0]!r} is not a module of the model")
        self.capture = HiddenStateCapture({name: modules[name] for name in probe}, root=model)
        self.capture.lenient = set(probe) - set(self.names)

    def __enter__(self) -> LayerSamples:
        return self

    def __exit__(self, *exc: object) -> None:
        self.capture.detach()

    def _pool(self, name: str, hidden: torch.Tensor, inputs: Mapping[str, Any]):
        return default_samples(name, hidden, inputs, pooling=self.pooling, mask_source="attention_mask",
                               layout=layout_for(self.model, name))

    def _settle(self, calls) -> None:
        if self.choice is None or not self.choice.pending:
            return
        ran = set(self.capture.ran_only) | {name for call in calls for name in (*call.outputs, *call.no_grad_layers)}
        self.chosen = self.choice.settle(self.model, ran)
        self.names = list(self.choice.names)
        self.capture.modules = {name: m for name, m in self.capture.modules.items() if name in self.names}
        self.capture.lenient = set()

    @torch.no_grad()
    def samples(self, inputs: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], Any]:
        """``({layer: valid samples (n, p)}, model output)`` of one batch (see the class docstring)."""
        with self.capture.recording("eval"):
            output = self.model(**inputs)
        try:
            calls = self.capture.sample_calls()
            self._settle(calls)
            missing = [name for name in self.names if not any(name in call.outputs for call in calls)]
            if missing:
                raise ValueError(f"decorr_layers: module {missing[0]!r} did not run in the model's forward pass")
            parts = call_samples(calls, inputs, self.names, self._pool, pooling=self.pooling, strict=True)
        finally:
            self.capture.clear()
        out = {}
        for sample in assemble_samples(parts, decoder_side={}, pooled_rows_bound=None):
            valid = sample.mask
            out[sample.layer] = sample.x if valid is None else sample.x.index_select(0, valid.nonzero().squeeze(-1))
        return out, output


def layer_statistics(model: nn.Module, layers: Sequence[str] | LayerChoice, batches: Iterable[Mapping[str, Any]],
                     pooling: str = "tokens") -> dict[str, CovarianceAccumulator]:
    """Float64 ``(n, Σh, Σhhᵀ)`` of each layer's valid samples over ``batches`` (mappings of input tensors on the
    model's device), one [`CovarianceAccumulator`][hf_decorr.CovarianceAccumulator] per layer, in layer order;
    ``acc.covariance()`` is the layer's covariance ``C (p, p)`` over the whole data set."""
    stats: dict[str, CovarianceAccumulator] = {}
    with LayerSamples(model, layers, pooling) as capture:
        for inputs in batches:
            samples, _ = capture.samples(inputs)
            for name in capture.names:
                stats.setdefault(name, CovarianceAccumulator())
            for name, x in samples.items():
                stats[name].update(x)
    return stats


class PairedStatistics:
    """Float64 statistics of two layers seen on the same samples, for linear CKA.

    Keeps ``n``, ``Σx (p)``, ``Σy (q)``, ``Σxxᵀ (p, p)``, ``Σyyᵀ (q, q)`` (as two
    [`CovarianceAccumulator`][hf_decorr.CovarianceAccumulator]) and ``Σyxᵀ (q, p)``.
    """

    def __init__(self) -> None:
        self.x = CovarianceAccumulator()
        self.y = CovarianceAccumulator()
        self.cross: torch.Tensor | None = None

    def update(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add paired samples ``x (N, p)`` and ``y (N, q)`` (row ``i`` of both is the same input)."""
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"paired samples need the same number of rows, got {x.shape[0]} and {y.shape[0]}")
        x, y = x.detach().double(), y.detach().to(device=x.device, dtype=torch.float64)
        self.x.update(x)
        self.y.update(y)
        cross = y.T @ x
        self.cross = cross if self.cross is None else self.cross + cross

    def linear_cka(self) -> float:
        """``‖Y_cᵀX_c‖_F² / (‖X_cᵀX_c‖_F ‖Y_cᵀY_c‖_F)`` from the sums; NaN if a layer is constant."""
        if self.cross is None:
            raise ValueError("no samples were accumulated")
        (n, sx, xx), (_, sy, yy) = self.x.statistics(), self.y.statistics()
        sxx = xx - torch.outer(sx, sx) / n
        syy = yy - torch.outer(sy, sy) / n
        syx = self.cross - torch.outer(sy, sx) / n
        denominator = float(torch.linalg.matrix_norm(sxx) * torch.linalg.matrix_norm(syy))
        if not denominator > 0:
            return math.nan
        return float(torch.linalg.matrix_norm(syx) ** 2) / denominator


def edit_hidden(output: Any, edit: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``output`` with its hidden-state tensor ``h`` replaced by ``edit(h)`` (a forward hook's return value).

    Tensors, tuples / lists (the first tensor) and ``ModelOutput`` / mappings (``last_hidden_state`` or
    the first tensor) are handled.
    """
    hidden = first_tensor(output)
    if hidden is None:
        raise TypeError(f"the layer's output ({type(output).__name__}) holds no tensor")
    edited = edit(hidden)
    if isinstance(output, torch.Tensor):
        return edited
    if isinstance(output, (tuple, list)):
        items = list(output)
        index = next(i for i, item in enumerate(items) if item is hidden)
        items[index] = edited
        return type(output)(items) if isinstance(output, list) else tuple(items)
    key = next(k for k, v in output.items() if v is hidden)
    output[key] = edited
    return output


def replace_units(output: Any, keep: torch.Tensor, mean: torch.Tensor) -> Any:
    """``output`` with its hidden-state tensor ``h (..., p)`` changed to ``where(keep, h, mean)``: the units not
    kept (``keep``, a ``(p,)`` bool mask) set to their ``mean (p,)`` (see
    [`edit_hidden`][hf_decorr.analysis.edit_hidden])."""
    def edit(h: torch.Tensor) -> torch.Tensor:
        if keep.shape != (h.shape[-1],) or mean.shape != (h.shape[-1],):
            raise ValueError(f"replace_units: keep and mean must have the layer's {h.shape[-1]} units, shape "
                             f"({h.shape[-1]},); got {tuple(keep.shape)} and {tuple(mean.shape)}")
        return torch.where(keep.to(h.device), h, mean.to(device=h.device, dtype=h.dtype))

    return edit_hidden(output, edit)


@contextlib.contextmanager
def _hooks(pairs: Sequence[tuple[nn.Module, Callable[..., Any]]]) -> Iterator[None]:
    handles = [module.register_forward_hook(fn) for module, fn in pairs]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def keep_units(module: nn.Module, keep: torch.Tensor, mean: torch.Tensor) -> Iterator[None]:
    """Inside the ``with``, ``module``'s output keeps the units in ``keep`` and has the others at their ``mean``
    (unit ablation, as ``hf-decorr ablate``); the hook is removed on exit."""
    with _hooks([(module, lambda m, i, o: replace_units(o, keep, mean))]):
        yield


@contextlib.contextmanager
def quantized_outputs(modules: Sequence[nn.Module], bits: int = 8, granularity: str = "tensor") -> Iterator[None]:
    """Inside the ``with``, each module's output is fake-quantized to ``bits`` (symmetric int-B, per ``"tensor"``
    or per ``"token"``: [`fake_quantize`][hf_decorr.fake_quantize]), as ``hf-decorr quantize`` does."""
    fake_quantize(torch.zeros(1, 2), bits, granularity)  # bad bits / granularity fail here, naming the choices
    with _hooks([(m, lambda mod, i, o: edit_hidden(o, lambda h: fake_quantize(h, bits, granularity)))
                 for m in modules]):
        yield


@torch.no_grad()
def classifier_accuracy(model: nn.Module, batches: Iterable[tuple[Any, Mapping[str, Any]]],
                        labels: torch.Tensor) -> float:
    """A sequence classifier's accuracy: ``batches`` are ``(rows, inputs)`` pairs (``rows`` indexes ``labels``, the
    class ids of every example: a slice or index tensor), ``inputs`` the model's inputs for those rows."""
    correct = 0
    for rows, inputs in batches:
        predictions = model(**inputs).logits.argmax(dim=-1).cpu()
        correct += int((predictions == labels[rows]).sum())
    return correct / len(labels)


def sign_test(wins: int, losses: int) -> float:
    """Two-sided sign test: the chance of a split at least this lopsided when either side has chance 1/2
    (ties are left out before calling)."""
    n, k = wins + losses, max(wins, losses)
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k, n + 1)) / 2 ** n) if n else 1.0


def paired_differences(values: Sequence[float]) -> dict[str, Any]:
    """What the penalty study reports of paired differences (e.g. penalised − baseline accuracy per seed):
    ``{"mean", "std", "ci95": [low, high] (Student's t; None for one value), "n", "wins", "losses", "sign_p"}``."""
    mean, std, n = mean_std(values)
    half = T975.get(n - 1, 1.96) * std / math.sqrt(n) if n > 1 else None
    wins, losses = sum(v > 0 for v in values), sum(v < 0 for v in values)
    ci95 = [mean - half, mean + half] if half is not None else None
    return {"mean": mean, "std": std, "ci95": ci95, "n": n, "wins": wins, "losses": losses,
            "sign_p": sign_test(wins, losses)}
