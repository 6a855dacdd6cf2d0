"""Multi-node, exercised on one machine: two "nodes" of one CPU process each (gloo), started by two launchers that
meet at a rendezvous on localhost, as docs/DISTRIBUTED.md's multi-node commands do on real nodes:

* ``torchrun --nnodes 2 --nproc_per_node 1 --node_rank r --rdzv_backend c10d --rdzv_endpoint 127.0.0.1:PORT``;
* ``accelerate launch --config_file recipes/accelerate/ddp.yaml --num_machines 2 --num_processes 2
  --machine_rank r --main_process_ip 127.0.0.1 --main_process_port PORT``.

Each runs the trainer scenarios of tests/dist_worker.py; the evaluation metrics, the training logs and the
parameters after one SGD step must equal one process on the whole batch (the standard of tests/test_distributed.py).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import dist_worker as w
import pytest
import torch
from conftest import REPO_ROOT, check_exit, free_port, worker_env
from tiny_models import tiny_bert

TIMEOUT_S = 300
WORKER = os.path.join(os.path.dirname(__file__), "dist_worker.py")
DDP_RECIPE = os.path.join(REPO_ROOT, "recipes", "accelerate", "ddp.yaml")
SCENARIOS = ("tokens", "mean")
TOL = 1e-5


def two_nodes(commands: list[list[str]], out) -> list[dict]:
    """Start one launcher per node at once; both must exit 0."""
    start = time.perf_counter()
    procs = [subprocess.Popen(cmd, env=worker_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for cmd in commands]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT_S))
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"two-node launch timed out after {TIMEOUT_S}s")
    for node, (proc, (stdout, stderr)) in enumerate(zip(procs, outputs)):
        check_exit(f"node {node}", proc.returncode, stdout, stderr)
    print(f"\ntwo nodes ({commands[0][2]}): {time.perf_counter() - start:.1f}s wall")
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in (0, 1)]


@pytest.fixture(scope="module")
def torchrun_nodes(tmp_path_factory):
    out = tmp_path_factory.mktemp("torchrun_nodes")
    port = free_port()
    return two_nodes([[sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "1",
                       "--node_rank", str(node), "--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}",
                       "--rdzv_id", "hf_decorr_two_nodes", WORKER, "--out", str(out), "--part", "trainer"]
                      for node in (0, 1)], out)


@pytest.fixture(scope="module")
def accelerate_nodes(tmp_path_factory):
    out = tmp_path_factory.mktemp("accelerate_nodes")
    port = free_port()
    return two_nodes([[sys.executable, "-m", "accelerate.commands.launch", "--config_file", DDP_RECIPE,
                       "--num_machines", "2", "--num_processes", "2", "--machine_rank", str(node),
                       "--main_process_ip", "127.0.0.1", "--main_process_port", str(port), "--mixed_precision", "no",
                       "--dynamo_backend", "no", WORKER, "--out", str(out), "--part", "trainer"]
                      for node in (0, 1)], out)


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    root = tmp_path_factory.mktemp("one_node")
    return {name: w.run_trainer(str(root / name), **w.trainer_scenarios()[name]) for name in SCENARIOS}


def check_equal_to_one_process(results: list[dict], one: dict) -> None:
    before = {n: p.detach() for n, p in tiny_bert(layers=2, seed=0).named_parameters()}
    assert [r["world"] for r in results] == [2, 2]
    for name in SCENARIOS:
        want = one[name]
        moved = torch.cat([(want["params"][n] - before[n]).reshape(-1) for n in before]).norm()
        assert moved > 1e-2
        for result in results:
            got = result["trainer"][name]
            assert got["wrapper_class"] == "DistributedDataParallel"
            err = torch.cat([(got["params"][n] - want["params"][n]).reshape(-1) for n in before]).norm()
            assert float(err / moved) <= TOL, (name, float(err / moved))
            for key in ("loss", "task_loss", "decorr_loss", "decorr_loss/bert.encoder.layer.1"):
                assert got["logs"][0][key] == pytest.approx(want["logs"][0][key], rel=TOL), (name, key)
            metrics = [k for k in want["metrics"] if k.startswith("eval_decorr_")]
            assert "eval_decorr_samples" in metrics
            for key in metrics:
                assert got["metrics"][key] == pytest.approx(want["metrics"][key], rel=TOL, abs=1e-7), (name, key)


def test_two_torchrun_nodes_equal_one_process(torchrun_nodes, one):
    check_equal_to_one_process(torchrun_nodes, one)


def test_two_accelerate_nodes_equal_one_process(accelerate_nodes, one):
    check_equal_to_one_process(accelerate_nodes, one)
