#!/usr/bin/env python
"""Custom samples: penalise only the tokens inside entities (label > 0), by overriding decorr_samples.

    python examples/custom_samples.py

``decorr_samples(layer, output, inputs)`` gets one layer's output of one forward call (here
``(B, T, p)``) and that call's inputs, and returns the samples ``(N, p)`` with their validity
``(N,)``. A mask keeps shapes fixed (no host sync); masked rows are left out of every sum.
"""

import torch
from datasets import Dataset
from transformers import BertConfig, BertForTokenClassification

from hf_decorr import DecorrTrainer, DecorrTrainingArguments

OUTSIDE = 0  # label of tokens outside any entity; -100 marks padding and special tokens


class EntityTokensTrainer(DecorrTrainer):
    def decorr_samples(self, layer, output, inputs):
        samples = output.reshape(-1, output.shape[-1])
        entity = (inputs["labels"] > OUTSIDE).reshape(-1)
        return samples, entity


def main(output_dir: str = "outputs/example_custom_samples") -> EntityTokensTrainer:
    torch.manual_seed(0)
    model = BertForTokenClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                  num_attention_heads=2, intermediate_size=64, num_labels=3))
    labels = torch.randint(0, 3, (32, 12))
    labels[:, 0] = -100  # the first token carries no label
    data = Dataset.from_dict({"input_ids": torch.randint(1, 100, (32, 12)).tolist(), "labels": labels.tolist()})
    args = DecorrTrainingArguments(output_dir=output_dir, max_steps=4, per_device_train_batch_size=8,
                                   logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                                   decorr_weight=1.0, decorr_layers=["-1"])
    trainer = EntityTokensTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    print("decorr_loss per step:", [round(e["decorr_loss"], 4) for e in trainer.state.log_history
                                    if "decorr_loss" in e])
    return trainer


if __name__ == "__main__":
    main()
