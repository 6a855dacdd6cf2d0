"""Faults, round 2: the override points, the new options and Trainer's contract.

Each test names the case it covers. The ``hf-decorr`` command's cases (4, 5, 6, 8) are in
tests/test_command_faults.py; the λ = 0 / divergence-guard cases (10, 11) in tests/test_divergence.py.
"""

import os
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_bert, token_dataset
from torch import nn
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_decorr import DecorrError, DecorrTrainer, DecorrTrainingArguments, Penalty, register_penalty

COMMON = dict(report_to=[], use_cpu=True, disable_tqdm=True, save_strategy="no", seed=0)


def make_args(tmp_path, **kw):
    options = {**COMMON, "output_dir": str(tmp_path), "per_device_train_batch_size": 4, "logging_steps": 1,
               "learning_rate": 1e-2, "decorr_layers": ["0", "1"], "decorr_weight": 1.0}
    options.update(kw)
    return DecorrTrainingArguments(**options)


def batch_of(trainer, n=6):
    data = token_dataset(n, seed=4)
    return trainer.data_collator([data[i] for i in range(n)])


def first_loss(trainer):
    trainer.model.train()
    return trainer.compute_loss(trainer.model, batch_of(trainer))


# ------------------------------------------------------------------ case 1: decorr_max_samples and resume


@pytest.mark.parametrize("accumulation", [1, 2])
def test_case1_subsampled_run_resumes_exactly(tmp_path, accumulation):
    class StopAfter(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step == 2

    def run(out, resume=None, callbacks=None):
        args = make_args(out, decorr_max_samples=8, max_steps=4, gradient_accumulation_steps=accumulation,
                         save_strategy="steps", save_steps=2, learning_rate=1e-3, decorr_weight=5.0,
                         train_sampling_strategy="sequential")
        trainer = DecorrTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset(32), callbacks=callbacks)
        trainer.train(resume_from_checkpoint=resume)
        return trainer

    whole = run(tmp_path / "whole")
    run(tmp_path / "cut", callbacks=[StopAfter()])  # stops after checkpoint-2, as a killed run would have left it
    resumed = run(tmp_path / "cut", resume=str(tmp_path / "cut" / "checkpoint-2"))
    a = load_file(str(tmp_path / "whole" / "checkpoint-4" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "checkpoint-4" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    logged = [[e["decorr_loss"] for e in t.state.log_history if "decorr_loss" in e][-2:] for t in (whole, resumed)]
    assert logged[0] == logged[1]


def test_case1_draws_depend_on_seed_step_micro_batch_and_layer_only():
    from hf_decorr.engine import draw_generator, subsample_rows

    x = torch.randn(50, 3)
    draw = lambda *key: subsample_rows(x, None, 8, draw_generator(*key, torch.device("cpu")))[0]
    assert torch.equal(draw(0, 3, 1, 0), draw(0, 3, 1, 0))
    assert not torch.equal(draw(0, 3, 1, 0), draw(0, 3, 1, 1))  # another layer
    assert not torch.equal(draw(0, 3, 1, 0), draw(0, 3, 0, 0))  # another micro-batch
    assert not torch.equal(draw(0, 3, 1, 0), draw(0, 4, 1, 0))  # another step
    assert not torch.equal(draw(0, 3, 1, 0), draw(1, 3, 1, 0))  # another seed


# ------------------------------------------------------------------ case 2: a penalty without a gradient


def _constant(cov):
    return cov.new_full(cov.shape[:-2], 98.5)


def _detached(cov):
    return cov.abs().mean(dim=(-2, -1)).detach()


@pytest.mark.parametrize("fn", [_constant, _detached])
def test_case2_penalty_fn_that_trains_nothing_is_refused_at_the_first_step(tmp_path, fn):
    trainer = DecorrTrainer(model=tiny_bert(), args=make_args(tmp_path), decorr_penalty_fn=fn)
    with pytest.raises(DecorrError, match=r"decorr_penalty_fn returned a value that does not depend differentiably"):
        first_loss(trainer)
    # at λ = 0 it is only measured, and that is fine
    trainer = DecorrTrainer(model=tiny_bert(), args=make_args(tmp_path, decorr_weight=0.0), decorr_penalty_fn=fn)
    assert torch.isfinite(first_loss(trainer))


def test_case2_registered_and_overridden_penalties_that_train_nothing_are_named(tmp_path):
    register_penalty("test_round2_constant", _constant, of_covariance=True)
    trainer = DecorrTrainer(model=tiny_bert(), args=make_args(tmp_path, decorr_penalty="test_round2_constant"))
    with pytest.raises(DecorrError, match=r"the registered penalty 'test_round2_constant' returned a value that"):
        first_loss(trainer)

    class Overridden(DecorrTrainer):
        def decorr_penalty(self, covariance):
            return _detached(covariance)

    with pytest.raises(DecorrError, match=r"Overridden\.decorr_penalty returned a value that does not depend"):
        first_loss(Overridden(model=tiny_bert(), args=make_args(tmp_path)))


@pytest.mark.parametrize("kind", ["detached", "integer", "float_mask"])
def test_case2_samples_that_train_nothing_are_refused(tmp_path, kind):
    class Bad(DecorrTrainer):
        def decorr_samples(self, layer, output, inputs):
            x, mask = super().decorr_samples(layer, output, inputs)
            if kind == "detached":
                return x.detach(), mask
            if kind == "integer":
                return x.long(), mask
            return x, torch.full((x.shape[0],), 0.3)

    expected = {"detached": "returned samples that do not depend on the layer's output",
                "integer": "must return floating-point samples; got torch.int64",
                "float_mask": "must return a bool or 0/1 integer mask; got torch.float32"}[kind]
    with pytest.raises((DecorrError, TypeError), match=rf"decorr_samples\('bert.encoder.layer.0'\) .*{expected}"):
        first_loss(Bad(model=tiny_bert(), args=make_args(tmp_path)))


# ------------------------------------------------------------------ case 3: a penalty of the wrong shape


@pytest.mark.parametrize("fn, expected", [
    (lambda cov: cov, r"must return shape \(\) \(one value per covariance \(p, p\)\) for an input of shape "
                      r"\(32, 32\); got \(32, 32\)"),
    (lambda cov: cov.diagonal(dim1=-2, dim2=-1), r"must return shape \(\) .*got \(32,\)"),
    (lambda cov: 0.5, r"must return a tensor of shape \(\) .*got float"),
    (lambda cov: (cov.abs().sum() > 0).long(), r"must return a floating-point tensor; got torch.int64"),
])
def test_case3_penalty_of_the_wrong_shape_fails_at_the_first_call_naming_it(tmp_path, fn, expected):
    trainer = DecorrTrainer(model=tiny_bert(), args=make_args(tmp_path), decorr_penalty_fn=fn)
    with pytest.raises((TypeError, ValueError), match=r"^decorr_penalty_fn " + expected):
        first_loss(trainer)


def test_case3_stacked_pooled_layers_need_one_value_per_layer(tmp_path):
    trainer = DecorrTrainer(model=tiny_bert(), args=make_args(tmp_path, decorr_pooling="mean"),
                            decorr_penalty_fn=lambda cov: cov.abs().sum())
    with pytest.raises(ValueError, match=r"must return shape \(2,\) \(one value per covariance \(p, p\)\) for an "
                                         r"input of shape \(2, 32, 32\); got \(\)"):
        first_loss(trainer)


def test_case3_harmless_returns_are_accepted(tmp_path):
    class NumpyWeight(DecorrTrainer):
        def decorr_layer_weight(self, layer, step):
            return np.float32(0.5) if layer.endswith("0") else torch.tensor(0.25)

    trainer = NumpyWeight(model=tiny_bert(), args=make_args(tmp_path),
                          decorr_penalty_fn=lambda cov: cov.abs().mean(dim=(-2, -1)).double())
    assert torch.isfinite(first_loss(trainer))


# ------------------------------------------------------------------ case 7: quiet no-ops


def test_case7_figures_without_a_logger_warn(tmp_path):
    pytest.importorskip("matplotlib")
    with pytest.warns(UserWarning, match=r"decorr_log_figures=True logs the figures through the report_to "
                                         r"integrations .* report_to is 'none'"):
        DecorrTrainingArguments(output_dir=str(tmp_path), report_to="none", decorr_log_figures=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        DecorrTrainingArguments(output_dir=str(tmp_path), report_to="tensorboard", decorr_log_figures=True)


def test_case7_an_evaluation_without_samples_says_why(tmp_path):
    trainer = DecorrTrainer(model=tiny_bert(), args=make_args(tmp_path))
    with pytest.warns(UserWarning, match=r"no evaluation sample reached 'bert.encoder.layer.0', so its eval_decorr_\* "
                                         r"metrics are NaN"):
        metrics = trainer.decorr_metrics_from_stats({}, prefix="eval_decorr")
    assert metrics["eval_decorr_samples"] == 0.0


# ------------------------------------------------- case 9: create_model_card keeps Trainer's signature


def test_case9_create_model_card_takes_trainers_positional_arguments(tmp_path):
    import inspect

    ours = list(inspect.signature(DecorrTrainer.create_model_card).parameters)
    theirs = list(inspect.signature(Trainer.create_model_card).parameters)
    assert ours[: len(theirs)] == theirs
    trainer = DecorrTrainer(model=tiny_bert(), args=make_args(tmp_path))
    trainer.create_model_card("en", "mit", ["extra-tag"], "my-model", None, None, ["dtag"], "sst2", ["a"])
    card = (tmp_path / "README.md").read_text()
    assert "license: mit" in card and "extra-tag" in card and "# my-model" in card


# ------------------------------------------------------------------ case 12: models without sub-modules


class Regression(nn.Module):
    """transformers' own test model: parameters a and b, no sub-modules."""

    def __init__(self):
        super().__init__()
        self.a = nn.Parameter(torch.tensor(0.5))
        self.b = nn.Parameter(torch.tensor(0.1))

    def forward(self, input_x, labels=None):
        y = (input_x * self.a + self.b).unsqueeze(-1).repeat(1, 2)  # (B, 2) "hidden state"
        return (nn.functional.mse_loss(y[:, 0], labels), y) if labels is not None else (y,)


def regression_data(n=16):
    from datasets import Dataset

    x = torch.linspace(-1, 1, n)
    return Dataset.from_dict({"input_x": x.tolist(), "labels": (2 * x + 1).tolist()})


def test_case12_model_without_submodules_names_the_way_out_and_penalises_its_output(tmp_path):
    with pytest.raises(ValueError, match=r"has no sub-modules.*decorr_layers=\['\.'\]"):
        DecorrTrainer(Regression(), make_args(tmp_path, decorr_weight=0.0, decorr_layers=["last"]))
    # '.': the model's own output, like a plain Trainer at λ = 0 ...
    plain = Regression()
    Trainer(plain, TrainingArguments(output_dir=str(tmp_path / "p"), max_steps=3, per_device_train_batch_size=4,
                                     learning_rate=0.1, **COMMON), train_dataset=regression_data()).train()
    ours = Regression()
    trainer = DecorrTrainer(ours, make_args(tmp_path / "o", decorr_weight=0.0, decorr_layers=["."], max_steps=3,
                                            learning_rate=0.1), train_dataset=regression_data())
    trainer.train()
    assert trainer.decorr_layer_names == ["."]
    assert torch.equal(plain.a, ours.a) and torch.equal(plain.b, ours.b)
    assert all("decorr_loss" in e for e in trainer.state.log_history if "loss" in e)
    # ... and trained at λ > 0
    trained = Regression()
    DecorrTrainer(trained, make_args(tmp_path / "t", decorr_weight=1.0, decorr_layers=["."], max_steps=3,
                                     learning_rate=0.1), train_dataset=regression_data()).train()
    assert not torch.equal(trained.a, ours.a)
    assert not os.path.exists(tmp_path / "t" / "model.safetensors")


def test_penalty_kernel_and_sums_fields_are_validated():
    with pytest.raises(ValueError, match="kernel must be callable and is for penalties of the covariance only"):
        register_penalty("test_round2_bad_kernel", lambda h, m: h.sum(), of_covariance=False, kernel=lambda *a: 0)
    with pytest.raises(ValueError, match="sums must be callable and is for penalties of the samples only"):
        register_penalty("test_round2_bad_sums", lambda c: c.sum(), of_covariance=True, sums=lambda *a: 0)
    assert isinstance(Penalty("x", lambda c: c, True).kernel, type(None))
