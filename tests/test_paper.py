"""The paper's models (hf_decorr.models) and the three reproduction recipes (recipes/paper/)."""

import json
import math
import os
import sys

import pytest
import torch
from conftest import REPO_ROOT
from transformers import AutoConfig, AutoModel

from hf_decorr import DecorrTrainer
from hf_decorr.metrics import decorrelation_metrics
from hf_decorr.models import (
    ConvAutoencoder,
    ConvAutoencoderConfig,
    LinearAutoencoder,
    LinearAutoencoderConfig,
    XorMLP,
    XorMLPConfig,
)

sys.path.insert(0, os.path.join(REPO_ROOT, "recipes", "paper"))

import dimensionality  # noqa: E402
import image_autoencoder  # noqa: E402
import paper_common  # noqa: E402
import xor  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _finite_numbers(obj) -> list[float]:
    """Every number in a JSON tree (None is how NaN is written: count it as not finite)."""
    if isinstance(obj, dict):
        return [x for v in obj.values() for x in _finite_numbers(v)]
    if isinstance(obj, list):
        return [x for v in obj for x in _finite_numbers(v)]
    if obj is None:
        return [math.nan]
    if isinstance(obj, (int, float)) and not isinstance(obj, bool):
        return [float(obj)]
    return []


def _check_outputs(out, names):
    assert sorted(p.name for p in out.iterdir()) == sorted(names)
    for name in names:
        path = out / name
        assert path.stat().st_size > 0
        if name.endswith(".png"):
            assert path.read_bytes()[:8] == PNG_MAGIC
    return json.loads((out / "results.json").read_text())


# ---- models -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "config, inputs",
    [
        (LinearAutoencoderConfig(input_dim=6, code_dim=5), {"input_values": torch.randn(7, 6)}),
        (XorMLPConfig(hidden_sizes=[4, 3]), {"input_values": torch.rand(7, 2), "labels": torch.ones(7)}),
        (ConvAutoencoderConfig(code_size=12, hidden_size=20), {"pixel_values": torch.rand(7, 1, 8, 8)}),
        (
            ConvAutoencoderConfig(image_size=12, num_channels=3, conv_channels=[4, 6], kernel_size=5, code_size=9),
            {"pixel_values": torch.rand(7, 3, 12, 12)},
        ),
    ],
)
def test_models_roundtrip_through_auto_classes(tmp_path, config, inputs):
    model = AutoModel.from_config(config)
    out = model(**inputs)
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    model.save_pretrained(tmp_path)
    assert AutoConfig.from_pretrained(tmp_path).model_type == config.model_type
    again = AutoModel.from_pretrained(tmp_path)
    assert type(again) is type(model)
    with torch.no_grad():
        assert torch.allclose(again(**inputs).loss, model(**inputs).loss)


def test_model_outputs_and_weight_init():
    torch.manual_seed(0)
    ae = LinearAutoencoder(LinearAutoencoderConfig(input_dim=6, code_dim=5))
    x = torch.randn(4, 6)
    out = ae(input_values=x)
    assert out.code.shape == (4, 5) and out.reconstruction.shape == (4, 6)
    assert torch.allclose(out.loss, ((out.reconstruction - x) ** 2).mean())
    # Glorot-uniform weights (bound √(6 / (fan_in + fan_out))), zero biases — not N(0, 0.02)
    bound = math.sqrt(6 / 11)
    assert ae.code.weight.abs().max() <= bound and ae.code.weight.std() > 0.1
    assert torch.all(ae.code.bias == 0)
    mlp = XorMLP(XorMLPConfig())
    with torch.no_grad():
        out = mlp(input_values=torch.rand(3, 2))
    assert out.loss is None and out.logits.shape == (3, 1)
    assert [h.shape for h in out.hidden_states] == [(3, 4), (3, 4)]
    assert all(0 < float(h.min()) and float(h.max()) < 1 for h in out.hidden_states)  # logistic units
    conv = ConvAutoencoder(ConvAutoencoderConfig())
    with torch.no_grad():
        out = conv(pixel_values=torch.rand(2, 1, 8, 8))
    assert out.code.shape == (2, 84) and out.reconstruction.shape == (2, 1, 8, 8)
    assert float(out.reconstruction.min()) >= 0 and float(out.reconstruction.max()) <= 1


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: XorMLPConfig(activation="gelu"), r"activation='gelu'.*linear.*relu.*sigmoid.*tanh"),
        (lambda: XorMLPConfig(hidden_sizes=[]), "hidden_sizes"),
        (lambda: LinearAutoencoderConfig(code_dim=0), "code_dim must be an integer >= 1"),
        (lambda: ConvAutoencoderConfig(image_size=10), "image_size must be divisible by 4"),
        (lambda: ConvAutoencoderConfig(kernel_size=4), "kernel_size must be odd"),
        (lambda: ConvAutoencoderConfig(conv_channels=[8]), "two widths"),
        (lambda: ConvAutoencoderConfig(code_activation="swish"), "code_activation='swish'"),
    ],
)
def test_configs_reject_bad_values(make, message):
    with pytest.raises(ValueError, match=message):
        make()


# ---- DecorrTrainer on the small models -------------------------------------------------------------------


def test_trainer_metrics_match_library_metrics_of_the_layer(tmp_path):
    """eval_decorr_* from the trainer = decorrelation_metrics of the code's covariance over the same set."""
    args = dimensionality.DimensionalityArguments(num_samples=300, eval_samples=257, epochs=1, num_draws=1)
    train, held_out, _ = dimensionality.make_draw(args, 0)
    model = LinearAutoencoder(LinearAutoencoderConfig())
    targs = paper_common.training_arguments(
        str(tmp_path),
        num_train_epochs=1,
        per_device_train_batch_size=50,
        per_device_eval_batch_size=100,
        decorr_layers=["code"],
        decorr_weight=0.5,
        decorr_top_d=4,
    )
    trainer, metrics = paper_common.train_and_evaluate(model, targs, train, held_out)
    assert isinstance(trainer, DecorrTrainer) and trainer.decorr_layer_names == ["code"]
    cov = paper_common.layer_covariances(trainer.model, held_out, ["code"])["code"]
    expected = decorrelation_metrics(cov, top_d=4)
    for key in ("mapc", "cvr", "tdv", "ud", "pca_ud", "cov_l1"):
        assert metrics[f"eval_decorr_{key}"] == pytest.approx(expected[key], rel=1e-6, abs=1e-9)
    assert metrics["eval_decorr_samples"] == 257
    with torch.no_grad():
        mse = torch.mean((trainer.model(**held_out.tensors).reconstruction - held_out.tensors["labels"]) ** 2)
    assert metrics["eval_loss"] == pytest.approx(float(mse), rel=1e-5)  # eval_loss is the task loss, no penalty


def test_penalty_concentrates_the_variance_of_the_linear_code(tmp_path):
    """The claim in miniature: L_Σ moves the code's variance into fewer units, at a small MSE cost."""
    args = dimensionality.DimensionalityArguments(
        num_draws=1,
        num_samples=2000,
        eval_samples=500,
        epochs=6,
        num_weights=1,
        weight_min=1.0,
        weight_max=1.0,
        penalties=["cov_l1"],
    )
    data = dimensionality.make_draw(args, 0)
    with paper_common.runtime(1):
        plain = dimensionality.run_one(args, 0, "none", 0.0, data, str(tmp_path))
        penalised = dimensionality.run_one(args, 0, "cov_l1", 1.0, data, str(tmp_path))
    assert penalised["tdv"] > plain["tdv"] + 0.1
    assert penalised["cvr"] < plain["cvr"] - 1.0
    assert penalised["ud"] < plain["ud"]
    assert penalised["rel_mse"] < 0.01  # still reconstructs (MSE below 1% of the data variance)
    assert len(penalised["history"]) == 6 and penalised["history"][-1]["tdv"] == pytest.approx(penalised["tdv"])


def test_tensor_dict_dataset_and_collator():
    ds = paper_common.TensorDictDataset({"a": torch.arange(5), "b": torch.arange(5) * 2})
    assert len(ds) == 5 and int(ds[3]["b"]) == 6
    batch = paper_common.batch_collator(ds.__getitems__([4, 0]))
    assert batch["a"].tolist() == [4, 0] and batch["b"].tolist() == [8, 0]
    assert paper_common.batch_collator([ds[1], ds[2]])["a"].tolist() == [1, 2]
    with pytest.raises(ValueError, match="same first dimension"):
        paper_common.TensorDictDataset({"a": torch.zeros(2), "b": torch.zeros(3)})


def test_runtime_restores_threads():
    before = torch.get_num_threads()
    with paper_common.runtime(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="--num_threads"), paper_common.runtime(0):
        pass


# ---- recipes: argument checks ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "module, argv, message",
    [
        (dimensionality, ["--penalties", "cov_l1", "dropout"], r"--penalties \['dropout'\].*choose from"),
        (dimensionality, ["--recommended_weight", "0.5"], "not in the λ grid"),
        (dimensionality, ["--epochs", "0"], "--epochs must be an integer >= 1"),
        (dimensionality, ["--latent_variances", "1", "-1"], "--latent_variances"),
        (xor, ["--figure_seed", "10"], "--figure_seed"),
        (image_autoencoder, ["--table_weight", "0.7"], "--table_weight 0.7 must be one of --weights"),
        (image_autoencoder, ["--penalties", "l2"], "--penalties"),
    ],
)
def test_recipes_reject_bad_arguments(tmp_path, module, argv, message):
    with pytest.raises(ValueError, match=message):
        module.main(["--output_dir", str(tmp_path / "out"), *argv])
    assert not (tmp_path / "out").exists()


def test_image_autoencoder_rejects_unknown_dataset(tmp_path, capsys):
    with pytest.raises(SystemExit):
        image_autoencoder.main(["--output_dir", str(tmp_path / "out"), "--dataset", "mnist"])
    assert "invalid choice: 'mnist'" in capsys.readouterr().err


def test_cifar10_offline_fails_early_with_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    with pytest.raises(RuntimeError, match=r"--dataset cifar10 needs the Hugging Face Hub.*--dataset digits"):
        image_autoencoder.main(["--output_dir", str(tmp_path / "out"), "--dataset", "cifar10"])
    assert not (tmp_path / "out").exists()


# ---- recipes: quick end-to-end runs -----------------------------------------------------------------------


def test_dimensionality_quick(tmp_path):
    out = tmp_path / "dim"
    result = dimensionality.main(["--output_dir", str(out), "--quick"])
    data = _check_outputs(
        out,
        [
            "results.json",
            "results.md",
            "dimensionality_fig2.png",
            "dimensionality_fig3.png",
            "dimensionality_convergence.png",
            "dimensionality_covariance.png",
        ],
    )
    runs = data["runs"]
    assert len(runs) == 2 * (1 + 2 * 2)  # 2 draws × (λ = 0 + 2 penalties × 2 λ)
    assert {(r["penalty"], r["weight"]) for r in runs} == {
        ("none", 0.0),
        ("cov_l1", 0.01),
        ("cov_l1", 1.0),
        ("l1", 0.01),
        ("l1", 1.0),
    }
    for r in runs:
        assert all(math.isfinite(x) for x in _finite_numbers({k: r[k] for k in dimensionality.METRICS}))
        assert 0 < r["tdv"] <= 1 and 1 <= r["ud"] <= 10 and r["cvr"] >= 1
        assert len(r["history"]) == 2
    assert all(math.isfinite(x) for x in _finite_numbers(data["summary"]))
    assert data["claim"]["recommended_weight"] in (0.01, 1.0)
    assert isinstance(data["claim"]["reproduced"], bool)
    assert result["timing"]["cpu_s"] > 0
    md = (out / "results.md").read_text()
    assert "| L_Σ | 1 |" in md and "Recommended λ" in md


def test_xor_quick(tmp_path):
    out = tmp_path / "xor"
    xor.main(["--output_dir", str(out), "--quick"])
    data = _check_outputs(out, ["results.json", "results.md", "xor_covariance.png", "xor_spectra.png"])
    assert len(data["runs"]) == 4
    for r in data["runs"]:
        assert len(r["layer1_variances"]) == 4 and len(r["layer2_covariance"]) == 4
        assert r["layer1_active_abs"] == sum(v >= 0.01 for v in r["layer1_variances"])
        assert r["layer2_active_rel"] == sum(v >= 0.01 * sum(r["layer2_variances"]) for v in r["layer2_variances"])
        assert all(math.isfinite(x) for x in _finite_numbers(r))
    assert data["runs"][0]["weight"] == 0.0 and data["runs"][1]["weight"] == 0.2
    for condition in ("none", "cov_l1"):
        s = data["summary"][condition]
        assert s["runs"] == 2 and 0 <= s["runs_2_1_abs"] <= 2 and 0 <= s["runs_2_1_rel"] <= 2
        assert set(s["runs_2_1_abs_by_level"]) == {"0.001", "0.01", "0.05"}
        assert set(s["runs_2_1_rel_by_level"]) == {"0.01", "0.05", "0.1"}


def test_xor_data_and_active_units():
    data = xor.xor_dataset()
    assert data.tensors["labels"].tolist() == [0.0, 1.0, 1.0, 0.0]
    assert xor.count_active([0.2, 0.01, 0.0099, 0.0], 0.01) == 2
    # relative rule: scale-free, so a layer shrunk by the penalty keeps its count
    assert xor.count_active_share([0.2, 0.01, 0.0099, 0.0], 0.05) == 1
    assert (
        xor.count_active_share([0.002, 0.0001, 0.00009, 0.0], 0.01)
        == xor.count_active_share([0.2, 0.01, 0.009, 0.0], 0.01)
        == 3
    )
    assert xor.count_active_share([0.0] * 4, 0.01) == 0
    # a collapsed layer: every unit constant up to float32 round-off (seed 9's layer 1 with L_Σ)
    assert xor.count_active_share([5.6e-15, 4.7e-15, 3.3e-15, 8.9e-16], 0.01) == 0
    assert xor.count_active_share([5.6e-13, 4.7e-13, 3.3e-13, 8.9e-14], 0.01) == 4


def test_image_autoencoder_quick(tmp_path):
    out = tmp_path / "iae"
    image_autoencoder.main(["--output_dir", str(out), "--quick"])
    data = _check_outputs(out, ["results.json", "results.md", "image_ae_tradeoff.png", "image_ae_code.png"])
    assert len(data["runs"]) == 1 + 2 * 2
    assert [r["penalty"] for r in data["table"]] == ["cov_l1", "l1", "none"]
    for r in data["runs"]:
        assert all(math.isfinite(x) for x in _finite_numbers({k: r[k] for k in image_autoencoder.METRICS}))
        assert 0 < r["mse"] < 1 and 1 <= r["cvr"] and 0 <= r["ud"] <= 16
    assert "Table 1 analogue" in (out / "results.md").read_text()


def test_digits_split_is_fixed_and_disjoint():
    a = image_autoencoder.load_digits_splits()
    b = image_autoencoder.load_digits_splits()
    assert [len(a[k]) for k in ("train", "validation", "test")] == [1257, 180, 360]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert float(a["train"].min()) >= 0 and float(a["train"].max()) <= 1
