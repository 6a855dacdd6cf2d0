"""The evaluate metric modules shipped in hf_decorr: offline loading, agreement with hf_decorr.metrics
(decorrelation) and with scikit-learn, which the Hub's ``accuracy`` / ``f1`` modules call."""

import os
import sys

import evaluate
import numpy as np
import pytest
import torch

from hf_decorr.evaluate_metrics import METRIC_MODULES, load, metric_path
from hf_decorr.metrics import CovarianceAccumulator, decorrelation_metrics

sklearn_metrics = pytest.importorskip("sklearn.metrics")


@pytest.fixture(scope="module")
def decorr_metric():
    return load("decorrelation")


def test_modules_load_offline_from_their_folder():
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    for name in METRIC_MODULES:
        assert os.path.isfile(os.path.join(metric_path(name), f"{name}.py"))
        module = evaluate.load(metric_path(name))
        assert isinstance(module, evaluate.Metric)
    with pytest.raises(ValueError, match="unknown hf_decorr metric module 'nope'"):
        metric_path("nope")


def _reference(h: np.ndarray, **kwargs) -> dict:
    acc = CovarianceAccumulator()
    acc.update(torch.from_numpy(h.astype(np.float32).astype(np.float64)))
    return decorrelation_metrics(acc.covariance(), samples=float(acc.count), **kwargs)


def test_decorrelation_module_matches_hf_decorr_metrics(decorr_metric):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(500, 3))
    h = z @ rng.normal(size=(3, 12)) + 0.05 * rng.normal(size=(500, 12))  # 12 units, rank ~3, correlated
    got = decorr_metric.compute(predictions=h.astype(np.float32), top_d=3, variance_share=0.9)
    want = _reference(h, top_d=3, variance_share=0.9)
    assert set(got) == set(want)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-9, abs=1e-12), key
    assert got["samples"] == 500
    assert got["mapc"] > 0.3 and got["pca_ud"] <= 3  # correlated units, a rank-3 code


def test_decorrelation_module_streams_batches(decorr_metric):
    rng = np.random.default_rng(1)
    h = rng.normal(size=(300, 8)).astype(np.float32)
    h[:, 1] += 2 * h[:, 0]
    whole = decorr_metric.compute(predictions=h)
    for start in range(0, 300, 64):
        decorr_metric.add_batch(predictions=h[start: start + 64])
    streamed = decorr_metric.compute(chunk_size=50)
    for key in whole:
        assert streamed[key] == pytest.approx(whole[key], rel=1e-9, abs=1e-12), key


def test_decorrelation_module_on_transformer_hidden_states(decorr_metric):
    """Usable on any hidden states: the non-padding tokens of a BERT layer's output."""
    from transformers import BertConfig, BertModel

    model = BertModel(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=32)).eval()
    ids = torch.randint(5, 50, (4, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[3, 4:] = 0
    with torch.no_grad():
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
    tokens = hidden[mask.bool()].numpy()  # (valid tokens, 16)
    got = decorr_metric.compute(predictions=tokens)
    acc = CovarianceAccumulator()
    acc.update(hidden.reshape(-1, 16), mask.reshape(-1))  # the trainer's masked path
    want = decorrelation_metrics(acc.covariance(), samples=float(acc.count))
    assert got["samples"] == int(mask.sum())
    for key in ("mapc", "cvr", "ud", "cov_l1"):
        assert got[key] == pytest.approx(want[key], rel=1e-5), key


def test_decorrelation_module_rejects_ragged_or_empty(decorr_metric):
    with pytest.raises(ValueError, match="same width"):
        decorr_metric.compute(predictions=[[1.0, 2.0], [1.0, 2.0, 3.0]])
    with pytest.raises(ValueError):
        decorr_metric.compute(predictions=[])


def _cases():
    rng = np.random.default_rng(2)
    for n_classes in (2, 3, 5):
        for weighted in (False, True):
            for _ in range(4):
                n = int(rng.integers(5, 60))
                refs = rng.integers(0, n_classes, n)
                preds = np.where(rng.random(n) < 0.6, refs, rng.integers(0, n_classes, n))
                weights = rng.random(n) * 3 if weighted else None
                yield refs, preds, weights, n_classes


def test_accuracy_module_equals_sklearn():
    accuracy = load("accuracy")
    for refs, preds, weights, _ in _cases():
        for normalize in (True, False):
            got = accuracy.compute(predictions=preds, references=refs, normalize=normalize, sample_weight=weights)
            want = float(sklearn_metrics.accuracy_score(refs, preds, normalize=normalize, sample_weight=weights))
            assert got["accuracy"] == pytest.approx(want, rel=1e-12, abs=1e-12)
    # the Hub module's documented example
    assert accuracy.compute(references=[0, 1, 2, 0, 1, 2], predictions=[0, 1, 1, 2, 1, 0]) == {"accuracy": 0.5}


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
def test_f1_module_equals_sklearn():
    f1 = load("f1")
    checked = 0
    for refs, preds, weights, n_classes in _cases():
        averages = ["macro", "micro", "weighted", None] + (["binary"] if len(np.union1d(refs, preds)) <= 2 else [])
        for average in averages:
            got = f1.compute(predictions=preds, references=refs, average=average, sample_weight=weights)["f1"]
            want = sklearn_metrics.f1_score(refs, preds, average=average, sample_weight=weights, zero_division="warn")
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
            checked += 1
        labels = list(range(n_classes + 1))  # one label absent from the data: a 0 component in the macro mean
        got = f1.compute(predictions=preds, references=refs, labels=labels, average="macro")["f1"]
        assert got == pytest.approx(sklearn_metrics.f1_score(refs, preds, labels=labels, average="macro"), abs=1e-12)
    assert checked > 80
    # class 1 never predicted nor present: 0, as scikit-learn's default zero_division
    assert f1.compute(predictions=[0, 0, 2], references=[0, 2, 2], average=None)["f1"].tolist() == pytest.approx(
        sklearn_metrics.f1_score([0, 2, 2], [0, 0, 2], average=None).tolist()
    )
    assert f1.compute(references=[0, 1, 0, 1, 0], predictions=[0, 0, 1, 1, 0], pos_label=0)["f1"] == pytest.approx(
        sklearn_metrics.f1_score([0, 1, 0, 1, 0], [0, 0, 1, 1, 0], pos_label=0)
    )
    with pytest.raises(ValueError, match="multiclass"):
        f1.compute(predictions=[0, 1, 2], references=[0, 1, 2])


def test_recipe_compute_metrics_uses_the_modules():
    import importlib.util

    from conftest import REPO_ROOT
    from transformers import EvalPrediction

    spec = importlib.util.spec_from_file_location("tc_recipe", os.path.join(REPO_ROOT, "recipes",
                                                                            "text_classification.py"))
    recipe = importlib.util.module_from_spec(spec)
    sys.modules["tc_recipe"] = recipe  # dataclasses look their module up while the class is built
    spec.loader.exec_module(recipe)
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(40, 3))
    labels = rng.integers(0, 3, 40)
    out = recipe.make_compute_metrics()(EvalPrediction(predictions=logits, label_ids=labels))
    preds = logits.argmax(-1)
    assert out["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(labels, preds))
    assert out["f1_macro"] == pytest.approx(sklearn_metrics.f1_score(labels, preds, average="macro"))
