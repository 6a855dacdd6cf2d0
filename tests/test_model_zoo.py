"""The model zoo (scripts/model_zoo.py): the fast subset of the most used architectures and of the ones that used
to fail, trained with DecorrTrainer as a user would; and the kept sweep over every registered architecture,
rendered as docs/model-zoo.md."""

import json
import os
import subprocess
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


def _run_script(*argv: str, tmp_path) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    return subprocess.run([sys.executable, os.path.join(REPO_ROOT, "scripts", "model_zoo.py"), *argv], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300, env=env)


def test_the_command_line_as_the_page_gives_it(tmp_path):
    """docs/model-zoo.md's commands: --help, --render (the page from the kept file), and a sweep of chosen pairs."""
    proc = _run_script("--help", tmp_path=tmp_path)
    assert proc.returncode == 0 and "--render" in proc.stdout and "--only" in proc.stdout
    page = tmp_path / "page.md"
    proc = _run_script("--render", "--page", str(page), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert page.read_text(encoding="utf-8") == open(PAGE, encoding="utf-8").read()
    out = tmp_path / "zoo.json"
    proc = _run_script("--task", "sequence-classification", "--only", "bert", "--output", str(out), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [(r["model_type"], r["status"]) for r in result["pairs"]] == [("bert", "supported")]


@pytest.mark.parametrize("argv,message", [(["--only", "nosuchmodel"], "--only nosuchmodel: not registered"),
                                          (["--timeout", "0"], "--timeout must be at least 1 second")])
def test_the_command_line_refuses_bad_options(argv, message, tmp_path):
    proc = _run_script(*argv, tmp_path=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr
