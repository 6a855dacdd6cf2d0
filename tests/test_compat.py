"""hf_decorr._compat: version-gated workarounds, checked against the installed versions' behaviour."""

import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
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
