"""Model card and Hub push: what exactly would be uploaded, that it loads with plain transformers and gives
the trained model's logits, and that a failed push leaves the local output complete. There is no Hub here:
``HfApi`` is patched at the network boundary (``create_repo`` / ``upload_folder``)."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import huggingface_hub
import pytest
import torch
from conftest import REPO_ROOT
from huggingface_hub import ModelCard
from huggingface_hub.hf_api import DEFAULT_IGNORE_PATTERNS
from huggingface_hub.utils import filter_repo_objects

from hf_decorr.app.hub import UPLOAD_IGNORE_PATTERNS, push_folder_to_hub
from hf_decorr.model_card import decorr_model_card, write_model_card

SENTENCES = ["a charming and often affecting journey .", "unflinchingly bleak and desperate", "it 's a mess ."]


def load_recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"recipe_{name}", os.path.join(REPO_ROOT, "recipes", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    """A 2-layer BERT classifier with a word-level vocabulary of the shipped SST-2 data, saved locally."""
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    root = tmp_path_factory.mktemp("tiny_bert")
    words = set()
    for name in ("train.tsv", "dev.tsv"):
        with open(os.path.join(REPO_ROOT, "recipes", "data", "sst2", name), encoding="utf-8") as f:
            for line in list(f)[1:200]:
                words.update(line.split("\t")[0].split())
    for sentence in SENTENCES:
        words.update(sentence.split())
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *sorted(words)]
    (root / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = BertTokenizerFast(vocab_file=str(root / "vocab.txt"), do_lower_case=True)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64, num_labels=2)
    torch.manual_seed(0)
    model_dir = root / "model"
    BertForSequenceClassification(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    return str(model_dir)


@pytest.fixture()
def tiny_data(tmp_path):
    """64 training and 32 validation rows of the shipped SST-2 files."""
    paths = {}
    for name, rows in (("train.tsv", 64), ("dev.tsv", 32)):
        with open(os.path.join(REPO_ROOT, "recipes", "data", "sst2", name), encoding="utf-8") as f:
            lines = list(f)[: rows + 1]
        (tmp_path / name).write_text("".join(lines), encoding="utf-8")
        paths[name] = str(tmp_path / name)
    return paths


class FakeHub:
    """Stands in for the Hub: records create_repo / upload_folder calls and copies what would be uploaded."""

    def __init__(self, remote_root):
        self.remote_root = remote_root
        self.calls = []
        self.uploaded: dict[str, list[str]] = {}

    def install(self, monkeypatch):
        hub = self

        def create_repo(api, repo_id, **kwargs):
            hub.calls.append(("create_repo", repo_id, kwargs))
            return huggingface_hub.RepoUrl(f"https://huggingface.co/{repo_id}")

        def upload_folder(api, *, repo_id, folder_path, **kwargs):
            hub.calls.append(("upload_folder", repo_id, kwargs))
            # the same filter upload_folder applies: our ignore patterns plus the library's defaults (.git, …)
            ignore = list(kwargs.get("ignore_patterns") or []) + list(DEFAULT_IGNORE_PATTERNS)
            paths = sorted(
                os.path.relpath(os.path.join(root, name), folder_path).replace(os.sep, "/")
                for root, _, names in os.walk(folder_path) for name in names
            )
            files = list(filter_repo_objects(paths, ignore_patterns=ignore))
            target = os.path.join(hub.remote_root, repo_id.replace("/", "__"))
            for rel in files:
                os.makedirs(os.path.dirname(os.path.join(target, rel)), exist_ok=True)
                shutil.copyfile(os.path.join(folder_path, rel), os.path.join(target, rel))
            hub.uploaded[repo_id] = files
            return f"https://huggingface.co/{repo_id}/commit/0"

        monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
        monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
        return self

    def remote(self, repo_id):
        return os.path.join(self.remote_root, repo_id.replace("/", "__"))


def _card(**overrides):
    settings = {"decorr_weight": 0.3, "decorr_layers": ["-2", "-1"], "decorr_penalty": "cov_l1",
                "decorr_pooling": "tokens", "decorr_mask": "attention_mask", "decorr_warmup_steps": 0,
                "decorr_sync": "global", "hf_decorr_version": "0.1.0"}
    layers = ["bert.encoder.layer.4", "bert.encoder.layer.5"]
    metrics = {"eval_loss": 0.41, "eval_accuracy": 0.8125, "eval_f1_macro": 0.8099, "eval_decorr_mapc": 0.0345,
               "eval_decorr_cvr": 9.87, "eval_decorr_mapc/bert.encoder.layer.4": 0.0412,
               "eval_decorr_mapc/bert.encoder.layer.5": 0.0278, "eval_decorr_ud/bert.encoder.layer.5": 141.0}
    kwargs = dict(model_name="me/minilm-sst2-decorr", decorr_settings=settings, layer_names=layers, metrics=metrics,
                  task="text-classification", base_model="sentence-transformers/all-MiniLM-L6-v2",
                  training={"learning rate": 1e-4, "seed": 42}, command="python recipes/text_classification.py --x")
    kwargs.update(overrides)
    return decorr_model_card(**kwargs)


def test_model_card_content():
    card = _card()
    text = str(card)
    data = ModelCard(text).data.to_dict()  # round trip through the card's YAML header
    assert "hf-decorr" in data["tags"]
    assert data["library_name"] == "transformers"
    assert data["pipeline_tag"] == "text-classification"
    assert data["base_model"] == "sentence-transformers/all-MiniLM-L6-v2"
    assert "L_\\Sigma(H) = \\frac{1}{p^2} \\sum_{i,j} |C_{ij}|" in text  # the formula
    assert "| λ (`decorr_weight`) | 0.3 |" in text
    assert "| layers (`decorr_layers`) | `-2`, `-1` |" in text
    assert "`bert.encoder.layer.4`, `bert.encoder.layer.5`" in text
    assert "| penalty (`decorr_penalty`) | cov_l1 |" in text
    assert "| pooling (`decorr_pooling`) | tokens |" in text
    assert "| eval_accuracy | 0.8125 |" in text and "| eval_f1_macro | 0.8099 |" in text
    # decorrelation metrics: the mean row and one row per layer, values in place
    assert "| `mean over layers` | 0.0345 | 9.87 |" in text
    assert "| `bert.encoder.layer.4` | 0.0412 |" in text
    assert "| `bert.encoder.layer.5` | 0.0278 | – | 141 |" in text
    assert "python recipes/text_classification.py --x" in text
    assert 'AutoModelForSequenceClassification.from_pretrained("me/minilm-sst2-decorr")' in text
    assert "unregularised baseline" not in text


def test_model_card_baseline_and_local_base_model():
    card = _card(base_model="/some/local/folder", decorr_settings={"decorr_weight": 0.0, "decorr_layers": ["-1"]},
                 datasets=["nyu-mll/glue", "./local/data"])
    data = ModelCard(str(card)).data.to_dict()
    assert "base_model" not in data  # a local path is no Hub id
    assert data["datasets"] == ["nyu-mll/glue"]
    assert "λ = 0: this is the unregularised baseline" in str(card)


def test_push_uploads_exactly_the_finished_folder(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "decorr_config.json", "model.safetensors", "tokenizer.json"):
        (folder / name).write_text("{}")
    write_model_card(folder, _card())
    for junk in ("checkpoint-5/model.safetensors", "runs/events.out", ".README.md.abc.tmp", "sub/.hidden"):
        (folder / junk).parent.mkdir(parents=True, exist_ok=True)
        (folder / junk).write_text("x")
    hub = FakeHub(str(tmp_path / "remote")).install(monkeypatch)
    result = push_folder_to_hub(folder, "me/tiny", private=True)
    assert result.ok and result.url == "https://huggingface.co/me/tiny"
    expected = ["README.md", "config.json", "decorr_config.json", "model.safetensors", "tokenizer.json"]
    assert hub.uploaded["me/tiny"] == expected
    assert result.files == expected
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"]
    assert hub.calls[0][2]["private"] is True and hub.calls[0][2]["exist_ok"] is True
    assert hub.calls[1][2]["ignore_patterns"] == UPLOAD_IGNORE_PATTERNS


def test_push_refuses_an_unfinished_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="lacks decorr_config.json, README.md"):
        push_folder_to_hub(tmp_path, "me/tiny")


def test_push_failure_is_reported_not_raised(tmp_path, monkeypatch):
    folder = tmp_path / "model"
    folder.mkdir()
    for name in ("config.json", "decorr_config.json"):
        (folder / name).write_text("{}")
    write_model_card(folder, _card())

    def broken(api, repo_id, **kwargs):
        raise ConnectionError("Failed to resolve 'huggingface.co'")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", broken)
    result = push_folder_to_hub(folder, "me/tiny")
    assert not result.ok
    assert result.error == "ConnectionError: Failed to resolve 'huggingface.co'"
    assert sorted(os.listdir(folder)) == ["README.md", "config.json", "decorr_config.json"]


def _common_args(tiny_bert, tiny_data, out):
    return ["--model_name_or_path", tiny_bert, "--train_file", tiny_data["train.tsv"],
            "--validation_file", tiny_data["dev.tsv"], "--output_dir", str(out), "--max_length", "32",
            "--num_train_epochs", "1", "--per_device_train_batch_size", "16", "--learning_rate", "1e-3",
            "--decorr_weight", "0.5", "--decorr_layers", "-1", "--report_to", "none", "--save_strategy", "no",
            "--disable_tqdm", "true", "--dataloader_pin_memory", "false", "--class_names", "negative", "positive"]


def test_recipe_push_loads_with_plain_transformers_and_same_logits(tiny_bert, tiny_data, tmp_path, monkeypatch):
    recipe = load_recipe("text_classification")
    trained = []

    class RecordingTrainer(recipe.DecorrTrainer):
        def train(self, *args, **kwargs):
            trained.append(self)
            return super().train(*args, **kwargs)

    monkeypatch.setattr(recipe, "DecorrTrainer", RecordingTrainer)
    hub = FakeHub(str(tmp_path / "remote")).install(monkeypatch)
    secret = "hf_notarealtoken1234567890"
    argv = _common_args(tiny_bert, tiny_data, tmp_path / "out") + [
        "--push_to_hub", "--hub_model_id", "me/tiny-sst2-decorr", "--hub_token", secret]
    summary = recipe.main(argv)
    assert summary["push"]["ok"] is True

    local = tmp_path / "out" / "model"
    uploaded = hub.uploaded["me/tiny-sst2-decorr"]
    assert uploaded == sorted(os.listdir(local))  # the whole finished folder, nothing else
    for name in ("config.json", "model.safetensors", "tokenizer.json", "decorr_config.json", "README.md"):
        assert name in uploaded
    remote = hub.remote("me/tiny-sst2-decorr")
    with open(os.path.join(remote, "decorr_config.json")) as f:
        assert json.load(f)["decorr_weight"] == 0.5
    card = ModelCard.load(os.path.join(remote, "README.md"))
    assert "hf-decorr" in card.data.tags
    assert "eval_accuracy" in card.text and "| λ (`decorr_weight`) | 0.5 |" in card.text
    # the token is never written or printed
    for root, _, names in os.walk(tmp_path / "out"):
        for name in names:
            with open(os.path.join(root, name), "rb") as f:
                assert secret.encode() not in f.read(), name

    # plain transformers, in a process that never imports hf_decorr
    script = (
        "import json, sys, torch\n"
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n"
        "path = sys.argv[1]\n"
        "model = AutoModelForSequenceClassification.from_pretrained(path).eval()\n"
        "tok = AutoTokenizer.from_pretrained(path)\n"
        f"enc = tok({SENTENCES!r}, padding=True, return_tensors='pt')\n"
        "with torch.no_grad():\n"
        "    logits = model(**enc).logits\n"
        "print(json.dumps({'logits': logits.tolist(), 'labels': model.config.id2label,\n"
        "                  'hf_decorr': any(m.startswith('hf_decorr') for m in sys.modules)}))\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", script, remote], capture_output=True, text=True, env=env,
                          cwd=str(tmp_path), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    loaded = json.loads(proc.stdout.strip().splitlines()[-1])
    assert loaded["hf_decorr"] is False
    assert loaded["labels"] == {"0": "negative", "1": "positive"}

    model = trained[-1].model.eval()
    tok = trained[-1].processing_class
    enc = tok(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = model(**{k: v.to(model.device) for k, v in enc.items()}).logits.cpu()
    torch.testing.assert_close(torch.tensor(loaded["logits"]), expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(expected[0], expected[1])  # a trained model, not a constant


def test_recipe_failed_push_keeps_complete_output(tiny_bert, tiny_data, tmp_path, capsys):
    """No patch: HF_HUB_OFFLINE=1 makes create_repo fail like a network error would."""
    recipe = load_recipe("text_classification")
    argv = _common_args(tiny_bert, tiny_data, tmp_path / "out") + ["--push_to_hub", "--hub_model_id", "me/x"]
    with pytest.raises(SystemExit) as exit_info:
        recipe.main(argv)
    assert exit_info.value.code == 3
    err = capsys.readouterr().err
    assert "push to the Hub failed (OfflineModeIsEnabled" in err
    assert "the local output in" in err and "is complete" in err
    local = tmp_path / "out" / "model"
    for name in ("config.json", "model.safetensors", "decorr_config.json", "README.md", "results.json"):
        assert (local / name).is_file(), name
    from transformers import AutoModelForSequenceClassification

    assert AutoModelForSequenceClassification.from_pretrained(local).config.num_labels == 2
    assert not [n for n in os.listdir(tmp_path / "out") if n.endswith((".tmp", ".old"))]


# ------------------------------------------------------------------- the trainer owns its card


def test_plain_trainer_push_to_hub_writes_the_decorr_card(tmp_path, monkeypatch):
    """``trainer.push_to_hub()`` with nothing else: the upload carries hf_decorr's card (network patched at HfApi)."""
    from tiny_models import tiny_bert as build_tiny_bert
    from tiny_models import token_dataset

    from hf_decorr import PENALTIES, DecorrTrainer, DecorrTrainingArguments, register_penalty

    def off_diagonal_squares(c):
        return (c - torch.diag_embed(torch.diagonal(c, dim1=-2, dim2=-1))).square().sum((-2, -1))

    name = "test_card_offdiag_sq"
    if name not in PENALTIES:
        register_penalty(name, off_diagonal_squares, of_covariance=True, description="Σ_{i≠j} C_ij² (a test penalty)")
    hub = FakeHub(str(tmp_path / "remote")).install(monkeypatch)
    args = DecorrTrainingArguments(
        output_dir=str(tmp_path / "out"), report_to="none", save_strategy="no", max_steps=2, logging_steps=1,
        per_device_train_batch_size=4, per_device_eval_batch_size=4, disable_tqdm=True, use_cpu=True,
        hub_model_id="me/plain-push", decorr_weight=0.25, decorr_layers=["-1"], decorr_penalty=name,
        decorr_pooling="mean",
    )
    data = token_dataset(8, seed=1)
    trainer = DecorrTrainer(model=build_tiny_bert(), args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    metrics = trainer.evaluate()
    trainer.push_to_hub()
    remote = hub.remote("me/plain-push")
    assert "README.md" in hub.uploaded["me/plain-push"] and "decorr_config.json" in hub.uploaded["me/plain-push"]
    card = ModelCard.load(os.path.join(remote, "README.md"))
    assert {"hf-decorr", "decorrelation", "covariance-penalty"} <= set(card.data.tags)
    assert card.data.pipeline_tag == "text-classification"
    text = card.text
    assert "L_\\Sigma(H) = \\frac{1}{p^2} \\sum_{i,j} |C_{ij}|" in text  # the formula
    assert "| λ (`decorr_weight`) | 0.25 |" in text
    assert "| layers (`decorr_layers`) | `-1` |" in text and "`bert.encoder.layer.1`" in text
    assert f"| penalty (`decorr_penalty`) | {name} |" in text
    assert f"Penalty: `{name}`: Σ_{{i≠j}} C_ij² (a test penalty)." in text  # the registry's description
    assert "| pooling (`decorr_pooling`) | mean |" in text
    # the last evaluation's metrics, as evaluate() returned them
    assert f"| eval_loss | {metrics['eval_loss']:.4g} |" in text
    assert f"| `mean over layers` | {metrics['eval_decorr_mapc']:.4g} |" in text
    assert trainer.model.model_tags and "hf-decorr" in trainer.model.model_tags


def test_card_of_a_custom_penalty_fn_names_it(tmp_path):
    from tiny_models import tiny_bert as build_tiny_bert
    from tiny_models import token_dataset

    from hf_decorr import DecorrTrainer, DecorrTrainingArguments

    def trace_penalty(cov):
        return torch.diagonal(cov, dim1=-2, dim2=-1).sum(-1)

    args = DecorrTrainingArguments(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True,
                                   decorr_layers=["-1"])
    trainer = DecorrTrainer(model=build_tiny_bert(), args=args, train_dataset=token_dataset(4),
                            decorr_penalty_fn=trace_penalty)
    trainer.create_model_card(output_dir=str(tmp_path / "card"), model_name="x")
    text = (tmp_path / "card" / "README.md").read_text(encoding="utf-8")
    assert "custom:trace_penalty" in text and "(no evaluation was run)" in text
