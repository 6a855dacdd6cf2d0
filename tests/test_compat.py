"""hf_decorr._compat: version-gated workarounds, checked against the installed versions' behaviour."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from conftest import REPO_ROOT
from torch import nn

from hf_decorr import _compat


@pytest.mark.parametrize("version, needed", [("1.3.0", False), ("1.13.1", False), ("1.14.0.dev0", True),
                                             ("1.14.0", True), ("1.15.0", True), ("2.0.0", True)])
def test_eval_prepare_gate(version, needed):
    assert _compat.needs_eval_prepare_undo(version) is needed


def test_the_gate_matches_the_installed_accelerate():
    """The premise of the gate: accelerate ≥ 1.14 returns a model marked prepared untouched (no autocast wrap)."""
    code = (
        "import torch\n"
        "from accelerate import Accelerator\n"
        "acc = Accelerator(cpu=True, mixed_precision='bf16')\n"
        "model = torch.nn.Linear(2, 2)\n"
        "model._is_accelerate_prepared = True\n"
        "acc.prepare_model(model)\n"
        "print('skipped' if '_original_forward' not in vars(model) else 'prepared again')\n"
    )
    env = dict(os.environ, PYTHONPATH=REPO_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    skipped = proc.stdout.strip().splitlines()[-1] == "skipped"
    assert skipped is _compat.needs_eval_prepare_undo()


def _trainer(processes: int = 2, in_train: bool = False):
    model = nn.Linear(2, 2)
    accelerator = SimpleNamespace(num_processes=processes, _models=[])
    return SimpleNamespace(model=model, model_wrapped=model, accelerator=accelerator, is_in_train=in_train,
                           is_deepspeed_enabled=False, is_fsdp_enabled=False)


def _eval_only_prepare(trainer):
    """What transformers' evaluation_loop does to a model no training has prepared (DDP, evaluation mode)."""
    trainer.model._is_accelerate_prepared = True
    trainer.accelerator._models.append(trainer.model)


@pytest.mark.parametrize("needed", [True, False])
def test_undo_eval_only_prepare_on_several_processes(monkeypatch, needed):
    monkeypatch.setattr(_compat, "needs_eval_prepare_undo", lambda: needed)
    trainer = _trainer()
    with _compat.undo_eval_only_prepare(trainer):
        _eval_only_prepare(trainer)
    assert ("_is_accelerate_prepared" in vars(trainer.model)) is not needed
    assert (trainer.accelerator._models == [trainer.model]) is not needed


def test_undo_happens_also_when_the_evaluation_fails(monkeypatch):
    monkeypatch.setattr(_compat, "needs_eval_prepare_undo", lambda: True)
    trainer = _trainer()
    with pytest.raises(RuntimeError), _compat.undo_eval_only_prepare(trainer):
        _eval_only_prepare(trainer)
        raise RuntimeError("eval failed")
    assert "_is_accelerate_prepared" not in vars(trainer.model) and trainer.accelerator._models == []


@pytest.mark.parametrize("case", ["one process", "in train", "already prepared", "wrapped"])
def test_undo_leaves_other_cases_alone(monkeypatch, case):
    monkeypatch.setattr(_compat, "needs_eval_prepare_undo", lambda: True)
    trainer = _trainer(processes=1 if case == "one process" else 2, in_train=case == "in train")
    if case == "already prepared":
        _eval_only_prepare(trainer)
    if case == "wrapped":
        trainer.model_wrapped = nn.Sequential(trainer.model)
    with _compat.undo_eval_only_prepare(trainer):
        if case != "already prepared":
            _eval_only_prepare(trainer)
    assert trainer.model._is_accelerate_prepared is True and trainer.model in trainer.accelerator._models


# ---------------------------------------------------------------------- activation checkpointing


def test_checkpointing_names_follow_the_installed_transformers():
    import dataclasses

    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    expected = "activation_checkpointing" if "activation_checkpointing" in fields else "gradient_checkpointing"
    assert _compat.checkpointing_option() == expected
    assert set(_compat.checkpointing_args(True, use_reentrant=False)) == {expected, f"{expected}_kwargs"}
    args = TrainingArguments(output_dir="unused", report_to="none", **_compat.checkpointing_args(True))
    assert args.gradient_checkpointing is True  # the name every transformers 5.x reads


def test_checkpointing_option_maps_to_the_old_name_only_when_needed():
    old = {"gradient_checkpointing", "gradient_checkpointing_kwargs", "seed"}
    new = old | {"activation_checkpointing", "activation_checkpointing_kwargs"}
    assert _compat.checkpointing_option("activation_checkpointing", old) == "gradient_checkpointing"
    assert _compat.checkpointing_option("activation_checkpointing_kwargs", old) == "gradient_checkpointing_kwargs"
    assert _compat.checkpointing_option("activation_checkpointing", new) == "activation_checkpointing"
    assert _compat.checkpointing_option("seed", old) == "seed"
    assert _compat.checkpointing_option("no_such_option", old) == "no_such_option"


def test_recipe_parser_takes_the_new_name_on_an_older_transformers(tmp_path):
    """A dataclass with only the pre-5.2x names, as TrainingArguments had them: config and CLI both work."""
    import dataclasses

    from hf_decorr.app.parser import DecorrArgumentParser

    @dataclasses.dataclass
    class OldArguments:
        gradient_checkpointing: bool = False
        seed: int = 0

    config = tmp_path / "c.yaml"
    config.write_text("activation_checkpointing: true\n")
    (parsed,) = DecorrArgumentParser(OldArguments).parse_args_and_config(["--config", str(config)])
    assert parsed.gradient_checkpointing is True
    (parsed,) = DecorrArgumentParser(OldArguments).parse_args_and_config(["--activation_checkpointing", "true"])
    assert parsed.gradient_checkpointing is True
    (parsed,) = DecorrArgumentParser(OldArguments).parse_args_and_config(["--activation_checkpointing=false"])
    assert parsed.gradient_checkpointing is False


def test_assumption_sync_gradients_marks_the_last_micro_batch(tmp_path):
    """_compat.sync_gradients_now: the Trainer sets accelerate's sync_gradients before each training_step,
    true exactly for the last micro-batch of an optimizer step (the divergence guard reads the gradients there)."""
    from tiny_models import tiny_bert, token_dataset

    from hf_decorr import DecorrTrainer, DecorrTrainingArguments
    from hf_decorr._compat import sync_gradients_now

    marks = []

    class Recording(DecorrTrainer):
        def training_step(self, model, inputs, *args, **kwargs):
            marks.append(sync_gradients_now(self.accelerator))
            return super().training_step(model, inputs, *args, **kwargs)

    args = DecorrTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2,
                                   gradient_accumulation_steps=3, decorr_layers=["0"], report_to=[], use_cpu=True,
                                   save_strategy="no", disable_tqdm=True)
    Recording(model=tiny_bert(), args=args, train_dataset=token_dataset(24)).train()
    assert marks == [False, False, True, False, False, True], (
        "the assumption of hf_decorr._compat.sync_gradients_now no longer holds: the installed transformers does not "
        "mark the last micro-batch of an optimizer step with accelerator.sync_gradients before training_step"
    )


# ---------------------------------------------------------------- upstream assumptions (docs/COMPATIBILITY.md)


def _tiny_trainer(tmp_path, **kw):
    from tiny_models import tiny_bert, token_dataset

    from hf_decorr import DecorrTrainer, DecorrTrainingArguments

    options = dict(output_dir=str(tmp_path), per_device_train_batch_size=2, max_steps=2, decorr_layers=["0"],
                   report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    options.update(kw)
    return DecorrTrainer(model=tiny_bert(), args=DecorrTrainingArguments(**options),
                         train_dataset=token_dataset(8), eval_dataset=token_dataset(4))


@pytest.mark.parametrize("num_items", [None, 7])
def test_assumption_training_step_divides_as_mirrored(tmp_path, monkeypatch, num_items):
    """_compat.trainer_divides_loss mirrors training_step's rule for dividing by the accumulation steps."""
    from tiny_models import tiny_bert, token_dataset
    from transformers import Trainer, TrainingArguments

    from hf_decorr._compat import trainer_divides_loss

    trainer = Trainer(model=tiny_bert(), args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True),
                      train_dataset=token_dataset(4))
    trainer.create_optimizer_and_scheduler(num_training_steps=1)
    trainer.current_gradient_accumulation_steps = 4
    monkeypatch.setattr(Trainer, "compute_loss", lambda self, model, inputs, **kw: torch.tensor(8.0,
                                                                                                requires_grad=True))
    seen = []
    monkeypatch.setattr(trainer.accelerator, "backward", lambda loss, **kw: seen.append(float(loss)))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(2)])
    trainer.training_step(trainer.model, batch, num_items)
    expected = 2.0 if trainer_divides_loss(trainer, num_items) else 8.0
    assert seen == [expected], (
        "the assumption of hf_decorr._compat.trainer_divides_loss no longer holds: training_step divided the loss "
        f"differently ({seen}) from the mirrored rule ({expected})"
    )


def test_assumption_prediction_runs_the_model_in_eval_mode_without_grad(tmp_path, monkeypatch):
    """compute_loss tells training from evaluation by model.training and torch.is_grad_enabled()."""
    trainer = _tiny_trainer(tmp_path, decorr_weight=1.0)
    states = []
    original = type(trainer).compute_loss

    def spy(self, model, inputs, *args, **kwargs):
        states.append((model.training, torch.is_grad_enabled()))
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(type(trainer), "compute_loss", spy)
    trainer.evaluate()
    assert states and all(s == (False, False) for s in states), (
        "the assumption of DecorrTrainerMixin.compute_loss no longer holds: prediction_step ran compute_loss "
        f"with (model.training, grad enabled) = {states}"
    )


def test_assumption_checkpoints_are_written_through_save_model(tmp_path, monkeypatch):
    """The divergence guard refuses checkpoints in save_model: Trainer's checkpoints must go through it."""
    trainer = _tiny_trainer(tmp_path, decorr_weight=1.0, save_strategy="steps", save_steps=1)
    calls = []
    original = type(trainer).save_model

    def spy(self, output_dir=None, _internal_call=False):
        calls.append(os.path.basename(output_dir or ""))
        return original(self, output_dir, _internal_call)

    monkeypatch.setattr(type(trainer), "save_model", spy)
    trainer.train()
    assert calls[:2] == ["checkpoint-1", "checkpoint-2"], (
        "the assumption of DecorrTrainerMixin.save_model no longer holds: Trainer wrote checkpoints without "
        f"save_model ({calls})"
    )


def test_assumption_flow_flags_are_set_before_the_divergence_callback(tmp_path):
    """DivergenceCallback reads control.should_log/should_save in on_step_end: DefaultFlowCallback runs first."""
    from transformers import TrainerCallback

    from hf_decorr.monitor import DivergenceCallback

    trainer = _tiny_trainer(tmp_path, decorr_weight=1.0, logging_steps=1)
    seen = []

    class Probe(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            seen.append(control.should_log)

    names = [type(c).__name__ for c in trainer.callback_handler.callbacks]
    assert names.index("DefaultFlowCallback") < names.index(DivergenceCallback.__name__), (
        f"the assumption of hf_decorr.monitor.DivergenceCallback no longer holds: callbacks run in the order {names}"
    )
    trainer.add_callback(Probe())
    trainer.train()
    assert seen == [True, True]


def test_assumption_accelerator_names_its_loss_scaler():
    """The guard tells fp16 loss scaling by accelerator.scaler (None without a GradScaler)."""
    from accelerate import Accelerator

    assert Accelerator(cpu=True).scaler is None, (
        "the assumption of hf_decorr.trainer (accelerator.scaler marks fp16 loss scaling) no longer holds"
    )


def test_assumption_models_declare_their_hidden_state_classes():
    """transformers 5.x: ``_can_record_outputs["hidden_states"]`` names the blocks whose outputs are the hidden
    states (a class, an OutputRecorder, or a list of them); the block-stack rule relies on it to leave out
    wav2vec2's convolutional feature encoder, which is larger than a tiny encoder's transformer layers."""
    from transformers import LlamaConfig, LlamaForCausalLM, Wav2Vec2Config, Wav2Vec2ForSequenceClassification
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from transformers.models.wav2vec2.modeling_wav2vec2 import Wav2Vec2EncoderLayer

    from hf_decorr.capture import find_block_stacks

    llama = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=2))
    assert LlamaDecoderLayer in _compat.hidden_state_classes(llama), "assumption broken: Llama declares no blocks"
    wav2vec2 = Wav2Vec2ForSequenceClassification(Wav2Vec2Config(hidden_size=16, num_hidden_layers=2,
                                                                 num_attention_heads=2, intermediate_size=32,
                                                                 num_conv_pos_embeddings=16))
    assert Wav2Vec2EncoderLayer in _compat.hidden_state_classes(wav2vec2), "assumption broken: wav2vec2 declares none"
    assert [s.name for s in find_block_stacks(wav2vec2)] == ["wav2vec2.encoder.layers"]
    assert _compat.hidden_state_classes(nn.Sequential(nn.Linear(2, 2))) == ()
