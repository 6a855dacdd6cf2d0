"""DecorrTrainer end to end on tiny models: gradients, scaling, logging, evaluation, saving."""

from __future__ import annotations

import math
import os

import pytest
import torch
from tiny_models import model_and_data, tiny_bert, tiny_gpt2, token_dataset
from transformers import Trainer, TrainerCallback, TrainingArguments

from hf_decorr import DECORR_CONFIG_NAME, MODEL_TAG, DecorrTrainer, DecorrTrainingArguments, DivergenceError
from hf_decorr._compat import checkpointing_args
from hf_decorr.metrics import CovarianceAccumulator, decorrelation_metrics

COMMON = dict(report_to=[], use_cpu=True, save_strategy="no", eval_strategy="no", disable_tqdm=True,
              train_sampling_strategy="sequential", max_grad_norm=0.0, seed=0, data_seed=0)


def args_for(tmp_path, **kw) -> DecorrTrainingArguments:
    options = {**COMMON, "output_dir": str(tmp_path), "per_device_train_batch_size": 4, "logging_steps": 1,
               "learning_rate": 1e-2}
    options.update(kw)
    return DecorrTrainingArguments(**options)


class GradRecorder(TrainerCallback):
    """Keeps a copy of every parameter gradient right before each optimizer step."""

    def __init__(self):
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.grads.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def reference_penalty(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L_Σ straight from the formula on the valid tokens, in float64."""
    x = hidden[mask.bool()].double()
    c = torch.cov(x.T)
    return c.abs().sum() / x.shape[1] ** 2


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


# ---- one training step on every architecture ------------------------------------------------------


@pytest.mark.parametrize("arch", ["bert", "gpt2", "llama", "t5", "vit"])
def test_one_step_per_architecture(arch, tmp_path):
    model, data = model_and_data(arch, n=8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = args_for(tmp_path, max_steps=1, decorr_weight=1.0, decorr_layers=["0", "last"])
    trainer = DecorrTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])]
    assert changed, "the step changed no parameter"
    for key in ("loss", "task_loss", "decorr_loss", "decorr_weight"):
        values = logged(trainer, key)
        assert values and all(math.isfinite(v) for v in values), key
    assert logged(trainer, "decorr_loss")[0] > 0
    assert MODEL_TAG in model.model_tags

    # the captured tensors are the block outputs asked for: compare with output_hidden_states
    recorder = SampleRecorder(model=model, args=args)
    batch = recorder.data_collator([data[i] for i in range(4)])
    model.train()
    torch.manual_seed(0)
    recorder.compute_loss(model, batch)
    torch.manual_seed(0)
    out = model(**batch, output_hidden_states=True)
    states = out.encoder_hidden_states if arch == "t5" else out.hidden_states
    first = recorder.decorr_layer_names[0]
    assert first.endswith(".0")
    torch.testing.assert_close(recorder.outputs[first], states[1])
    if arch == "t5":
        torch.testing.assert_close(recorder.outputs["decoder.block.0"], out.decoder_hidden_states[1])
        assert recorder.decorr_layer_names == ["encoder.block.0", "decoder.block.0", "encoder.block.1",
                                               "decoder.block.1"]
    assert not decorr_hooks(model), "hooks left on the model after the step"


def decorr_hooks(model) -> list:
    """The forward hooks of hf_decorr on the model's modules."""
    return [h for m in model.modules() for h in m._forward_hooks.values()
            if getattr(h, "__module__", "").startswith("hf_decorr")]


class SampleRecorder(DecorrTrainer):
    """Records each layer's output through the public sample hook."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.outputs = {}

    def decorr_samples(self, layer, output, inputs):
        self.outputs[layer] = output.detach()
        return super().decorr_samples(layer, output, inputs)


# ---- gradient accumulation ----------------------------------------------------------------------


@pytest.mark.parametrize("arch,accepts_loss_kwargs", [("bert", True), ("bert", False), ("gpt2", True)])
@pytest.mark.parametrize("accumulation", [1, 2, 4])
def test_penalty_gradient_under_accumulation(arch, accepts_loss_kwargs, accumulation, tmp_path):
    """grad(λ) − grad(0) after one optimizer step = λ × mean over micro-batches of ∇P_micro."""
    kind = "classification" if arch == "bert" else "causal"
    data = token_dataset(8, seed=3, kind=kind)
    build = tiny_bert if arch == "bert" else tiny_gpt2
    weight = 0.7
    grads = {}
    for lam in (weight, 0.0):
        model = build(seed=1)
        recorder = GradRecorder()
        args = args_for(tmp_path, max_steps=1, per_device_train_batch_size=8 // accumulation,
                        gradient_accumulation_steps=accumulation, decorr_weight=lam, decorr_layers=["0"])
        trainer = DecorrTrainer(model=model, args=args, train_dataset=data, callbacks=[recorder])
        trainer.model_accepts_loss_kwargs = accepts_loss_kwargs
        trainer.train()
        grads[lam] = recorder.grads[0]

    model = build(seed=1)
    model.train()
    params = dict(model.named_parameters())
    micro = 8 // accumulation
    reference = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    collate = trainer.data_collator
    for k in range(accumulation):
        batch = collate([data[i] for i in range(k * micro, (k + 1) * micro)])
        out = model(**batch, output_hidden_states=True)
        penalty = reference_penalty(out.hidden_states[1], batch["attention_mask"])
        names = [n for n, p in params.items() if p.requires_grad]
        for n, g in zip(names, torch.autograd.grad(penalty, [params[n] for n in names], allow_unused=True)):
            if g is not None:
                reference[n] += g.double() * weight / accumulation
    diff_norm = ref_norm = 0.0
    for n, ref in reference.items():
        got = (grads[weight].get(n, torch.zeros_like(ref)) - grads[0.0].get(n, torch.zeros_like(ref))).double()
        diff_norm += (got - ref).square().sum().item()
        ref_norm += ref.square().sum().item()
    assert ref_norm > 0
    assert math.sqrt(diff_norm) <= 2e-4 * math.sqrt(ref_norm)


# ---- λ = 0 is a plain Trainer -------------------------------------------------------------------


def test_zero_weight_reproduces_plain_trainer(tmp_path):
    data = token_dataset(24, seed=5)
    options = {**COMMON, "per_device_train_batch_size": 4, "logging_steps": 1, "learning_rate": 5e-3,
               "num_train_epochs": 1, "train_sampling_strategy": "random", "max_grad_norm": 1.0}

    def run(trainer_cls, args_cls, **extra):
        model = tiny_bert(seed=2)
        model.config.hidden_dropout_prob = 0.1
        args = args_cls(output_dir=str(tmp_path / trainer_cls.__name__), **options, **extra)
        trainer = trainer_cls(model=model, args=args, train_dataset=data, eval_dataset=data)
        trainer.train()
        return trainer, logged(trainer, "loss"), [p.detach().clone() for p in model.parameters()], trainer.evaluate()

    plain, plain_losses, plain_params, plain_eval = run(Trainer, TrainingArguments)
    ours, our_losses, our_params, our_eval = run(DecorrTrainer, DecorrTrainingArguments, decorr_weight=0.0,
                                                 decorr_layers=["all"])
    assert len(plain_losses) == 6
    assert our_losses == plain_losses
    assert all(torch.equal(a, b) for a, b in zip(plain_params, our_params))
    assert our_eval["eval_loss"] == plain_eval["eval_loss"]
    assert all(v > 0 for v in logged(ours, "decorr_loss"))  # still monitored
    assert set(logged(ours, "decorr_weight")) == {0.0}


def test_logged_loss_decomposes(tmp_path):
    model, data = model_and_data("bert", n=16)
    args = args_for(tmp_path, max_steps=4, logging_steps=2, gradient_accumulation_steps=2, decorr_weight=0.5,
                    decorr_layers=["all"])
    trainer = DecorrTrainer(model=model, args=args, train_dataset=data)
    trainer.model_accepts_loss_kwargs = False  # training_step divides: the logged loss is a mean
    trainer.train()
    for entry in trainer.state.log_history:
        if "task_loss" in entry:
            per_layer = [v for k, v in entry.items() if k.startswith("decorr_loss/")]
            assert len(per_layer) == 2
            assert entry["decorr_loss"] == pytest.approx(sum(per_layer), rel=1e-6)
            assert entry["loss"] == pytest.approx(entry["task_loss"] + 0.5 * entry["decorr_loss"], rel=1e-5)


# ---- gradient checkpointing ---------------------------------------------------------------------


@pytest.mark.parametrize("layers", [["all"], ["bert.encoder.layer.*.attention"]])
def test_gradient_checkpointing_same_penalty_and_gradients(layers, tmp_path):
    data = token_dataset(8, seed=4)
    results = []
    for checkpointing in (False, True):
        model = tiny_bert(seed=3)
        recorder = GradRecorder()
        args = args_for(tmp_path, max_steps=1, per_device_train_batch_size=8, decorr_weight=1.0,
                        decorr_layers=layers, **checkpointing_args(checkpointing))
        trainer = DecorrTrainer(model=model, args=args, train_dataset=data, callbacks=[recorder])
        trainer.train()
        results.append((logged(trainer, "decorr_loss")[0], recorder.grads[0]))
    (p0, g0), (p1, g1) = results
    assert p0 == pytest.approx(p1, rel=1e-6)
    for name in g0:
        torch.testing.assert_close(g1[name], g0[name], rtol=1e-5, atol=1e-7)


def test_reentrant_checkpointing_works_on_blocks_and_is_refused_inside(tmp_path):
    data = token_dataset(8, seed=4)
    args = args_for(tmp_path, max_steps=1, per_device_train_batch_size=8, decorr_layers=["all"],
                    **checkpointing_args(True, use_reentrant=True))
    trainer = DecorrTrainer(model=tiny_bert(), args=args, train_dataset=data)
    trainer.train()
    assert math.isfinite(logged(trainer, "decorr_loss")[0])
    args = args_for(tmp_path, max_steps=1, per_device_train_batch_size=8,
                    decorr_layers=["bert.encoder.layer.0.attention"], **checkpointing_args(True, use_reentrant=True))
    trainer = DecorrTrainer(model=tiny_bert(), args=args, train_dataset=data)
    with pytest.raises(RuntimeError, match="ran without autograd.*use_reentrant"):
        trainer.train()


# ---- checkpoints, resume, saving ---------------------------------------------------------------


def test_resume_continues_schedule_and_saves_config(tmp_path):
    data = token_dataset(32, seed=6)
    base = dict(max_steps=6, decorr_weight=3.0, decorr_warmup_steps=4, save_strategy="steps", save_steps=3)
    full = DecorrTrainer(model=tiny_bert(seed=4), args=args_for(tmp_path / "full", **base), train_dataset=data)
    full.train()
    expected = logged(full, "decorr_weight")
    assert expected == pytest.approx([0.75, 1.5, 2.25, 3.0, 3.0, 3.0])
    checkpoint = tmp_path / "full" / "checkpoint-3"
    assert (checkpoint / DECORR_CONFIG_NAME).exists() and (checkpoint / "model.safetensors").exists()

    resumed = DecorrTrainer(model=tiny_bert(seed=9), args=args_for(tmp_path / "resumed", **base),
                            train_dataset=data)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    assert logged(resumed, "decorr_weight")[-3:] == pytest.approx(expected[-3:])
    assert logged(resumed, "loss")[-3:] == pytest.approx(logged(full, "loss")[-3:], rel=1e-5)
    resumed.save_model()
    assert (tmp_path / "resumed" / DECORR_CONFIG_NAME).exists()
    assert not [p for p in os.listdir(tmp_path / "resumed") if p.endswith(".tmp")]


# ---- evaluation ----------------------------------------------------------------------------------


def test_eval_metrics_cover_the_whole_set_and_ignore_batch_size(tmp_path):
    model = tiny_bert(seed=5)
    data = token_dataset(19, seed=7)
    metrics = []
    for batch in (3, 19):
        args = args_for(tmp_path, per_device_eval_batch_size=batch, decorr_layers=["-1", "0"])
        trainer = DecorrTrainer(model=model, args=args, eval_dataset=data)
        metrics.append(trainer.evaluate())
    a, b = metrics
    assert a["eval_loss"] == pytest.approx(b["eval_loss"], rel=1e-5)
    for key in a:
        if key.startswith("eval_decorr_"):
            assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-9), key
    # independent computation from output_hidden_states over the whole set
    batch = trainer.data_collator([data[i] for i in range(len(data))])
    model.eval()
    with torch.no_grad():
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
    mask = batch["attention_mask"].bool()
    acc = CovarianceAccumulator()
    acc.update(hidden[mask])
    want = decorrelation_metrics(acc.covariance(), top_d=10)
    for key, value in want.items():
        assert a[f"eval_decorr_{key}/bert.encoder.layer.1"] == pytest.approx(value, rel=1e-5, abs=1e-8), key
    assert a["eval_decorr_samples"] == mask.sum().item()
    plain = Trainer(model=model, args=TrainingArguments(output_dir=str(tmp_path), **{
        k: v for k, v in COMMON.items()}), eval_dataset=data).evaluate()
    assert a["eval_loss"] == pytest.approx(plain["eval_loss"], rel=1e-6)


def test_eval_metrics_can_be_turned_off(tmp_path):
    args = args_for(tmp_path, decorr_eval_metrics=False)
    metrics = DecorrTrainer(model=tiny_bert(), args=args, eval_dataset=token_dataset(8)).evaluate()
    assert not [k for k in metrics if "decorr" in k]


# ---- bad input -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layers,pattern",
    [(["bert.encoder.nope"], "matches no module.*bert.encoder.layer \\(2 blocks\\)"),
     (["5"], "index 5 is out of range for 'bert.encoder.layer'")],
)
def test_bad_layers_fail_when_the_trainer_is_built(layers, pattern, tmp_path):
    with pytest.raises(ValueError, match=pattern):
        DecorrTrainer(model=tiny_bert(), args=args_for(tmp_path, decorr_layers=layers))


def test_layer_without_tensor_output_fails_at_first_step(tmp_path):
    model = tiny_bert()
    layer = model.bert.encoder.layer[0].attention
    layer.register_forward_hook(lambda module, args, output: {"nothing": None})
    args = args_for(tmp_path, max_steps=1, decorr_layers=["bert.encoder.layer.0.attention"])
    trainer = DecorrTrainer(model=model, args=args, train_dataset=token_dataset(8))
    with pytest.raises(TypeError, match="decorr_layers: module 'bert.encoder.layer.0.attention'.*holds no tensor"):
        trainer.train()


def test_last_pooling_without_attention_mask_fails_at_first_step(tmp_path):
    data = token_dataset(8).remove_columns("attention_mask")
    args = args_for(tmp_path, max_steps=1, decorr_pooling="last")
    trainer = DecorrTrainer(model=tiny_bert(), args=args, train_dataset=data)
    with pytest.raises(ValueError, match="decorr_pooling='last' needs an attention mask"):
        trainer.train()


def test_labels_mask_without_token_labels_fails(tmp_path):
    args = args_for(tmp_path, max_steps=1, decorr_mask="labels")
    trainer = DecorrTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset(8))
    with pytest.raises(ValueError, match="decorr_mask='labels' needs token labels"):
        trainer.train()


def test_plain_training_arguments_are_refused(tmp_path):
    with pytest.raises(TypeError, match="needs args that include the decorr settings"):
        DecorrTrainer(model=tiny_bert(), args=TrainingArguments(output_dir=str(tmp_path), **COMMON))


def test_non_finite_activations_reach_the_loss(tmp_path):
    model = tiny_bert()
    model.bert.encoder.layer[0].register_forward_hook(lambda m, a, out: out * float("nan"))
    args = args_for(tmp_path, max_steps=1, decorr_layers=["0"], logging_nan_inf_filter=False)
    with pytest.raises(DivergenceError, match="training diverged"):  # the default: stop (see test_faults.py)
        DecorrTrainer(model=model, args=args, train_dataset=token_dataset(8)).train()
    args = args_for(tmp_path, max_steps=1, decorr_layers=["0"], logging_nan_inf_filter=False,
                    decorr_stop_on_nonfinite=False)
    trainer = DecorrTrainer(model=model, args=args, train_dataset=token_dataset(8))
    trainer.train()
    assert math.isnan(logged(trainer, "decorr_loss")[0])


class NoSyncCheck(DecorrTrainer):
    """Forbids host syncs from the first penalty sample hook to the end of compute_loss."""

    monkeypatch = None

    def decorr_samples(self, layer, output, inputs):
        if self.monkeypatch is not None:
            def forbidden(*a, **k):
                raise AssertionError("host sync in the penalty path")

            for name in ("item", "tolist", "__bool__", "__float__", "__int__", "nonzero", "numpy"):
                self.monkeypatch.setattr(torch.Tensor, name, forbidden)
        return super().decorr_samples(layer, output, inputs)


@pytest.mark.parametrize("pooling", ["mean", "tokens"])
def test_penalty_path_makes_no_host_sync(pooling, tmp_path, monkeypatch):
    args = args_for(tmp_path, decorr_layers=["all"], decorr_pooling=pooling)
    trainer = NoSyncCheck(model=tiny_bert(), args=args)
    trainer.decorr_compact_cpu_tokens = False  # the accelerator path (the CPU one gathers the valid rows)
    batch = trainer.data_collator([token_dataset(8)[i] for i in range(8)])
    trainer.model.train()
    trainer.monkeypatch = monkeypatch
    loss = trainer.compute_loss(trainer.model, batch)
    monkeypatch.undo()
    assert torch.isfinite(loss)


def test_cpu_token_compaction_gives_the_masked_result(tmp_path, monkeypatch):
    data = token_dataset(8, seed=2)
    results = []
    selects = []
    original = torch.Tensor.index_select
    monkeypatch.setattr(torch.Tensor, "index_select", lambda self, *a: selects.append(1) or original(self, *a))
    for compact in (True, False):
        selects.clear()
        args = args_for(tmp_path, decorr_layers=["all"], decorr_weight=1.0)
        trainer = DecorrTrainer(model=tiny_bert(seed=6), args=args)
        trainer.decorr_compact_cpu_tokens = compact
        batch = trainer.data_collator([data[i] for i in range(8)])
        trainer.model.train()
        with_penalty = trainer.compute_loss(trainer.model, batch)
        trainer.args.decorr_weight = 0.0
        task = trainer.compute_loss(trainer.model, batch)
        trainer.args.decorr_weight = 1.0
        assert bool(selects) == compact  # the valid rows were gathered only on the compact path
        (with_penalty - task.detach()).backward()
        results.append((with_penalty.detach() - task.detach(),
                        [p.grad.clone() for p in trainer.model.parameters() if p.grad is not None]))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=0)
    assert results[0][0] > 0
    for a, b in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
