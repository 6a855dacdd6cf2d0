"""The public extension surface: override points of DecorrTrainer, the penalty registry, hook lifecycle."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from tiny_models import tiny_bert, token_dataset
from transformers import HfArgumentParser

from hf_decorr import (
    PENALTIES,
    DecorrTrainer,
    DecorrTrainingArguments,
    Penalty,
    register_penalty,
)

COMMON = dict(report_to=[], use_cpu=True, save_strategy="no", eval_strategy="no", disable_tqdm=True,
              train_sampling_strategy="sequential", max_grad_norm=0.0, seed=0, data_seed=0)


def make_args(tmp_path, **kw) -> DecorrTrainingArguments:
    options = {**COMMON, "output_dir": str(tmp_path), "per_device_train_batch_size": 4, "logging_steps": 1,
               "learning_rate": 1e-2, "decorr_layers": ["0", "1"]}
    options.update(kw)
    return DecorrTrainingArguments(**options)


def batch_of(trainer, n=6, seed=4):
    data = token_dataset(n, seed=seed)
    return trainer.data_collator([data[i] for i in range(n)])


def added_penalty(trainer, batch) -> float:
    """compute_loss (task + penalty) − the model's own loss on one training batch (no dropout in tiny models)."""
    trainer.model.train()
    with_penalty = trainer.compute_loss(trainer.model, batch).detach().double()
    with torch.no_grad():
        task = trainer.model(**batch).loss.double()
    return float(with_penalty - task)


def block_outputs(model, batch) -> list[torch.Tensor]:
    """The outputs of blocks 0 and 1 in float64 (hidden_states[1], [2])."""
    model.train()
    with torch.no_grad():
        states = model(**batch, output_hidden_states=True).hidden_states
    return [states[1].double(), states[2].double()]


def cov64(x: torch.Tensor) -> torch.Tensor:
    """Unbiased covariance of the rows of x (N, p), straight from the formula."""
    centred = x - x.mean(dim=0, keepdim=True)
    return centred.T @ centred / (x.shape[0] - 1)


def l_sigma(x: torch.Tensor) -> torch.Tensor:
    return cov64(x).abs().sum() / x.shape[1] ** 2


# ---- (a) the penalty hook ------------------------------------------------------------------------


def mean_variance(cov: torch.Tensor) -> torch.Tensor:
    """tr C / p: a penalty of the covariance that no built-in computes."""
    return torch.diagonal(cov, dim1=-2, dim2=-1).sum(dim=-1) / cov.shape[-1]


class MeanVarianceTrainer(DecorrTrainer):
    def decorr_penalty(self, covariance):
        return mean_variance(covariance)


def test_penalty_hook_sets_the_added_loss(tmp_path):
    lam = 0.5
    trainer = MeanVarianceTrainer(model=tiny_bert(seed=2), args=make_args(tmp_path, decorr_weight=lam))
    batch = batch_of(trainer)
    mask = batch["attention_mask"].bool()
    want = lam * sum(float(mean_variance(cov64(h[mask]))) for h in block_outputs(trainer.model, batch))
    assert added_penalty(trainer, batch) == pytest.approx(want, rel=1e-5)
    # and differs from the default penalty, so the check can fail
    plain = DecorrTrainer(model=tiny_bert(seed=2), args=make_args(tmp_path, decorr_weight=lam))
    assert not math.isclose(added_penalty(plain, batch), want, rel_tol=1e-2)


def test_penalty_fn_argument_equals_the_hook(tmp_path):
    args = make_args(tmp_path, decorr_weight=0.5)
    by_arg = DecorrTrainer(model=tiny_bert(seed=2), args=args, decorr_penalty_fn=mean_variance)
    by_hook = MeanVarianceTrainer(model=tiny_bert(seed=2), args=args)
    batch = batch_of(by_arg)
    assert added_penalty(by_arg, batch) == pytest.approx(added_penalty(by_hook, batch), rel=1e-6)
    assert by_arg.decorr_penalty_spec.of_covariance


def test_penalty_fn_trains_and_logs_its_value(tmp_path):
    trainer = DecorrTrainer(model=tiny_bert(seed=2), args=make_args(tmp_path, max_steps=2, decorr_weight=0.1),
                            train_dataset=token_dataset(8), decorr_penalty_fn=mean_variance)
    trainer.train()
    logs = [e for e in trainer.state.log_history if "decorr_loss" in e]
    assert len(logs) == 2 and all(e["decorr_loss"] > 0 for e in logs)
    assert logs[0]["loss"] == pytest.approx(logs[0]["task_loss"] + 0.1 * logs[0]["decorr_loss"], rel=1e-4)


def test_penalty_hook_with_a_sample_penalty_is_refused(tmp_path):
    with pytest.raises(ValueError, match="overrides decorr_penalty"):
        MeanVarianceTrainer(model=tiny_bert(), args=make_args(tmp_path, decorr_penalty="l1"))
    with pytest.raises(TypeError, match="decorr_penalty_fn must be"):
        DecorrTrainer(model=tiny_bert(), args=make_args(tmp_path), decorr_penalty_fn=3)


# ---- (b) the sample hook -------------------------------------------------------------------------


class FirstTokenTrainer(DecorrTrainer):
    """Only the first token of each sequence is a sample (a custom mask, static shapes)."""

    def decorr_samples(self, layer, output, inputs):
        batch, length, width = output.shape
        mask = torch.zeros(batch, length, dtype=torch.bool, device=output.device)
        mask[:, 0] = True
        return output.reshape(batch * length, width), mask.reshape(-1)


def test_sample_hook_sets_the_added_loss(tmp_path):
    lam = 2.0
    trainer = FirstTokenTrainer(model=tiny_bert(seed=3), args=make_args(tmp_path, decorr_weight=lam))
    batch = batch_of(trainer)
    want = lam * sum(float(l_sigma(h[:, 0])) for h in block_outputs(trainer.model, batch))
    assert added_penalty(trainer, batch) == pytest.approx(want, rel=1e-5)
    mask = batch["attention_mask"].bool()
    every_token = lam * sum(float(l_sigma(h[mask])) for h in block_outputs(trainer.model, batch))
    assert not math.isclose(want, every_token, rel_tol=1e-2)


def test_sample_hook_with_bad_shapes_is_named(tmp_path):
    class Bad(DecorrTrainer):
        def decorr_samples(self, layer, output, inputs):
            return output, None  # (B, T, p): not flattened

    trainer = Bad(model=tiny_bert(), args=make_args(tmp_path))
    trainer.model.train()
    with pytest.raises(ValueError, match=r"decorr_samples\('bert.encoder.layer.0'\) must return samples of shape"):
        trainer.compute_loss(trainer.model, batch_of(trainer))


# ---- (c) the weight hook -------------------------------------------------------------------------


class PerLayerWeight(DecorrTrainer):
    weights = {"bert.encoder.layer.0": 2.0, "bert.encoder.layer.1": 0.0}

    def decorr_layer_weight(self, layer, step):
        return self.weights[layer]


def test_weight_hook_sets_per_layer_weights(tmp_path):
    trainer = PerLayerWeight(model=tiny_bert(seed=5), args=make_args(tmp_path, decorr_weight=1.0))
    batch = batch_of(trainer)
    first, _ = block_outputs(trainer.model, batch)
    mask = batch["attention_mask"].bool()
    assert added_penalty(trainer, batch) == pytest.approx(2.0 * float(l_sigma(first[mask])), rel=1e-5)


class CosineSchedule(DecorrTrainer):
    def decorr_layer_weight(self, layer, step):
        return 0.5 * (1 + math.cos(math.pi * step / self.state.max_steps))


def test_weight_hook_as_a_schedule_is_logged(tmp_path):
    trainer = CosineSchedule(model=tiny_bert(), args=make_args(tmp_path, max_steps=3),
                             train_dataset=token_dataset(12))
    trainer.train()
    weights = [e["decorr_weight"] for e in trainer.state.log_history if "decorr_weight" in e]
    assert weights == pytest.approx([0.5 * (1 + math.cos(math.pi * s / 3)) for s in range(3)])


def test_weight_hook_must_return_a_finite_non_negative_float(tmp_path):
    class Negative(DecorrTrainer):
        def decorr_layer_weight(self, layer, step):
            return -1.0

    trainer = Negative(model=tiny_bert(), args=make_args(tmp_path))
    trainer.model.train()
    with pytest.raises(ValueError, match="must return a finite float >= 0"):
        trainer.compute_loss(trainer.model, batch_of(trainer))


# ---- the registry --------------------------------------------------------------------------------


def test_register_penalty_is_read_by_config_cli_and_trainer(tmp_path):
    name = "test_ext_trace"
    with pytest.raises(ValueError, match="decorr_penalty='test_ext_trace' is not valid"):
        make_args(tmp_path, decorr_penalty=name)
    penalty = register_penalty(name, mean_variance, of_covariance=True, description="tr C / p")
    assert isinstance(penalty, Penalty) and PENALTIES[name] is penalty
    with pytest.raises(ValueError, match="already registered"):
        register_penalty(name, mean_variance, of_covariance=True)
    with pytest.raises(TypeError, match="register_penalty"):
        PENALTIES["other"] = penalty
    # the command-line choices are read when the parser is built, after the registration
    parser = HfArgumentParser(DecorrTrainingArguments)
    help_text = io.StringIO()
    parser.print_help(help_text)
    assert name in help_text.getvalue()
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", str(tmp_path), "--decorr_penalty", name,
                                                   "--decorr_layers", "0", "1", "--use_cpu"])
    assert args.decorr_penalty == name
    trainer = DecorrTrainer(model=tiny_bert(seed=2), args=make_args(tmp_path, decorr_penalty=name, decorr_weight=0.5))
    hooked = MeanVarianceTrainer(model=tiny_bert(seed=2), args=make_args(tmp_path, decorr_weight=0.5))
    batch = batch_of(trainer)
    assert added_penalty(trainer, batch) == pytest.approx(added_penalty(hooked, batch), rel=1e-6)


def test_register_penalty_rejects_bad_definitions():
    with pytest.raises(ValueError, match="non-empty string"):
        register_penalty(" ", mean_variance, of_covariance=True)
    with pytest.raises(TypeError, match="must be callable"):
        register_penalty("test_ext_not_callable", 3, of_covariance=True)
    with pytest.raises(ValueError, match="correction must be"):
        register_penalty("test_ext_bad_correction", mean_variance, of_covariance=True, correction=2)


# ---- hooks exist only during a forward pass --------------------------------------------------------


def decorr_hooks(model) -> list:
    return [h for m in model.modules() for h in m._forward_hooks.values()
            if getattr(h, "__module__", "").startswith("hf_decorr")]


def test_model_stays_picklable_and_trainers_never_stack_hooks(tmp_path):
    model = tiny_bert()
    seen, during = [], []

    class Counting(DecorrTrainer):
        def decorr_samples(self, layer, output, inputs):
            seen.append((id(self), layer))
            return super().decorr_samples(layer, output, inputs)

    trainers = [Counting(model=model, args=make_args(tmp_path, max_steps=1), train_dataset=token_dataset(4))
                for _ in range(3)]
    assert decorr_hooks(model) == []
    torch.save(model, io.BytesIO())  # picklable after the trainers were built
    # runs after the blocks in every forward: how many hf_decorr hooks are attached right then
    counter = model.classifier.register_forward_hook(lambda *a: during.append(len(decorr_hooks(model))))
    for trainer in trainers:
        trainer.train()
    counter.remove()
    assert decorr_hooks(model) == []
    torch.save(model, io.BytesIO())  # and after training
    copy.deepcopy(model)
    assert sorted(seen) == sorted((id(t), layer) for t in trainers for layer in t.decorr_layer_names)
    # each training forward: that trainer's hooks only (one per penalised block + the per-call one on the model)
    assert during == [3, 3, 3]
    # the helper does see our hooks while they are attached (so the checks above can fail)
    with _attached(trainers[0]):
        assert len(decorr_hooks(model)) == 2


class _attached:
    """Attach a trainer's hooks through the public capture API of hf_decorr.capture."""

    def __init__(self, trainer):
        from hf_decorr.capture import HiddenStateCapture

        modules = dict(trainer.model.named_modules())
        self.capture = HiddenStateCapture({n: modules[n] for n in trainer.decorr_layer_names})

    def __enter__(self):
        self.capture.attach()

    def __exit__(self, *exc):
        self.capture.detach()
