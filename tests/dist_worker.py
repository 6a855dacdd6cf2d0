"""Worker of tests/test_distributed.py: started as 2 processes by ``torchrun`` (gloo, CPU).

Every scenario is a function that runs unchanged in one process (the pytest process, which
computes the reference on the concatenated batch) and in each of the 2 workers; the data
builders are deterministic, so both sides see the same numbers. Each worker writes its results
to ``<out>/rank<r>.pt``::

    torchrun --nproc_per_node 2 tests/dist_worker.py --out DIR [--part penalties,trainer]

(``accelerate launch --config_file <recipes/accelerate/*.yaml>`` works too: the part ``trainer``
uses ``TrainingArguments(use_cpu=True)``.)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch
import torch.distributed as dist
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from hf_decorr.distributed import (  # noqa: E402
    global_covariance_penalties,
    global_penalty_with_count,
    rank,
    sum_accumulators,
    world_size,
)
from hf_decorr.metrics import CovarianceAccumulator  # noqa: E402
from hf_decorr.penalties import PENALTIES, decorrelation_penalty, register_penalty  # noqa: E402

#: a user-registered penalty of the covariance (‖C‖_F / p): the global path must run it on the global C
REGISTERED = "dist_test_frobenius"
register_penalty(REGISTERED, lambda cov: cov.square().sum(dim=(-2, -1)).sqrt() / cov.shape[-1], of_covariance=True,
                 description="‖C‖_F / p (a test penalty)")

WIDTH = 16
KINDS = tuple(PENALTIES)
TOKEN_SHAPES = ((3, 5), (2, 7))  # (sequences, padded length) of process 0 and 1: different padding, different N
POOLED_ROWS = (3, 2)  # pooled samples of process 0 and 1 (rows_bound 3)
POOLED_BOUND = 3

# ---- penalty primitives ---------------------------------------------------------------------------


class TwoLayers(nn.Module):
    """``x → h1 = tanh(A x) → h2 = tanh(B h1)``; both outputs have ``WIDTH`` units."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(6, WIDTH)
        self.b = nn.Linear(WIDTH, WIDTH)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h1 = torch.tanh(self.a(x))
        return torch.stack([h1, torch.tanh(self.b(h1))])  # (2, ..., WIDTH): a stack of two layers


def token_shards() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per process: inputs ``(B, T, 6)`` and a right-padding mask ``(B, T)`` with varied lengths."""
    g = torch.Generator().manual_seed(1)
    out = []
    for b, t in TOKEN_SHAPES:
        x = torch.randn(b, t, 6, generator=g) * 2 + 0.5
        lengths = torch.randint(1, t + 1, (b,), generator=g)
        lengths[0] = t
        mask = torch.arange(t).unsqueeze(0) < lengths.unsqueeze(1)
        x = torch.where(mask.unsqueeze(-1), x, torch.full_like(x, 7.0))  # padding holds junk
        out.append((x, mask))
    return out


def pooled_shards() -> list[tuple[torch.Tensor, None]]:
    """Per process: pooled inputs ``(N_r, 6)``, every row valid."""
    g = torch.Generator().manual_seed(2)
    return [(torch.randn(n, 6, generator=g) - 0.3, None) for n in POOLED_ROWS]


def _flat(x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    return (x.reshape(-1, x.shape[-1]), None if mask is None else mask.reshape(-1))


def reference_penalties(shards) -> dict[str, dict[str, object]]:
    """One process, the concatenated batch: per kind, the per-layer penalty and the parameter gradients."""
    xs, ms = zip(*(_flat(x, m) for x, m in shards))
    x = torch.cat(xs)
    mask = None if ms[0] is None else torch.cat(ms)
    out = {}
    for kind in KINDS:
        model = TwoLayers()
        values = decorrelation_penalty(model(x), mask, kind)
        values.sum().backward()
        out[kind] = {"values": values.detach(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}
    return out


def reference_local(shards) -> dict[str, dict[str, object]]:
    """One process, each shard on its own: the mean of the per-shard penalties and of their gradients."""
    out = {}
    for kind in KINDS:
        values, grads = [], []
        for x, m in shards:
            model = TwoLayers()
            v = decorrelation_penalty(model(_flat(x, m)[0]), _flat(x, m)[1], kind)
            v.sum().backward()
            values.append(v.detach())
            grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        out[kind] = {
            "values": torch.stack(values).mean(dim=0),
            "grads": {n: torch.stack([g[n] for g in grads]).mean(dim=0) for n in grads[0]},
        }
    return out


def distributed_penalties(shards, sync: str, strategy: str = "stats", bound: int | None = None,
                          replicated: bool = True) -> dict[str, dict[str, object]]:
    """This process's shard through DDP: per kind, the penalties and the DDP-averaged gradients."""
    x, m = _flat(*shards[rank()])
    out = {}
    for kind in KINDS:
        model = nn.parallel.DistributedDataParallel(TwoLayers())
        h = model(x)
        if sync == "global":
            values, count = global_penalty_with_count(h, m, kind, strategy, bound, replicated_loss=replicated)
        else:
            values, count = decorrelation_penalty(h, m, kind), None
        values.sum().backward()
        out[kind] = {
            "values": values.detach(),
            "count": count,
            "grads": {n: p.grad.clone() for n, p in model.module.named_parameters()},
        }
    return out


def naive_gather_penalty(shards) -> dict[str, object]:
    """Negative control: a plain ``all_gather`` (no autograd) with the local tensor re-inserted, ``cov_l1``."""
    x, _ = _flat(*shards[rank()])
    model = nn.parallel.DistributedDataParallel(TwoLayers())
    h = model(x)
    h = torch.cat([h, h.new_zeros(2, POOLED_BOUND - h.shape[1], WIDTH)], dim=1)
    mask = (torch.arange(POOLED_BOUND) < x.shape[0]).float()
    parts = [torch.empty_like(h.detach()) for _ in range(world_size())]
    masks = [torch.empty_like(mask) for _ in range(world_size())]
    dist.all_gather(parts, h.detach().contiguous())
    dist.all_gather(masks, mask)
    parts[rank()] = h
    values = decorrelation_penalty(torch.cat(parts, dim=1), torch.cat(masks), "cov_l1")
    values.sum().backward()
    return {"values": values.detach(), "grads": {n: p.grad.clone() for n, p in model.module.named_parameters()}}


BUCKET_KINDS = ("cov_l1", "decov")


def _three_layers(h: torch.Tensor) -> list[torch.Tensor]:
    """Layers of widths W, 2W, W from the two outputs of TwoLayers (different widths in one bucket list)."""
    return [h[0], torch.cat([h[0], h[1] * 0.5 - h[0]], dim=-1), h[1]]


def bucketed_penalties(shards, bucket_bytes: int) -> dict[str, dict[str, object]]:
    """Three token layers through the bucketed global path, chunks of 8 rows (N_r = 15 and 14)."""
    x, m = _flat(*shards[rank()])
    out = {}
    for kind in BUCKET_KINDS:
        model = nn.parallel.DistributedDataParallel(TwoLayers())
        items = [(layer, m, None) for layer in _three_layers(model(x))]
        values, counts = global_covariance_penalties(items, kind, chunk=8, bucket_bytes=bucket_bytes)
        torch.stack(values).sum().backward()
        out[kind] = {"values": torch.stack(values).detach(), "count": torch.stack(counts),
                     "grads": {n: p.grad.clone() for n, p in model.module.named_parameters()}}
    return out


def bucketed_reference(shards) -> dict[str, dict[str, object]]:
    """One process, the concatenated batch, the plain penalty of each of the three layers."""
    xs, ms = zip(*(_flat(x, m) for x, m in shards))
    x, mask = torch.cat(xs), torch.cat(ms)
    out = {}
    for kind in BUCKET_KINDS:
        model = TwoLayers()
        values = torch.stack([decorrelation_penalty(layer, mask, kind) for layer in _three_layers(model(x))])
        values.sum().backward()
        out[kind] = {"values": values.detach(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()}}
    return out


def accumulator_sums() -> dict[str, list[float]]:
    """Layer 'a' on both processes, 'b' only on process 1, 'c' on none: summed statistics."""
    g = torch.Generator().manual_seed(3 + rank())
    stats = {"a": CovarianceAccumulator()}
    stats["a"].update(torch.randn(4 + rank(), 3, generator=g))
    if rank() == 1:
        stats["b"] = CovarianceAccumulator()
        stats["b"].update(torch.randn(5, 2, generator=g))
    summed = sum_accumulators(stats, ["a", "b", "c"], "cpu")
    return {name: [float(acc.count), acc.covariance().tolist()] for name, acc in summed.items()}


def accumulator_reference() -> dict[str, list[float]]:
    out = {}
    merged = {"a": CovarianceAccumulator(), "b": CovarianceAccumulator()}
    for r in (0, 1):
        g = torch.Generator().manual_seed(3 + r)
        merged["a"].update(torch.randn(4 + r, 3, generator=g))
        if r == 1:
            merged["b"].update(torch.randn(5, 2, generator=g))
    for name, acc in merged.items():
        out[name] = [float(acc.count), acc.covariance().tolist()]
    return out


def run_penalties() -> dict[str, object]:
    tokens, pooled = token_shards(), pooled_shards()
    return {
        "tokens/stats": distributed_penalties(tokens, "global", "stats"),
        "tokens/stats/unreplicated": distributed_penalties(tokens, "global", "stats", replicated=False),
        "pooled/stats": distributed_penalties(pooled, "global", "stats"),
        "pooled/gather": distributed_penalties(pooled, "global", "gather", POOLED_BOUND),
        "pooled/gather/unreplicated": distributed_penalties(pooled, "global", "gather", POOLED_BOUND,
                                                            replicated=False),
        "tokens/local": distributed_penalties(tokens, "local"),
        "pooled/local": distributed_penalties(pooled, "local"),
        "naive": naive_gather_penalty(pooled),
        "bucketed/one-per-layer": bucketed_penalties(tokens, bucket_bytes=1),
        "bucketed/one-bucket": bucketed_penalties(tokens, bucket_bytes=1 << 26),
        "accumulators": accumulator_sums(),
        "fsdp2/tokens": fsdp2_step("tokens"),
        "fsdp2/mean": fsdp2_step("mean"),
    }


# ---- DecorrTrainer on a tiny BERT -------------------------------------------------------------------

TRAIN_SIZE = 8  # one optimizer step: 1 process × 8, or 2 processes × 4
EVAL_SIZE = 7  # not a multiple of 2 processes × 2: accelerate pads the last batch with a duplicate
LR = 0.5
DECORR_WEIGHT = 2.0


def bert_data(size: int, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(size):
        length = int(torch.randint(3, 13, (1,), generator=g))
        rows.append({"input_ids": torch.randint(5, 101, (length,), generator=g), "label": i % 2})
    return rows


def collate(rows: list[dict[str, object]]) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sequence of the batch (so each process pads differently)."""
    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = r["input_ids"]
        mask[i, : len(r["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([r["label"] for r in rows])}


def run_trainer(output_dir: str, pooling: str = "tokens", sync: str = "global", weight: float = DECORR_WEIGHT,
                average_tokens: bool = False, evaluate: bool = True, **extra) -> dict[str, object]:
    """Evaluate, train one SGD step and return the metrics, logs and parameters (rank-independent code)."""
    from tiny_models import tiny_bert

    from hf_decorr import DecorrTrainer, DecorrTrainingArguments

    world = int(os.environ.get("WORLD_SIZE", "1"))  # the process group may not exist yet (accelerate launch)
    args = DecorrTrainingArguments(
        output_dir=output_dir, report_to="none", save_strategy="no", max_steps=1, logging_steps=1,
        per_device_train_batch_size=TRAIN_SIZE // world, per_device_eval_batch_size=2, optim="sgd",
        learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, seed=0,
        average_tokens_across_devices=average_tokens, disable_tqdm=True, dataloader_num_workers=0,
        train_sampling_strategy="sequential",  # process r trains on examples 4r..4r+3 (per-shard references)
        ddp_find_unused_parameters=False,
        decorr_weight=weight, decorr_layers=["-1", "-2"], decorr_pooling=pooling, decorr_sync=sync,
        **{"use_cpu": True, **extra},
    )
    model = tiny_bert(layers=2, seed=0)
    trainer = DecorrTrainer(model=model, args=args, train_dataset=bert_data(TRAIN_SIZE, 10),
                            eval_dataset=bert_data(EVAL_SIZE, 11), data_collator=collate)
    metrics = trainer.evaluate() if evaluate else {}
    start = time.perf_counter()
    trainer.train()
    step_seconds = time.perf_counter() - start
    logs = [entry for entry in trainer.state.log_history if "task_loss" in entry]
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    sharded = [n for n, p in unwrapped.named_parameters() if hasattr(p, "full_tensor")]  # FSDP2: DTensor shards
    params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone()
              for n, p in unwrapped.named_parameters()}
    return {"metrics": metrics, "logs": logs, "params": params, "seconds": step_seconds,
            "layers": trainer.decorr_layer_names, "model_class": type(unwrapped).__name__,
            "wrapper_class": type(trainer.model_wrapped).__name__, "sharded": sharded,
            "distributed_type": str(trainer.accelerator.distributed_type)}


def trainer_scenarios() -> dict[str, dict[str, object]]:
    """The trainer runs compared between 1 and 2 processes (token samples: stats; mean pooling: gather)."""
    return {
        "tokens": {"pooling": "tokens"},
        "mean": {"pooling": "mean"},
        "tokens/avg_tokens": {"pooling": "tokens", "average_tokens": True, "evaluate": False},
        "tokens/avg_tokens/no_penalty": {"pooling": "tokens", "average_tokens": True, "weight": 0.0,
                                         "evaluate": False},
        "tokens/local": {"pooling": "tokens", "sync": "local", "evaluate": False},
        "tokens/registered": {"pooling": "tokens", "evaluate": False, "decorr_penalty": REGISTERED},
    }


def run_trainers(root: str) -> dict[str, object]:
    return {name: run_trainer(os.path.join(root, name.replace("/", "_")), **kw)
            for name, kw in trainer_scenarios().items()}


def initial_shard_penalties() -> list[torch.Tensor]:
    """Per-layer penalty of each process's training shard (examples 4r..4r+3) under the initial weights."""
    from tiny_models import tiny_bert

    data = bert_data(TRAIN_SIZE, 10)
    model = tiny_bert(layers=2, seed=0)
    captured = {}
    hooks = [model.bert.encoder.layer[i].register_forward_hook(
        lambda mod, a, out, i=i: captured.__setitem__(i, out[0] if isinstance(out, tuple) else out)) for i in (1, 0)]
    out = []
    with torch.no_grad():
        for r in range(2):
            batch = collate(data[4 * r: 4 * r + 4])
            model(**batch)
            mask = batch["attention_mask"].reshape(-1)
            out.append(torch.stack([decorrelation_penalty(captured[i].reshape(-1, captured[i].shape[-1]), mask)
                                    for i in (1, 0)]))
    for h in hooks:
        h.remove()
    return out


# ---- FSDP2 (torch fully_shard) on CPU / gloo -----------------------------------------------------------


def fsdp2_step(pooling: str) -> dict[str, object]:
    """Task loss + λ · global penalty of layers -1, -2 of a tiny BERT, parameters sharded with ``fully_shard``
    when there are several processes; returns the penalties, the full gradients and what unwrapping gives.

    Process r holds examples 4r..4r+3; one process holds all 8 (the reference). The hooks are registered on
    the module objects after sharding, the layers are resolved on the sharded model. In float64, because the
    two runs pad differently, which moves float32 BERT activations by rounding (~1e-7) that the small
    LayerNorm-bias gradients amplify past 1e-5.
    """
    from accelerate.utils import extract_model_from_parallel
    from tiny_models import tiny_bert

    from hf_decorr.capture import HiddenStateCapture, resolve_layers
    from hf_decorr.distributed import choose_strategy
    from hf_decorr.pooling import pool_hidden

    world, r = world_size(), rank()
    model = tiny_bert(layers=2, seed=0).double()  # float64: the padding differs between 1 and 2 processes
    if world > 1:
        from torch.distributed.fsdp import fully_shard

        for layer in model.bert.encoder.layer:
            fully_shard(layer)
        fully_shard(model)
    names = resolve_layers(model, ["-1", "-2"])
    modules = dict(model.named_modules())
    capture = HiddenStateCapture({n: modules[n] for n in names})
    capture.attach()
    capture.mode = "train"
    per = TRAIN_SIZE // world
    batch = collate(bert_data(TRAIN_SIZE, 10)[per * r: per * (r + 1)])
    out = model(**batch)
    outputs = {n: h for call in capture.sample_calls() for n, h in call.outputs.items()}
    samples = [pool_hidden(outputs[n], batch["attention_mask"], pooling, n) for n in names]
    h = torch.stack([x for x, _ in samples])
    mask = None if samples[0][1] is None else torch.stack([m for _, m in samples])
    bound = per if pooling != "tokens" else None
    strategy = choose_strategy(h.shape[-1], bound, world)
    values, _ = global_penalty_with_count(h, mask, "cov_l1", strategy, bound)
    (out.loss + DECORR_WEIGHT * values.sum()).backward()
    grads = {n: (p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad).clone()
             for n, p in model.named_parameters()}
    capture.detach()
    return {"values": values.detach(), "grads": grads, "names": names, "strategy": strategy,
            "model_class": type(model).__name__, "unwrapped_is_model": extract_model_from_parallel(model) is model,
            "sharded": sum(hasattr(p, "full_tensor") for p in model.parameters())}


# ---- main -------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--part", default="penalties,trainer")
    cli = parser.parse_args()
    parts = cli.part.split(",")
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    result: dict[str, object] = {}
    start = time.perf_counter()
    if "penalties" in parts:
        result["penalties"] = run_penalties()
    if "trainer" in parts:
        with tempfile.TemporaryDirectory() as root:
            result["trainer"] = run_trainers(root)
    result["seconds"] = time.perf_counter() - start
    result["world"] = world_size()
    tmp = os.path.join(cli.out, f".rank{rank()}.pt.tmp")
    torch.save(result, tmp)
    os.replace(tmp, os.path.join(cli.out, f"rank{rank()}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
