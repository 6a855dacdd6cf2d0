"""Faults and bad input through the recipes (issue 11, cases 1, 2, 3, 6, 7, 8, 9), as a user runs them.

A tiny BERT classifier with a word-level tokenizer and a few rows of SST-2-like data are built
here, so each recipe run takes seconds. Crashes are real: the recipe runs as a subprocess and is
killed with SIGKILL right after a checkpoint is written (a callback added by the test harness
below, not by the product).
"""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import REPO_ROOT

TC = os.path.join(REPO_ROOT, "recipes", "text_classification.py")
CLM = os.path.join(REPO_ROOT, "recipes", "causal_lm.py")
WORDS = [f"w{i}" for i in range(40)]


@pytest.fixture(scope="module")
def tiny_classifier(tmp_path_factory):
    from tiny_models import tiny_word_tokenizer
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = tiny_word_tokenizer(WORDS)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=24, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                        num_labels=2, max_position_embeddings=64, pad_token_id=0)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_classifier")
    BertForSequenceClassification(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def _rows(n, seed):
    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(0, len(WORDS), (int(torch.randint(3, 9, (1,), generator=g)),), generator=g).tolist()
        rows.append((" ".join(WORDS[i] for i in ids), ids[0] % 2))
    return rows


@pytest.fixture(scope="module")
def tsv_data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tsv")
    for name, n, seed in (("train", 32, 0), ("dev", 16, 1)):
        with open(folder / f"{name}.tsv", "w", encoding="utf-8") as f:
            f.write("sentence\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in _rows(n, seed)))
    return str(folder / "train.tsv"), str(folder / "dev.tsv")


def tc_args(model, data, out, *extra):
    train, dev = data
    return ["--model_name_or_path", model, "--train_file", train, "--validation_file", dev, "--output_dir", str(out),
            "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8", "--max_length", "16",
            "--learning_rate", "1e-3", "--max_steps", "6", "--logging_steps", "1", "--save_strategy", "no",
            "--eval_strategy", "no", "--report_to", "none", "--disable_tqdm", "true", "--use_cpu", "true",
            "--seed", "0", "--decorr_layers", "-1", *extra]


# The test harness: run a recipe as a program, optionally with a callback that SIGKILLs the process right
# after the checkpoint of step `kill_after` has been written (on_save runs once the checkpoint is complete).
HARNESS = textwrap.dedent("""
    import os, runpy, signal, sys
    kill_after = int(os.environ.get("FAULT_KILL_AFTER_SAVE", "0"))
    only_weight = os.environ.get("FAULT_KILL_WEIGHT")
    if kill_after:
        import transformers.trainer as trainer_module
        from transformers import TrainerCallback

        class KillAfterSave(TrainerCallback):
            def on_save(self, args, state, control, **kwargs):
                if state.global_step == kill_after and (only_weight is None or
                                                        float(args.decorr_weight) == float(only_weight)):
                    os.kill(os.getpid(), signal.SIGKILL)

        trainer_module.DEFAULT_CALLBACKS.append(KillAfterSave)
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    runpy.run_path(script, run_name="__main__")
""")


def run(script, argv, kill_after=0, kill_weight=None, timeout=300):
    env = {**os.environ, "PYTHONPATH": REPO_ROOT, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "FAULT_KILL_AFTER_SAVE": str(kill_after)}
    env.pop("HF_DECORR_DEBUG", None)
    if kill_weight is not None:
        env["FAULT_KILL_WEIGHT"] = str(kill_weight)
    return subprocess.run([sys.executable, "-c", HARNESS, script, *argv], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO_ROOT, env=env, check=False)


def one_error_line(proc, program="text_classification.py"):
    """The single `<program>: error: ...` line that must end stderr, without a traceback."""
    err = proc.stderr
    assert "Traceback" not in err, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith(f"{program}: error:")]
    assert len(errors) == 1, err[-3000:]
    assert err.strip().splitlines()[-1] == errors[0]
    return errors[0]


def weights(folder):
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


# ------------------------------------------------------------------ case 2: divergence through the recipe


@pytest.mark.parametrize("clip", ["0", "1"])
def test_case2_diverging_recipe_exits_nonzero_with_one_line_and_no_model(tiny_classifier, tsv_data, tmp_path, clip):
    out = tmp_path / "out"
    proc = run(TC, tc_args(tiny_classifier, tsv_data, out, "--decorr_weight", "1e30", "--max_grad_norm", clip,
                           "--learning_rate", "1e-3"))
    assert proc.returncode == 1
    line = one_error_line(proc)
    assert line.startswith("text_classification.py: error: training diverged: ")
    assert "decorr_weight (now 1e+30)" in line
    assert not (out / "model").exists() and not (out / "results.json").exists()
    found = [root for root, dirs, files in os.walk(tmp_path) if "model.safetensors" in files]
    assert found == []  # no model, checkpoint or card anywhere


# ------------------------------------------------------------------ case 1: resume through the recipe


def test_case1_killed_and_resumed_run_equals_the_uninterrupted_one(text_classification, tiny_classifier, tsv_data,
                                                                   tmp_path, capsys):
    common = ["--save_strategy", "steps", "--save_steps", "2", "--decorr_weight", "0.5", "--decorr_warmup_steps", "4"]
    whole = tmp_path / "whole"
    text_classification.main(tc_args(tiny_classifier, tsv_data, whole, *common))

    cut = tmp_path / "cut"
    killed = run(TC, tc_args(tiny_classifier, tsv_data, cut, *common), kill_after=4)
    assert killed.returncode == -signal.SIGKILL
    assert not cut.exists()  # nothing looks finished: the run was in cut.partial
    assert sorted(os.listdir(tmp_path / "cut.partial")) == ["checkpoint-2", "checkpoint-4"]
    shutil.copytree(tmp_path / "cut.partial", tmp_path / "by_path.partial")
    # resuming from a named checkpoint (of the same unfinished run)
    text_classification.main(tc_args(tiny_classifier, tsv_data, tmp_path / "by_path", *common,
                                     "--resume_from_checkpoint", str(tmp_path / "by_path.partial" / "checkpoint-4")))
    c = weights(tmp_path / "by_path" / "model")
    text_classification.main(tc_args(tiny_classifier, tsv_data, cut, *common, "--resume_from_checkpoint", "true"))

    a, b = weights(whole / "model"), weights(cut / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(a[k], c[k]) for k in a)
    ra, rb = (json.loads((folder / "results.json").read_text()) for folder in (whole, cut))
    assert ra["task_loss_log"] == rb["task_loss_log"] and len(ra["task_loss_log"]) == 6
    assert ra["decorr_loss_log"] == rb["decorr_loss_log"]
    assert ra["eval"]["eval_loss"] == rb["eval"]["eval_loss"]
    assert not (tmp_path / "cut.partial").exists()
    # a run that is resumed without any checkpoint left, and a checkpoint path that does not exist: one line
    assert "nothing to resume" in in_process(
        text_classification, tc_args(tiny_classifier, tsv_data, tmp_path / "none", "--resume_from_checkpoint", "true"),
        capsys)
    line = in_process(text_classification, tc_args(tiny_classifier, tsv_data, tmp_path / "none",
                                                   "--resume_from_checkpoint", str(tmp_path / "no-such")), capsys)
    assert "resume_from_checkpoint=" in line and "no such folder" in line


# ------------------------------------------------------------------ case 3: complete or absent


def test_case3_crashed_compare_rerun_leaves_the_old_output_whole(text_classification, tiny_classifier, tsv_data,
                                                                 tmp_path, capsys):
    out = tmp_path / "out"
    text_classification.main(tc_args(tiny_classifier, tsv_data, out, "--compare_baseline", "--decorr_weight", "0.5"))
    before = {path: (out / path).read_bytes() for path in ("comparison.json", "comparison.md",
                                                           "baseline/model/model.safetensors",
                                                           "decorr/model/model.safetensors",
                                                           "baseline/results.json", "decorr/results.json")}
    listing = sorted(os.path.relpath(os.path.join(r, f), out) for r, _, fs in os.walk(out) for f in fs)
    # a re-run with other settings is killed in its penalised run, after its baseline run has finished
    second = run(TC, tc_args(tiny_classifier, tsv_data, out, "--compare_baseline", "--decorr_weight", "0.7",
                             "--save_strategy", "steps", "--save_steps", "2", "--seed", "1"),
                 kill_after=2, kill_weight=0.7)
    assert second.returncode == -signal.SIGKILL
    after = sorted(os.path.relpath(os.path.join(r, f), out) for r, _, fs in os.walk(out) for f in fs)
    assert after == listing  # not one new file beside the old ones
    assert all((out / path).read_bytes() == content for path, content in before.items())
    assert (tmp_path / "out.partial" / "baseline" / "model").is_dir()  # the unfinished run, named as such
    # a crash that Python sees (divergence in the penalised run) leaves the old output whole too
    line = in_process(text_classification, tc_args(tiny_classifier, tsv_data, out, "--compare_baseline",
                                                   "--decorr_weight", "1e30", "--max_grad_norm", "0"), capsys)
    assert "training diverged" in line
    assert all((out / path).read_bytes() == content for path, content in before.items())
    # and a completed re-run replaces the whole folder at once
    text_classification.main(tc_args(tiny_classifier, tsv_data, out, "--compare_baseline", "--decorr_weight", "0.7",
                                     "--seed", "1"))
    summary = json.loads((out / "comparison.json").read_text())
    assert [row["decorr_weight"] for row in summary["runs"]] == [0.0, 0.7]
    assert json.loads((out / "decorr" / "results.json").read_text())["decorr_weight"] == 0.7
    new_baseline = (out / "baseline" / "model" / "model.safetensors").read_bytes()
    assert new_baseline != before["baseline/model/model.safetensors"]  # seed 1: a new baseline
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no partial or old folder left


# ------------------------------------------------------------------ cases 6-9: bad input, one line each


@pytest.fixture(scope="module")
def text_classification():
    import importlib.util

    spec = importlib.util.spec_from_file_location("recipe_tc_faults", TC)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def in_process(recipe, argv, capsys, code=1):
    from hf_decorr.app.parser import run_recipe

    with pytest.raises(SystemExit) as info:
        run_recipe(recipe.main, argv)
    assert info.value.code == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if " error: " in line]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err[-2000:]
    return lines[0]


@pytest.mark.parametrize("value", ["0", "1", "-5"])
def test_case6_max_length_below_two_is_refused_at_parse_time(text_classification, tiny_classifier, tsv_data,
                                                              tmp_path, capsys, value):
    argv = tc_args("/no/such/model", tsv_data, tmp_path / "o", "--max_length", value)  # parse errors come first
    line = in_process(text_classification, argv, capsys, code=2)
    assert f"max_length={value} " in line and "at least 2" in line


def test_case7_output_dir_that_is_a_file_or_read_only_is_one_line_before_data(text_classification, tiny_classifier,
                                                                             tsv_data, tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    bad_data = (str(tmp_path / "missing.tsv"), tsv_data[1])  # the output check comes before the data
    line = in_process(text_classification, tc_args(tiny_classifier, bad_data, a_file), capsys)
    assert f"output_dir={str(a_file)!r} is a file" in line
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        target = locked / "out"
    else:  # root writes into any folder of an ordinary file system; /proc refuses new folders even to root
        locked, target = None, "/proc/hf_decorr_test/out"
    try:
        line = in_process(text_classification, tc_args(tiny_classifier, bad_data, target), capsys)
        assert f"output_dir={str(target)!r} cannot be written" in line
    finally:
        if locked is not None:
            locked.chmod(0o755)


def test_case7_disk_full_at_the_final_save_is_one_line(text_classification, tiny_classifier, tsv_data, tmp_path,
                                                       capsys, monkeypatch):
    from transformers import PreTrainedModel

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(PreTrainedModel, "save_pretrained", full)
    out = tmp_path / "out"
    line = in_process(text_classification, tc_args(tiny_classifier, tsv_data, out), capsys)
    assert "No space left on device" in line and "cannot write" in line
    assert not (out / "model").exists()


def test_case7_corpus_shorter_than_one_block_is_one_line(tmp_path, capsys):
    import importlib.util

    from tiny_models import tiny_word_tokenizer

    spec = importlib.util.spec_from_file_location("recipe_clm_faults", CLM)
    causal_lm = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = causal_lm
    spec.loader.exec_module(causal_lm)
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_word_tokenizer(WORDS)
    model_dir = tmp_path / "llama"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2,
                                 max_position_embeddings=64, pad_token_id=0)).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("w1 w2 w3\nw4 w5\n")
    argv = ["--model_name_or_path", str(model_dir), "--train_file", str(corpus), "--output_dir", str(tmp_path / "o"),
            "--block_size", "32", "--max_steps", "1", "--report_to", "none", "--use_cpu", "true"]
    line = in_process(causal_lm, argv, capsys)
    assert "fewer than block_size=32 tokens" in line


def _write(path, data: bytes):
    path.write_bytes(data)
    return str(path)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.jsonl", b"", "is empty"),
        ("blank.jsonl", b"\n\n", "is empty"),
        ("header.tsv", b"sentence\tlabel\n", "has a header (sentence, label) but no rows"),
        ("header.csv", b"sentence,label\n", "has a header (sentence, label) but no rows"),
        ("latin1.tsv", "sentence\tlabel\ncaf\u00e9 w1\t1\nw2 w3\t0\n".encode("latin-1"),
         "is not UTF-8 text: byte 0xe9 at offset 18 (line 2)"),
    ],
)
def test_case8_data_errors_name_the_real_cause(text_classification, tiny_classifier, tsv_data, tmp_path, capsys,
                                              name, content, message):
    path = _write(tmp_path / name, content)
    line = in_process(text_classification, tc_args(tiny_classifier, (path, tsv_data[1]), tmp_path / "o"), capsys)
    assert f"train_file={path!r}" in line and message in line, line


def test_case9_missing_or_empty_texts_are_refused_with_a_count(text_classification, tiny_classifier, tsv_data,
                                                               tmp_path, capsys):
    rows = [{"sentence": "w1 w2", "label": 0}, {"sentence": None, "label": 1}, {"sentence": "  ", "label": 0},
            {"sentence": "w3", "label": 1}, {"sentence": "", "label": 1}]
    path = tmp_path / "holes.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    line = in_process(text_classification, tc_args(tiny_classifier, (str(path), tsv_data[1]), tmp_path / "o"),
                      capsys)
    assert "text_column='sentence': 3 of the 5 rows of the 'train' split are missing or empty (rows 1, 2, 4)" in line
