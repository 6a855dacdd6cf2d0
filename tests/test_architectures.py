"""The architectures whose layers are not one (batch, sequence, p) stack: towers that do not run, hybrid stacks,
embedding tables, feature maps, sequence-first / internally padded / prefixed / streamed / downsampled layouts.

Each class is checked on the path a user takes (DecorrTrainer on a model, the penalty compared with a float64
reference of the formula on the samples that should be used), plus the pure functions underneath."""

import logging
import os
import sys

import pytest
import torch
from conftest import REPO_ROOT
from torch import nn
from transformers import PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

from hf_decorr import DecorrTrainer, DecorrTrainingArguments
from hf_decorr.capture import LayerChoice, find_block_stacks, resolve_layers
from hf_decorr.layouts import SequenceLayout, layout_for, to_positions

sys.path.insert(0, os.path.join(REPO_ROOT, "scripts"))
import model_zoo  # noqa: E402


def reference_penalty(x: torch.Tensor) -> float:
    """L_Σ = (1/p²) Σ_ij |C_ij| of the rows of x, float64, straight from the formula."""
    x = x.double()
    c = (x - x.mean(0)).T @ (x - x.mean(0)) / (x.shape[0] - 1)
    return (c.abs().sum() / x.shape[1] ** 2).item()


def args(tmp_path, **kw) -> DecorrTrainingArguments:
    base = dict(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=4, learning_rate=1e-2,
                logging_steps=1, report_to="none", use_cpu=True, save_strategy="no", decorr_weight=1.0,
                disable_tqdm=True)
    base.update(kw)
    return DecorrTrainingArguments(**base)


class Recorder(DecorrTrainer):
    """Keeps what decorr_samples returned, through the public override point."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.seen = []
        self.masks = []  # the attention mask of each call, beside seen

    def decorr_samples(self, layer, output, inputs):
        x, mask = super().decorr_samples(layer, output, inputs)
        self.seen.append((layer, tuple(output.shape), x.detach().clone(), None if mask is None else mask.clone()))
        self.masks.append(inputs.get("attention_mask"))
        return x, mask


def batch_of(rows):
    return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}


def zoo_trainer(task, model_type, tmp_path, **kw):
    model = model_zoo.build_model(task, model_type)
    data = model_zoo.rows(task, model, 4)
    return Recorder(model=model, args=args(tmp_path, **kw), train_dataset=data), data


# ----------------------------------------------------------------- 1. towers that do not run, multimodal batches


class TwoTowerConfig(PretrainedConfig):
    model_type = "two_tower_test"


class TwoTower(PreTrainedModel):
    """A text stack and a vision stack of equal size; the vision tower runs only when pixel_values are given."""

    config_class = TwoTowerConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(50, 8)
        self.text_layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2))
        self.vision_layers = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(2))
        self.head = nn.Linear(8, 2)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, pixel_values=None, labels=None, **kwargs):
        h = self.embed(input_ids)
        for layer in self.text_layers:
            h = layer(h)
        pooled = h.mean(1)
        if pixel_values is not None:
            v = pixel_values
            for layer in self.vision_layers:
                v = layer(v)
            pooled = pooled + v.mean(1)
        logits = self.head(pooled)
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return SequenceClassifierOutput(loss=loss, logits=logits)


def two_tower_rows(n, images):
    g = torch.Generator().manual_seed(0)
    rows = []
    for i in range(n):
        row = {"input_ids": torch.randint(1, 50, (6,), generator=g), "attention_mask": torch.ones(6, dtype=torch.long),
               "labels": torch.tensor(i % 2)}
        if images:
            row["pixel_values"] = torch.randn(5, 8, generator=g)
        rows.append(row)
    return rows


def test_a_tower_that_does_not_run_is_left_out_with_one_info_line(tmp_path, caplog):
    torch.manual_seed(0)
    model = TwoTower(TwoTowerConfig())
    choice = LayerChoice.resolve(model, ["last"])
    assert choice.pending and choice.names == ["text_layers.1", "vision_layers.1"]
    trainer = Recorder(model=model, args=args(tmp_path, max_steps=2), train_dataset=two_tower_rows(8, images=False))
    with caplog.at_level(logging.INFO, logger="hf_decorr"):
        trainer.train()
    assert trainer.decorr_layer_names == ["text_layers.1"]
    lines = [r.getMessage() for r in caplog.records if "decorr_layers" in r.getMessage()]
    assert len(lines) == 1
    assert "penalising text_layers.1" in lines[0] and "left out: vision_layers" in lines[0]
    logged = [h["decorr_loss"] for h in trainer.state.log_history if "decorr_loss" in h]
    assert len(logged) == 2 and all(v > 0 for v in logged)


def test_a_multimodal_batch_penalises_both_towers_and_a_later_text_batch_gives_the_absent_one_zero(tmp_path):
    torch.manual_seed(0)
    model = TwoTower(TwoTowerConfig())
    rows = two_tower_rows(4, images=True) + two_tower_rows(4, images=False)
    collate = lambda b: {k: torch.stack([r[k] for r in b]) for k in b[0]}  # noqa: E731
    trainer = Recorder(model=model, args=args(tmp_path, max_steps=2, decorr_log_per_layer=True, seed=0,
                                              dataloader_drop_last=True), train_dataset=rows, data_collator=collate)
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(rows)
    with pytest.warns(UserWarning, match="did not run in a training step"):
        trainer.train()
    assert trainer.decorr_layer_names == ["text_layers.1", "vision_layers.1"]
    logs = [h for h in trainer.state.log_history if "decorr_loss" in h]
    assert logs[0]["decorr_loss/vision_layers.1"] > 0 and logs[1]["decorr_loss/vision_layers.1"] == 0
    assert logs[1]["decorr_loss/text_layers.1"] > 0
    # the image step's vision samples: 4 examples x 5 patches, the penalty of the formula
    vision = [s for s in trainer.seen if s[0] == "vision_layers.1"]
    assert len(vision) == 1 and vision[0][2].shape == (20, 8)
    assert logs[0]["decorr_loss/vision_layers.1"] == pytest.approx(reference_penalty(vision[0][2]), rel=1e-4)


def test_explicit_layers_of_a_tower_that_never_runs_still_fail_at_the_first_step(tmp_path):
    model = TwoTower(TwoTowerConfig())
    trainer = DecorrTrainer(model=model, args=args(tmp_path, decorr_layers=["vision_layers.1"]),
                            train_dataset=two_tower_rows(4, images=False))
    with pytest.raises(Exception, match="'vision_layers.1' did not run during the forward pass"):
        trainer.train()


def test_no_stack_that_runs_names_the_option():
    model = TwoTower(TwoTowerConfig())
    choice = LayerChoice.resolve(model, ["all"])
    with pytest.raises(ValueError, match=r"decorr_layers=\['all'\]: none of the block stacks"):
        choice.settle(model, ran={"head"})


@pytest.mark.parametrize("task,model_type,expected", [
    ("causal-lm", "gemma3", "model.language_model.layers"),
    ("seq2seq-lm", "qwen2_audio", "model.language_model.layers"),
    ("seq2seq-lm", "t5gemma2", "model.encoder.text_model.layers"),
])
def test_multimodal_models_fine_tuned_on_text_penalise_the_language_model(task, model_type, expected, tmp_path):
    trainer, _ = zoo_trainer(task, model_type, tmp_path)
    trainer.train()
    names = trainer.decorr_layer_names
    assert names and any(n.startswith(expected + ".") for n in names)
    assert not any("vision" in n or "audio" in n for n in names)


# ----------------------------------------------------------------- 4. and 5. hybrid stacks, embedding tables


class AttentionBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(x)


class RecurrentBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.mix = nn.Linear(8, 8)
        self.gate = nn.Linear(8, 8)

    def forward(self, x):
        return self.mix(x) * torch.sigmoid(self.gate(x))


def test_hybrid_stacks_are_stacks_and_embedding_tables_never_are():
    model = nn.Module()
    model.tables = nn.ModuleList(nn.Embedding(1000, 8) for _ in range(10))  # more parameters than the layers
    model.layers = nn.ModuleList([AttentionBlock(), RecurrentBlock(), RecurrentBlock(), AttentionBlock()])
    model.heads = nn.ModuleList([nn.Linear(8, 2), nn.Conv1d(8, 2, 1)])  # mixed leaf modules: not a stack
    assert [s.name for s in find_block_stacks(model)] == ["layers"]
    assert resolve_layers(model, ["last"]) == ["layers.3"]


@pytest.mark.parametrize("task,model_type", [("causal-lm", "olmo_hybrid")])
def test_hybrid_llms_penalise_every_block(task, model_type, tmp_path):
    trainer, _ = zoo_trainer(task, model_type, tmp_path, decorr_layers=["all"])
    model = trainer.model
    kinds = {type(m).__name__ for m in model.model.layers}
    assert len(kinds) >= 2  # really a hybrid stack
    trainer.train()
    assert trainer.decorr_layer_names == [f"model.layers.{i}" for i in range(len(model.model.layers))]


def test_markuplm_penalises_its_encoder_not_its_xpath_tables(tmp_path):
    trainer, _ = zoo_trainer("token-classification", "markuplm", tmp_path)
    assert trainer.decorr_layer_names == ["markuplm.encoder.layer.1"]
    trainer.train()
    assert trainer.state.log_history[0]["decorr_loss"] > 1e-6


# ----------------------------------------------------------------- 2. sequence layouts, on real architectures


def valid_counts(trainer):
    return [int(mask.sum()) if mask is not None else x.shape[0] for _, _, x, mask in trainer.seen]


@pytest.mark.parametrize("task,model_type", [
    ("sequence-classification", "longformer"),  # padded internally to a multiple of the attention window
    ("sequence-classification", "xlnet"),  # (sequence, batch, p)
    ("causal-lm", "cpmant"),  # prompt positions prepended
    ("seq2seq-lm", "led"),
])
def test_token_samples_are_exactly_the_real_tokens(task, model_type, tmp_path):
    trainer, data = zoo_trainer(task, model_type, tmp_path)
    trainer.train()
    real = int(batch_of(data)["attention_mask"].sum())
    encoder = [(layer, shape, x, m) for layer, shape, x, m in trainer.seen if "decoder" not in layer]
    assert encoder and all(int(m.sum()) == real for *_, m in encoder)
    assert all(shape != (4, 12, 32) for _, shape, _, _ in encoder)  # not the input's layout: it was mapped
    # the logged penalty is the formula's on the real tokens
    values = [h for h in trainer.state.log_history if "decorr_loss" in h][0]
    rows = [x[m] for _, _, x, m in trainer.seen]
    assert values["decorr_loss"] == pytest.approx(sum(reference_penalty(r) for r in rows), rel=1e-3)


def test_prophetnet_decoder_streams_take_the_mask_per_stream(tmp_path):
    trainer, data = zoo_trainer("seq2seq-lm", "prophetnet", tmp_path)
    trainer.train()
    labels = batch_of(data)["labels"]
    decoder = [(shape, m) for layer, shape, _, m in trainer.seen if "decoder" in layer]
    streams = 1 + trainer.model.config.ngram
    assert decoder and all(shape[1] == streams * labels.shape[1] for shape, _ in decoder)
    assert all(int(m.sum()) == streams * int((labels != -100).sum()) for _, m in decoder)


@pytest.mark.parametrize("task,model_type", [("sequence-classification", "funnel"),
                                             ("sequence-classification", "canine"),
                                             ("audio-classification", "wav2vec2")])
def test_downsampled_layers_count_only_positions_that_saw_no_padding(task, model_type, tmp_path):
    trainer, data = zoo_trainer(task, model_type, tmp_path, decorr_layers=["all"])
    trainer.train()
    mask = trainer.masks[0].bool()
    downsampled = [(shape, m) for _, shape, _, m in trainer.seen if m is not None and shape[1] < mask.shape[1]]
    assert downsampled, "the architecture has downsampled layers"
    for shape, m in downsampled:
        length = shape[1]
        expected = [(mask[b].reshape(length, -1).all(dim=1)) if mask.shape[1] % length == 0 else None
                    for b in range(mask.shape[0])]
        if expected[0] is not None:
            assert torch.equal(m.reshape(mask.shape[0], length), torch.stack(expected))
        assert int(m.sum()) < int(mask.sum()) * length / mask.shape[1] + 1


def test_seamless_text_decoder_is_on_the_decoder_side(tmp_path):
    trainer, data = zoo_trainer("seq2seq-lm", "seamless_m4t", tmp_path)
    trainer.train()
    # the text decoder's samples are the target positions (labels != -100), the encoder's the input's
    labels = batch_of(data)["labels"]
    decoder = [m for layer, _, _, m in trainer.seen if layer.startswith("text_decoder")]
    assert decoder and int(decoder[0].sum()) == int((labels != -100).sum())
    encoder = [m for layer, _, _, m in trainer.seen if layer.startswith("text_encoder")]
    assert encoder and int(encoder[0].sum()) == int(trainer.masks[0].sum())


# ----------------------------------------------------------------- 3. feature maps


@pytest.mark.parametrize("model_type", ["mobilenet_v2", "resnet", "convnext"])
def test_feature_maps_give_one_sample_per_position_with_channels_as_units(model_type, tmp_path):
    trainer, data = zoo_trainer("image-classification", model_type, tmp_path, decorr_log_per_layer=True)
    trainer.train()
    (layer, shape, x, mask), = trainer.seen
    batch, channels, height, width = shape
    assert x.shape == (batch * height * width, channels) and mask is None
    logged = trainer.state.log_history[0]["decorr_loss"]
    assert logged == pytest.approx(reference_penalty(x), rel=1e-3)


def test_feature_maps_pool_by_mean_and_refuse_first(tmp_path):
    trainer, _ = zoo_trainer("image-classification", "resnet", tmp_path, decorr_pooling="mean")
    trainer.train()
    (_, shape, x, _), = trainer.seen
    assert x.shape == (shape[0], shape[1])
    trainer, _ = zoo_trainer("image-classification", "resnet", tmp_path, decorr_pooling="first")
    with pytest.raises(ValueError, match="decorr_pooling='first'.*feature map.*'tokens'.*'mean'"):
        trainer.train()


# ----------------------------------------------------------------- the pure functions


def test_to_positions_layouts():
    h = torch.randn(3, 5, 4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    out, m = to_positions(h, mask)
    assert out is h and torch.equal(m, mask.bool())
    out, m = to_positions(h.transpose(0, 1), mask)  # sequence first, told apart by the batch size
    assert torch.equal(out, h) and torch.equal(m, mask.bool())
    square = torch.randn(3, 3, 4)
    out, _ = to_positions(square, mask[:, :3], layout=SequenceLayout(sequence_first=True))
    assert torch.equal(out, square.transpose(0, 1))
    out, m = to_positions(torch.randn(3, 8, 4), mask)  # internal right padding
    assert m.shape == (3, 8) and torch.equal(m[:, :5], mask.bool()) and not m[:, 5:].any()
    out, m = to_positions(torch.randn(3, 7, 4), mask, layout=SequenceLayout(prefix=2))
    assert not m[:, :2].any() and torch.equal(m[:, 2:], mask.bool())
    out, m = to_positions(torch.randn(3, 10, 4), mask, layout=SequenceLayout(streams=2))
    assert torch.equal(m, mask.bool().repeat(1, 2))
    long_mask = torch.tensor([[1] * 7 + [0] * 5, [1] * 12, [1] * 4 + [0] * 8])
    out, m = to_positions(torch.randn(3, 3, 4), long_mask)  # downsampled by 4
    assert m.tolist() == [[True, False, False], [True, True, True], [True, False, False]]
    out, m = to_positions(torch.randn(3, 4, 4), long_mask, layout=SequenceLayout(unmasked=True))
    assert m is None
    with pytest.raises(ValueError, match="no axis of the batch's 3 examples"):
        to_positions(torch.randn(7, 5, 4), mask)


def test_to_positions_feature_maps():
    first = torch.randn(2, 6, 3, 3)
    out, m = to_positions(first, None)
    assert out.shape == (2, 9, 6) and m is None
    assert torch.equal(out[1, 4], first[1, :, 1, 1])
    last = torch.randn(2, 3, 3, 6)  # (B, H, W, C)
    out, _ = to_positions(last, None)
    assert out.shape == (2, 9, 6) and torch.equal(out[1, 4], last[1, 1, 1])
    video = torch.randn(2, 6, 2, 3, 3)
    assert to_positions(video, None)[0].shape == (2, 18, 6)


def test_layout_registry_and_towers():
    model = model_zoo.build_model("seq2seq-lm", "prophetnet")
    assert layout_for(model, "prophetnet.decoder.layers.0").streams == 1 + model.config.ngram
    assert layout_for(model, "prophetnet.encoder.layers.0").streams == 1
    gemma = model_zoo.build_model("causal-lm", "gemma3")
    vision = next(n for n, _ in gemma.named_modules() if n.startswith("model.vision_tower") and n.endswith("layers.0"))
    assert layout_for(gemma, vision).unmasked and not layout_for(gemma, "model.language_model.layers.0").unmasked


def test_blocks_whose_forward_is_called_directly_are_refused_with_a_module_that_works(tmp_path):
    """SqueezeBERT calls its layers' forward directly, which forward hooks never see: the first step says so and
    names the module around the stack; that setting trains."""
    trainer, _ = zoo_trainer("sequence-classification", "squeezebert", tmp_path)
    with pytest.raises(Exception, match=r"decorr_layers=\['transformer.encoder'\]"):
        trainer.train()
    trainer, _ = zoo_trainer("sequence-classification", "squeezebert", tmp_path, decorr_layers=["transformer.encoder"])
    trainer.train()
    assert trainer.state.log_history[0]["decorr_loss"] > 0


def test_the_command_line_settles_the_same_choice_as_the_trainer():
    """hf-decorr inspect/compare collect samples through LayerSamples: a pending choice is settled by the first
    batch exactly as the trainer settles it, and the line that says so names the same layers."""
    from hf_decorr.analysis import LayerSamples

    torch.manual_seed(0)
    model = TwoTower(TwoTowerConfig()).eval()
    choice = LayerChoice.resolve(model, ["all"])
    batch = batch_of(two_tower_rows(4, images=False))
    batch.pop("labels")
    with LayerSamples(model, choice, "tokens") as layers:
        samples, _ = layers.samples(batch)
        assert layers.names == ["text_layers.0", "text_layers.1"] and sorted(samples) == layers.names
        assert layers.chosen.startswith("decorr_layers=['all']: penalising text_layers.0, text_layers.1")
        assert all(x.shape == (24, 8) for x in samples.values())  # 4 sequences x 6 tokens, 8 units
