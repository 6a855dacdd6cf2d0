"""Issue 18 (an outside probe of the hf-decorr command): each fault through the user's path.

Cases 4, 5, 6: ``hf-decorr inspect / compare / ablate`` run in-process through
``hf_decorr.app.commands.main`` (and as ``python -m hf_decorr``): exit status, the one error line,
and that nothing is written. Case 8: the message for an unregistered ``decorr_penalty``.
"""

from __future__ import annotations

import re

import pytest
from transformers import HfArgumentParser

from hf_decorr import DecorrConfig, DecorrTrainingArguments

REGISTER_HINT = "must be registered with hf_decorr.register_penalty before the config is built or parsed"


# ---- case 8: a custom penalty that was not registered in this process ------------------------------


def test_case8_unregistered_penalty_in_a_config_dict_says_to_register_it():
    with pytest.raises(ValueError) as info:
        DecorrConfig(**{"decorr_weight": 0.1, "decorr_penalty": "my_custom_penalty"})
    message = str(info.value)
    assert message.startswith("decorr_penalty='my_custom_penalty' is not valid; choose one of [")
    assert REGISTER_HINT in message and "import the module that registers it first" in message
    # the other choices keep their message
    with pytest.raises(ValueError, match=r"decorr_pooling='max' is not valid; choose one of \[[^]]*\]$"):
        DecorrConfig(decorr_pooling="max")


def test_case8_unregistered_penalty_in_a_yaml_file_says_to_register_it(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("output_dir: o\nuse_cpu: true\nreport_to: []\ndecorr_weight: 0.5\n"
                    "decorr_penalty: my_custom_penalty\n")
    with pytest.raises(ValueError, match=re.escape(REGISTER_HINT)):
        HfArgumentParser(DecorrTrainingArguments).parse_yaml_file(str(path))
