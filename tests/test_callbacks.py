"""DecorrFigureCallback / decorr_log_figures: heat maps and spectra of the penalised layers in TensorBoard."""

from __future__ import annotations

import glob
import io
import sys

import numpy as np
import pytest
from tiny_models import tiny_bert, token_dataset

from hf_decorr import DecorrFigureCallback, DecorrTrainer, DecorrTrainingArguments, decorrelation_metrics
from hf_decorr.callbacks import layer_images

COMMON = dict(report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True, per_device_train_batch_size=4,
              per_device_eval_batch_size=5, learning_rate=1e-2, logging_steps=1, seed=0)


def test_training_run_writes_heat_maps_and_spectra_to_tensorboard(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logdir = tmp_path / "tb"
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(logdir))
    args = DecorrTrainingArguments(output_dir=str(tmp_path / "out"), **{**COMMON, "report_to": ["tensorboard"]},
                                   max_steps=4, eval_strategy="steps", eval_steps=2, decorr_layers=["0", "-1"],
                                   decorr_log_figures=True)
    trainer = DecorrTrainer(model=tiny_bert(seed=3), args=args, train_dataset=token_dataset(16, seed=1),
                            eval_dataset=token_dataset(11, seed=2))
    trainer.train()
    figures = [c for c in trainer.callback_handler.callbacks if isinstance(c, DecorrFigureCallback)]
    assert len(figures) == 1 and figures[0].logged_steps == [2, 4]

    # the covariances behind the images are the ones behind eval_decorr_*
    metrics = trainer.evaluate()
    for layer, cov in trainer.decorr_last_eval_covariances.items():
        assert cov.shape == (32, 32)
        assert decorrelation_metrics(cov)["mapc"] == pytest.approx(metrics[f"eval_decorr_mapc/{layer}"], rel=1e-9)

    events = glob.glob(str(logdir / "events.out.tfevents.*"))
    assert events
    accumulator = EventAccumulator(str(logdir), size_guidance={"images": 0})
    accumulator.Reload()
    tags = set(accumulator.Tags()["images"])
    for layer in ("bert.encoder.layer.0", "bert.encoder.layer.1"):
        for kind in ("correlation", "spectrum"):
            assert f"decorr/eval/{layer}/{kind}" in tags, tags
    images = accumulator.Images("decorr/eval/bert.encoder.layer.1/correlation")
    assert [e.step for e in images] == [2, 4, 4]  # two evaluations in training, one after
    last = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB"))
    want = layer_images(trainer.decorr_last_eval_covariances["bert.encoder.layer.1"], "bert.encoder.layer.1")
    assert last.shape == want["correlation"].shape
    assert np.array_equal(last, want["correlation"])  # PNG is lossless: the very image of the last evaluation
    assert "eval/decorr_mapc" in accumulator.Tags()["scalars"] or any(
        t.endswith("decorr_mapc") for t in accumulator.Tags()["scalars"])


def test_callback_added_by_hand_without_reporting_logs_nothing(tmp_path):
    args = DecorrTrainingArguments(output_dir=str(tmp_path), **COMMON, decorr_layers=["-1"])
    trainer = DecorrTrainer(model=tiny_bert(), args=args, eval_dataset=token_dataset(8))
    callback = DecorrFigureCallback(trainer)
    trainer.add_callback(callback)
    trainer.evaluate()
    assert list(trainer.decorr_last_eval_covariances) == ["bert.encoder.layer.1"]
    assert callback.logged_steps == []  # report_to=[]: no integration to write to


def test_layer_images_are_rgb_arrays():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6))
    images = layer_images(np.cov(x.T), "layer")
    for image in images.values():
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3 and image.std() > 0


def test_log_figures_without_matplotlib_fails_at_config_time(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(ValueError, match=r"decorr_log_figures=True needs matplotlib: pip install 'hf-decorr\[plots"):
        DecorrTrainingArguments(output_dir=str(tmp_path), report_to=[], decorr_log_figures=True)


def test_save_layer_figures_writes_one_png_per_layer(tmp_path):
    from hf_decorr.plotting import save_layer_figures

    rng = np.random.default_rng(1)
    covs = {run: {layer: np.cov((rng.normal(size=(100, 5)) @ rng.normal(size=(5, 5))).T)
                  for layer in ("enc.0", "enc.1")} for run in ("baseline", "decorr")}
    paths = save_layer_figures(tmp_path / "figures", covs)
    assert [p.name for p in paths] == ["00_enc.0.png", "01_enc.1.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in paths)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["figures"]  # no staging folder left
