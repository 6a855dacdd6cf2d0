"""TRL integration: ``SFTTrainer`` with the covariance penalty.

    from hf_decorr.trl import DecorrSFTConfig, DecorrSFTTrainer

    args = DecorrSFTConfig(output_dir="out", decorr_weight=0.1, decorr_layers=["-1"],
                           decorr_mask="labels")        # completion tokens only (prompt and padding excluded)
    trainer = DecorrSFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)

``DecorrSFTConfig`` is ``SFTConfig`` plus the decorr fields of [`DecorrConfig`][hf_decorr.DecorrConfig]
(the mixin comes first, because ``TrainingArguments.__post_init__`` does not call ``super()``).
``DecorrSFTTrainer`` mixes [`DecorrTrainerMixin`][hf_decorr.DecorrTrainerMixin] into ``SFTTrainer``:
the loss becomes ``SFT loss + λ_t · Σ_layers L_Σ``. TRL's fused LM head returns no hidden states;
the penalty does not need them, since it captures the chosen layers with forward hooks. With
``completion_only_loss`` (the default for prompt-completion data) TRL's collator sets the prompt
tokens' labels to -100, so ``decorr_mask="labels"`` takes the completion tokens as the samples.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

try:
    from trl import SFTConfig, SFTTrainer
except ImportError as err:  # pragma: no cover - exercised only where TRL is absent
    raise ImportError(
        "hf_decorr.trl needs TRL, which is not installed: pip install 'hf-decorr[trl]' (or pip install trl)"
    ) from err

from .config import DecorrConfig
from .model_card import CARD_TAGS
from .trainer import DecorrTrainerMixin

__all__ = ["DecorrSFTConfig", "DecorrSFTTrainer"]


@dataclass
class DecorrSFTConfig(DecorrConfig, SFTConfig):
    """TRL's ``SFTConfig`` plus the decorr settings of [`DecorrConfig`][hf_decorr.DecorrConfig]."""


class DecorrSFTTrainer(DecorrTrainerMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` with the covariance penalty (see [`DecorrTrainerMixin`][hf_decorr.DecorrTrainerMixin])."""

    _tag_names = [*SFTTrainer._tag_names, *CARD_TAGS]

    decorr_default_arguments_class = DecorrSFTConfig

    def create_model_card(  # type: ignore[override]  # TRL's parameter order, which its users call
        self, model_name: str | None = None, dataset_name: str | None = None, tags: str | list[str] | None = None,
        **kwargs: Any,
    ) -> None:
        """``SFTTrainer.create_model_card(model_name, dataset_name, tags)`` in TRL's order, writing hf_decorr's card
        ([`create_model_card()`][hf_decorr.DecorrTrainerMixin.create_model_card], whose other parameters are accepted
        as
        keywords)."""
        DecorrTrainerMixin.create_model_card(self, model_name=model_name, dataset_name=dataset_name, tags=tags,
                                             **kwargs)
