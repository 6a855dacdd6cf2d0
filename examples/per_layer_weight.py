#!/usr/bin/env python
"""Per-layer λ with a custom schedule: deeper layers weigh more, ramped in over 10 steps (decorr_layer_weight).

    python examples/per_layer_weight.py

The loss is ``task_loss + Σ_layers w(layer, step) · P_layer``; ``decorr_layer_weight`` returns
``w`` for one layer at one optimizer step (0-based). Here ``w = λ · depth / L · min(1, (step+1)/10)``.
"""

import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification

from hf_decorr import DecorrTrainer, DecorrTrainingArguments

RAMP_STEPS = 10


class DepthWeightedTrainer(DecorrTrainer):
    def decorr_layer_weight(self, layer, step):
        depth = self.decorr_layer_names.index(layer) + 1
        ramp = min(1.0, (step + 1) / RAMP_STEPS)
        return self.args.decorr_weight * depth / len(self.decorr_layer_names) * ramp


def main(output_dir: str = "outputs/example_per_layer_weight") -> DepthWeightedTrainer:
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=3,
                                                     num_attention_heads=2, intermediate_size=64))
    data = Dataset.from_dict({"input_ids": torch.randint(1, 100, (32, 12)).tolist(),
                              "labels": torch.randint(0, 2, (32,)).tolist()})
    args = DecorrTrainingArguments(output_dir=output_dir, max_steps=4, per_device_train_batch_size=8,
                                   logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                                   decorr_weight=0.5, decorr_layers=["all"])
    trainer = DepthWeightedTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    for layer in trainer.decorr_layer_names:
        print(f"{layer}: w at steps 0, 9 = {trainer.decorr_layer_weight(layer, 0):.3f}, "
              f"{trainer.decorr_layer_weight(layer, 9):.3f}")
    return trainer


if __name__ == "__main__":
    main()
