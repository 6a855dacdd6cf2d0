"""DecorrTrainer under DeepSpeed ZeRO-2 and ZeRO-3 on 2 CPU processes (gloo) against one process on the whole batch.

Two launches (module fixtures) run every scenario of tests/deepspeed_worker.py:

* ZeRO-3 by ``torchrun --nproc_per_node 2``: parameters really partitioned (``stage3_param_persistence_threshold``
  0: each process holds half of every weight), ``decorr_sync="global"``, activation checkpointing on, for
  ``last`` and ``all`` with gradient accumulation 1 and 2: each rank reads different rows; the logged penalty,
  the evaluation metrics and the parameters after one SGD step (the consolidated weights that ``save_model``
  writes, loaded with ``from_pretrained``) equal one process on the 8 rows; the divergence guard stops both
  processes at the same step and nothing is saved; a run resumed from the ZeRO checkpoint of step 1 ends on the
  parameters of the uninterrupted run.
  Before all that, without the configured process state, accelerate counts one process: the trainer refuses.
* ZeRO-2 by ``accelerate launch --config_file recipes/accelerate/deepspeed_zero2.yaml`` (the DeepSpeed config is
  the recipe's): the same equality.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import deepspeed  # noqa: F401 - in the tests extra: a missing DeepSpeed fails here, it is never skipped
import deepspeed_worker as dw
import dist_worker as w
import pytest
import torch
from conftest import REPO_ROOT, check_exit, free_port, worker_env

LAUNCH_TIMEOUT_S = 420
WORKER = os.path.join(os.path.dirname(__file__), "deepspeed_worker.py")
ZERO2_RECIPE = os.path.join(REPO_ROOT, "recipes", "accelerate", "deepspeed_zero2.yaml")
TOL = 1e-5


def launch(cmd: list[str], out) -> list[dict]:
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=worker_env(), capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"DeepSpeed worker timed out after {LAUNCH_TIMEOUT_S}s\nstdout:\n{exc.stdout}\n"
                    f"stderr:\n{exc.stderr}")
    check_exit("DeepSpeed worker", proc.returncode, proc.stdout, proc.stderr)
    print(f"\n{' '.join(cmd[:6])} ...: {time.perf_counter() - start:.1f}s wall")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="module")
def zero3(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), WORKER, "--out", str(out), "--stage", "3"]
    return launch(cmd, out)


@pytest.fixture(scope="module")
def zero2(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero2")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", ZERO2_RECIPE, "--num_processes", "2",
           "--mixed_precision", "no", "--main_process_ip", "127.0.0.1", "--main_process_port", str(free_port()),
           WORKER, "--out", str(out), "--stage", "2", "--launcher_config"]
    return launch(cmd, out)


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """Each scenario in this single process: the 8 rows on one device, no DeepSpeed."""
    root = tmp_path_factory.mktemp("one")
    out = {}
    for name, kw in dw.SCENARIOS.items():
        trainer = dw.build(dw.arguments(str(root / name.replace("/", "_")), world=1, **kw))
        trainer.train()
        out[name] = {"params": {n: p.detach().clone() for n, p in trainer.model.named_parameters()},
                     "logs": [e for e in trainer.state.log_history if "task_loss" in e],
                     "metrics": trainer.evaluate(), "rows_read": trainer.rows_read,
                     "layers": trainer.decorr_layer_names}
    return out


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def saved_params(folder: str) -> dict[str, torch.Tensor]:
    from transformers import BertForSequenceClassification

    model = BertForSequenceClassification.from_pretrained(folder)
    return {n: p.detach() for n, p in model.named_parameters()}


def update_error(got: dict, want: dict) -> float:
    """‖θ_got − θ_want‖ / ‖θ_want − θ_0‖: the error relative to what one step moved the parameters."""
    from tiny_models import tiny_bert

    before = {n: p.detach() for n, p in tiny_bert(layers=2, seed=0).named_parameters()}
    moved = torch.cat([(want[n] - before[n]).reshape(-1) for n in want]).norm()
    assert moved > 1e-2
    return float(torch.cat([(got[n] - want[n]).reshape(-1) for n in want]).norm() / moved)


def first_tokens() -> list[int]:
    return [int(r["input_ids"][0]) for r in w.bert_data(w.TRAIN_SIZE, 10)]


@pytest.mark.parametrize("name", list(dw.SCENARIOS))
def test_zero3_is_data_parallel_with_partitioned_parameters(zero3, one, name):
    runs = [r["scenarios"][name] for r in zero3]
    for run in runs:
        assert run["processes"] == 2 and run["distributed_type"] == "DistributedType.DEEPSPEED"
        part = run["partitioned"]
        assert part["local"] == 0 and part["shard"] * 2 == part["full"] > 0  # half of the weight on each process
        assert run["layers"] == one[name]["layers"]
    rows = [sorted(t for batch in run["rows_read"] for t in batch) for run in runs]
    assert not set(rows[0]) & set(rows[1])  # each rank reads different rows...
    assert sorted(rows[0] + rows[1]) == sorted(first_tokens())  # ...and together all of them
    # every micro-batch of the global batch is one micro-batch of the single process
    accumulation = dw.SCENARIOS[name]["accumulation"]
    assert len(runs[0]["rows_read"]) == accumulation == len(one[name]["rows_read"])
    for k in range(accumulation):
        assert sorted(runs[0]["rows_read"][k] + runs[1]["rows_read"][k]) == sorted(one[name]["rows_read"][k])


@pytest.mark.parametrize("name", list(dw.SCENARIOS))
def test_zero3_logs_metrics_and_saved_weights_equal_one_process(zero3, one, name):
    want = one[name]
    keys = [k for k in want["logs"][0] if k in ("loss", "task_loss") or k.startswith("decorr_")]
    assert "decorr_loss" in keys
    for run in (r["scenarios"][name] for r in zero3):
        for key in keys:
            assert run["logs"][0][key] == pytest.approx(want["logs"][0][key], rel=TOL), key
        metric_keys = [k for k in want["metrics"] if k.startswith("eval_decorr_")]
        assert "eval_decorr_samples" in metric_keys
        for key in metric_keys:
            assert run["metrics"][key] == pytest.approx(want["metrics"][key], rel=TOL, abs=1e-7), key
    folder = zero3[0]["scenarios"][name]["saved"]
    assert os.path.exists(os.path.join(folder, "decorr_config.json"))
    with open(os.path.join(folder, "decorr_config.json")) as f:
        assert json.load(f)["decorr_layers"] == [dw.SCENARIOS[name]["layers"]]
    assert update_error(saved_params(folder), want["params"]) <= TOL


def test_zero3_divergence_stops_both_processes_and_saves_nothing(zero3):
    errors = [r["diverge"].get("error", "") for r in zero3]
    assert all(e.startswith("training diverged") for e in errors) and errors[0] == errors[1]
    assert "at optimizer step 2" in errors[0]
    assert not os.path.exists(zero3[0]["diverge"]["saved"])


def test_zero3_resume_from_a_zero_checkpoint_lands_on_the_uninterrupted_run(zero3):
    result = zero3[0]["resume"]
    assert "global_step1" in result["checkpoint"] and "decorr_config.json" in result["checkpoint"]
    assert [e["step"] for e in result["logs"]] == [1, 2]  # the resumed trainer's history holds step 1 and 2
    uninterrupted, resumed = saved_params(result["uninterrupted"]), saved_params(result["resumed"])
    for n in uninterrupted:
        assert torch.allclose(resumed[n], uninterrupted[n], rtol=0, atol=1e-7), n


def test_zero2_through_the_accelerate_recipe_equals_one_process(zero2, one):
    name = dw.ZERO2[0]
    for result in zero2:
        run = result["scenarios"][name]
        assert run["processes"] == 2 and run["partitioned"]["shard"] == -1  # ZeRO-2 keeps parameters whole
        assert run["logs"][0]["decorr_loss"] == pytest.approx(one[name]["logs"][0]["decorr_loss"], rel=TOL)
    rows = [t for r in zero2 for batch in r["scenarios"][name]["rows_read"] for t in batch]
    assert sorted(rows) == sorted(first_tokens())
    assert update_error(saved_params(zero2[0]["scenarios"][name]["saved"]), one[name]["params"]) <= TOL


def test_a_miscounted_deepspeed_run_is_refused_with_the_fix(zero3):
    for result in zero3:
        message = result["miscounted"]
        assert "DeepSpeed runs 2 processes but accelerate counts 1" in message
        assert "deepspeed_process_state()" in message and "use_configured_state" in message
