"""``DecorrTrainerMixin``: adds ``λ_t · Σ_layers L_Σ`` to any ``Trainer``'s training loss.

Per training micro-batch the loss returned to ``training_step`` is

    task_loss + (λ_t / s) · Σ_layers P_layer,          s = 1 if training_step divides by the
                                                         accumulation steps, else the number
                                                         of micro-batches of this optimizer step

so one optimizer step always receives ``λ_t × mean over micro-batches of ∂P/∂θ`` whatever
``gradient_accumulation_steps`` is and whether the model consumes ``num_items_in_batch``
(``training_step``'s rule is mirrored in :meth:`DecorrTrainerMixin._decorr_trainer_divides`).
``P_layer`` is computed from the outputs of the chosen modules, captured by forward hooks
that are only active inside the training forward and the evaluation's prediction steps.

Evaluation leaves ``eval_loss`` the task loss and adds ``eval_decorr_*`` metrics computed from
float64 sufficient statistics of the whole evaluation set. Training logs carry ``task_loss``,
``decorr_loss`` (``Σ_layers P``, before λ), ``decorr_weight`` (``λ_t``) and per-layer values,
averaged over the logging window and over processes; they are accumulated as device tensors
and read once per logging step, so the training step itself never waits on the host.

Public override points (subclass and override; each is documented and tested):

* :meth:`DecorrTrainerMixin.decorr_samples` — the samples ``(N, p)`` and validity ``(N,)`` of one
  layer's output (e.g. only some tokens).
* :meth:`DecorrTrainerMixin.decorr_penalty` — the penalty as a function of the covariance
  ``C (..., p, p) → (...)``; or pass ``decorr_penalty_fn=`` to the constructor, or register a
  named penalty with :func:`hf_decorr.register_penalty` and set ``decorr_penalty``.
* :meth:`DecorrTrainerMixin.decorr_layer_weight` — the weight of one layer at one optimizer step
  (a per-layer λ or a custom schedule).

The grouping of layers, the CPU token compaction, the multi-process covariance and the logging
stay in the default implementation and apply to overridden pieces too.
"""

from __future__ import annotations

import inspect
import math
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from transformers import Seq2SeqTrainer, Trainer
from transformers.trainer_pt_utils import find_batch_size
from transformers.trainer_utils import unwrap_peft_model

from ._compat import checkpointing_option, sync_gradients_now, undo_eval_only_prepare
from .capture import (
    CapturedCall,
    HiddenStateCapture,
    PenaltyGradientReplay,
    resolve_layers,
)
from .config import DecorrConfig, DecorrSeq2SeqTrainingArguments, DecorrTrainingArguments, check_base_order
from .distributed import (
    choose_strategy,
    global_covariance_penalties,
    global_penalty_with_count,
    real_samples_in_batch,
    sum_accumulators,
    world_size,
)
from .errors import DecorrError
from .gram import cov_l1_lowmem, lowmem_covariance
from .metrics import METRIC_NAMES, CovarianceAccumulator, decorrelation_metrics
from .model_card import CARD_TAGS, MODEL_TAG, decorr_model_card, pipeline_tag_of, write_model_card
from .monitor import DivergenceCallback, DivergenceMonitor, local_shard
from .penalties import (
    Penalty,
    _cov_l1_of_covariance,
    decorrelation_penalty,
    get_penalty,
)
from .pooling import MissingMaskError, mask_from_inputs, mask_like_keys, pool_hidden

__all__ = ["DecorrTrainerMixin", "DecorrTrainer", "DecorrSeq2SeqTrainer", "DecorrSamples", "MODEL_TAG"]

#: what ``Trainer(model)`` names the output folder when it builds default arguments (transformers 5.x)
DEFAULT_OUTPUT_DIR = "tmp_trainer"


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
    """

    layer: str
    x: torch.Tensor
    mask: torch.Tensor | None
    pooled: bool = False
    decoder: bool = False
    rows_bound: int | None = field(default=None, repr=False)

    @property
    def group(self) -> tuple:
        """Rank-independent key: layers with equal keys are stacked into one batched kernel."""
        return (self.x.shape[-1], self.decoder, self.pooled, self.x.dtype, self.x.device)


class _LogWindow:
    """Device-side sums of the values logged at the next logging step."""

    def __init__(self) -> None:
        self.task: torch.Tensor | None = None
        self.layers: torch.Tensor | None = None
        self.few: torch.Tensor | None = None
        self.micro = 0
        self.weight_sum = 0.0
        self.start_step: int | None = None

    def add(self, task: torch.Tensor, layers: torch.Tensor, few: torch.Tensor, weight: float, step: int) -> None:
        if self.micro == 0:
            self.task, self.layers, self.few, self.start_step = task, layers, few, step
        else:
            self.task, self.layers, self.few = self.task + task, self.layers + layers, self.few + few
        self.micro += 1
        self.weight_sum += weight


def _reentrant_message(name: str) -> str:
    return (
        f"decorr_layers: module {name!r} ran without autograd in the training forward, so the penalty cannot train "
        "anything through it: it runs inside a reentrant gradient-checkpointing region (use "
        f"{checkpointing_option('activation_checkpointing_kwargs')}={{'use_reentrant': False}}, or penalise the whole "
        "block) or under torch.no_grad"
    )


class _ArmReplay(torch.autograd.Function):
    """Identity on the loss; its backward arms the replay hooks before the cached loss's own hook replays."""

    @staticmethod
    def forward(ctx, loss: torch.Tensor, replay: PenaltyGradientReplay) -> torch.Tensor:
        ctx.replay = replay
        return loss.view_as(loss)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        ctx.replay.arm(grad.detach())
        return grad, None


def _not_a_trainer(name: str, base: type | None) -> str:
    what = f"{base.__module__}.{base.__qualname__} is not one" if base is not None else "it is not one"
    return (
        f"{name}: DecorrTrainerMixin works only on subclasses of transformers.Trainer, and {what}. "
        "For SetFit, keep setfit.Trainer and call hf_decorr.setfit.decorr_setfit_trainer(trainer, decorr_weight=...), "
        "which makes its embedding phase (a sentence-transformers trainer) train with the penalty; for "
        "sentence-transformers use hf_decorr.sentence_transformers.DecorrSentenceTransformerTrainer."
    )


class DecorrTrainerMixin:
    """Mix into any ``transformers.Trainer`` subclass, *before* it in the bases.

    ``args`` must be a :class:`~hf_decorr.config.DecorrConfig` (for example
    :class:`~hf_decorr.config.DecorrTrainingArguments`). Layer specs are resolved when the
    trainer is built, so a bad ``decorr_layers`` fails before training starts.

    Args:
        decorr_penalty_fn: optional penalty used instead of ``args.decorr_penalty``, the way
            ``Trainer`` takes ``compute_loss_func``: a :class:`~hf_decorr.penalties.Penalty`, or a
            callable of the covariance ``C (..., p, p) → (...)`` (``C`` with ``1/(N−1)``).

    Override points (public; the defaults keep the grouping, chunking, multi-process sync and
    logging around them): :meth:`decorr_samples`, :meth:`decorr_penalty`,
    :meth:`decorr_layer_weight`.

    After each evaluation, :attr:`decorr_last_eval_covariances` holds every penalised layer's
    float64 covariance ``(p, p)`` over the whole evaluation set (on the CPU, summed over
    processes), the statistics behind ``eval_decorr_*``; ``decorr_log_figures=True`` logs their
    heat maps and spectra as images (:class:`~hf_decorr.callbacks.DecorrFigureCallback`).
    """

    args: DecorrConfig
    #: the class of the arguments built when none are given (``DecorrTrainer(model)``, like ``Trainer(model)``)
    decorr_default_arguments_class: type = DecorrTrainingArguments

    def __init_subclass__(cls, **kwargs) -> None:
        super().__init_subclass__(**kwargs)
        if issubclass(cls, Trainer):
            check_base_order(cls, DecorrTrainerMixin, Trainer, "compute_loss")
            return
        # a class that mixes in a trainer-like class (it has `train`) that is not a transformers.Trainer
        foreign = [base for base in cls.__mro__[1:]
                   if base is not object and not issubclass(base, DecorrTrainerMixin) and hasattr(base, "train")]
        if foreign:
            raise TypeError(_not_a_trainer(cls.__name__, foreign[0]))

    def __init__(self, *args, decorr_penalty_fn: Penalty | Callable[[torch.Tensor], torch.Tensor] | None = None,
                 **kwargs) -> None:
        if not isinstance(self, Trainer):
            raise TypeError(_not_a_trainer(type(self).__name__, None))
        # like Trainer(model): no arguments means default ones, here with the decorr settings
        # only for parents that take Trainer's `args` parameter (SetFit's embedding trainer builds its own)
        if "args" in inspect.signature(super().__init__).parameters:
            if len(args) >= 2 and args[1] is None:
                args = (args[0], self._decorr_default_arguments(), *args[2:])
            elif len(args) < 2 and kwargs.get("args") is None:
                kwargs["args"] = self._decorr_default_arguments()
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, DecorrConfig):
            raise TypeError(
                f"{type(self).__name__} needs args that include the decorr settings, e.g. DecorrTrainingArguments; "
                f"got {type(self.args).__name__}"
            )
        # the settings may have been changed since the arguments were built: check them again
        self.args._validate_decorr()
        if getattr(self.args, "n_gpu", 1) > 1:
            raise ValueError(
                "hf_decorr does not support torch.nn.DataParallel (several GPUs in one process): its replicas run the "
                "hooks on copies of the layers. Launch one process per GPU with `accelerate launch` or `torchrun`."
            )
        self.decorr_penalty_spec = self._decorr_resolve_penalty(decorr_penalty_fn)
        self._decorr_capture: HiddenStateCapture | None = None
        self._decorr_hooked: nn.Module | None = None
        self._decorr_layer_names: list[str] = []
        self._decorr_decoder_side: dict[str, bool] = {}
        self._decorr_window = _LogWindow()
        self._decorr_eval_stats: dict[str, CovarianceAccumulator] | None = None
        self._decorr_warned: set[str] = set()
        self.decorr_monitor = DivergenceMonitor()
        if self.decorr_guard_active:
            self.add_callback(DivergenceCallback(self))
        self.decorr_last_eval_covariances: dict[str, torch.Tensor] = {}
        if getattr(self.args, "decorr_log_figures", False):
            from .callbacks import DecorrFigureCallback

            self.add_callback(DecorrFigureCallback(self))
        if self.model is not None:
            base = self._decorr_prepare(self.model)
            if hasattr(base, "add_model_tags"):
                base.add_model_tags([MODEL_TAG])

    def _decorr_default_arguments(self) -> DecorrConfig:
        import logging

        logging.getLogger(__name__).info(
            "No arguments passed, using %s(output_dir=%r).", self.decorr_default_arguments_class.__name__,
            DEFAULT_OUTPUT_DIR,
        )
        return self.decorr_default_arguments_class(output_dir=DEFAULT_OUTPUT_DIR)

    # ---- model card ------------------------------------------------------------------------------

    #: tags of the model card (and of the model, ``add_model_tags``), as TRL's trainers declare theirs
    _tag_names = list(CARD_TAGS)

    def create_model_card(
        self,
        *,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_name: str | None = None,
        tags: str | list[str] | None = None,
        license: str | None = None,
        output_dir: str | None = None,
        metrics: Mapping[str, float] | None = None,
        language: str | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
        **card_options: Any,
    ) -> None:
        """Write the model card, ``README.md``, into ``output_dir`` (default ``args.output_dir``).

        Called by ``Trainer.push_to_hub()``, so a plain ``trainer.push_to_hub()`` uploads this card:
        the formula ``task loss + λ Σ_layers L_Σ``, λ, the layers (as configured and as resolved),
        the penalty (its description from the registry, or the custom ``decorr_penalty_fn``),
        pooling, mask and the last evaluation's metrics (``metrics`` when given, else the last
        ``eval_*`` and ``test_*`` entries of the training log). Tags: :attr:`_tag_names`, the
        model's own tags and ``tags``. ``finetuned_from`` defaults to the model's
        ``name_or_path``, ``tasks`` to the pipeline tag of its head. ``card_options`` go to
        :func:`hf_decorr.model_card.decorr_model_card` (``dataset_description``, ``training``,
        ``command``); ``language``, ``dataset_tags`` and ``dataset_args`` (``Trainer``'s) are
        accepted and not used. Only the main process writes. Models that are not transformers
        ``PreTrainedModel`` s (e.g. sentence-transformers) keep their trainer's own card.
        """
        from transformers import PreTrainedModel

        if not self.is_world_process_zero():
            return
        model = self._decorr_unwrap(self.model)
        if not isinstance(model, PreTrainedModel):
            return super().create_model_card(model_name=model_name)
        if metrics is None:
            latest: dict[str, dict[str, float]] = {}
            for entry in self.state.log_history:
                for prefix in ("eval_", "test_"):
                    if any(key.startswith(prefix) for key in entry):
                        latest[prefix] = {k: v for k, v in entry.items() if k.startswith(prefix)}
            metrics = {k: v for part in latest.values() for k, v in part.items()}
        extra = [tags] if isinstance(tags, str) else list(tags or [])
        extra += [t for t in (getattr(model, "model_tags", None) or []) if t not in self._tag_names]
        task = tasks[0] if isinstance(tasks, list) and tasks else tasks
        datasets = [dataset] if isinstance(dataset, str) else list(dataset or [])
        if dataset_name:
            datasets.append(dataset_name)
        spec = self.decorr_penalty_spec
        custom = spec.name != self.args.decorr_penalty
        card = decorr_model_card(
            model_name=model_name or self.args.hub_model_id or os.path.basename(os.path.abspath(self.args.output_dir)),
            decorr_settings={**self.args.decorr_dict(), **({"decorr_penalty": spec.name} if custom else {})},
            layer_names=self.decorr_layer_names,
            metrics=metrics,
            task=task or pipeline_tag_of(model),
            base_model=finetuned_from or getattr(model, "name_or_path", None) or None,
            datasets=datasets or None,
            extra_tags=[*self._tag_names, *extra],
            license=license,
            penalty_description=spec.description if custom else None,
            **card_options,
        )
        write_model_card(output_dir if output_dir is not None else self.args.output_dir, card)

    def _decorr_resolve_penalty(self, fn) -> Penalty:
        overridden = type(self).decorr_penalty is not DecorrTrainerMixin.decorr_penalty
        if fn is None:
            penalty = get_penalty(self.args.decorr_penalty)
        elif isinstance(fn, Penalty):
            penalty = fn
        elif callable(fn):
            name = getattr(fn, "__name__", type(fn).__name__)
            penalty = Penalty(f"custom:{name}", fn, of_covariance=True, correction=1,
                              description=f"custom penalty of the covariance ({name})")
        else:
            raise TypeError(
                "decorr_penalty_fn must be a hf_decorr.Penalty or a callable of the covariance, got "
                f"{type(fn).__name__}"
            )
        if overridden and not penalty.of_covariance:
            raise ValueError(
                f"{type(self).__name__} overrides decorr_penalty (a function of the covariance), but the configured "
                f"penalty {penalty.name!r} is a function of the samples; set decorr_penalty to a covariance penalty "
                "such as 'cov_l1' (its divisor is used for C)"
            )
        return penalty

    # ---- override points -----------------------------------------------------------------------

    def decorr_samples(
        self, layer: str, output: torch.Tensor, inputs: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The samples of one penalised layer for this step. Can be overridden.

        Args:
            layer: the module's name, relative to the unwrapped model (see :attr:`decorr_layer_names`).
            output: the module's output tensor in one forward call of the model, ``(B, p)`` or
                ``(B, T, p)``; it carries the graph.
            inputs: the inputs of *that call* (its keyword arguments: ``input_ids``,
                ``attention_mask``, ``labels``, ...; for sentence-transformers the features dict of
                one text column or mini-batch). When the call could not be observed (a model whose
                ``forward`` is invoked without ``__call__``), the batch given to the trainer.

        This method runs once per forward call of the model in the step; the samples of all
        calls of a layer are concatenated into one covariance.

        Returns:
            ``(x, mask)``: samples ``x`` of shape ``(N, p)`` and their validity ``mask`` (bool or
            0/1, shape ``(N,)``; ``None`` when every row is valid). Rows whose mask is false are
            left out of every sum. The default takes the mask named by ``decorr_mask`` (the
            attention mask, or ``labels != -100``; on the decoder side of an encoder-decoder model
            ``decoder_attention_mask``) and pools per ``decorr_pooling``.

        Keep the shapes independent of the data (use the mask rather than boolean indexing) to
        avoid host syncs on accelerators.
        """
        decoder = self._decorr_decoder_side.get(layer, False)
        mask = mask_from_inputs(inputs, decoder_side=decoder, source=self.args.decorr_mask)
        if mask is None and output.dim() == 3:
            candidates = mask_like_keys(inputs, decoder_side=decoder)
            if candidates:
                raise MissingMaskError(
                    f"decorr: the (batch, sequence, p) output of {layer!r} needs a mask of its valid positions, "
                    "but its "
                    f"forward call has no {'decoder_attention_mask or labels' if decoder else 'attention_mask'}; keys "
                    f"that look like masks: {candidates}. Padding is never counted as samples: pass the mask to the "
                    "model as attention_mask, or override decorr_samples to choose it"
                )
        return pool_hidden(output, mask, self.args.decorr_pooling, layer)

    def decorr_penalty(self, covariance: torch.Tensor) -> torch.Tensor:
        """The penalty of a covariance: ``C (..., p, p) → (...)``, one value per leading index. Can be overridden.

        ``C`` is the sample covariance of a layer's samples with divisor ``N − 1`` (``N − 0`` for
        penalties registered with ``correction=0``); with ``decorr_sync="global"`` and several
        processes it is the covariance of the samples of all processes, and the gradient flows back
        to each process's samples exactly. Layers of one width arrive stacked (``(L, p, p)``).
        The default applies ``decorr_penalty_fn`` or the registered penalty named ``decorr_penalty``
        (for ``cov_l1``: ``(1/p²) Σ_ij |C_ij|``). Penalties of the samples (``l1``) do not go through
        this method.
        """
        return self.decorr_penalty_spec.fn(covariance)

    def decorr_layer_weight(self, layer: str, step: int) -> float:
        """The weight ``w`` of one layer's penalty at optimizer step ``step`` (0-based). Can be overridden.

        The loss is ``task_loss + Σ_layers w_layer · P_layer``. The default is ``λ_t`` of the
        config, ``decorr_weight · min(1, (step + 1) / decorr_warmup_steps)`` for every layer.
        Return a finite float ``≥ 0``; when every layer's weight is 0 the step trains exactly like a
        plain ``Trainer`` and the penalty is only logged.
        """
        return self.args.decorr_weight_at(step)

    # ---- layers and hooks ------------------------------------------------------------------

    def _decorr_unwrap(self, model: nn.Module) -> nn.Module:
        """The model without DDP / DeepSpeed / compile wrappers and without the PEFT wrapper."""
        return unwrap_peft_model(self.accelerator.unwrap_model(model, keep_torch_compile=False))

    def _decorr_prepare(self, model: nn.Module) -> nn.Module:
        """Resolve ``decorr_layers`` on ``model`` (once per model object); the hooks are attached per pass."""
        base = self._decorr_unwrap(model)
        if self._decorr_hooked is base:
            return base
        names, output_keys = self._decorr_resolve_layers(base)
        modules = dict(base.named_modules())
        encoder_decoder = bool(getattr(getattr(base, "config", None), "is_encoder_decoder", False))
        self._decorr_layer_names = names
        self._decorr_decoder_side = {
            name: encoder_decoder and any(part.startswith("decoder") for part in name.split(".")) for name in names
        }
        self._decorr_capture = HiddenStateCapture({name: modules[name] for name in names}, root=base,
                                                  output_keys=output_keys)
        self._decorr_hooked = base
        return base

    def _decorr_resolve_layers(self, model: nn.Module) -> tuple[list[str], dict[str, str]]:
        """Module names for ``decorr_layers`` and, per name, the key of its tensor when it returns a mapping."""
        return resolve_layers(model, self.args.decorr_layers), {}

    @property
    def decorr_layer_names(self) -> list[str]:
        """Names of the penalised modules, relative to the unwrapped model."""
        return list(self._decorr_layer_names)

    def remove_decorr_hooks(self) -> None:
        """Remove any hook of this trainer from the model (they exist only during a forward pass anyway)."""
        self._decorr_disarm_replay()
        if self._decorr_capture is not None:
            self._decorr_capture.detach()

    def _decorr_warn_once(self, key: str, message: str) -> None:
        if key not in self._decorr_warned:
            self._decorr_warned.add(key)
            warnings.warn(message, stacklevel=3)

    def _decorr_call_samples(
        self, calls: list[CapturedCall], inputs: Mapping[str, Any], strict: bool
    ) -> dict[str, list[tuple[torch.Tensor, torch.Tensor | None, bool]]]:
        """``layer → [(x, mask, pooled) per call]``: :meth:`decorr_samples` on every output, with its call's inputs."""
        out: dict[str, list[tuple[torch.Tensor, torch.Tensor | None, bool]]] = {}
        for name in self._decorr_layer_names:
            parts = []
            seen = False
            for call in calls:
                hidden = call.outputs.get(name)
                if hidden is None:
                    continue
                seen = True
                try:
                    x, mask = self.decorr_samples(name, hidden, call.inputs if call.inputs is not None else inputs)
                except MissingMaskError:
                    raise
                except ValueError:
                    if strict:
                        raise
                    self._decorr_warn_once(
                        f"eval-shape-{name}",
                        f"decorr: skipping {name!r} for an evaluation batch whose output shape {tuple(hidden.shape)} "
                        "does not fit the batch's mask (e.g. a generation step)",
                    )
                    continue
                if x.dim() != 2 or (mask is not None and mask.shape != x.shape[:1]):
                    raise ValueError(
                        f"decorr_samples({name!r}) must return samples of shape (N, p) and a mask of shape (N,) or "
                        f"None; got {tuple(x.shape)} and {None if mask is None else tuple(mask.shape)}"
                    )
                if mask is not None:
                    mask = mask.to(device=x.device, dtype=torch.bool)
                parts.append((x, mask, hidden.dim() == 2 or self.args.decorr_pooling != "tokens"))
            if not seen:
                if strict and name in self._decorr_capture.ran_without_grad:
                    raise DecorrError(_reentrant_message(name))
                if strict:
                    raise DecorrError(
                        f"decorr_layers: module {name!r} did not run during the forward pass, so it cannot be "
                        "penalised; choose a module that the model's forward uses"
                    )
                continue
            if parts:
                out[name] = parts
        return out

    def _decorr_samples(
        self, captured: list[CapturedCall] | Mapping[str, torch.Tensor], inputs: Mapping[str, Any], strict: bool
    ) -> list[DecorrSamples]:
        """The samples of every penalised layer, in layer order: the valid samples of all its calls, concatenated.

        ``captured``: the recorded calls, or a mapping ``layer → output`` (one call with ``inputs``).
        """
        if isinstance(captured, Mapping):
            captured = [CapturedCall(None, True, dict(captured))]
        out = []
        for name, parts in self._decorr_call_samples(captured, inputs, strict).items():
            x, mask, pooled = parts[0]
            if len(parts) > 1:
                x = torch.cat([part[0] for part in parts])
                if any(part[1] is not None for part in parts):
                    mask = torch.cat([
                        torch.ones(part[0].shape[0], dtype=torch.bool, device=x.device) if part[1] is None else part[1]
                        for part in parts
                    ])
            # pooled rows from one call are bounded by the batch size on every process; several calls are not
            rows_bound = self.args.per_device_train_batch_size if pooled and len(parts) == 1 else None
            out.append(DecorrSamples(name, x, mask, pooled, self._decorr_decoder_side.get(name, False), rows_bound))
        return out

    #: On the CPU every operation is synchronous, so nothing is lost by gathering the valid token
    #: rows first: the covariance then costs the real tokens only, not the padding. On accelerators
    #: the mask keeps the shapes static and the step never waits on the host.
    decorr_compact_cpu_tokens: bool = True

    def _decorr_compact_tokens(self, xs: list[torch.Tensor], ms: list[torch.Tensor | None], rows_bound) -> bool:
        first = ms[0]
        return (
            self.decorr_compact_cpu_tokens
            and rows_bound is None  # token samples (pooled ones are few rows already)
            and first is not None
            and first.device.type == "cpu"
            and all(m is not None and m.shape == first.shape and torch.equal(m, first) for m in ms)
        )

    def _decorr_fused_cov_l1(self) -> bool:
        """Whether the penalty is the built-in ``cov_l1`` (not overridden), computed by the fused tiled kernel."""
        return (
            type(self).decorr_penalty is DecorrTrainerMixin.decorr_penalty
            and self.decorr_penalty_spec.fn is _cov_l1_of_covariance
            and self.decorr_penalty_spec.correction == 1
        )

    def _decorr_subsample(self, x: torch.Tensor, mask: torch.Tensor | None, generator: torch.Generator):
        """``decorr_max_samples`` random valid rows of ``x``: ``(index (K,), validity (K,) | None)``, static shapes.

        Random keys, −1 for invalid rows, and ``topk``: no host sync. With fewer than ``K`` valid rows some
        invalid ones are drawn too and masked out.
        """
        k = self.args.decorr_max_samples
        if x.shape[0] <= k:
            return None, mask
        keys = torch.rand(x.shape[0], generator=generator, device=x.device)
        if mask is not None:
            keys = torch.where(mask, keys, keys.new_full((), -1.0))
        index = keys.topk(k, sorted=False).indices
        return index, None if mask is None else mask.index_select(0, index)

    def _decorr_generator(self, device: torch.device) -> torch.Generator:
        """The subsampling generator of this micro-batch: seeded from ``args.seed``, the step and the call count."""
        self._decorr_draws = getattr(self, "_decorr_draws", 0) + 1
        seed = (self.args.seed * 1_000_003 + self.state.global_step * 7_919 + self._decorr_draws) % (2**63 - 1)
        return torch.Generator(device=device).manual_seed(seed)

    def _decorr_penalties(self, samples: list[DecorrSamples]) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-layer penalties ``(L,)`` in layer order and the number of layers with < 2 samples.

        Token samples of a covariance penalty are walked one layer at a time through the low-memory
        kernels of :mod:`hf_decorr.gram` (no copy of the activations, no stack of layers: the backward
        keeps the layer output itself plus O(p²) state); pooled samples (few rows) and penalties of the
        samples (``l1``) are stacked by group (same width, side and kind) into one batched kernel. With
        ``decorr_sync="global"`` and several processes the covariance is taken over the samples of all
        processes (token layers: bucketed all-reduces, see :func:`~hf_decorr.distributed.global_covariance_penalties`).
        """
        penalty = self.decorr_penalty_spec
        if penalty.of_covariance:
            # every covariance penalty goes through the (overridable) decorr_penalty method
            penalty = Penalty(penalty.name, self.decorr_penalty, True, penalty.correction, penalty.description)
        args = self.args
        chunk = args.decorr_chunk_size or None
        precision = args.decorr_precision
        fused = self._decorr_fused_cov_l1()
        world = world_size()
        sync = world > 1 and args.decorr_sync == "global"
        groups: dict[tuple, list[int]] = {}
        for i, sample in enumerate(samples):
            groups.setdefault(sample.group, []).append(i)
        values: list[torch.Tensor | None] = [None] * len(samples)
        few = []
        token_global: list[tuple[int, tuple]] = []
        generator = None
        for members in groups.values():
            xs = [samples[i].x for i in members]
            ms = [samples[i].mask for i in members]
            if penalty.of_covariance and not samples[members[0]].pooled:
                shared_index = None
                if not args.decorr_max_samples and self._decorr_compact_tokens(xs, ms, None):
                    shared_index = ms[0].nonzero().squeeze(-1)  # CPU: the valid rows only, without copying them
                for i, x, m in zip(members, xs, ms):
                    index, mask = (shared_index, None) if shared_index is not None else (None, m)
                    if args.decorr_max_samples:
                        generator = generator or self._decorr_generator(x.device)
                        index, mask = self._decorr_subsample(x, m, generator)
                    if mask is None:
                        rows = x.shape[0] if index is None else index.shape[0]
                        if rows < 2 and not sync:
                            self._decorr_warn_once(
                                "few", f"decorr: a batch has {rows} sample(s); the penalty needs 2 and is 0 for it"
                            )
                    elif not sync:
                        few.append((mask.sum() < 2).reshape(1).sum())
                    if sync:
                        token_global.append((i, (x, mask, index)))
                    elif fused:
                        values[i] = cov_l1_lowmem(x, mask, index=index, chunk=chunk, precision=precision)
                    else:
                        cov, _ = lowmem_covariance(x, mask, penalty.correction, index=index, chunk=chunk,
                                                   precision=precision)
                        values[i] = penalty.fn(cov)
                continue
            h = xs[0].unsqueeze(0) if len(xs) == 1 else torch.stack(xs)
            if all(m is None for m in ms):
                mask = None
                rows = h.shape[-2]
                if rows < 2 and not sync:
                    self._decorr_warn_once(
                        "few", f"decorr: a batch has {rows} sample(s); the penalty needs 2 and is 0 for it"
                    )
            else:
                mask = torch.stack([torch.ones(h.shape[-2], dtype=torch.bool, device=h.device) if m is None else m
                                    for m in ms])
                if not sync:
                    few.append((mask.sum(dim=-1) < 2).sum())
            if sync:
                # every process issues the same collectives in the same order: the groups are keyed and
                # ordered rank-independently and the strategy depends only on rank-independent shapes
                bound = samples[members[0]].rows_bound
                strategy = choose_strategy(h.shape[-1], bound, world)
                result, count = global_penalty_with_count(h, mask, penalty, strategy=strategy, rows_bound=bound)
                few.append((count < 2).sum())
            else:
                result = decorrelation_penalty(h, mask, penalty)
            for j, i in enumerate(members):
                values[i] = result[j]
        if token_global:
            results, counts = global_covariance_penalties(
                [item for _, item in token_global], penalty, chunk=chunk, precision=precision
            )
            for (i, _), value, count in zip(token_global, results, counts):
                values[i] = value
                few.append((count < 2).reshape(1).sum())
        per_layer = torch.stack(values) if values else torch.zeros(0)
        few_count = torch.stack(few).sum() if few else torch.zeros((), device=per_layer.device)
        return per_layer, few_count

    # ---- training ------------------------------------------------------------------------------

    def _decorr_trainer_divides(self, num_items_in_batch) -> bool:
        """Whether ``training_step`` divides the returned loss by the accumulation steps (its rule)."""
        scaled = getattr(self, "loss_is_scaled_for_ga", None)
        if scaled is None:
            scaled = (self.model_accepts_loss_kwargs and num_items_in_batch is not None) or (
                self.compute_loss_func is not None
            )
        return not scaled

    def _decorr_layer_weights(self, step: int) -> list[float]:
        weights = []
        for name in self._decorr_layer_names:
            w = self.decorr_layer_weight(name, step)
            if isinstance(w, torch.Tensor):
                w = float(w)
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not w >= 0 or w == float("inf"):
                raise ValueError(f"decorr_layer_weight({name!r}, {step}) must return a finite float >= 0, got {w!r}")
            weights.append(float(w))
        return weights

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._decorr_prepare(model)
        capture = self._decorr_capture
        if not (model.training and torch.is_grad_enabled()):
            return super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        self._decorr_check_last_replay()
        with capture.recording("train"):
            result = super().compute_loss(
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        loss, outputs = result if return_outputs else (result, None)
        weights = self._decorr_layer_weights(self.state.global_step)
        active = any(w > 0 for w in weights)
        calls = capture.sample_calls()
        # every call ran without autograd, and the loss still trains: a cached loss (GradCache), which embeds
        # again with autograd during backward; the penalty's gradient is then applied to that replay
        replay = active and bool(calls) and not any(call.grad for call in calls)
        try:
            if replay:
                if not loss.requires_grad:
                    raise DecorrError(
                        "decorr_weight > 0, but no forward call of the model in this training step ran with autograd, "
                        f"so the penalty cannot train anything through {self._decorr_layer_names}: the model runs "
                        "under torch.no_grad or inference_mode"
                    )
                calls = [CapturedCall(c.inputs, True,
                                      {n: h.detach().requires_grad_(True) for n, h in c.outputs.items()})
                         for c in calls]
            elif active:
                for call in calls:
                    for name, hidden in call.outputs.items():
                        if name in call.no_grad_layers:
                            raise DecorrError(_reentrant_message(name))
                        if not hidden.requires_grad:
                            raise DecorrError(
                                f"decorr_layers: the output of {name!r} does not require grad, so the penalty cannot "
                                "train anything through it: no trainable parameter feeds it (frozen layers, or PEFT "
                                "adapters only above it)"
                            )
            else:
                calls = [CapturedCall(c.inputs, c.grad, {n: h.detach() for n, h in c.outputs.items()}) for c in calls]
            samples = self._decorr_samples(calls, inputs, strict=True)
        finally:
            capture.clear()
        per_layer, few = self._decorr_penalties(samples)

        divides = self._decorr_trainer_divides(num_items_in_batch)
        steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        task = loss.detach() / steps if divides else loss.detach()
        if active:
            scale = 1.0 if divides else 1.0 / steps
            if len(set(weights)) == 1:
                weighted = weights[0] * per_layer.sum()
            else:
                weighted = (per_layer * per_layer.new_tensor(weights)).sum()
            term = scale * weighted
            if replay:
                leaves = [(i, name, h) for i, call in enumerate(calls) for name, h in call.outputs.items()]
                grads = torch.autograd.grad(term, [h for _, _, h in leaves], allow_unused=True)
                per_call: list[dict[str, torch.Tensor]] = [{} for _ in calls]
                for (i, name, _), grad in zip(leaves, grads):
                    if grad is not None:
                        per_call[i][name] = grad
                self._decorr_replay = PenaltyGradientReplay(capture, per_call)
                loss = _ArmReplay.apply(loss, self._decorr_replay) + term.detach().to(loss.dtype)
                per_layer = per_layer.detach()
            else:
                loss = loss + term.to(loss.dtype)
        self._decorr_window.add(task.float(), per_layer.detach().float(), few, sum(weights) / max(1, len(weights)),
                                self.state.global_step)
        if self.decorr_guard_active:
            self.decorr_monitor.observe_loss(loss.detach(), per_layer.detach(), self.state.global_step)
        return (loss, outputs) if return_outputs else loss

    # ---- divergence ----------------------------------------------------------------------------

    @property
    def decorr_guard_active(self) -> bool:
        """Whether the divergence guard runs: ``decorr_stop_on_nonfinite``, or when unset, ``decorr_weight > 0``.

        With the default settings at ``decorr_weight=0`` the trainer therefore behaves exactly like a plain
        ``Trainer`` (same callbacks, and a NaN loss is logged and trained on as ``Trainer`` does).
        """
        setting = self.args.decorr_stop_on_nonfinite
        return self.args.decorr_weight > 0 if setting is None else setting

    def training_step(self, model, inputs, *args, **kwargs):
        loss = super().training_step(model, inputs, *args, **kwargs)
        # the last micro-batch of an optimizer step: its gradients are complete and not yet clipped
        if self.decorr_guard_active and sync_gradients_now(self.accelerator):
            self.decorr_monitor.observe_gradients(
                model.parameters(), self.state.global_step, scaled=self.accelerator.scaler is not None,
                device=self.args.device,
            )
        return loss

    def _decorr_weights_nonfinite(self, model: nn.Module | None = None) -> torch.Tensor:
        """Whether any trainable parameter of this process holds NaN or inf (a device bool)."""
        device = self.args.device
        bad = torch.zeros((), dtype=torch.bool, device=device)
        model = self.model if model is None else model
        if model is None:
            return bad
        for param in model.parameters():
            if param.requires_grad:
                shard = local_shard(param)
                if shard.numel():
                    bad = bad | (~torch.isfinite(shard).all()).to(device)
        return bad

    def decorr_raise_if_diverged(self, weights: bool, collective: bool = True) -> None:
        """Raise :class:`~hf_decorr.errors.DivergenceError` if training has diverged (see :mod:`hf_decorr.monitor`).

        Diverged: a non-finite loss, penalty or gradient norm at some optimizer step so far, or, with
        ``weights``, a non-finite trainable parameter now. One host read, and with several processes
        (``collective``) one gather, so that every process stops at the same step. Does nothing when
        the guard is off (:attr:`decorr_guard_active`).
        """
        if not self.decorr_guard_active:
            return
        device = self.args.device
        status = self.decorr_monitor.status(device)
        if weights:
            status[4] = self._decorr_weights_nonfinite().to(torch.float64)
        if collective and self.accelerator.num_processes > 1:
            gathered = self.accelerator.gather(status.unsqueeze(0))
            steps = gathered[:, 3]
            first = steps[steps >= 0].min() if bool((steps >= 0).any()) else steps.new_tensor(-1.0)
            status = torch.cat([gathered[:, :3].amax(dim=0), first.reshape(1), gathered[:, 4:].amax(dim=0)])
        error = DivergenceMonitor.error(
            status.tolist(), self.state.global_step, self.args.decorr_weight, self.args.learning_rate,
            self.args.max_grad_norm, scaled=self.accelerator.scaler is not None,
        )
        if error is not None:
            raise error

    _decorr_replay: PenaltyGradientReplay | None = None

    def _decorr_disarm_replay(self) -> None:
        if self._decorr_replay is not None:
            self._decorr_replay.disarm()

    def _decorr_check_last_replay(self) -> None:
        """A cached-loss step's penalty gradient must have reached a grad-enabled replay of its calls."""
        replay, self._decorr_replay = self._decorr_replay, None
        if replay is None:
            return
        replay.disarm()
        if replay.upstream is not None and replay.injected == 0:
            raise DecorrError(
                "decorr_weight > 0, but no forward call of the model ran with autograd in the last training step: "
                "neither in the loss's forward nor replayed during its backward (as cached losses do), so the penalty "
                f"trained nothing through {self._decorr_layer_names}. Run the model with autograd enabled"
            )

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs and self._decorr_window.micro:
            logs.update(self._decorr_flush_window())
        super().log(logs, start_time)

    def _decorr_flush_window(self) -> dict[str, float]:
        window, self._decorr_window = self._decorr_window, _LogWindow()
        values = torch.cat([window.task.reshape(1), window.layers, window.few.float().reshape(1).to(window.task)])
        if self.accelerator.num_processes > 1:
            values = self.accelerator.gather(values.unsqueeze(0)).mean(dim=0)
        values = values.tolist()
        optimizer_steps = max(1, self.state.global_step - (window.start_step or 0))
        layers = [v / window.micro for v in values[1:-1]]
        logs = {
            "task_loss": values[0] / optimizer_steps,
            "decorr_loss": sum(layers),
            "decorr_weight": window.weight_sum / window.micro,
        }
        if self.args.decorr_log_per_layer and len(layers) > 1:
            logs.update({f"decorr_loss/{name}": v for name, v in zip(self._decorr_layer_names, layers)})
        if values[-1] > 0:
            self._decorr_warn_once(
                "few", "decorr: some batches had fewer than 2 valid samples in a layer; the penalty was 0 for them"
            )
        return logs

    # ---- evaluation ----------------------------------------------------------------------------

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **kwargs):
        stats = self._decorr_eval_stats
        if stats is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys, **kwargs)
        self._decorr_prepare(model)
        capture = self._decorr_capture
        with capture.recording("eval"):
            result = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys, **kwargs)
        calls = capture.sample_calls()
        capture.clear()
        # With several processes and even_batches, accelerate completes the last batch with samples from
        # the start of the set; gather_for_metrics keeps the first `remainder` samples of the rank-major
        # concatenation. Keep the same samples here, so that summed statistics count every sample once.
        accelerator, keep, batch = self.accelerator, None, None
        state = accelerator.gradient_state
        if accelerator.num_processes > 1 and accelerator.even_batches and state.end_of_dataloader:
            batch = find_batch_size(inputs)
            if batch and state.remainder > 0:
                keep = real_samples_in_batch(state.remainder, accelerator.process_index, batch)
        for name, parts in self._decorr_call_samples(calls, inputs, strict=False).items():
            for x, mask, _ in parts:  # every call of the model, into the layer's one accumulator
                if keep is not None and keep < batch:
                    rows = x.shape[0]
                    if rows % batch:
                        self._decorr_warn_once(
                            f"eval-dup-{name}",
                            f"decorr: cannot tell which of the {rows} samples of {name!r} belong to which of the "
                            f"{batch} examples of the padded last evaluation batch; its duplicated examples are "
                            "counted",
                        )
                    else:  # rows are example-major: row k belongs to example k // (rows / batch)
                        real = torch.arange(rows, device=x.device) < keep * (rows // batch)
                        mask = real if mask is None else mask.to(torch.bool) & real
                stats.setdefault(name, CovarianceAccumulator()).update(x, mask)
        return result

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        self._decorr_eval_stats = {} if self.args.decorr_eval_metrics else None
        try:
            with undo_eval_only_prepare(self):  # an evaluation before train() must not leave DDP unwrapped
                output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                                 metric_key_prefix)
            stats = self._decorr_eval_stats
        finally:
            self._decorr_eval_stats = None
        if stats is not None and output.metrics is not None:
            output.metrics.update(self.decorr_metrics_from_stats(stats, prefix=f"{metric_key_prefix}_decorr"))
        return output

    def decorr_metrics_from_stats(self, stats: dict[str, CovarianceAccumulator], prefix: str) -> dict[str, float]:
        """Sum the statistics over processes, then compute the paper's metrics per layer and their mean.

        Every process must call this (it runs collectives when there are several); a layer that
        one process did not see contributes zeros there.
        """
        stats = sum_accumulators(stats, self._decorr_layer_names, self.accelerator.device)
        self.decorr_last_eval_covariances = {
            name: stats[name].covariance().cpu()
            for name in self._decorr_layer_names
            if stats.get(name) is not None and not stats[name].empty
        }
        per_layer: dict[str, dict[str, float]] = {}
        for name in self._decorr_layer_names:
            acc = stats.get(name)
            if acc is None or acc.empty:  # no sample of this layer: undefined, never a perfect score
                per_layer[name] = {key: 0.0 if key in ("live_units", "samples") else math.nan for key in METRIC_NAMES}
                continue
            per_layer[name] = decorrelation_metrics(
                acc.covariance(), top_d=self.args.decorr_top_d, variance_share=self.args.decorr_variance_share,
                samples=float(acc.count),
            )
        out: dict[str, float] = {}
        if not per_layer:
            return out
        for key in next(iter(per_layer.values())):
            out[f"{prefix}_{key}"] = sum(m[key] for m in per_layer.values()) / len(per_layer)
        if self.args.decorr_log_per_layer and len(per_layer) > 1:
            for name, metrics in per_layer.items():
                out.update({f"{prefix}_{key}/{name}": value for key, value in metrics.items()})
        return out

    # ---- saving ------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        # never write non-finite weights (checkpoints come through here too); local check, no collective,
        # so that a save called on the main process only cannot hang
        self.decorr_raise_if_diverged(weights=True, collective=False)
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.args.should_save:
            self.args.save_decorr_config(output_dir if output_dir is not None else self.args.output_dir)


class DecorrTrainer(DecorrTrainerMixin, Trainer):
    """``transformers.Trainer`` with the covariance penalty (see :class:`DecorrTrainerMixin`)."""


class DecorrSeq2SeqTrainer(DecorrTrainerMixin, Seq2SeqTrainer):
    """``transformers.Seq2SeqTrainer`` with the covariance penalty (see :class:`DecorrTrainerMixin`)."""

    decorr_default_arguments_class = DecorrSeq2SeqTrainingArguments
