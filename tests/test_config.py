"""DecorrConfig: parsing from the command line and YAML, validation, schedule, saving."""

import json
import math

import pytest
from transformers import HfArgumentParser, TrainingArguments

from hf_decorr import DECORR_CONFIG_NAME, DecorrConfig, DecorrTrainingArguments
from hf_decorr.config import DEFAULT_DECORR_WEIGHT


def make(**kw):
    return DecorrTrainingArguments(output_dir="unused", report_to=[], use_cpu=True, **kw)


def test_defaults():
    args = make()
    assert args.decorr_weight == DEFAULT_DECORR_WEIGHT
    assert args.decorr_layers == ["last"]
    assert (args.decorr_penalty, args.decorr_pooling, args.decorr_mask) == ("cov_l1", "tokens", "attention_mask")
    assert isinstance(args, TrainingArguments) and isinstance(args, DecorrConfig)


def test_cli_parsing_with_negative_indices():
    parser = HfArgumentParser(DecorrTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", "o", "--decorr_weight", "0.1", "--decorr_layers", "-1", "-2", "--decorr_pooling", "mean",
         "--use_cpu", "--report_to", "none"]
    )
    assert args.decorr_weight == 0.1 and args.decorr_layers == ["-1", "-2"] and args.decorr_pooling == "mean"


def test_cli_rejects_bad_choice(capsys):
    parser = HfArgumentParser(DecorrTrainingArguments)
    with pytest.raises(SystemExit):
        parser.parse_args_into_dataclasses(["--output_dir", "o", "--decorr_penalty", "nope"])
    assert "decorr_penalty" in capsys.readouterr().err


def test_yaml_parsing(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: o\nuse_cpu: true\nreport_to: []\ndecorr_weight: 0.5\ndecorr_layers: [-1, 0]\n"
                    "decorr_penalty: decov\ndecorr_warmup_steps: 10\n")
    (args,) = HfArgumentParser(DecorrTrainingArguments).parse_yaml_file(str(path))
    assert args.decorr_layers == ["-1", "0"] and args.decorr_penalty == "decov" and args.decorr_warmup_steps == 10


@pytest.mark.parametrize(
    "kw,pattern",
    [
        ({"decorr_weight": -0.1}, "decorr_weight must be a finite number >= 0, got -0.1"),
        ({"decorr_weight": math.nan}, "decorr_weight must be a finite number >= 0, got nan"),
        ({"decorr_weight": math.inf}, "decorr_weight must be a finite number >= 0"),
        ({"decorr_weight": "big"}, "decorr_weight must be a number"),
        ({"decorr_penalty": "l2"}, r"decorr_penalty='l2' is not valid; choose one of \['cov_l1', 'decov'"),
        ({"decorr_pooling": "max"}, r"decorr_pooling='max' is not valid; choose one of \['tokens', 'mean'"),
        ({"decorr_mask": "x"}, r"decorr_mask='x' is not valid"),
        ({"decorr_sync": "all"}, r"decorr_sync='all' is not valid; choose one of \['global', 'local'\]"),
        ({"decorr_layers": []}, "decorr_layers must be a non-empty list"),
        ({"decorr_layers": [" "]}, "decorr_layers holds an empty spec"),
        ({"decorr_warmup_steps": -1}, "decorr_warmup_steps must be >= 0"),
        ({"decorr_top_d": 0}, "decorr_top_d must be an integer >= 1"),
        ({"decorr_variance_share": 1.5}, r"decorr_variance_share must be in \(0, 1\]"),
    ],
)
def test_bad_values_fail_at_config_time(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        make(**kw)


def test_standalone_mixin_validates():
    with pytest.raises(ValueError, match="decorr_weight"):
        DecorrConfig(decorr_weight=-1)
    assert DecorrConfig(decorr_layers="-1").decorr_layers == ["-1"]


def test_warmup_schedule():
    args = make(decorr_weight=2.0, decorr_warmup_steps=4)
    assert [args.decorr_weight_at(s) for s in range(6)] == [0.5, 1.0, 1.5, 2.0, 2.0, 2.0]
    assert make(decorr_weight=2.0).decorr_weight_at(0) == 2.0


def test_save_decorr_config(tmp_path):
    args = make(decorr_weight=0.3, decorr_layers=["all"])
    path = args.save_decorr_config(tmp_path / "ckpt")
    saved = json.loads((tmp_path / "ckpt" / DECORR_CONFIG_NAME).read_text())
    assert path.endswith(DECORR_CONFIG_NAME)
    assert saved["decorr_weight"] == 0.3 and saved["decorr_layers"] == ["all"]
    assert "hf_decorr_version" not in saved  # exactly the DecorrConfig fields: HfArgumentParser reads it back
    assert "learning_rate" not in saved
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == [DECORR_CONFIG_NAME]


@pytest.mark.parametrize("name", ["decorr_eval_metrics", "decorr_log_per_layer", "decorr_stop_on_nonfinite",
                                  "decorr_log_figures"])
def test_switches_must_be_booleans(tmp_path, name):
    with pytest.raises(ValueError, match=f"{name} must be True.*False.*got 'x'"):
        DecorrTrainingArguments(output_dir=str(tmp_path), **{name: "x"})
