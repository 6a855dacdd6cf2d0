#!/usr/bin/env python
"""λ sweep of the default SST-2 / MiniLM job: several λ (0 = the baseline) × several seeds, mean ± std.

    nice -n 10 python recipes/sweep_sst2.py --weights 0 1 3 10 --seeds 42 43 44 --threads 1 \
        --output_dir outputs/sst2_sweep

Each run is ``recipes/text_classification.py --config <config> --compare_baseline false
--decorr_weight λ --seed s`` plus ``--test_file`` (the SST-2 test set is evaluated once at the end of
every run and reported; it is never used to choose). Seeds form the outer loop, so an interrupted
sweep has whole seeds; ``--resume`` skips runs whose ``results.json`` exists. The summary goes to
``sweep.json`` and ``sweep.md`` in the output folder.

λ is chosen on the validation (dev) split only, by a rule fixed before the sweep: among λ > 0, the
one with the lowest mean dev MAPC (mean over the penalised layers) whose mean dev accuracy is at most
``--max_accuracy_drop`` (default 0.01, one point) below the baseline's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time

try:
    import hf_decorr  # noqa: F401
except ImportError:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from hf_decorr.app.outputs import write_json_atomic
from hf_decorr.app.reporting import layer_metrics
from hf_decorr.atomic import write_text_atomic

HERE = os.path.dirname(os.path.abspath(__file__))
RECIPE = os.path.join(HERE, "text_classification.py")


def run_dir_name(weight: float, seed: int) -> str:
    return f"lambda{weight:g}_seed{seed}"


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(results: list[dict]) -> dict:
    """Mean and sample standard deviation (n − 1) over the seeds of one λ."""
    def collect(fn):
        return mean_std([fn(r) for r in results])

    layers = results[0]["layers"]
    per_layer = [layer_metrics(r["eval"], r["layers"]) for r in results]
    out = {
        "n": len(results),
        "seeds": [r["seed"] for r in results],
        "accuracy": collect(lambda r: r["eval"].get("eval_accuracy")),
        "f1_macro": collect(lambda r: r["eval"].get("eval_f1_macro")),
        "test_accuracy": collect(lambda r: (r.get("test") or {}).get("test_accuracy")),
        "test_f1_macro": collect(lambda r: (r.get("test") or {}).get("test_f1_macro")),
        "mapc_mean": collect(lambda r: r["eval"].get("eval_decorr_mapc")),
        "train_runtime": collect(lambda r: r["train"].get("train_runtime")),
        "decorr_loss_first": collect(lambda r: r["decorr_loss_log"][0] if r["decorr_loss_log"] else None),
        "decorr_loss_last": collect(lambda r: r["decorr_loss_log"][-1] if r["decorr_loss_log"] else None),
        "task_loss_first": collect(lambda r: r["task_loss_log"][0] if r["task_loss_log"] else None),
        "task_loss_last": collect(lambda r: r["task_loss_log"][-1] if r["task_loss_log"] else None),
        "layers": {
            layer: {m: mean_std([pl.get(layer, {}).get(m) for pl in per_layer])
                    for m in ("mapc", "cvr", "ud", "pca_ud", "cov_l1")}
            for layer in layers
        },
    }
    return out


def choose_weight(summary: dict[float, dict], max_drop: float) -> float | None:
    """The dev-only rule of the module doc."""
    if 0.0 not in summary:
        return None
    floor = summary[0.0]["accuracy"][0] - max_drop
    candidates = [w for w, s in summary.items()
                  if w > 0 and s["accuracy"][0] is not None and s["accuracy"][0] >= floor]
    if not candidates:
        return None
    return min(candidates, key=lambda w: summary[w]["mapc_mean"][0])


def _pm(pair, digits: int) -> str:
    mean, std = pair
    if mean is None:
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def markdown(summary: dict[float, dict], chosen: float | None) -> str:
    layers = list(next(iter(summary.values()))["layers"])
    short = [".".join(layer.split(".")[-2:]) for layer in layers]
    header = ["λ", "n", "dev accuracy", "dev macro-F1"]
    header += [f"MAPC {s}" for s in short] + [f"CVR {s}" for s in short] + [f"UD_90% {s}" for s in short]
    header += ["L_Σ train (first → last log)", "task loss (last log)", "train time (s)", "test accuracy",
               "test macro-F1"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for weight in sorted(summary):
        s = summary[weight]
        label = (f"{weight:g}" + (" (baseline)" if weight == 0 else "")
                 + (" ← chosen on dev" if weight == chosen else ""))
        cells = [label, str(s["n"]), _pm(s["accuracy"], 4), _pm(s["f1_macro"], 4)]
        for metric, digits in (("mapc", 4), ("cvr", 2), ("ud", 1)):
            cells += [_pm(s["layers"][layer][metric], digits) for layer in layers]
        first, last = s["decorr_loss_first"][0], s["decorr_loss_last"][0]
        cells.append(f"{first:.4g} → {last:.4g}" if first is not None else "–")
        cells += [_pm(s["task_loss_last"], 3), _pm(s["train_runtime"], 0), _pm(s["test_accuracy"], 4),
                  _pm(s["test_f1_macro"], 4)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=os.path.join(HERE, "configs", "sst2_minilm_default.yaml"))
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 1.0, 3.0, 10.0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--output_dir", default="outputs/sst2_sweep")
    parser.add_argument("--test_file", default=os.path.join("recipes", "data", "sst2", "test.tsv"))
    parser.add_argument("--max_accuracy_drop", type=float, default=0.01)
    parser.add_argument("--resume", action="store_true", help="skip runs whose results.json exists")
    parser.add_argument("--keep_models", action="store_true", help="keep each run's model folder (≈ 90 MB each)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads per run (OMP_NUM_THREADS); 1 avoids thread stalls on a shared machine")
    args, extra = parser.parse_known_args()

    os.makedirs(args.output_dir, exist_ok=True)
    started = time.time()
    for seed in args.seeds:
        for weight in args.weights:
            run_dir = os.path.join(args.output_dir, run_dir_name(weight, seed))
            if args.resume and os.path.isfile(os.path.join(run_dir, "results.json")):
                print(f"[sweep] skip {run_dir} (done)", flush=True)
                continue
            command = [sys.executable, RECIPE, "--config", args.config, "--compare_baseline", "false",
                       "--decorr_weight", str(weight), "--seed", str(seed), "--output_dir", run_dir,
                       "--test_file", args.test_file, "--disable_tqdm", "true", *extra]
            print(f"[sweep] λ={weight:g} seed={seed}  ({time.time() - started:.0f} s so far)", flush=True)
            os.makedirs(run_dir, exist_ok=True)
            env = dict(os.environ)
            if args.threads:
                env["OMP_NUM_THREADS"] = str(args.threads)
            with open(os.path.join(run_dir, "log.txt"), "w") as log:
                proc = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, env=env)
            if proc.returncode != 0:
                raise SystemExit(f"[sweep] run failed (exit {proc.returncode}); see {run_dir}/log.txt")
            if not args.keep_models:
                shutil.rmtree(os.path.join(run_dir, "model"), ignore_errors=True)

    results: dict[float, list[dict]] = {}
    for weight in args.weights:
        for seed in args.seeds:
            path = os.path.join(args.output_dir, run_dir_name(weight, seed), "results.json")
            with open(path) as f:
                results.setdefault(weight, []).append(json.load(f))
    summary = {w: summarise(r) for w, r in results.items()}
    chosen = choose_weight(summary, args.max_accuracy_drop)
    command = " ".join(["python", "recipes/sweep_sst2.py", *sys.argv[1:]])
    table = markdown(summary, chosen)
    write_json_atomic(os.path.join(args.output_dir, "sweep.json"),
                      {"command": command, "chosen_weight": chosen, "max_accuracy_drop": args.max_accuracy_drop,
                       "summary": {f"{w:g}": s for w, s in summary.items()}, "wall_time_s": time.time() - started})
    write_text_atomic(os.path.join(args.output_dir, "sweep.md"),
                      f"# SST-2 / MiniLM λ sweep\n\nCommand: `{command}`\n\n{table}")
    print("\n" + table, flush=True)
    print(f"[sweep] chosen on dev: λ = {chosen}; wall time {time.time() - started:.0f} s", flush=True)


if __name__ == "__main__":
    main()
