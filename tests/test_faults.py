"""Faults and bad input (issue 11): the library keeps its promises when something goes wrong.

Each test names the case of the issue it covers. The recipe-level cases (resume, divergence through
the command line, complete-or-absent outputs, bad data) are in tests/test_recipe_faults.py.
"""

import json
import math
from dataclasses import dataclass

import pytest
import torch
from torch import nn
from transformers import HfArgumentParser, TrainingArguments

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
