"""SetFit: the covariance penalty in SetFit's embedding phase.

``setfit.Trainer`` is not a ``transformers.Trainer``, so [`DecorrTrainerMixin`][hf_decorr.DecorrTrainerMixin]
cannot be mixed into it (that raises ``TypeError``). SetFit trains in two phases: the embedding
phase fine-tunes the ``SentenceTransformer`` body on pairs with a sentence-transformers trainer
that SetFit builds itself (``trainer.st_trainer``, with its own training arguments derived from
SetFit's), then the classifier head is fitted on the embeddings.
[`decorr_setfit_trainer()`][hf_decorr.setfit.decorr_setfit_trainer]
rebuilds that inner trainer as a decorr trainer, so the embedding phase trains with
``task loss + λ · Σ_layers L_Σ``; the head phase is unchanged::

    from setfit import SetFitModel, Trainer, TrainingArguments
    from hf_decorr.setfit import decorr_setfit_trainer

    trainer = Trainer(model=SetFitModel.from_pretrained(path), args=TrainingArguments(...),
                      train_dataset=few_shot)
    decorr_setfit_trainer(trainer, decorr_weight=3e4, decorr_layers=["embedding"])
    trainer.train()

Needs setfit (``pip install setfit``). The settings are [`DecorrConfig`][hf_decorr.DecorrConfig]'s fields
(``decorr_layers`` as in [`hf_decorr.sentence_transformers`][hf_decorr.sentence_transformers]: ``"embedding"`` by
default).
"""

from __future__ import annotations

import dataclasses
from typing import Any

try:
    import setfit
    import setfit.trainer as _setfit_trainer
except ImportError as err:  # pragma: no cover - exercised only without setfit
    raise ImportError("hf_decorr.setfit needs SetFit: pip install setfit") from err

from .config import DecorrConfig
from .sentence_transformers import (
    DecorrSentenceTransformerTrainingArguments,
    resolve_sentence_transformer_layers,
)
from .trainer import DecorrTrainerMixin

__all__ = ["DecorrSetFitEmbeddingTrainer", "decorr_setfit_trainer", "FOREIGN_TRAINER_HINT"]

FOREIGN_TRAINER_HINT = (
    "For SetFit, keep setfit.Trainer and call hf_decorr.setfit.decorr_setfit_trainer(trainer, decorr_weight=...), "
    "which makes its embedding phase (a sentence-transformers trainer) train with the penalty."
)
"""What the error says to a user who mixes ``DecorrTrainerMixin`` into ``setfit.Trainer``: use
[`decorr_setfit_trainer()`][hf_decorr.setfit.decorr_setfit_trainer] instead."""

_DECORR_FIELDS = {f.name for f in dataclasses.fields(DecorrConfig)}


class DecorrSetFitEmbeddingTrainer(DecorrTrainerMixin, _setfit_trainer.BCSentenceTransformersTrainer):
    """SetFit's inner sentence-transformers trainer (``BCSentenceTransformersTrainer``) with the penalty."""

    def decorr_resolve_layers(self, model):
        """``decorr_layers`` resolved on SetFit's ``SentenceTransformer`` (``"embedding"``, ``"pooled"`` included).

        Returns ``(names, output_keys)`` as
        [`hf_decorr.DecorrTrainerMixin.decorr_resolve_layers()`][hf_decorr.DecorrTrainerMixin.decorr_resolve_layers].
        """
        return resolve_sentence_transformer_layers(model, list(self.args.decorr_layers))


def decorr_setfit_trainer(trainer: setfit.Trainer, **decorr_settings: Any) -> setfit.Trainer:
    """Make ``trainer``'s embedding phase train with the penalty; returns ``trainer``.

    ``decorr_settings`` are fields of [`DecorrConfig`][hf_decorr.DecorrConfig] (``decorr_weight``,
    ``decorr_layers``, ``decorr_penalty``, ...), validated as in the training arguments. The
    inner trainer ``trainer.st_trainer`` is rebuilt (SetFit builds it with its own arguments),
    keeping SetFit's callbacks; call this once, after building ``trainer`` and before ``train``.
    """
    if not isinstance(trainer, setfit.Trainer):
        raise TypeError(f"decorr_setfit_trainer needs a setfit.Trainer, got {type(trainer).__name__}")
    unknown = sorted(set(decorr_settings) - _DECORR_FIELDS)
    if unknown:
        raise TypeError(f"decorr_setfit_trainer: unknown decorr settings {unknown}; valid: {sorted(_DECORR_FIELDS)}")
    old = trainer.st_trainer
    if getattr(old, "decorr_layer_names", None) is not None:
        raise RuntimeError("decorr_setfit_trainer was already applied to this trainer")

    def arguments(**kwargs: Any) -> DecorrSentenceTransformerTrainingArguments:
        return DecorrSentenceTransformerTrainingArguments(**kwargs, **decorr_settings)

    # SetFit's BCSentenceTransformersTrainer builds its arguments with this module-level name
    original = _setfit_trainer.SentenceTransformerTrainingArguments
    _setfit_trainer.SentenceTransformerTrainingArguments = arguments
    try:
        new = DecorrSetFitEmbeddingTrainer(setfit_model=trainer.model, setfit_args=trainer.args, callbacks=[])
    finally:
        _setfit_trainer.SentenceTransformerTrainingArguments = original
    present = {type(callback) for callback in new.callback_handler.callbacks}
    for callback in old.callback_handler.callbacks:
        if type(callback) not in present:
            new.add_callback(callback)
    trainer.st_trainer = new
    return trainer
