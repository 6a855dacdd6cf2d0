"""Finding block stacks, resolving layer specs, pooling and masks."""

import pytest
import torch
from tiny_models import tiny_bert, tiny_gpt2, tiny_llama, tiny_t5, tiny_vit
from torch import nn
from transformers import Trainer

from hf_decorr import DecorrTrainerMixin, DecorrTrainingArguments
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
    assert capture.sample_calls() == []
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
    assert capture.ran_without_grad == {"lin"} and not any(call.grad for call in capture.sample_calls())
    first = lin(torch.ones(1, 3))
    with pytest.warns(UserWarning, match="ran more than once"):
        lin(torch.zeros(1, 3))
    [call] = capture.sample_calls()  # the grad-enabled output is preferred, the first of the repeats kept
    assert call.grad and call.outputs["lin"] is first
    capture.clear()
    capture.mode = "eval"
    second = lin(torch.zeros(1, 3))
    [call] = capture.sample_calls()
    torch.testing.assert_close(call.outputs["lin"], second.detach())


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


# ---- per-call capture: every forward call of the model, each with its own inputs ------------------


def test_every_call_is_recorded_with_its_own_inputs():
    model = tiny_bert()
    layer = model.bert.encoder.layer[1]
    capture = HiddenStateCapture({"bert.encoder.layer.1": layer}, root=model)
    short = {"input_ids": torch.tensor([[5, 6, 0]]), "attention_mask": torch.tensor([[1, 1, 0]])}
    long = {"input_ids": torch.tensor([[5, 6, 7, 8, 0], [5, 6, 7, 8, 9]]),
            "attention_mask": torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])}
    with capture.recording("train"):
        with torch.no_grad():
            model(**short)  # a no-grad call (a cached loss's first pass, a reference model): left out
        model(**short)
        model(**long)
        model.bert.encoder.layer[1](torch.zeros(1, 2, 32))  # outside any call of the model
    calls = capture.sample_calls()
    assert [c.inputs["attention_mask"].shape for c in calls[:2]] == [(1, 3), (2, 5)]
    assert [c.outputs["bert.encoder.layer.1"].shape[:2] for c in calls[:2]] == [(1, 3), (2, 5)]
    assert all(c.grad for c in calls)
    assert len(capture.all_calls()) == 4 and not capture.all_calls()[0].grad
    assert not capture.attached  # the hooks live only inside recording()
    with capture.recording("eval"):
        model(**short)
        model(**long)
    calls = capture.sample_calls()
    assert [c.inputs["input_ids"].shape for c in calls] == [(1, 3), (2, 5)]
    assert not calls[0].outputs["bert.encoder.layer.1"].requires_grad


def test_calls_that_continue_an_earlier_call_bring_no_samples():
    class Root(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x, past_key_values=None, encoder_outputs=None):
            return self.lin(x)

    root = Root()
    capture = HiddenStateCapture({"lin": root.lin}, root=root)
    with capture.recording("eval"):
        root(x=torch.ones(2, 3))
        root(x=torch.ones(5, 3), past_key_values=None)
        root(x=torch.ones(1, 3), past_key_values=("cache",))  # cached decoding (generate): left out
        root(x=torch.ones(1, 3), encoder_outputs=(torch.ones(1),))  # a decoder on earlier encoder states
    assert [c.outputs["lin"].shape[0] for c in capture.sample_calls()] == [2, 5]


def test_only_no_grad_calls_are_kept_when_there_is_no_other():
    lin = nn.Linear(3, 3)
    root = nn.Sequential(lin)
    capture = HiddenStateCapture({"0": lin}, root=root)
    with capture.recording("train"), torch.no_grad():
        root(torch.ones(2, 3))
        root(torch.ones(4, 3))
    calls = capture.sample_calls()
    assert [c.outputs["0"].shape[0] for c in calls] == [2, 4] and not any(c.grad for c in calls)


class TwoCallTrainer(Trainer):
    """Runs the model once per text column, each padded to its own length (as sentence-transformers does)."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        total = 0
        for prefix in ("a_", "b_"):
            out = model(input_ids=inputs[prefix + "input_ids"], attention_mask=inputs[prefix + "attention_mask"],
                        labels=inputs["labels"])
            total = total + out.loss
        return total


class DecorrTwoCallTrainer(DecorrTrainerMixin, TwoCallTrainer):
    pass


def two_column_batch():
    a_ids = torch.tensor([[2, 5, 6, 0, 0], [2, 7, 8, 9, 3], [2, 4, 0, 0, 0]])
    b_ids = torch.tensor([[2, 9, 0], [2, 8, 7], [2, 6, 5]])
    return {"a_input_ids": a_ids, "a_attention_mask": (a_ids != 0).long(),
            "b_input_ids": b_ids, "b_attention_mask": (b_ids != 0).long(), "labels": torch.tensor([0, 1, 1])}


def test_two_calls_of_different_padding_make_one_covariance(tmp_path):
    model = tiny_bert()
    args = DecorrTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, decorr_weight=1.0,
                                   decorr_layers=["-1"], decorr_eval_metrics=False)
    trainer = DecorrTwoCallTrainer(model=model, args=args)
    batch = two_column_batch()
    model.eval()  # no dropout: the reference below sees the same activations
    rows = []
    with torch.no_grad():
        for prefix in ("a_", "b_"):
            mask = batch[prefix + "attention_mask"]
            states = model(input_ids=batch[prefix + "input_ids"], attention_mask=mask, output_hidden_states=True)
            rows.append(states.hidden_states[-1].double()[mask.bool()])
        task = sum(model(input_ids=batch[p + "input_ids"], attention_mask=batch[p + "attention_mask"],
                         labels=batch["labels"]).loss for p in ("a_", "b_"))
    x = torch.cat(rows)
    assert x.shape[0] == 10 + 8  # the valid tokens of both calls (of 15 + 9 positions), no padding
    centred = x - x.mean(0)
    expected = (centred.T @ centred / (x.shape[0] - 1)).abs().mean()
    model.train()
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    loss = trainer.compute_loss(model, batch)
    torch.testing.assert_close((loss.detach() - task).double(), expected, rtol=1e-5, atol=0)


def test_missing_mask_names_the_keys_that_look_like_masks(tmp_path):
    class Hidden(Trainer):  # calls forward directly: the call (and its mask) cannot be observed
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            return model.forward(input_ids=inputs["a_input_ids"], labels=inputs["labels"]).loss

    class DecorrHidden(DecorrTrainerMixin, Hidden):
        pass

    args = DecorrTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, decorr_layers=["-1"])
    trainer = DecorrHidden(model=tiny_bert(), args=args)
    trainer.model.train()
    with pytest.raises(ValueError, match="keys that look like masks: \\['a_attention_mask', 'b_attention_mask'\\]"):
        trainer.compute_loss(trainer.model, two_column_batch())


def test_mixin_refuses_classes_that_are_not_transformers_trainers():
    class OtherTrainer:
        def train(self):
            pass

    with pytest.raises(TypeError, match="works only on subclasses of transformers.Trainer.*OtherTrainer is not one"):
        type("Mixed", (DecorrTrainerMixin, OtherTrainer), {})

    class Mixin(DecorrTrainerMixin):  # a mixin on the mixin is fine until it is built
        pass

    with pytest.raises(TypeError, match="Mixin: DecorrTrainerMixin works only on subclasses"):
        Mixin()
