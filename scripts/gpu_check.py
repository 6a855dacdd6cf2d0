#!/usr/bin/env python
"""GPU checks of hf_decorr that the CPU test suite cannot make (run by scripts/gpu_check.sh).

Modes:

* ``single``: one process, one GPU. (1) every penalty and its gradient on CUDA equal the CPU ones
  (float32 with TF32 off: 1e-5 relative; the error with TF32 on is printed); bf16 inputs too.
  (2) ``DecorrTrainer`` steps under bf16 autocast (``bf16=True``) and with bf16 weights: the
  penalty is finite and float32, the loss finite. (3) ``eval_decorr_*`` on CUDA equal the CPU ones.
* ``llm``: a ~1.1B-parameter Llama (hidden 2048, 22 layers) from a config in bf16 with non-reentrant
  checkpointing, 8k tokens, every layer penalised: step time and peak memory of the old penalty path and of
  each ``decorr_precision`` against a plain Trainer, and the error of each precision against float64 on the
  model's own hidden states (writes ``<out>/llm_check.json``).
* ``launched --recipe NAME``: under ``accelerate launch --config_file recipes/accelerate/NAME.yaml``
  with any number of processes. Evaluates, then trains one SGD step of a tiny BERT on a global
  batch of 8 (``8 / W`` per process); rank 0 writes ``<out>/NAME_W<W>.pt``. With ``W ≥ 2`` it also
  checks the global penalty and its DDP gradients against the concatenated batch over NCCL, and
  compares the step with ``<out>/ddp_W1.pt`` (the same global batch on one process) when present.

Every check prints ``PASS <name>`` or ``FAIL <name>: <why>``; the exit status is 1 if any failed.
Self-contained (no ``datasets``, no test helpers): the GPU image may lack them. ``--dry-run-cpu``
runs the same code with the CPU standing in for the GPU (gloo instead of NCCL), to check the script
itself on a machine without a GPU; it proves nothing about CUDA.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_decorr import DecorrTrainer, DecorrTrainingArguments  # noqa: E402
from hf_decorr.engine import PenaltyEngine  # noqa: E402
from hf_decorr.penalties import PENALTIES, decorrelation_penalty  # noqa: E402

FAILED: list[str] = []
DEVICE = "cuda"  # "cpu" with --dry-run-cpu
TRAIN_SIZE, EVAL_SIZE, LR, WEIGHT = 8, 7, 0.5, 2.0


def check(name: str, ok: bool, why: str = "") -> None:
    rank = int(os.environ.get("RANK", "0"))
    print(f"[rank {rank}] {'PASS' if ok else 'FAIL'} {name}{'' if ok else ': ' + why}", flush=True)
    if not ok:
        FAILED.append(name)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=37, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, num_labels=2,
                     max_position_embeddings=64)
    return BertForSequenceClassification(cfg)


def bert_data(size: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for i in range(size):
        length = int(torch.randint(3, 13, (1,), generator=g))
        rows.append({"input_ids": torch.randint(5, 101, (length,), generator=g), "label": i % 2})
    return rows


def collate(rows: list[dict]) -> dict[str, torch.Tensor]:
    length = max(len(r["input_ids"]) for r in rows)
    ids = torch.zeros(len(rows), length, dtype=torch.long)
    mask = torch.zeros(len(rows), length, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r["input_ids"])] = r["input_ids"]
        mask[i, : len(r["input_ids"])] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([r["label"] for r in rows])}


def make_trainer(out: str, use_cpu: bool = False, world: int = 1, **kw) -> DecorrTrainer:
    options = dict(output_dir=out, use_cpu=use_cpu, report_to="none", save_strategy="no", max_steps=1,
                   logging_steps=1, per_device_train_batch_size=TRAIN_SIZE // world, per_device_eval_batch_size=2,
                   optim="sgd", learning_rate=LR, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
                   seed=0, average_tokens_across_devices=False, disable_tqdm=True, dataloader_num_workers=0,
                   decorr_weight=WEIGHT, decorr_layers=["-1", "-2"], decorr_pooling="tokens")
    options.update(kw)
    model = options.pop("model", None) or tiny_bert()
    return DecorrTrainer(model=model, args=DecorrTrainingArguments(**options),
                         train_dataset=bert_data(TRAIN_SIZE, 10), eval_dataset=bert_data(EVAL_SIZE, 11),
                         data_collator=collate)


# ---- single process ------------------------------------------------------------------------------


def penalties_cuda_vs_cpu() -> None:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 4096, 384, generator=g) @ torch.randn(384, 384, generator=g) * 0.1
    mask = torch.rand(4096, generator=g) > 0.2
    for tf32 in (False, True) if DEVICE == "cuda" else (False,):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        for kind in PENALTIES:
            for dtype in (torch.float32, torch.bfloat16):
                x_cpu = h.to(dtype).clone().requires_grad_()
                x_gpu = h.to(dtype).to(DEVICE).clone().requires_grad_()
                v_cpu = decorrelation_penalty(x_cpu, mask, kind)
                v_gpu = decorrelation_penalty(x_gpu, mask.to(DEVICE), kind)
                v_cpu.sum().backward()
                v_gpu.sum().backward()
                ev, eg = rel(v_gpu, v_cpu), rel(x_gpu.grad.float(), x_cpu.grad.float())
                name = f"cuda_vs_cpu/{kind}/{str(dtype)[6:]}/tf32={tf32}"
                print(f"  {name}: value rel err {ev:.2e}, grad rel err {eg:.2e}, dtype {v_gpu.dtype}")
                if not tf32:
                    tol = 1e-5 if dtype == torch.float32 else 1e-2  # bf16 grads are rounded to bf16
                    check(name, ev <= 1e-5 and eg <= tol and v_gpu.dtype == torch.float32, f"{ev:.2e} {eg:.2e}")
    torch.backends.cuda.matmul.allow_tf32 = False


def bf16_steps() -> None:
    seen: list[torch.Tensor] = []
    original = PenaltyEngine.penalties

    def spy(self, samples, *args, **kwargs):
        per_layer, few = original(self, samples, *args, **kwargs)
        seen.append(per_layer.detach())
        return per_layer, few

    PenaltyEngine.penalties = spy
    try:
        for label, kw in (("autocast", {"bf16": True}), ("bf16_weights", {"model": tiny_bert().to(torch.bfloat16)})):
            seen.clear()
            with tempfile.TemporaryDirectory() as out:
                trainer = make_trainer(out, use_cpu=DEVICE == "cpu", **kw)
                trainer.train()
            log = [e for e in trainer.state.log_history if "decorr_loss" in e][0]
            ok = bool(seen) and seen[0].dtype == torch.float32 and bool(torch.isfinite(seen[0]).all())
            check(f"bf16/{label}: penalty finite and float32", ok, f"{[(s.dtype, s.tolist()) for s in seen]}")
            check(f"bf16/{label}: loss finite", math.isfinite(log["loss"]) and math.isfinite(log["decorr_loss"]),
                  str(log))
            print(f"  bf16/{label}: {log}")
    finally:
        PenaltyEngine.penalties = original


def eval_cuda_vs_cpu() -> None:
    metrics = {}
    for use_cpu in (True, False):
        with tempfile.TemporaryDirectory() as out:
            metrics[use_cpu] = make_trainer(out, use_cpu=use_cpu).evaluate()
    keys = [k for k in metrics[True] if k.startswith("eval_decorr_")]
    bad = {k: (metrics[False][k], metrics[True][k]) for k in keys
           if not math.isclose(metrics[False][k], metrics[True][k], rel_tol=1e-4, abs_tol=1e-6)}
    check("eval metrics cuda == cpu", bool(keys) and not bad, str(bad))


def single() -> None:
    assert DEVICE == "cpu" or torch.cuda.is_available(), "no CUDA device"
    torch.backends.cuda.matmul.allow_tf32 = False
    for step in (penalties_cuda_vs_cpu, bf16_steps, eval_cuda_vs_cpu):
        start = time.perf_counter()
        try:
            step()
        except Exception as exc:  # one failing check must not hide the others
            check(step.__name__, False, f"{type(exc).__name__}: {exc}")
        print(f"  ({step.__name__}: {time.perf_counter() - start:.1f}s)")


# ---- launched by accelerate ------------------------------------------------------------------------


def global_penalty_over_nccl() -> None:
    """The global penalty of a stack of 2 layers and its DDP gradients equal those of the concatenated batch."""
    import torch.distributed as dist

    from hf_decorr.distributed import global_penalty_with_count

    world, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if DEVICE == "cuda" else torch.device("cpu")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(6, 64), torch.nn.Tanh()).to(device)
    g = torch.Generator().manual_seed(1)
    rows = [int(torch.randint(20, 60, (1,), generator=g)) for _ in range(world)]
    xs = [torch.randn(n, 6, generator=g).to(device) for n in rows]
    masks = [torch.rand(n, generator=g).to(device) > 0.3 for n in rows]
    for kind in PENALTIES:
        for strategy, bound in (("stats", None), ("gather", max(rows))):
            ref = torch.nn.Sequential(torch.nn.Linear(6, 64), torch.nn.Tanh()).to(device)
            ref.load_state_dict(net.state_dict())
            want = decorrelation_penalty(ref(torch.cat(xs)), torch.cat(masks), kind)
            want.backward()
            ddp = torch.nn.parallel.DistributedDataParallel(
                torch.nn.Sequential(torch.nn.Linear(6, 64), torch.nn.Tanh()).to(device),
                device_ids=None if device.type == "cpu" else [device.index])
            ddp.module.load_state_dict(net.state_dict())
            got, _ = global_penalty_with_count(ddp(xs[rank]), masks[rank], kind, strategy, bound)
            got.backward()
            err = max(rel(p.grad, q.grad) for p, q in zip(ddp.module.parameters(), ref.parameters()))
            check(f"{dist.get_backend()}/{kind}/{strategy}", rel(got, want) <= 1e-5 and err <= 1e-5,
                  f"value {rel(got, want):.2e} grad {err:.2e}")


def launched(recipe: str, out_dir: str) -> None:
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    with tempfile.TemporaryDirectory() as out:
        extra = {"use_cpu": True} if DEVICE == "cpu" else {"tf32": False}
        trainer = make_trainer(out, world=world, **extra)
        metrics = trainer.evaluate()
        trainer.train()
    unwrapped = trainer.accelerator.unwrap_model(trainer.model)
    params = {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().float().cpu().clone()
              for n, p in unwrapped.named_parameters()}
    result = {
        "world": world, "distributed_type": str(trainer.accelerator.distributed_type),
        "wrapper": type(trainer.model_wrapped).__name__, "model": type(unwrapped).__name__,
        "sharded": sum(hasattr(p, "full_tensor") for p in unwrapped.parameters()),
        "layers": trainer.decorr_layer_names, "metrics": metrics,
        "logs": [e for e in trainer.state.log_history if "decorr_loss" in e], "params": params,
    }
    print(f"  {recipe} W={world}: {result['distributed_type']}, wrapper {result['wrapper']}, model {result['model']}, "
          f"{result['sharded']} sharded parameters, layers {result['layers']}, log {result['logs']}")
    if DEVICE == "cuda":  # on CPU, accelerate quietly falls back to DDP for the FSDP recipe
        engine = {"ddp": "MULTI_GPU" if world > 1 else "", "fsdp": "FSDP", "deepspeed_zero2": "DEEPSPEED",
                  "deepspeed_zero3": "DEEPSPEED"}.get(recipe, "")
        check(f"{recipe}/W{world}: engine {engine or 'any'}", engine in result["distributed_type"],
              result["distributed_type"])
        if recipe == "fsdp":
            check(f"{recipe}/W{world}: FSDP2 parameters are DTensors", result["sharded"] > 0, str(result["sharded"]))
        if recipe == "ddp" and world > 1:
            check(f"{recipe}/W{world}: DDP wrapper", result["wrapper"] == "DistributedDataParallel", result["wrapper"])
    check(f"{recipe}/W{world}: layers hooked", result["layers"] == ["bert.encoder.layer.1", "bert.encoder.layer.0"])
    logged = result["logs"][0]["decorr_loss"] if result["logs"] else math.nan
    check(f"{recipe}/W{world}: penalty logged and finite", math.isfinite(logged) and logged > 0, str(result["logs"]))
    if world > 1:
        global_penalty_over_nccl()
        reference = os.path.join(out_dir, "ddp_W1.pt")
        if os.path.exists(reference):
            want = torch.load(reference, weights_only=False)
            before = {n: p.detach().float() for n, p in tiny_bert().named_parameters()}
            moved = torch.cat([(want["params"][n] - before[n]).reshape(-1) for n in before]).norm()
            err = torch.cat([(params[n] - want["params"][n]).reshape(-1) for n in before]).norm()
            ratio = float(err / moved)
            check(f"{recipe}/W{world}: one step == one process", ratio <= 1e-4, f"{ratio:.2e}")
            for key in ("eval_decorr_samples", "eval_decorr_cvr", "eval_decorr_mapc"):
                check(f"{recipe}/W{world}: {key} == one process",
                      math.isclose(metrics[key], want["metrics"][key], rel_tol=1e-4),
                      f"{metrics[key]} {want['metrics'][key]}")
            for key in ("task_loss", "decorr_loss"):
                check(f"{recipe}/W{world}: logged {key} == one process",
                      math.isclose(result["logs"][0][key], want["logs"][0][key], rel_tol=1e-4),
                      f"{result['logs'][0][key]} {want['logs'][0][key]}")
    if int(os.environ.get("RANK", "0")) == 0:
        path = os.path.join(out_dir, f"{recipe}_W{world}.pt")
        torch.save(result, path + ".tmp")
        os.replace(path + ".tmp", path)
    if dist.is_initialized():
        dist.barrier()


def llm(out_dir: str, tokens: int = 8192) -> None:
    """A ~1B-parameter Llama (TinyLlama's shape) from a config, bf16 weights, non-reentrant checkpointing,
    ``tokens`` tokens, ``decorr_layers=["all"]``: step time (forward + backward, median of 3 after a warm-up) and
    peak allocated memory of each variant against a plain Trainer; the penalty of every ``decorr_precision``
    against float64 on the model's own hidden states (value 1e-4, gradient 1%)."""
    import json
    import statistics

    from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

    from hf_decorr.gram import cov_l1_lowmem

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from llm_scale import OldPathTrainer

    small = DEVICE == "cpu"  # dry run: a tiny model, the same code
    cfg = LlamaConfig(vocab_size=32000 if not small else 256, hidden_size=2048 if not small else 64,
                      intermediate_size=5632 if not small else 128, num_hidden_layers=22 if not small else 2,
                      num_attention_heads=32 if not small else 4, num_key_value_heads=4 if not small else 2,
                      max_position_embeddings=max(tokens, 2048))
    tokens = tokens if not small else 256
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(device=DEVICE, dtype=torch.bfloat16)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    params = sum(p.numel() for p in model.parameters())
    ids = torch.randint(0, cfg.vocab_size, (1, tokens), device=DEVICE)
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    results = {"params": params, "tokens": tokens}
    variants = [("plain", None), ("old", "fp32"), ("fp32", "fp32"), ("tf32", "tf32"), ("bf16", "bf16"),
                ("auto", "auto")]
    for name, precision in variants:
        if name == "plain":
            trainer = Trainer(model=model, args=TrainingArguments(output_dir=out_dir, report_to=[],
                                                                  use_cpu=small))
        else:
            args = DecorrTrainingArguments(output_dir=out_dir, report_to=[], use_cpu=small, decorr_layers=["all"],
                                           decorr_eval_metrics=False, decorr_precision=precision)
            trainer = (OldPathTrainer if name == "old" else DecorrTrainer)(model=model, args=args)
        times = []
        try:
            for _ in range(4):
                if DEVICE == "cuda":
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                start = time.perf_counter()
                trainer.compute_loss(model, inputs).backward()
                if DEVICE == "cuda":
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - start)
                model.zero_grad(set_to_none=True)
            peak = torch.cuda.max_memory_allocated() if DEVICE == "cuda" else 0
            results[name] = {"seconds": statistics.median(times[1:]), "peak_GiB": peak / 2**30}
        except torch.OutOfMemoryError as exc:
            results[name] = {"error": f"out of memory: {exc}"[:200]}
            model.zero_grad(set_to_none=True)
        if hasattr(trainer, "remove_decorr_hooks"):
            trainer.remove_decorr_hooks()
        del trainer
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
        print(f"  llm {name}: {results[name]}", flush=True)
    base = results["plain"]
    for name, _ in variants[1:]:
        if "seconds" in results[name]:
            results[name]["time_ratio"] = results[name]["seconds"] / base["seconds"]
            if base["peak_GiB"]:
                results[name]["peak_ratio"] = results[name]["peak_GiB"] / base["peak_GiB"]
    check("llm/new path runs with all layers", all("seconds" in results[n] for n, _ in variants[2:]))
    # precision of each option against float64 on this model's hidden states
    captured = []
    hooks = [layer.register_forward_hook(lambda m, a, o: captured.append((o[0] if isinstance(o, tuple) else o)
                                                                         .detach().reshape(-1, cfg.hidden_size)))
             for layer in model.model.layers[-2:]]
    with torch.no_grad():
        model(**inputs)
    for hook in hooks:
        hook.remove()
    errors = {}
    for i, h in enumerate(captured):
        ref_h = h.double().requires_grad_()
        ref = cov_l1_lowmem(ref_h)
        ref.backward()
        for precision in ("fp32", "tf32", "bf16", "auto"):
            x = h.float().requires_grad_()  # a float32 gradient: its own rounding is not the Gram's error
            value = cov_l1_lowmem(x, precision=precision)
            value.backward()
            errors[f"layer{i}/{precision}"] = (abs(float(value) - float(ref)) / abs(float(ref)),
                                               rel(x.grad, ref_h.grad))
    results["precision"] = errors
    for key, (value_err, grad_err) in errors.items():
        print(f"  llm precision {key}: value {value_err:.2e}, gradient {grad_err:.2e}", flush=True)
        if key.endswith("auto"):
            check(f"llm/{key} within 1e-4 (value) and 1% (gradient)", value_err <= 1e-4 and grad_err <= 1e-2,
                  f"{value_err:.2e}, {grad_err:.2e}")
    with open(os.path.join(out_dir, "llm_check.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    print("  llm results: " + json.dumps(results), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("mode", choices=["single", "launched", "llm"])
    parser.add_argument("--tokens", type=int, default=8192, help="llm mode: tokens per step")
    parser.add_argument("--recipe", default="ddp")
    parser.add_argument("--out", default=tempfile.gettempdir())
    parser.add_argument("--dry-run-cpu", action="store_true", help="the CPU stands in for the GPU (checks the script)")
    cli = parser.parse_args()
    global DEVICE
    DEVICE = "cpu" if cli.dry_run_cpu else "cuda"
    os.makedirs(cli.out, exist_ok=True)
    try:
        if cli.mode == "llm":
            llm(cli.out, cli.tokens)
        else:
            single() if cli.mode == "single" else launched(cli.recipe, cli.out)
    except Exception as exc:
        check(f"{cli.mode}/{cli.recipe}", False, f"{type(exc).__name__}: {exc}")
        raise
    finally:
        print(f"{len(FAILED)} failed: {FAILED}" if FAILED else "all passed", flush=True)
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
