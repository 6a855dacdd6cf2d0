"""The model zoo (scripts/model_zoo.py): the fast subset of the most used architectures and of the ones that used
to fail, trained with DecorrTrainer as a user would; and the kept sweep over every registered architecture,
rendered as docs/model-zoo.md."""

import json
import os
import sys

import pytest
from conftest import REPO_ROOT

sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))
import model_zoo  # noqa: E402

RESULT = os.path.join(REPO_ROOT, "docs", "results", "model_zoo.json")
PAGE = os.path.join(REPO_ROOT, "docs", "model-zoo.md")


@pytest.mark.parametrize("task,model_type", model_zoo.CI_SUBSET, ids=[f"{t}:{m}" for t, m in model_zoo.CI_SUBSET])
def test_the_subset_trains_with_the_penalty(task, model_type):
    """The control trains; last and all train, log a finite positive penalty every step, change the weights
    against the control's (same seed, same data) and evaluate with finite decorrelation metrics."""
    result = model_zoo.check_pair(task, model_type)
    assert result.status == "supported", f"{task} {model_type}: {result.status}: {result.reason}"
    assert result.layers["last"] and set(result.layers["last"]) <= set(result.layers["all"])


def test_a_pair_whose_penalty_trains_nothing_is_not_supported(monkeypatch):
    """The harness can fail: with the penalty's weight forced to 0 the weights equal the control's."""
    from hf_decorr import DecorrTrainer

    monkeypatch.setattr(DecorrTrainer, "decorr_layer_weight", lambda self, layer, step: 0.0)
    result = model_zoo.check_pair("sequence-classification", "bert")
    assert result.status == "fails" and "the penalty trained nothing" in result.reason


def load_result() -> dict:
    with open(RESULT, encoding="utf-8") as f:
        return json.load(f)


def test_the_kept_sweep_meets_the_bar():
    """At least 99% of the pairs that the plain Trainer trains are supported; every refused one has a one-line
    reason that says what to set instead."""
    payload = load_result()
    counted = [r for r in payload["pairs"] if r["status"] in ("supported", "fails")]
    supported = [r for r in counted if r["status"] == "supported"]
    assert len(counted) >= 300 and len(supported) / len(counted) >= 0.99
    for r in counted:
        if r["status"] == "fails":
            assert "\n" not in r["reason"] and "decorr_" in r["reason"], r
    families = {r["task"] for r in counted}
    assert len(families) >= 5
    for family, counts in model_zoo.summary(payload["pairs"]).items():
        assert payload["summary"][family] == counts


def test_the_support_page_is_the_rendered_result():
    with open(PAGE, encoding="utf-8") as f:
        assert f.read() == model_zoo.render(load_result()), "run: python scripts/model_zoo.py --render"


@pytest.mark.slow
def test_the_whole_sweep_again(tmp_path):
    """The full sweep on the installed transformers (about 7 minutes): the same bar as the kept result."""
    output = tmp_path / "zoo.json"
    assert model_zoo.main(["--output", str(output)]) == 0
    payload = json.loads(output.read_text())
    counted = [r for r in payload["pairs"] if r["status"] in ("supported", "fails")]
    assert sum(r["status"] == "supported" for r in counted) / len(counted) >= 0.99
