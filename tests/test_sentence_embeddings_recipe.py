"""recipes/sentence_embeddings.py (--quick, merging seeds) and the probe helpers of hf_decorr.app.embedding_probe."""

from __future__ import annotations

import importlib.util
import json
import os
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT

from hf_decorr.app.embedding_probe import accuracy_vs_k, fit_truncation, label_pairs

pytest.importorskip("sentence_transformers")
pytest.importorskip("sklearn")
CONFIG = os.path.join(REPO_ROOT, "recipes", "configs", "sentence_embeddings_minilm.yaml")


def recipe():
    spec = importlib.util.spec_from_file_location("sentence_embeddings",
                                                  os.path.join(REPO_ROOT, "recipes", "sentence_embeddings.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_label_pairs_are_balanced_and_seeded():
    texts = [f"t{i}" for i in range(10)]
    labels = [i % 2 for i in range(10)]
    pairs = label_pairs(texts, labels, 8, seed=3)
    assert sum(pairs["score"]) == 4 and len(pairs["sentence_0"]) == 8
    by_text = dict(zip(texts, labels))
    for a, b, score in zip(pairs["sentence_0"], pairs["sentence_1"], pairs["score"]):
        assert a != b and (by_text[a] == by_text[b]) == (score == 1.0)
    assert label_pairs(texts, labels, 8, seed=3) == pairs != label_pairs(texts, labels, 8, seed=4)


def test_truncations_keep_what_they_claim():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5)) * np.array([0.1, 3.0, 1.0, 0.5, 2.0])
    variance = fit_truncation("variance", x)
    np.testing.assert_array_equal(variance.apply(x, 2), x[:, [1, 4]])  # the two units of largest variance
    np.testing.assert_array_equal(fit_truncation("first", x).apply(x, 3), x[:, :3])
    pca = fit_truncation("pca", x)
    kept = pca.apply(x, 2)
    top = np.linalg.eigvalsh(np.cov(x, rowvar=False))[::-1][:2]
    np.testing.assert_allclose(kept.var(axis=0, ddof=1), top, rtol=1e-10)  # the top principal variances
    with pytest.raises(ValueError, match="truncation 'random' is not valid"):
        fit_truncation("random", x)


def test_probe_uses_dev_for_selection_and_scores_test_once():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 300)
    x = rng.normal(size=(300, 8))
    x[:, 6] += 3 * y  # only unit 6 carries the label; it has the largest variance
    splits = {"train": x[:100], "dev": x[100:200], "test": x[200:]}
    labels = {"train": y[:100], "dev": y[100:200], "test": y[200:]}
    scores = accuracy_vs_k(splits, labels, "variance", [1, 8])
    assert scores[1]["test"] > 0.85 and scores[1]["dev"] > 0.85
    first = accuracy_vs_k(splits, labels, "first", [1])
    assert first[1]["test"] < 0.7  # unit 0 carries nothing


def test_recipe_quick_writes_the_table_and_the_plot(tmp_path, monkeypatch):
    monkeypatch.chdir(REPO_ROOT)
    out = tmp_path / "out"
    results = recipe().main(["--config", CONFIG, "--quick", "--configs", "baseline", "penalty",
                             "--output_dir", str(out)])
    runs = {run["config"]: run for run in results["runs"]}
    assert runs["baseline"]["decorr_weight"] == 0.0 and runs["penalty"]["decorr_weight"] > 0
    assert runs["penalty"]["decorr_layers"] == ["2"]  # the embedding
    assert set(runs["baseline"]["scores"]) == {"variance", "pca"} and set(runs["penalty"]["scores"]) == {"variance"}
    assert runs["penalty"]["eval"]["eval_decorr_samples"] == 2 * 8  # every text of the 8 dev pairs
    table = (out / "accuracy_vs_k.md").read_text()
    assert "| baseline + PCA (first k components) |" in table and "| penalty, top-k units by variance |" in table
    assert (out / "accuracy_vs_k.png").stat().st_size > 0
    saved = json.loads((out / "results.json").read_text())
    assert saved["summary"]["baseline, top-k units by variance"]["8"]["seeds"] == 1

    merged = recipe().main(["--config", CONFIG, "--quick", "--output_dir", str(tmp_path / "merged"),
                            "--from_results", str(out / "results.json"), str(out / "results.json")])
    assert merged["summary"]["penalty, top-k units by variance"][8]["seeds"] == 2
