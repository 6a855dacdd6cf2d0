"""sentence-transformers as a first-class client: the penalty in ``SentenceTransformerTrainer``.

Needs sentence-transformers (``pip install "hf-decorr[sentence-transformers]"``)::

    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    from hf_decorr.sentence_transformers import (
        DecorrSentenceTransformerTrainer, DecorrSentenceTransformerTrainingArguments)

    model = SentenceTransformer("sentence-transformers/all-MiniLM-L6-v2")
    args = DecorrSentenceTransformerTrainingArguments(
        output_dir="out", decorr_weight=3e4, decorr_layers=["embedding"])
    trainer = DecorrSentenceTransformerTrainer(
        model=model, args=args, train_dataset=pairs, loss=MultipleNegativesRankingLoss(model))
    trainer.train()

**Samples.** sentence-transformers runs the model once per text column of a batch (and once per
mini-batch with the cached losses), each call with its own padding. The samples of one step are
the valid samples of *every* call of the model in that step, pooled with that call's own
attention mask, in one covariance: for token samples every non-padding token of every text of
the batch, for the embedding one row per text. In training, calls made without autograd (the
first pass of ``CachedMultipleNegativesRankingLoss`` & co.) are left out when a grad-enabled
call exists; when there is none (cached losses), the penalty's gradient reaches the model
through the loss's own grad-enabled replay of those calls during ``backward``.

**Layers** (``decorr_layers``) are resolved on the ``SentenceTransformer``; names are relative to
it (``0.model.encoder.layer.5`` for the BERT inside ``Transformer`` module ``0``). Besides the forms of
[`hf_decorr.resolve_layers()`][hf_decorr.resolve_layers] (``last``, ``all``, ``-1``, globs), two names address the
sentence embedding, one ``(B, p)`` sample per text:

* ``"embedding"``: the embedding ``encode`` returns (the output of the last module, e.g. after
  ``Dense`` and ``Normalize``); the default of
  [`DecorrSentenceTransformerTrainingArguments`][hf_decorr.sentence_transformers.DecorrSentenceTransformerTrainingArguments].
* ``"pooled"``: the output of the ``Pooling`` module (before ``Dense`` / ``Normalize``).

``last`` (or ``-1``) penalises the token outputs of the transformer's last block instead.

**λ.** L_Σ of a normalised 384-d embedding is small (about 3·10⁻⁴ on MiniLM, with a gradient about
10⁻⁵ of the task loss's), so useful λ for ``"embedding"`` are large (10⁴–10⁵), unlike the
token-level default of 1.

**Outputs.** The model card written by sentence-transformers carries the ``hf-decorr`` tag and
every ``decorr_*`` setting among its hyperparameters; ``decorr_config.json`` is saved beside
the model (also in checkpoints). The saved folder loads with plain ``SentenceTransformer``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

try:
    from sentence_transformers import (
        SentenceTransformerTrainer,
        SentenceTransformerTrainingArguments,
    )
except ImportError as err:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "hf_decorr.sentence_transformers needs sentence-transformers: pip install 'hf-decorr[sentence-transformers]'"
    ) from err

from torch import nn

from .capture import resolve_layers
from .config import DecorrConfig
from .trainer import MODEL_TAG, DecorrTrainerMixin

__all__ = [
    "EMBEDDING_SPECS",
    "DecorrSentenceTransformerTrainer",
    "DecorrSentenceTransformerTrainingArguments",
    "resolve_sentence_transformer_layers",
]

EMBEDDING_SPECS = ("embedding", "pooled")
"""The ``decorr_layers`` names of the sentence embedding: ``"embedding"`` (what ``encode`` returns) and
``"pooled"`` (the ``Pooling`` module's output)."""


@dataclass
class DecorrSentenceTransformerTrainingArguments(DecorrConfig, SentenceTransformerTrainingArguments):
    """``SentenceTransformerTrainingArguments`` plus the decorr settings of [`DecorrConfig`][hf_decorr.DecorrConfig].

    ``decorr_layers`` defaults to ``["embedding"]``: the sentence embedding ``encode`` returns.
    """

    decorr_layers: list[str] = field(
        default_factory=lambda: ["embedding"],
        metadata={
            "help": "Layers to penalise: 'embedding' (the sentence embedding encode returns), 'pooled' (the Pooling "
            "module's output), 'last', 'all', indices into the transformer's blocks ('-1'), or module-name globs."
        },
    )


def _is_pooling(module: nn.Module) -> bool:
    return type(module).__name__ == "Pooling"


def resolve_sentence_transformer_layers(model: nn.Module, specs: list[str]) -> tuple[list[str], dict[str, str]]:
    """``decorr_layers`` of a ``SentenceTransformer`` → module names and the output key of each.

    The ``SentenceTransformer`` is an ``nn.Sequential`` of modules (``0`` the transformer, then
    ``Pooling``, ``Dense``, ``Normalize``, ...) that pass a features dict along; a top-level
    module's output is read at ``"token_embeddings"`` before the ``Pooling`` module and at
    ``"sentence_embedding"`` from it on. Returns ``(names, output_keys)``.
    """
    children = list(model.named_children())
    pooling_at = next((i for i, (_, m) in enumerate(children) if _is_pooling(m)), None)
    keys: dict[str, str] = {}
    for i, (name, _) in enumerate(children):
        keys[name] = "sentence_embedding" if pooling_at is not None and i >= pooling_at else "token_embeddings"
    names: list[str] = []
    rest: list[str] = []
    for spec in specs:
        if spec in EMBEDDING_SPECS:
            if pooling_at is None:
                raise ValueError(
                    f"decorr_layers entry {spec!r} needs a Pooling module in the SentenceTransformer, which has none "
                    f"(its modules: {', '.join(f'{n} ({type(m).__name__})' for n, m in children)}); give module names"
                )
            names.append(children[pooling_at][0] if spec == "pooled" else children[-1][0])
        else:
            rest.append(spec)
    if rest:
        names += resolve_layers(model, rest)
    names = list(dict.fromkeys(names))
    return names, {name: keys[name] for name in names if name in keys}


class DecorrSentenceTransformerTrainer(DecorrTrainerMixin, SentenceTransformerTrainer):
    """``SentenceTransformerTrainer`` with the covariance penalty (see the module docstring).

    ``args`` must be a ``DecorrSentenceTransformerTrainingArguments`` (below). Everything else is
    the ``SentenceTransformerTrainer`` API (datasets with text columns, any sentence-transformers
    loss, evaluators); the logs add ``task_loss``, ``decorr_loss``, ``decorr_weight`` and the
    evaluation adds ``eval_decorr_*`` metrics over every call of the model on the eval set.
    """

    args: DecorrSentenceTransformerTrainingArguments
    training_args_class = DecorrSentenceTransformerTrainingArguments
    decorr_default_arguments_class = DecorrSentenceTransformerTrainingArguments

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        card = getattr(self.model, "model_card_data", None)
        if card is not None:
            card.add_tags([MODEL_TAG, "decorrelation", "covariance-penalty"])

    def decorr_resolve_layers(self, model: nn.Module) -> tuple[list[str], dict[str, str]]:
        """``decorr_layers`` resolved on the ``SentenceTransformer`` (``"embedding"`` and ``"pooled"`` included)."""
        return resolve_sentence_transformer_layers(model, list(self.args.decorr_layers))
