#!/usr/bin/env python
"""A custom penalty: the off-diagonal of the correlation matrix (Barlow-Twins-like), by overriding decorr_penalty.

    python examples/custom_penalty.py

``decorr_penalty`` receives the covariance ``C`` of a layer's samples (``(..., p, p)``; with
``decorr_sync="global"`` the covariance over all processes) and returns one value per leading
index. Grouping, distributed sync and logging stay hf_decorr's.
"""

import torch
from datasets import Dataset
from transformers import BertConfig, BertForSequenceClassification

from hf_decorr import DecorrTrainer, DecorrTrainingArguments


def correlation_penalty(covariance: torch.Tensor) -> torch.Tensor:
    """Σ_{i≠j} R_ij² / p with R = D^-½ C D^-½ the correlation matrix."""
    std = torch.diagonal(covariance, dim1=-2, dim2=-1).clamp_min(1e-8).sqrt()
    corr = covariance / (std[..., :, None] * std[..., None, :])
    off_diagonal = corr - torch.diag_embed(torch.diagonal(corr, dim1=-2, dim2=-1))
    return off_diagonal.square().sum((-2, -1)) / covariance.shape[-1]


class CorrelationTrainer(DecorrTrainer):
    def decorr_penalty(self, covariance):
        return correlation_penalty(covariance)


def main(output_dir: str = "outputs/example_custom_penalty") -> CorrelationTrainer:
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2,
                                                     num_attention_heads=2, intermediate_size=64))
    data = Dataset.from_dict({"input_ids": torch.randint(1, 100, (32, 12)).tolist(),
                              "labels": torch.randint(0, 2, (32,)).tolist()})
    args = DecorrTrainingArguments(output_dir=output_dir, max_steps=4, per_device_train_batch_size=8,
                                   logging_steps=1, report_to="none", use_cpu=True, save_strategy="no",
                                   decorr_weight=0.1, decorr_layers=["-1"])
    trainer = CorrelationTrainer(model=model, args=args, train_dataset=data)
    trainer.train()
    print("decorr_loss per step:", [round(e["decorr_loss"], 4) for e in trainer.state.log_history
                                    if "decorr_loss" in e])
    return trainer


if __name__ == "__main__":
    main()
