"""The divergence guard (hf_decorr.monitor): defined by the loss, the penalty and the gradient norm.

None of these tests depends on what the installed accelerate or torch do with an inf step: the
optimizers here are ours (one that skips non-finite steps, one that zeroes them), and the guard
reads the gradients before the Trainer clips them.
"""

import math
import os

import pytest
import torch
from tiny_models import tiny_bert, token_dataset
from transformers import Trainer

from hf_decorr import DecorrTrainer, DecorrTrainingArguments, DivergenceError
from hf_decorr.monitor import SCALER_PATIENCE, DivergenceCallback, DivergenceMonitor


def make_args(tmp_path, **kw):
    options = dict(per_device_train_batch_size=4, learning_rate=1e-3, max_steps=6, logging_steps=2,
                   save_strategy="no", decorr_layers=["0", "1"], train_sampling_strategy="sequential", seed=0,
                   report_to=[], use_cpu=True, disable_tqdm=True)
    options.update(kw)
    return DecorrTrainingArguments(output_dir=str(tmp_path), **options)


class SkipNonFinite(torch.optim.SGD):
    """An optimizer that skips every step whose gradient norm is not finite (as fp16 GradScaler does)."""

    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
        if not torch.isfinite(norm):
            return None
        return super().step(closure)


class ZeroNonFinite(torch.optim.SGD):
    """An optimizer that turns non-finite gradients into zeros before stepping."""

    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.nan_to_num_(nan=0.0, posinf=0.0, neginf=0.0)
        return super().step(closure)


def weights_of(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("optimizer_class", [SkipNonFinite, ZeroNonFinite])
@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
def test_inf_gradient_stops_training_whatever_the_optimizer_does_with_it(tmp_path, optimizer_class, max_grad_norm):
    model = tiny_bert()
    before = weights_of(model)
    args = make_args(tmp_path, decorr_weight=1e38, max_grad_norm=max_grad_norm, save_strategy="steps", save_steps=1)
    optimizer = optimizer_class(model.parameters(), lr=1e-3)
    trainer = DecorrTrainer(model=model, args=args, train_dataset=token_dataset(24), optimizers=(optimizer, None))
    with pytest.raises(DivergenceError) as info:
        trainer.train()
    message = str(info.value)
    assert "\n" not in message and "the gradient norm became NaN or infinite at optimizer step 1" in message
    # clipping is suggested only when it is off
    assert ("max_grad_norm > 0 (now 0)" in message) == (max_grad_norm == 0)
    assert "max_grad_norm > 0 (now 1)" not in message
    # the loss stayed finite: only the gradient norm says the run diverged
    assert "the training loss" not in message
    assert info.value.step == 1 and info.value.first_step == 1
    assert os.listdir(tmp_path) == []  # the save at step 1 was refused
    if optimizer_class is SkipNonFinite:  # the step was skipped: the weights are as they were, and finite
        after = weights_of(model)
        assert all(torch.equal(before[k], after[k]) for k in before)


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_a_normal_run_is_never_stopped_and_each_optimizer_step_is_checked_once(tmp_path, max_grad_norm,
                                                                                 accumulation):
    seen = []

    class Counting(DivergenceMonitor):
        def observe_gradients(self, parameters, step, scaled, device):
            seen.append(step)
            super().observe_gradients(parameters, step, scaled, device)

    args = make_args(tmp_path, decorr_weight=1.0, max_grad_norm=max_grad_norm, max_steps=4, logging_steps=1,
                     gradient_accumulation_steps=accumulation, save_strategy="steps", save_steps=2)
    trainer = DecorrTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset(40))
    trainer.decorr_monitor = Counting()
    trainer.train()
    assert trainer.state.global_step == 4
    # the guard read the gradients at the last micro-batch of every optimizer step, and only there
    assert seen == [0, 1, 2, 3]
    assert trainer.decorr_monitor.status(torch.device("cpu")).tolist() == [0.0, 0.0, 0.0, -1.0, 0.0]
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2", "checkpoint-4"]


def test_fp16_loss_scaling_stops_only_when_the_scaler_keeps_skipping():
    cpu = torch.device("cpu")
    inf = torch.nn.Parameter(torch.zeros(3))
    inf.grad = torch.tensor([1.0, math.inf, 0.0])
    ok = torch.nn.Parameter(torch.zeros(3))
    ok.grad = torch.ones(3)
    monitor = DivergenceMonitor()
    # SCALER_PATIENCE - 1 skipped steps, then a good one: the scaler found its scale, nothing to report
    for step in range(SCALER_PATIENCE - 1):
        monitor.observe_gradients([inf], step, scaled=True, device=cpu)
    monitor.observe_gradients([ok], SCALER_PATIENCE - 1, scaled=True, device=cpu)
    assert monitor.status(cpu)[:3].tolist() == [0.0, 0.0, 0.0]
    # SCALER_PATIENCE in a row: diverged, at the step where the streak reached the patience
    for step in range(SCALER_PATIENCE, 2 * SCALER_PATIENCE):
        monitor.observe_gradients([inf], step, scaled=True, device=cpu)
    status = monitor.status(cpu).tolist()
    assert status[:4] == [0.0, 0.0, 1.0, 2 * SCALER_PATIENCE - 1]
    error = DivergenceMonitor.error(status, 50, 1.0, 1e-3, 1.0, scaled=True)
    assert f"{SCALER_PATIENCE} optimizer steps in a row under fp16 loss scaling" in str(error)
    # without loss scaling one non-finite step is enough
    plain = DivergenceMonitor()
    plain.observe_gradients([inf], 7, scaled=False, device=cpu)
    assert plain.status(cpu).tolist()[:4] == [0.0, 0.0, 1.0, 7.0]


def test_finite_gradients_whose_norm_overflows_count_as_diverged():
    cpu = torch.device("cpu")
    p = torch.nn.Parameter(torch.zeros(4))
    p.grad = torch.full((4,), 1e30)  # each finite; ‖g‖² overflows float32, as the Trainer's own grad_norm does
    monitor = DivergenceMonitor()
    monitor.observe_gradients([p], 0, scaled=False, device=cpu)
    assert monitor.status(cpu).tolist()[2] == 1.0
    half = torch.nn.Parameter(torch.zeros(4, dtype=torch.float16))
    half.grad = torch.full((4,), 60000.0, dtype=torch.float16)  # norm 120000 > float16's range, but finite
    fine = DivergenceMonitor()
    fine.observe_gradients([half], 0, scaled=False, device=cpu)
    assert fine.status(cpu).tolist()[2] == 0.0


def test_at_weight_zero_the_guard_is_off_by_default_like_a_plain_trainer(tmp_path):
    """λ = 0 with the default settings: the callbacks and the handling of a NaN loss are Trainer's."""
    model = tiny_bert()
    model.bert.encoder.layer[0].register_forward_hook(lambda m, a, out: out * float("nan"))
    args = make_args(tmp_path, decorr_weight=0.0, max_steps=2, logging_nan_inf_filter=False)
    trainer = DecorrTrainer(model=model, args=args, train_dataset=token_dataset(8))
    plain = Trainer(model=tiny_bert(), args=args, train_dataset=token_dataset(8))
    assert [type(c) for c in trainer.callback_handler.callbacks] == [type(c) for c in plain.callback_handler.callbacks]
    assert not trainer.decorr_guard_active
    trainer.train()  # trains on, as Trainer does
    assert trainer.state.global_step == 2
    # switched on explicitly, it stops the same run
    args = make_args(tmp_path, decorr_weight=0.0, max_steps=2, decorr_stop_on_nonfinite=True)
    trainer = DecorrTrainer(model=model, args=args, train_dataset=token_dataset(8))
    assert any(isinstance(c, DivergenceCallback) for c in trainer.callback_handler.callbacks)
    with pytest.raises(DivergenceError, match="the training loss"):
        trainer.train()
    # λ > 0: on by default; False switches it off
    assert DecorrTrainer(model=tiny_bert(), args=make_args(tmp_path, decorr_weight=0.1)).decorr_guard_active
    assert not DecorrTrainer(model=tiny_bert(),
                             args=make_args(tmp_path, decorr_weight=0.1,
                                            decorr_stop_on_nonfinite=False)).decorr_guard_active
