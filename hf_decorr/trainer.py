"""``DecorrTrainerMixin``: adds ``λ_t · Σ_layers L_Σ`` to any ``Trainer``'s training loss.

Per training micro-batch the loss returned to ``training_step`` is

    task_loss + (λ_t / s) · Σ_layers P_layer,          s = 1 if training_step divides by the
                                                         accumulation steps, else the number
                                                         of micro-batches of this optimizer step

so one optimizer step always receives ``λ_t × mean over micro-batches of ∂P/∂θ`` whatever
``gradient_accumulation_steps`` is and whether the model consumes ``num_items_in_batch``.
``P_layer`` is computed from the outputs of the chosen modules, captured by forward hooks that are
only active inside the training forward and the evaluation's prediction steps.

This module holds the ``Trainer`` overrides and the public override points; each delegates to a
module that owns one mechanism and never imports the trainer:

* `hf_decorr.capture` — finding the layers and recording their outputs per forward call;
* `hf_decorr.samples` — turning each call's outputs into samples ``(N, p)``;
* `hf_decorr.engine` — computing each layer's penalty (fused, low-memory, stacked, global);
* `hf_decorr.replay` — the penalty's gradient for cached losses;
* `hf_decorr.monitor` — the log window and the divergence guard;
* `hf_decorr.model_card` — the model card.

Public override points (subclass and override; each is documented and tested):
[`decorr_samples()`][hf_decorr.DecorrTrainerMixin.decorr_samples],
[`decorr_penalty()`][hf_decorr.DecorrTrainerMixin.decorr_penalty],
[`decorr_layer_weight()`][hf_decorr.DecorrTrainerMixin.decorr_layer_weight], and for integrations whose models are not
plain transformers models, [`decorr_resolve_layers()`][hf_decorr.DecorrTrainerMixin.decorr_resolve_layers].
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import logging
import os
import warnings
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from transformers import Seq2SeqTrainer, Trainer
from transformers.trainer_utils import unwrap_peft_model

from ._compat import deepspeed_miscounts_processes, sync_gradients_now, trainer_divides_loss, undo_eval_only_prepare
from .capture import CapturedCall, HiddenStateCapture, LayerChoice
from .config import DecorrConfig, DecorrSeq2SeqTrainingArguments, DecorrTrainingArguments, check_base_order
from .engine import PenaltyEngine, layer_weights
from .errors import DecorrError
from .evaluation import add_eval_samples, metrics_from_statistics, padded_batch_rows
from .layouts import DEFAULT_LAYOUT
from .metrics import CovarianceAccumulator
from .model_card import CARD_TAGS, MODEL_TAG, trainer_model_card, write_model_card
from .monitor import DivergenceCallback, DivergenceMonitor, LogWindow, weights_nonfinite
from .penalties import Penalty
from .replay import attach_replay, check_replay, needs_replay, replay_leaves
from .samples import (
    FEW_SAMPLES_WARNING,
    DecorrSamples,
    assemble_samples,
    call_samples,
    check_trainable,
    default_samples,
)
from .selection import PenalisedLayers

__all__ = ["DecorrTrainerMixin", "DecorrTrainer", "DecorrSeq2SeqTrainer", "DecorrSamples", "MODEL_TAG"]

#: what ``Trainer(model)`` names the output folder when it builds default arguments (transformers 5.x)
DEFAULT_OUTPUT_DIR = "tmp_trainer"


def _not_a_trainer(name: str, base: type | None) -> str:
    what = f"{base.__module__}.{base.__qualname__} is not one" if base is not None else "it is not one"
    hint = "For a library whose trainer is not a transformers.Trainer, use its hf_decorr integration module."
    package = base.__module__.partition(".")[0] if base is not None else ""
    if package and importlib.util.find_spec(f"{__package__}.{package}") is not None:
        # an integration module of that library says how to use it (its FOREIGN_TRAINER_HINT)
        module = importlib.import_module(f"{__package__}.{package}")
        hint = getattr(module, "FOREIGN_TRAINER_HINT", None) or f"See {module.__name__}."
    return f"{name}: DecorrTrainerMixin works only on subclasses of transformers.Trainer, and {what}. {hint}"


def _with_default_arguments(parent_init, args: tuple, kwargs: dict, arguments_class: type) -> tuple[tuple, dict]:
    """Like ``Trainer(model)``: no arguments means default ones, here with the decorr settings; only for parents
    that take ``Trainer``'s ``args`` parameter (a parent that builds its own arguments is left alone)."""
    if "args" not in inspect.signature(parent_init).parameters:
        return args, kwargs
    if (len(args) >= 2 and args[1] is None) or (len(args) < 2 and kwargs.get("args") is None):
        logging.getLogger(__name__).info("No arguments passed, using %s(output_dir=%r).", arguments_class.__name__,
                                         DEFAULT_OUTPUT_DIR)
        default = arguments_class(output_dir=DEFAULT_OUTPUT_DIR)
        if len(args) >= 2:
            return (args[0], default, *args[2:]), kwargs
        return args, {**kwargs, "args": default}
    return args, kwargs


def _folder_name(path: str | None) -> str:
    """The name of the folder ``path`` (the default model name of a card)."""
    return os.path.basename(os.path.abspath(str(path)))


def _check_arguments(trainer: Trainer) -> None:
    if not isinstance(trainer.args, DecorrConfig):
        raise TypeError(
            f"{type(trainer).__name__} needs args that include the decorr settings, e.g. DecorrTrainingArguments; "
            f"got {type(trainer.args).__name__}"
        )
    trainer.args.validate_decorr()  # the settings may have been changed since the arguments were built
    if deepspeed_miscounts_processes(trainer):
        raise DecorrError(
            f"DeepSpeed runs {torch.distributed.get_world_size()} processes but accelerate counts "
            f"{trainer.accelerator.num_processes} (a machine without accelerators), so every process would read "
            "every row and decorr_sync='global' would take the covariance over duplicated rows: call "
            "hf_decorr.deepspeed_process_state() before building the arguments and pass "
            "accelerator_config={'use_configured_state': True} (docs/DISTRIBUTED.md)"
        )
    if getattr(trainer.args, "n_gpu", 1) > 1:
        raise ValueError(
            "hf_decorr does not support torch.nn.DataParallel (several GPUs in one process): its replicas run the "
            "hooks on copies of the layers. Launch one process per GPU with `accelerate launch` or `torchrun`."
        )


if TYPE_CHECKING:  # a mixin of Trainer: type checkers see the methods it overrides and calls
    _TrainerBase = Trainer
else:
    _TrainerBase = object


class DecorrTrainerMixin(_TrainerBase):
    """Mix into any ``transformers.Trainer`` subclass, *before* it in the bases (see the module docstring).

    ``args`` must be a [`DecorrConfig`][hf_decorr.DecorrConfig] (e.g. ``DecorrTrainingArguments``);
    ``decorr_layers`` is resolved when the trainer is built, so a bad spec fails before training.

    Args:
        decorr_penalty_fn: optional penalty used instead of ``args.decorr_penalty``, as ``Trainer`` takes
            ``compute_loss_func``: a [`Penalty`][hf_decorr.Penalty], or a callable of the covariance
            ``C (..., p, p) → (...)`` (``C`` with ``1/(N−1)``).

    After each evaluation, `decorr_last_eval_covariances` holds each penalised layer's float64
    covariance ``(p, p)`` over the whole evaluation set (CPU, summed over processes).
    """

    args: DecorrConfig
    _decorr_capture: HiddenStateCapture  # set when a model is prepared (_decorr_prepare), as is:
    _decorr_layers: PenalisedLayers
    #: the class of the arguments built when none are given (``DecorrTrainer(model)``, like ``Trainer(model)``)
    decorr_default_arguments_class: type = DecorrTrainingArguments
    #: On the CPU every operation is synchronous, so nothing is lost by gathering the valid token
    #: rows first: the covariance then costs the real tokens only, not the padding. On accelerators
    #: the mask keeps the shapes static and the step never waits on the host.
    decorr_compact_cpu_tokens: bool = True
    #: tags of the model card (and of the model, ``add_model_tags``), as TRL's trainers declare theirs
    _tag_names = list(CARD_TAGS)

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
        args, kwargs = _with_default_arguments(super().__init__, args, kwargs, self.decorr_default_arguments_class)
        super().__init__(*args, **kwargs)
        _check_arguments(self)
        overridden = type(self).decorr_penalty is not DecorrTrainerMixin.decorr_penalty
        self.decorr_engine = PenaltyEngine.from_config(
            self.args, decorr_penalty_fn, covariance_override=self.decorr_penalty if overridden else None,
            owner=type(self).__name__, warn=self._decorr_warn_once)
        self.decorr_penalty_spec = self.decorr_engine.configured
        self._decorr_hooked: nn.Module | None = None
        self._decorr_window = LogWindow()
        self._decorr_eval_stats: dict[str, CovarianceAccumulator] | None = None
        self._decorr_warned: set[str] = set()
        self._decorr_replay = None
        self._decorr_micro = (-1, 0)  # (optimizer step, micro-batch within it) of the last training micro-batch
        self.decorr_monitor = DivergenceMonitor()
        self.decorr_last_eval_covariances: dict[str, torch.Tensor] = {}
        if self.decorr_guard_active:
            self.add_callback(DivergenceCallback(self))
        if self.args.decorr_log_figures:
            from .callbacks import DecorrFigureCallback

            self.add_callback(DecorrFigureCallback(self))
        if self.model is not None:
            base = self._decorr_prepare(self.model)
            if callable(tag := getattr(base, "add_model_tags", None)):
                tag([MODEL_TAG])

    # ---- model card ------------------------------------------------------------------------------

    def create_model_card(
        self,
        language: str | None = None,
        license: str | None = None,
        tags: str | list[str] | None = None,
        model_name: str | None = None,
        finetuned_from: str | None = None,
        tasks: str | list[str] | None = None,
        dataset_tags: str | list[str] | None = None,
        dataset: str | list[str] | None = None,
        dataset_args: str | list[str] | None = None,
        *,
        dataset_name: str | None = None,
        output_dir: str | None = None,
        metrics: Mapping[str, float] | None = None,
        **card_options: Any,
    ) -> None:
        """Write the model card, ``README.md``, into ``output_dir`` (default ``args.output_dir``); main process only.

        ``Trainer.create_model_card``'s parameters in its order, then hf_decorr's (keyword-only). Called by
        ``Trainer.push_to_hub()``, so a plain ``trainer.push_to_hub()`` uploads it: the formula, λ, the layers,
        the penalty, pooling, mask and the last evaluation's metrics (`hf_decorr.model_card.trainer_model_card()`;
        ``card_options`` go to `decorr_model_card()`). ``language``, ``dataset_tags``
        and ``dataset_args`` are accepted and not used. Models that are not transformers ``PreTrainedModel`` s
        (e.g. sentence-transformers) keep their trainer's own card, given ``Trainer``'s parameters.
        """
        from transformers import PreTrainedModel

        if not self.is_world_process_zero():
            return
        model = self._decorr_unwrap(self.model) if self.model is not None else None
        if not isinstance(model, PreTrainedModel):
            given: dict[str, Any] = dict(language=language, license=license, tags=tags, model_name=model_name,
                         finetuned_from=finetuned_from, tasks=tasks, dataset_tags=dataset_tags, dataset=dataset,
                         dataset_args=dataset_args)
            return super().create_model_card(**{k: v for k, v in given.items() if v is not None})
        card = trainer_model_card(
            model=model, settings=self.args.decorr_dict(), penalty=self.decorr_penalty_spec,
            layer_names=self.decorr_layer_names, log_history=self.state.log_history, tag_names=self._tag_names,
            model_name=model_name or self.args.hub_model_id or _folder_name(self.args.output_dir),
            finetuned_from=finetuned_from, tasks=tasks, dataset=dataset, dataset_name=dataset_name, tags=tags,
            license=license, metrics=metrics, **card_options,
        )
        write_model_card(output_dir if output_dir is not None else str(self.args.output_dir), card)

    # ---- override points -----------------------------------------------------------------------

    def decorr_samples(
        self, layer: str, output: torch.Tensor, inputs: Mapping[str, Any]
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The samples of one penalised layer for this step. Can be overridden.

        Args:
            layer: the module's name, relative to the unwrapped model (see `decorr_layer_names`).
            output: the module's output tensor in one forward call of the model, ``(B, p)`` or
                ``(B, T, p)``; it carries the graph.
            inputs: the inputs of *that call* (its keyword arguments: ``input_ids``,
                ``attention_mask``, ``labels``, ...; for sentence-transformers the features dict of
                one text column or mini-batch). When the call could not be observed (a model whose
                ``forward`` is invoked without ``__call__``), the batch given to the trainer.

        Runs once per forward call of the model in the step; the samples of all calls of a layer are
        concatenated into one covariance. Keep the shapes independent of the data (a mask rather than
        boolean indexing) to avoid host syncs on accelerators.

        Returns:
            ``(x, mask)``: floating samples ``x (N, p)`` (at λ > 0, a differentiable function of ``output``)
            and their validity ``mask`` (bool or 0/1 integers, ``(N,)``; ``None``: every row is valid); rows
            whose mask is false are left out of every sum. The default lays the output out as the batch's positions
            ([`to_positions()`][hf_decorr.to_positions]: feature maps, sequence-first, padded, downsampled), maps onto
            them the mask named by ``decorr_mask`` (the attention mask, or ``labels != -100``;
            ``decoder_attention_mask`` on the decoder side) and pools per ``decorr_pooling``.
        """
        side, layouts, args = self._decorr_layers.decoder_side, self._decorr_layers.layouts, self.args
        return default_samples(layer, output, inputs, pooling=args.decorr_pooling, mask_source=args.decorr_mask,
                               decoder=side.get(layer, False), layout=layouts.get(layer, DEFAULT_LAYOUT))

    def decorr_penalty(self, covariance: torch.Tensor) -> torch.Tensor:
        """The penalty of a covariance: ``C (..., p, p) → (...)``, one value per leading index. Can be overridden.

        ``C`` is the sample covariance of a layer's samples with divisor ``N − 1`` (``N − 0`` for
        penalties registered with ``correction=0``); with ``decorr_sync="global"`` and several
        processes it is the covariance of the samples of all processes, and the gradient flows back
        to each process's samples exactly. Token samples arrive one layer at a time (``(p, p)``);
        pooled samples of layers of one width arrive stacked (``(L, p, p)``). What it returns is
        checked at every call: a floating tensor of shape ``(...)`` that, when ``C`` requires grad,
        depends differentiably on it (a constant or detached value trains nothing and is refused).
        The default applies ``decorr_penalty_fn`` or the registered penalty named ``decorr_penalty``
        (for ``cov_l1``: ``(1/p²) Σ_ij |C_ij|``). Penalties of the samples (``l1``) do not go through
        this method.
        """
        return self.decorr_penalty_spec.fn(covariance)

    def decorr_layer_weight(self, layer: str, step: int) -> float:
        """The weight ``w`` of one layer's penalty at optimizer step ``step`` (0-based). Can be overridden.

        The loss is ``task_loss + Σ_layers w_layer · P_layer``. The default is ``λ_t`` of the
        config, ``decorr_weight · min(1, (step + 1) / decorr_warmup_steps)`` for every layer.
        Return a finite number ``≥ 0`` (a Python or NumPy number or a 0-d tensor); when every layer's
        weight is 0 the step trains exactly like a plain ``Trainer`` and the penalty is only logged.
        """
        return self.args.decorr_weight_at(step)

    def decorr_resolve_layers(self, model: nn.Module) -> tuple[list[str], dict[str, str]]:
        """The penalised modules of the unwrapped ``model`` for ``decorr_layers``. Can be overridden.

        Returns ``(names, output_keys)``: module names (relative to ``model``, in order) and, for a module
        that returns a mapping rather than a tensor, the key of its hidden-state tensor
        (sentence-transformers modules return a features dict). The default: [`LayerChoice`][hf_decorr.LayerChoice]'s
        names (with several candidate stacks, all of them until the first forward pass keeps those that ran) and no
        keys; an override's own names are used as they are (`hf_decorr.sentence_transformers`). Called once per
        model object.
        """
        return LayerChoice.resolve(model, self.args.decorr_layers).names, {}

    # ---- layers and hooks ------------------------------------------------------------------

    def _decorr_unwrap(self, model: nn.Module) -> nn.Module:
        """The model without DDP / DeepSpeed / compile wrappers and without the PEFT wrapper."""
        return unwrap_peft_model(self.accelerator.unwrap_model(model, keep_torch_compile=False))

    def _decorr_prepare(self, model: nn.Module) -> nn.Module:
        """Resolve ``decorr_layers`` on ``model`` once per model object (`PenalisedLayers`,
        settled by the first forward pass); the hooks are attached per pass."""
        base = self._decorr_unwrap(model)
        if self._decorr_hooked is not base:
            names, output_keys = self.decorr_resolve_layers(base)
            self._decorr_layers = PenalisedLayers.resolve(base, self.args.decorr_layers, names,
                                                          self.args.decorr_pooling)
            self._decorr_capture, self._decorr_hooked = self._decorr_layers.capture(output_keys), base
        return base

    @property
    def decorr_layer_names(self) -> list[str]:
        """Names of the penalised modules, relative to the unwrapped model."""
        return list(self._decorr_layers.names) if hasattr(self, "_decorr_layers") else []

    def remove_decorr_hooks(self) -> None:
        """Remove any hook of this trainer from the model (they exist only during a forward pass anyway)."""
        if self._decorr_replay is not None:
            self._decorr_replay.disarm()
        if hasattr(self, "_decorr_capture"):
            self._decorr_capture.detach()

    def _decorr_warn_once(self, key: str, message: str) -> None:
        if key not in self._decorr_warned:
            self._decorr_warned.add(key)
            warnings.warn(message, stacklevel=3)

    def _decorr_step_samples(self, active: bool, loss: torch.Tensor, inputs) -> tuple[list, list, bool]:
        """This micro-batch's recorded calls (leaves when replayed), their samples, and whether it replays."""
        capture, layers, rows = self._decorr_capture, self._decorr_layers, self.args.per_device_train_batch_size
        calls = capture.sample_calls()
        replay = needs_replay(active, calls)
        try:
            if replay:
                calls = replay_leaves(calls, loss, layers.names)
            elif active:
                check_trainable(calls)
            else:
                calls = [CapturedCall(c.inputs, c.grad, {n: h.detach() for n, h in c.outputs.items()}) for c in calls]
            parts = call_samples(calls, inputs, layers.names, self.decorr_samples, strict=True,
                                 pooling=self.args.decorr_pooling, need_grad=active, warn=self._decorr_warn_once,
                                 ran_without_grad=capture.ran_without_grad,
                                 absent_ok=layers.widths.keys() - capture.ran_without_grad)
            samples = assemble_samples(parts, decoder_side=layers.decoder_side, pooled_rows_bound=rows)
            return calls, layers.complete(samples, loss.device, rows, self._decorr_warn_once), replay
        finally:
            capture.clear()

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """``Trainer.compute_loss`` plus ``(λ_t / s) · Σ_layers P_layer`` in training (see the module docstring).

        Outside training (evaluation, prediction) it is the parent's loss unchanged.
        """
        self._decorr_prepare(model)
        if not (model.training and torch.is_grad_enabled()):
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        replay, self._decorr_replay = self._decorr_replay, None
        check_replay(replay, self.decorr_layer_names)
        with self._decorr_capture.recording("train"):
            result = super().compute_loss(model, inputs, return_outputs=return_outputs,
                                          num_items_in_batch=num_items_in_batch)
        self._decorr_layers.settle_first(self._decorr_capture, self.accelerator, self.args.device)
        loss, outputs = result if return_outputs else (result, None)
        step = self.state.global_step
        weights = layer_weights(self.decorr_layer_names, self.decorr_layer_weight, step)
        active = any(w > 0 for w in weights)
        calls, samples, replay = self._decorr_step_samples(active, loss, inputs)
        self._decorr_micro = (step, self._decorr_micro[1] + 1 if self._decorr_micro[0] == step else 0)
        per_layer, few = self.decorr_engine.penalties(samples, step=step, micro=self._decorr_micro[1],
                                                      compact_cpu_tokens=self.decorr_compact_cpu_tokens)
        divides = trainer_divides_loss(self, num_items_in_batch)
        steps = getattr(self, "current_gradient_accumulation_steps", self.args.gradient_accumulation_steps)
        if active:
            weighted = weights[0] * per_layer.sum() if len(set(weights)) == 1 else (
                per_layer * per_layer.new_tensor(weights)).sum()
            term = weighted if divides else weighted / steps
            if replay:
                loss, self._decorr_replay = attach_replay(loss, term, calls, self._decorr_capture)
            else:
                loss = loss + term.to(loss.dtype)
        task = (result[0] if return_outputs else result).detach()
        self._decorr_window.add((task / steps if divides else task).float(), per_layer.detach().float(), few,
                                sum(weights) / max(1, len(weights)), step)
        if self.decorr_guard_active:
            self.decorr_monitor.observe_loss(loss.detach(), per_layer.detach(), step)
        return (loss, outputs) if return_outputs else loss

    # ---- divergence and logging ------------------------------------------------------------------

    @property
    def decorr_guard_active(self) -> bool:
        """Whether the divergence guard runs: ``decorr_stop_on_nonfinite``, or when unset, ``decorr_weight > 0``.

        With the default settings at ``decorr_weight=0`` the trainer therefore behaves exactly like a plain
        ``Trainer`` (same callbacks, and a NaN loss is logged and trained on as ``Trainer`` does).
        """
        setting = self.args.decorr_stop_on_nonfinite
        return self.args.decorr_weight > 0 if setting is None else setting

    def training_step(self, model, inputs, *args, **kwargs):
        """``Trainer.training_step``; with the guard on, the last micro-batch of each optimizer step also
        records whether the gradient norm (before clipping) is finite, on the device (`hf_decorr.monitor`)."""
        loss = super().training_step(model, inputs, *args, **kwargs)
        if self.decorr_guard_active and sync_gradients_now(self.accelerator):
            self.decorr_monitor.observe_gradients(
                model.parameters(), self.state.global_step, scaled=self.accelerator.scaler is not None,
                device=self.args.device,
            )
        return loss

    def decorr_raise_if_diverged(self, weights: bool, collective: bool = True) -> None:
        """Raise [`DivergenceError`][hf_decorr.DivergenceError] if training has diverged (see `hf_decorr.monitor`).

        Diverged: a non-finite loss, penalty or gradient norm at some optimizer step so far, or, with
        ``weights``, a non-finite trainable parameter now. One host read, and with several processes
        (``collective``) one gather, so that every process stops at the same step. Does nothing when
        the guard is off ([`decorr_guard_active`][hf_decorr.DecorrTrainerMixin.decorr_guard_active]).
        """
        if not self.decorr_guard_active:
            return
        status = self.decorr_monitor.status(self.args.device)
        if weights:
            status[4] = weights_nonfinite(self.model, self.args.device).to(torch.float64)
        if collective and self.accelerator.num_processes > 1:
            status = DivergenceMonitor.combine(self.accelerator.gather(status.unsqueeze(0)))
        error = DivergenceMonitor.error(
            status.tolist(), self.state.global_step, self.args.decorr_weight, self.args.learning_rate,
            self.args.max_grad_norm, scaled=self.accelerator.scaler is not None,
        )
        if error is not None:
            raise error

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """``Trainer.log``; a training log also gets ``task_loss``, ``decorr_loss``, ``decorr_weight`` and
        ``decorr_loss/<layer>``, averaged over the logging window and the processes (one host read)."""
        if "loss" in logs and self._decorr_window.micro:
            window, self._decorr_window = self._decorr_window, LogWindow()
            gather = None
            if self.accelerator.num_processes > 1:
                gather = lambda values: self.accelerator.gather(values.unsqueeze(0)).mean(dim=0)
            values, few = window.flush(self.state.global_step, self.decorr_layer_names,
                                       self.args.decorr_log_per_layer, gather)
            logs.update(values)
            if few:
                self._decorr_warn_once("few", FEW_SAMPLES_WARNING)
        super().log(logs, start_time)

    # ---- evaluation ----------------------------------------------------------------------------

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None, **kwargs):
        """``Trainer.prediction_step``; inside `evaluation_loop()` it also adds each penalised layer's samples
        of every forward call to float64 statistics (the loss stays the task loss)."""
        stats = self._decorr_eval_stats
        if stats is None:
            return super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys, **kwargs)
        self._decorr_prepare(model)
        with self._decorr_capture.recording("eval"):
            result = super().prediction_step(model, inputs, prediction_loss_only, ignore_keys=ignore_keys, **kwargs)
        self._decorr_layers.settle_first(self._decorr_capture, self.accelerator, self.args.device)
        calls = self._decorr_capture.sample_calls()
        self._decorr_capture.clear()
        parts = call_samples(calls, inputs, self.decorr_layer_names, self.decorr_samples,
                             pooling=self.args.decorr_pooling, strict=False, warn=self._decorr_warn_once)
        add_eval_samples(stats, parts, *padded_batch_rows(self.accelerator, inputs), warn=self._decorr_warn_once)
        return result

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        """``Trainer.evaluation_loop`` plus ``{metric_key_prefix}_decorr_*`` metrics (MAPC, CVR, TdV, UD, …) of the
        penalised layers over the whole set, per layer (``…/<layer>``) and averaged
        ([`decorr_metrics_from_stats()`][hf_decorr.DecorrTrainerMixin.decorr_metrics_from_stats])."""
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
        """Sum the statistics over processes, then compute the paper's metrics per layer and their mean
        (`hf_decorr.evaluation.metrics_from_statistics()`); sets `decorr_last_eval_covariances`.

        Every process must call this (it runs collectives when there are several).
        """
        metrics, self.decorr_last_eval_covariances = metrics_from_statistics(
            stats, self.decorr_layer_names, self.accelerator.device, prefix=prefix, top_d=self.args.decorr_top_d,
            variance_share=self.args.decorr_variance_share, per_layer=self.args.decorr_log_per_layer,
            warn=self._decorr_warn_once)
        return metrics

    # ---- saving ------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """``Trainer.save_model`` plus ``decorr_config.json``; refuses ([`DivergenceError`][hf_decorr.DivergenceError])
        to write weights after a divergence or non-finite weights, so nothing diverged is ever saved."""
        # never write non-finite weights (checkpoints come through here too); local check, no collective,
        # so that a save called on the main process only cannot hang
        self.decorr_raise_if_diverged(weights=True, collective=False)
        super().save_model(output_dir, _internal_call=_internal_call)
        if self.args.should_save:
            self.args.save_decorr_config(output_dir if output_dir is not None else str(self.args.output_dir))


class DecorrTrainer(DecorrTrainerMixin, Trainer):
    """``transformers.Trainer`` with the penalty (see [`DecorrTrainerMixin`][hf_decorr.DecorrTrainerMixin])."""


class DecorrSeq2SeqTrainer(DecorrTrainerMixin, Seq2SeqTrainer):
    """``transformers.Seq2SeqTrainer`` with the penalty (see [`DecorrTrainerMixin`][hf_decorr.DecorrTrainerMixin])."""

    decorr_default_arguments_class = DecorrSeq2SeqTrainingArguments
