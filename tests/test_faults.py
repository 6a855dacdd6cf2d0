"""Faults and bad input (issue 11): the library keeps its promises when something goes wrong.

Each test names the case of the issue it covers. The recipe-level cases (resume, divergence through
the command line, complete-or-absent outputs, bad data) are in tests/test_recipe_faults.py.
"""

import json
import math
import os
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from transformers import HfArgumentParser, Trainer, TrainerCallback, TrainingArguments

from hf_decorr import (
    DECORR_CONFIG_NAME,
    DecorrConfig,
    DecorrTrainingArguments,
    decorrelation_metrics,
    resolve_layers,
)
from hf_decorr.metrics import CovarianceAccumulator


def make_args(tmp_path, **kw):
    kw.setdefault("report_to", [])
    kw.setdefault("use_cpu", True)
    kw.setdefault("disable_tqdm", True)
    return DecorrTrainingArguments(output_dir=str(tmp_path), **kw)


# ------------------------------------------------------------------ case 5: wrong base order


def test_case5_config_after_training_arguments_is_refused_at_class_creation():
    with pytest.raises(TypeError, match=r"DecorrConfig must come before TrainingArguments in the bases.*"
                                        r"write class Wrong\(DecorrConfig, TrainingArguments\)"):
        @dataclass
        class Wrong(TrainingArguments, DecorrConfig):
            pass

    from transformers import Seq2SeqTrainingArguments

    with pytest.raises(TypeError, match=r"write class Wrong2\(DecorrConfig, Seq2SeqTrainingArguments\)"):
        @dataclass
        class Wrong2(Seq2SeqTrainingArguments, DecorrConfig):
            pass

    # the documented order, and subclasses of the shipped classes, are fine and validate
    @dataclass
    class Right(DecorrConfig, TrainingArguments):
        pass

    @dataclass
    class Sub(DecorrTrainingArguments):
        extra: int = 1

    with pytest.raises(ValueError, match="decorr_weight must be a finite number >= 0, got -1"):
        Right(output_dir="o", decorr_weight=-1)
    with pytest.raises(ValueError, match="decorr_weight"):
        Sub(output_dir="o", decorr_weight=-1)


# ------------------------------------------------------------------ case 10: decorr_config.json round-trips


def test_case10_decorr_config_json_round_trips(tmp_path):
    args = make_args(tmp_path, decorr_weight=0.25, decorr_layers=["-1", "0"], decorr_penalty="decov",
                     decorr_pooling="mean", decorr_warmup_steps=7, decorr_sync="local", decorr_top_d=3,
                     decorr_variance_share=0.8, decorr_log_per_layer=False, decorr_eval_metrics=False)
    path = args.save_decorr_config(tmp_path / "model")
    # from_json, from the file or its folder
    for source in (path, tmp_path / "model"):
        back = DecorrConfig.from_json(source)
        assert type(back) is DecorrConfig and back.decorr_dict() == args.decorr_dict()
    # the full training arguments, with further constructor arguments
    full = DecorrTrainingArguments.from_json(path, output_dir=str(tmp_path / "again"), report_to=[])
    assert full.decorr_dict() == args.decorr_dict() and full.output_dir == str(tmp_path / "again")
    # HfArgumentParser reads it as it is, alone or as part of the training arguments
    (parsed,) = HfArgumentParser(DecorrConfig).parse_json_file(path)
    assert parsed.decorr_dict() == args.decorr_dict()
    (parsed_full,) = HfArgumentParser(DecorrTrainingArguments).parse_json_file(path)
    assert parsed_full.decorr_dict() == args.decorr_dict()
    with open(path) as f:
        assert sorted(json.load(f)) == sorted(args.decorr_dict())


def test_case10_from_json_reads_old_files_and_refuses_unknown_keys(tmp_path):
    old = tmp_path / DECORR_CONFIG_NAME
    old.write_text(json.dumps({"decorr_weight": 0.5, "decorr_layers": ["last"], "hf_decorr_version": "0.1.0"}))
    assert DecorrConfig.from_json(old).decorr_weight == 0.5  # files of hf_decorr 0.1.0 carry a version key
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"decorr_weigth": 0.5}))
    with pytest.raises(ValueError, match=r"unknown decorr setting\(s\) \['decorr_weigth'\]"):
        DecorrConfig.from_json(bad)
    bad.write_text(json.dumps({"decorr_weight": -2}))
    with pytest.raises(ValueError, match="decorr_weight must be a finite number >= 0"):
        DecorrConfig.from_json(bad)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="is not valid JSON"):
        DecorrConfig.from_json(bad)


# ------------------------------------------------------------------ case 11: collapsed layers are not perfect


def test_case11_metrics_of_collapsed_layers_and_of_too_few_samples_are_nan():
    undefined = ("mapc", "cvr", "tdv", "ud", "pca_ud")
    g = torch.Generator().manual_seed(0)
    dead = CovarianceAccumulator()
    dead.update(torch.zeros(20, 6))
    one_live = CovarianceAccumulator()
    x = torch.zeros(20, 6)
    x[:, 2] = torch.randn(20, generator=g)
    one_live.update(x)
    for acc, live in ((dead, 0.0), (one_live, 1.0)):
        m = decorrelation_metrics(acc.covariance(), samples=acc.count)
        assert all(math.isnan(m[k]) for k in undefined), m
        assert m["live_units"] == live and m["samples"] == 20.0 and math.isfinite(m["cov_l1"])
    single = CovarianceAccumulator()
    single.update(torch.randn(5, 4, generator=g), torch.tensor([0, 0, 1, 0, 0]))
    m = decorrelation_metrics(single.covariance(), samples=single.count)
    assert all(math.isnan(m[k]) for k in (*undefined, "cov_l1")) and m["samples"] == 1.0
    # two live units: defined again
    two = x.clone()
    two[:, 4] = torch.randn(20, generator=g)
    m = decorrelation_metrics(torch.cov(two.T.double()))
    assert m["live_units"] == 2.0 and 0.0 <= m["mapc"] <= 1.0 and m["cvr"] >= 1.0


# ------------------------------------------------------------------ case 12: no sub-modules


def test_case12_model_without_submodules_gets_a_sensible_message():
    with pytest.raises(ValueError) as info:
        resolve_layers(nn.Linear(4, 4), ["last"])
    message = str(info.value)
    assert "modules include: " not in message
    assert "the model (Linear) has no sub-modules, so there is no layer to penalise" in message


# ------------------------------------------------------------------ case 2: divergence stops training


def train_args(tmp_path, **kw):
    options = dict(per_device_train_batch_size=4, learning_rate=1e-3, max_steps=6, logging_steps=2,
                   save_strategy="no", decorr_layers=["0", "1"], train_sampling_strategy="sequential", seed=0)
    options.update(kw)
    return make_args(tmp_path, **options)


def test_case2_huge_weight_stops_training_before_anything_is_saved(tmp_path):
    from tiny_models import tiny_bert, token_dataset

    from hf_decorr import DecorrTrainer, DivergenceError

    args = train_args(tmp_path, decorr_weight=1e30, max_grad_norm=0.0, save_strategy="steps", save_steps=1)
    trainer = DecorrTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset(24))
    with pytest.raises(DivergenceError) as info:
        trainer.train()
    message = str(info.value)
    assert "\n" not in message and message.startswith("training diverged: ")
    assert "decorr_weight (now 1e+30)" in message and "max_grad_norm > 0 (now 0)" in message
    # step 1's update made the weights NaN: the save at step 1 is refused, so no checkpoint exists at all
    assert info.value.step == 1 and os.listdir(tmp_path) == []


class NaNAtStep(TrainerCallback):
    """Makes the penalty NaN from optimizer step ``k`` on (0-based), through a flag the penalty reads."""

    def __init__(self, k):
        self.k, self.on = k, False

    def on_step_begin(self, args, state, control, **kwargs):
        self.on = state.global_step >= self.k


def test_case2_nonfinite_penalty_is_found_at_the_next_logging_step_without_a_sync_per_step(tmp_path):
    from tiny_models import tiny_bert, token_dataset

    from hf_decorr import DecorrTrainer, DivergenceError

    flag = NaNAtStep(2)

    def penalty(cov):
        value = cov.abs().mean(dim=(-2, -1))
        return value * math.nan if flag.on else value

    # λ = 0: the penalty is only measured, the loss stays finite; with the guard switched on it counts all the same
    args = train_args(tmp_path, decorr_weight=0.0, logging_steps=5, max_steps=8, decorr_stop_on_nonfinite=True)
    trainer = DecorrTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset(40), decorr_penalty_fn=penalty,
                            callbacks=[flag])
    with pytest.raises(DivergenceError, match=r"the decorrelation penalty became NaN or infinite at optimizer step 3 "
                                              r"\(detected at step 5\)") as info:
        trainer.train()
    # steps 3 and 4 ran on: the flag lives on the device and is read at the logging step only
    assert (info.value.first_step, info.value.step) == (3, 5)
    assert "the training loss" not in str(info.value)


def test_case2_nonfinite_loss_and_the_option_to_train_on(tmp_path):
    from tiny_models import tiny_bert, token_dataset

    from hf_decorr import DecorrTrainer, DivergenceError

    flag = NaNAtStep(1)

    def penalty(cov):
        value = cov.abs().mean(dim=(-2, -1))
        return value * math.nan if flag.on else value

    args = train_args(tmp_path / "a", decorr_weight=0.5, logging_steps=2, max_steps=4)
    trainer = DecorrTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset(24), decorr_penalty_fn=penalty,
                            callbacks=[flag])
    with pytest.raises(DivergenceError, match="the training loss, the decorrelation penalty and the gradient "
                                              "norm became NaN or infinite at optimizer step 2"):
        trainer.train()
    # decorr_stop_on_nonfinite=False: the old behaviour, trains on with NaN weights
    off = NaNAtStep(1)

    def penalty_off(cov):
        value = cov.abs().mean(dim=(-2, -1))
        return value * math.nan if off.on else value

    args = train_args(tmp_path / "b", decorr_weight=0.5, logging_steps=2, max_steps=4, decorr_stop_on_nonfinite=False)
    trainer = DecorrTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset(24),
                            decorr_penalty_fn=penalty_off, callbacks=[off])
    trainer.train()
    assert trainer.state.global_step == 4
    assert any(math.isnan(entry.get("task_loss", 0.0)) for entry in trainer.state.log_history)


class PoisonAfterLastStep(TrainerCallback):
    """Puts a NaN into one weight right after the last optimizer step (the loss of that step was finite)."""

    def __init__(self, model):
        self.model = model

    def on_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step == state.max_steps - 1:
            with torch.no_grad():
                self.model.classifier.weight[0, 0] = math.nan


def test_case2_nonfinite_weights_at_the_end_of_training_and_at_save(tmp_path):
    from tiny_models import tiny_bert, token_dataset

    from hf_decorr import DecorrTrainer, DivergenceError

    model = tiny_bert()
    args = train_args(tmp_path, decorr_weight=0.5, max_steps=3, logging_steps=10)
    trainer = DecorrTrainer(model=model, args=args, train_dataset=token_dataset(24),
                            callbacks=[PoisonAfterLastStep(model)])
    with pytest.raises(DivergenceError, match="the trained weights hold NaN or infinite values after optimizer "
                                              "step 3"):
        trainer.train()
    # a direct save of non-finite weights is refused too, and writes nothing
    with pytest.raises(DivergenceError):
        trainer.save_model(str(tmp_path / "final"))
    assert not (tmp_path / "final").exists()
    with torch.no_grad():
        model.classifier.weight[0, 0] = 0.0
    trainer.save_model(str(tmp_path / "final"))
    assert (tmp_path / "final" / "model.safetensors").is_file()


# ------------------------------------------------------------------ case 4: hooks, copies, several trainers


def test_case4_a_deepcopy_reports_to_its_own_trainer_only(tmp_path):
    import copy
    import io

    from tiny_models import tiny_bert, token_dataset

    from hf_decorr import DecorrTrainer

    seen = []

    class Counting(DecorrTrainer):
        def decorr_samples(self, layer, output, inputs):
            seen.append((self.tag, layer))
            return super().decorr_samples(layer, output, inputs)

    model = tiny_bert()
    first = Counting(model=model, args=train_args(tmp_path / "a", max_steps=1), train_dataset=token_dataset(8))
    first.tag = "first"
    first.train()
    twin = copy.deepcopy(model)  # after the original trainer trained
    batch = first.data_collator([token_dataset(4)[i] for i in range(4)])
    twin.train()
    twin(**batch).loss.backward()  # a forward of the copy outside any trainer reports nowhere
    assert seen == [("first", "bert.encoder.layer.0"), ("first", "bert.encoder.layer.1")]
    second = Counting(model=twin, args=train_args(tmp_path / "b", max_steps=2), train_dataset=token_dataset(8))
    second.tag = "second"
    second.train()
    assert seen[2:] == [("second", "bert.encoder.layer.0"), ("second", "bert.encoder.layer.1")] * 2
    for m in (model, twin):
        torch.save(m, io.BytesIO())
        assert not any(h for mod in m.modules() for h in mod._forward_hooks.values()
                       if getattr(h, "__module__", "").startswith("hf_decorr"))


# ------------------------------------------------------------------ case 5: mixin after the Trainer


def test_case5_trainer_mixin_after_trainer_is_refused_and_settings_are_checked_again(tmp_path):
    from tiny_models import tiny_bert

    from hf_decorr import DecorrTrainer, DecorrTrainerMixin

    with pytest.raises(TypeError, match=r"DecorrTrainerMixin must come before Trainer in the bases.*"
                                        r"write class Wrong\(DecorrTrainerMixin, Trainer\)"):
        class Wrong(Trainer, DecorrTrainerMixin):
            pass

    args = train_args(tmp_path)
    args.decorr_weight = -1.0  # changed after the arguments were built
    with pytest.raises(ValueError, match="decorr_weight must be a finite number >= 0, got -1"):
        DecorrTrainer(model=tiny_bert(), args=args)


# ------------------------------------------------------------------ case 7: a layer that never runs


def test_case7_a_layer_that_never_runs_is_one_clear_error(tmp_path):
    from tiny_models import tiny_bert, token_dataset

    from hf_decorr import DecorrError, DecorrTrainer

    model = tiny_bert()
    model.unused = nn.Linear(32, 32)
    trainer = DecorrTrainer(model=model, args=train_args(tmp_path, decorr_layers=["unused"]),
                            train_dataset=token_dataset(8))
    with pytest.raises(DecorrError) as info:
        trainer.train()
    assert isinstance(info.value, RuntimeError)
    assert str(info.value) == ("decorr_layers: module 'unused' did not run during the forward pass, so it cannot be "
                               "penalised; choose a module that the model's forward uses")


# ------------------------------------------------------------------ case 11: in the trainer


def test_case11_eval_without_samples_gives_nan_metrics(tmp_path):
    from tiny_models import tiny_bert, token_dataset

    from hf_decorr import DecorrTrainer

    class NoEvalSamples(DecorrTrainer):
        mode = "mask"

        def decorr_samples(self, layer, output, inputs):
            x, mask = super().decorr_samples(layer, output, inputs)
            if self.model.training:
                return x, mask
            if self.mode == "skip":
                raise ValueError("not this batch")
            return x, torch.zeros(x.shape[0], dtype=torch.bool)

    trainer = NoEvalSamples(model=tiny_bert(), args=train_args(tmp_path, decorr_layers=["1"]),
                            eval_dataset=token_dataset(8))
    for mode in ("mask", "skip"):
        trainer.mode = mode
        metrics = trainer.evaluate()
        assert metrics["eval_decorr_samples"] == 0.0, mode
        for key in ("mapc", "cvr", "tdv", "ud", "pca_ud"):
            assert math.isnan(metrics[f"eval_decorr_{key}"]), (mode, key)


class Collapse(TrainerCallback):
    """Makes the pooler's output constant during the evaluation at ``step`` (a collapsed layer)."""

    def __init__(self, model, step):
        self.step, self.on = step, False
        model.bert.pooler.register_forward_hook(
            lambda module, args, out: torch.zeros_like(out) if self.on and not module.training else None
        )

    def on_step_end(self, args, state, control, **kwargs):
        self.on = state.global_step == self.step


def test_case11_best_model_by_mapc_is_never_a_collapsed_one(tmp_path):
    from tiny_models import tiny_bert, token_dataset

    from hf_decorr import DecorrTrainer

    model = tiny_bert()
    collapse = Collapse(model, step=1)
    args = train_args(tmp_path, decorr_layers=["bert.pooler"], max_steps=2, eval_strategy="steps", eval_steps=1,
                      save_strategy="steps", save_steps=1, metric_for_best_model="eval_decorr_mapc",
                      greater_is_better=False, load_best_model_at_end=True, decorr_weight=0.1)
    trainer = DecorrTrainer(model=model, args=args, train_dataset=token_dataset(8), eval_dataset=token_dataset(8),
                            callbacks=[collapse])
    trainer.train()
    evals = [e for e in trainer.state.log_history if "eval_decorr_mapc" in e]
    assert math.isnan(evals[0]["eval_decorr_mapc"]) and evals[0]["eval_decorr_live_units"] == 0.0
    assert 0.0 < evals[1]["eval_decorr_mapc"] < 1.0
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")


# ------------------------------------------------------------------ case 12: no arguments


def test_case12_no_arguments_builds_default_ones_like_trainer(tmp_path, monkeypatch):
    from tiny_models import tiny_bert, tiny_t5

    from hf_decorr import DecorrSeq2SeqTrainer, DecorrSeq2SeqTrainingArguments, DecorrTrainer

    monkeypatch.chdir(tmp_path)
    plain = Trainer(tiny_bert())
    for trainer in (DecorrTrainer(tiny_bert()), DecorrTrainer(tiny_bert(), None), DecorrTrainer(model=tiny_bert())):
        assert type(trainer.args) is DecorrTrainingArguments
        assert trainer.args.output_dir == plain.args.output_dir
        assert trainer.decorr_layer_names == ["bert.encoder.layer.1"]
    seq2seq = DecorrSeq2SeqTrainer(tiny_t5())
    assert type(seq2seq.args) is DecorrSeq2SeqTrainingArguments and seq2seq.args.output_dir == plain.args.output_dir


def test_case12_model_without_submodules_in_a_trainer(tmp_path):
    from hf_decorr import DecorrTrainer

    with pytest.raises(ValueError, match="has no sub-modules, so there is no layer to penalise"):
        DecorrTrainer(model=nn.Linear(4, 4), args=train_args(tmp_path, decorr_layers=["last"]))
