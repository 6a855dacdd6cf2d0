"""Tiny models built from configs, and small padded data sets, for the tests."""

from __future__ import annotations

import torch
from datasets import Dataset
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    T5Config,
    T5ForConditionalGeneration,
    ViTConfig,
    ViTForImageClassification,
)

VOCAB = 101
LENGTH = 12


def tiny_bert(layers: int = 2, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers, num_attention_heads=2,
                     intermediate_size=37, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2,
                     max_position_embeddings=64)
    return BertForSequenceClassification(cfg)


def tiny_gpt2(seed: int = 0) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0)
    return GPT2LMHeadModel(cfg)


def tiny_llama(seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64, pad_token_id=0)
    return LlamaForCausalLM(cfg)


def tiny_t5(seed: int = 0) -> T5ForConditionalGeneration:
    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=2,
                   dropout_rate=0.0, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5ForConditionalGeneration(cfg)


def tiny_vit(seed: int = 0) -> ViTForImageClassification:
    torch.manual_seed(seed)
    cfg = ViTConfig(image_size=16, patch_size=8, num_channels=3, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=2, intermediate_size=37, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0, num_labels=3)
    return ViTForImageClassification(cfg)


def _lengths(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, LENGTH + 1, (n,), generator=g).tolist()


def token_rows(n: int, seed: int = 0, kind: str = "classification") -> list[dict]:
    """Right-padded rows of length LENGTH (pad id 0) for 'classification', 'causal' or 'seq2seq'."""
    g = torch.Generator().manual_seed(seed + 1)
    rows = []
    for i, valid in enumerate(_lengths(n, seed)):
        ids = torch.randint(2, VOCAB, (LENGTH,), generator=g)
        ids[valid:] = 0
        mask = [1] * valid + [0] * (LENGTH - valid)
        row = {"input_ids": ids.tolist(), "attention_mask": mask}
        if kind == "classification":
            row["labels"] = int(ids[0] % 2)
        elif kind == "causal":
            row["labels"] = [t if m else -100 for t, m in zip(ids.tolist(), mask)]
        elif kind == "seq2seq":
            target = torch.randint(2, VOCAB, (6,), generator=g).tolist()
            cut = 2 + i % 4
            row["labels"] = target[:cut] + [-100] * (6 - cut)
        rows.append(row)
    return rows


def token_dataset(n: int = 16, seed: int = 0, kind: str = "classification") -> Dataset:
    return Dataset.from_list(token_rows(n, seed, kind))


def image_dataset(n: int = 16, seed: int = 0) -> Dataset:
    g = torch.Generator().manual_seed(seed)
    pixels = torch.randn(n, 3, 16, 16, generator=g)
    return Dataset.from_dict({"pixel_values": pixels.tolist(), "labels": [i % 3 for i in range(n)]})


BUILDERS = {
    "bert": (tiny_bert, "classification"),
    "gpt2": (tiny_gpt2, "causal"),
    "llama": (tiny_llama, "causal"),
    "t5": (tiny_t5, "seq2seq"),
    "vit": (tiny_vit, "image"),
}


def model_and_data(arch: str, n: int = 16, seed: int = 0):
    build, kind = BUILDERS[arch]
    data = image_dataset(n, seed) if kind == "image" else token_dataset(n, seed, kind)
    return build(seed=seed), data


def tiny_word_tokenizer(words: list[str] | None = None):
    """A word-level fast tokenizer built locally (no Hub): [PAD]=0, [UNK]=1, [EOS]=2."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = words or [f"w{i}" for i in range(VOCAB - 3)]
    vocab = {"[PAD]": 0, "[UNK]": 1, "[EOS]": 2, **{w: i + 3 for i, w in enumerate(words[: VOCAB - 3])}}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]")
