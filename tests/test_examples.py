"""examples/: the three customisation scripts run on tiny models and do what they say."""

import importlib.util
import math
import os
import sys

import pytest
import torch
from conftest import REPO_ROOT


def load_example(name: str):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(REPO_ROOT, "examples", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def test_custom_penalty_example(tmp_path):
    example = load_example("custom_penalty")
    trainer = example.main(str(tmp_path))
    losses = logged(trainer, "decorr_loss")
    assert len(losses) == 4 and all(math.isfinite(v) and v > 0 for v in losses)
    # the override is the formula of its docstring, checked in float64 against a loop over i ≠ j
    x = torch.randn(50, 6, dtype=torch.float64) @ torch.randn(6, 6, dtype=torch.float64)
    cov = torch.cov(x.T)
    expected = sum(float(cov[i, j] / (cov[i, i] * cov[j, j]).sqrt()) ** 2
                   for i in range(6) for j in range(6) if i != j) / 6
    assert float(trainer.decorr_penalty(cov)) == pytest.approx(expected, rel=1e-12)
    assert float(trainer.decorr_penalty(torch.diag(torch.arange(1.0, 7.0)))) == 0.0  # uncorrelated units


def test_custom_samples_example(tmp_path):
    example = load_example("custom_samples")
    trainer = example.main(str(tmp_path))
    assert all(math.isfinite(v) for v in logged(trainer, "decorr_loss"))
    output = torch.randn(2, 3, 4)
    labels = torch.tensor([[-100, 0, 2], [1, 0, -100]])
    samples, mask = trainer.decorr_samples("bert.encoder.layer.1", output, {"labels": labels})
    assert samples.shape == (6, 4) and torch.equal(samples, output.reshape(6, 4))
    assert mask.tolist() == [False, False, True, True, False, False]  # only the entity tokens


def test_per_layer_weight_example(tmp_path):
    example = load_example("per_layer_weight")
    trainer = example.main(str(tmp_path))
    layers = trainer.decorr_layer_names
    assert len(layers) == 3 and all(math.isfinite(v) for v in logged(trainer, "decorr_loss"))
    for depth, layer in enumerate(layers, start=1):
        for step in (0, 4, 9, 50):
            expected = 0.5 * depth / 3 * min(1.0, (step + 1) / 10)
            assert trainer.decorr_layer_weight(layer, step) == pytest.approx(expected)
