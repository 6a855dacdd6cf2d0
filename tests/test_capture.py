"""Finding block stacks, resolving layer specs, pooling and masks."""

import pytest
import torch
from tiny_models import tiny_bert, tiny_gpt2, tiny_llama, tiny_t5, tiny_vit
from torch import nn

from hf_decorr.capture import HiddenStateCapture, find_block_stacks, first_tensor, resolve_layers
from hf_decorr.pooling import mask_from_inputs, pool_hidden

EXPECTED_STACKS = {
    "bert": (tiny_bert, ["bert.encoder.layer"]),
    "gpt2": (tiny_gpt2, ["transformer.h"]),
    "llama": (tiny_llama, ["model.layers"]),
    "t5": (tiny_t5, ["encoder.block", "decoder.block"]),
    "vit": (tiny_vit, ["vit.layers"]),
}


@pytest.mark.parametrize("arch", sorted(EXPECTED_STACKS))
def test_block_stacks_found_without_tables(arch):
    build, names = EXPECTED_STACKS[arch]
    stacks = find_block_stacks(build())
    assert [s.name for s in stacks] == names
    assert all(len(s.blocks) == 2 for s in stacks)


def test_specs_resolve():
    model = tiny_t5()
    assert resolve_layers(model, ["last"]) == ["encoder.block.1", "decoder.block.1"]
    assert resolve_layers(model, ["all"]) == ["encoder.block.0", "encoder.block.1", "decoder.block.0",
                                              "decoder.block.1"]
    assert resolve_layers(model, ["decoder:-1", "encoder:0"]) == ["decoder.block.1", "encoder.block.0"]
    assert resolve_layers(model, ["encoder.block.*"]) == ["encoder.block.0", "encoder.block.1"]
    llama = tiny_llama()
    assert resolve_layers(llama, ["-1", "-2", "-1"]) == ["model.layers.1", "model.layers.0"]
    assert resolve_layers(llama, ["model.layers.*.mlp"]) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert resolve_layers(llama, [0]) == ["model.layers.0"]
    assert resolve_layers(llama, ["**.mlp"]) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    assert resolve_layers(llama, ["model.layers.?"]) == ["model.layers.0", "model.layers.1"]


@pytest.mark.parametrize(
    "spec,pattern",
    [
        ("2", r"decorr_layers entry '2': index 2 is out of range for 'model.layers', which has 2 blocks"),
        ("-3", r"out of range"),
        ("model.nothing.*", r"decorr_layers entry 'model.nothing.\*' matches no module.*block stacks: model.layers"),
        ("decoder:0", r"no block stack is named like 'decoder'"),
    ],
)
def test_bad_specs_list_what_exists(spec, pattern):
    with pytest.raises(ValueError, match=pattern):
        resolve_layers(tiny_llama(), [spec])


def test_model_without_stack_needs_names():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    assert find_block_stacks(model) == []
    with pytest.raises(ValueError, match="needs a stack of transformer blocks.*modules include: 0, 1, 2"):
        resolve_layers(model, ["last"])
    assert resolve_layers(model, ["0"]) == ["0"]  # no stack: an exact module name


def test_first_tensor_of_outputs():
    t = torch.ones(2)
    assert first_tensor(t) is t
    assert first_tensor((None, t, torch.zeros(1))) is t
    assert first_tensor({"attentions": torch.zeros(1), "last_hidden_state": t}) is t
    assert first_tensor(None) is None and first_tensor((None, "x")) is None


def test_capture_modes_and_missing_tensor():
    class Odd(nn.Module):
        def forward(self, x):
            return {"note": "no tensor"}

    capture = HiddenStateCapture({"odd": Odd()})
    capture.attach()
    module = capture.modules["odd"]
    module(torch.ones(1))  # off: nothing
    assert capture.outputs == {}
    capture.mode = "train"
    with pytest.raises(TypeError, match="decorr_layers: module 'odd' \\(Odd\\) returned dict, which holds no tensor"):
        module(torch.ones(1))
    capture.detach()


def test_train_capture_ignores_no_grad_and_repeats():
    lin = nn.Linear(3, 3)
    capture = HiddenStateCapture({"lin": lin})
    capture.attach()
    capture.mode = "train"
    with torch.no_grad():
        lin(torch.ones(1, 3))
    assert capture.outputs == {}
    first = lin(torch.ones(1, 3))
    with pytest.warns(UserWarning, match="ran more than once"):
        lin(torch.zeros(1, 3))
    assert capture.outputs["lin"] is first
    capture.mode = "eval"
    second = lin(torch.zeros(1, 3))
    torch.testing.assert_close(capture.outputs["lin"], second.detach())


def hidden_and_mask():
    h = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])  # right and left padding
    return h, mask


def test_pooling_modes():
    h, mask = hidden_and_mask()
    x, m = pool_hidden(h, mask, "tokens")
    assert x.shape == (8, 3) and m.tolist() == [True, True, True, False, False, True, True, True]
    x, m = pool_hidden(h, mask, "mean")
    torch.testing.assert_close(x, torch.stack([h[0, :3].mean(0), h[1, 1:].mean(0)]))
    x, _ = pool_hidden(h, mask, "first")
    torch.testing.assert_close(x, torch.stack([h[0, 0], h[1, 1]]))
    x, _ = pool_hidden(h, mask, "last")
    torch.testing.assert_close(x, torch.stack([h[0, 2], h[1, 3]]))
    x, m = pool_hidden(h, None, "mean")
    torch.testing.assert_close(x, h.mean(1))
    flat = torch.randn(5, 3)
    assert pool_hidden(flat, mask, "last")[0] is flat


def test_pooling_errors_name_the_option():
    h, mask = hidden_and_mask()
    with pytest.raises(ValueError, match="decorr_pooling='last' needs an attention mask"):
        pool_hidden(h, None, "last", "enc.0")
    with pytest.raises(ValueError, match="decorr_pooling='tokens'.*does not fit the output of 'enc.0'"):
        pool_hidden(h, mask[:, :3], "tokens", "enc.0")
    with pytest.raises(ValueError, match="decorr_pooling='max' is not valid"):
        pool_hidden(h, mask, "max")
    with pytest.raises(ValueError, match="expected \\(batch, p\\) or"):
        pool_hidden(torch.randn(2, 3, 4, 5), None, "tokens", "conv")


def test_masks_from_inputs():
    attn = torch.tensor([[1, 1, 0]])
    labels = torch.tensor([[-100, 5, -100]])
    assert mask_from_inputs({"attention_mask": attn}) is attn
    assert mask_from_inputs({"attention_mask": attn, "labels": labels}, source="labels").tolist() == [[False, True,
                                                                                                      False]]
    assert mask_from_inputs({"labels": labels}, decoder_side=True).tolist() == [[False, True, False]]
    dec = torch.tensor([[1, 0, 0]])
    assert mask_from_inputs({"labels": labels, "decoder_attention_mask": dec}, decoder_side=True) is dec
    assert mask_from_inputs({"input_ids": attn}) is None
    with pytest.raises(ValueError, match="decorr_mask='labels' needs token labels"):
        mask_from_inputs({"attention_mask": attn, "labels": torch.tensor([1])}, source="labels")
