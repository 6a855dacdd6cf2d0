"""decorr_sync across 2 CPU processes (gloo) against one process that sees the whole batch.

One ``accelerate launch --config_file recipes/accelerate/ddp.yaml --num_processes 2
--mixed_precision no tests/dist_worker.py`` (module fixture) runs every 2-process scenario;
the references are computed here, in this single process, by the same functions of
``dist_worker``. Checked:

* ``global``: the per-layer penalty and the DDP-averaged parameter gradients equal those of
  one process on the concatenated batch (1e-5 relative), for every penalty kind, for token
  samples (different padding and N per process) and pooled samples (``stats`` and ``gather``);
  ``local``: the mean of the per-shard penalties and of their gradients. A plain all-gather
  (negative control) is off by the factor W, so these checks can fail.
* ``DecorrTrainer`` on a tiny BERT: the eval metrics (7 examples: accelerate pads the last
  batch with a duplicate), the training logs and the parameters after one SGD step (each run
  evaluates before it trains, which, without the trainer's guard, leaves the model without its
  DDP wrapper in transformers 5.24).
* FSDP2: ``fully_shard`` on CPU/gloo, hooks and layer resolution on the sharded model.
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

from hf_decorr.distributed import (
    choose_strategy,
    communication_volume,
    global_penalty_with_count,
    real_samples_in_batch,
    sum_accumulators,
)
from hf_decorr.metrics import CovarianceAccumulator
from hf_decorr.penalties import decorrelation_penalty

TOL = 1e-5
LAUNCH_TIMEOUT_S = 300
RECIPES = os.path.join(REPO_ROOT, "recipes", "accelerate")
DDP_RECIPE = os.path.join(RECIPES, "ddp.yaml")


def launch(out_dir, parts: str) -> tuple[list[dict], float]:
    """Run the worker on 2 processes; the worker's output is shown if it fails."""
    env = worker_env()
    # the DDP recipe itself, on CPU: 2 processes, gloo (the trainer runs get use_cpu=True)
    worker = os.path.join(os.path.dirname(__file__), "dist_worker.py")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", DDP_RECIPE, "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_ip",
           "127.0.0.1", "--main_process_port", str(free_port()), worker, "--out", str(out_dir), "--part", parts]
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"2-process worker timed out after {LAUNCH_TIMEOUT_S}s\nstdout:\n{exc.stdout}\n"
                    f"stderr:\n{exc.stderr}")
    seconds = time.perf_counter() - start
    check_exit("2-process worker", proc.returncode, proc.stdout, proc.stderr)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in (0, 1)], seconds


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    results, seconds = launch(out, "penalties,trainer")
    print(f"\n2-process worker: {seconds:.1f}s wall (launch included), "
          f"{results[0]['seconds']:.1f}s inside the workers")
    assert [r["world"] for r in results] == [2, 2]
    return results


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def initial_params() -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in tiny_bert(layers=2, seed=0).named_parameters()}


def assert_grads_close(got: dict, want: dict, tol: float = TOL) -> None:
    """Every gradient to ``tol`` relative; a gradient that is exactly zero in theory (BERT's key bias: softmax
    ignores it) holds rounding noise only, so its error is measured against 1e-6 × the whole gradient's norm."""
    assert got.keys() == want.keys()
    total = torch.cat([g.double().reshape(-1) for g in want.values()]).norm()
    for name in want:
        err = (got[name].double() - want[name].double()).norm()
        scale = max(float(want[name].double().norm()), 1e-6 * float(total))
        assert float(err) <= tol * scale, (name, float(err), scale)


# ---- the penalty and its gradients ------------------------------------------------------------------


@pytest.mark.parametrize("kind", w.KINDS)
@pytest.mark.parametrize("case", ["tokens/stats", "tokens/stats/unreplicated", "pooled/stats", "pooled/gather",
                                  "pooled/gather/unreplicated"])
def test_global_equals_one_process_on_the_whole_batch(two, case, kind):
    shards = w.token_shards() if case.startswith("tokens") else w.pooled_shards()
    want = w.reference_penalties(shards)[kind]
    expected_count = sum(int(m.sum()) if m is not None else x.shape[0] for x, m in shards)
    for result in two:
        got = result["penalties"][case][kind]
        assert got["values"].shape == (2,)  # a stack of two layers: one penalty each
        assert rel(got["values"], want["values"]) <= TOL, (got["values"], want["values"])
        assert_grads_close(got["grads"], want["grads"])
        assert got["count"].tolist() == [expected_count, expected_count]
    # every process holds the same value (so DDP's averaging sees one global loss)
    assert torch.equal(two[0]["penalties"][case][kind]["values"], two[1]["penalties"][case][kind]["values"])


@pytest.mark.parametrize("kind", w.BUCKET_KINDS)
@pytest.mark.parametrize("case", ["bucketed/one-per-layer", "bucketed/one-bucket"])
def test_bucketed_global_sync_equals_one_process(two, case, kind):
    """Three layers (widths 16, 32, 16), rows in chunks of 8: one all-reduce per layer (asynchronous, overlapped
    with the next layer's Gram) or one for all; both equal one process on the concatenated batch."""
    shards = w.token_shards()
    want = w.bucketed_reference(shards)[kind]
    expected = sum(int(m.sum()) for _, m in shards)
    for result in two:
        got = result["penalties"][case][kind]
        assert got["values"].shape == (3,)
        assert rel(got["values"], want["values"]) <= TOL, (got["values"], want["values"])
        assert_grads_close(got["grads"], want["grads"])
        assert got["count"].tolist() == [expected] * 3
    assert torch.equal(two[0]["penalties"][case][kind]["values"], two[1]["penalties"][case][kind]["values"])


@pytest.mark.parametrize("kind", w.KINDS)
@pytest.mark.parametrize("layout", ["tokens", "pooled"])
def test_local_is_the_mean_of_per_shard_penalties(two, layout, kind):
    shards = w.token_shards() if layout == "tokens" else w.pooled_shards()
    want = w.reference_local(shards)[kind]
    got = [r["penalties"][f"{layout}/local"][kind] for r in two]
    assert rel(torch.stack([g["values"] for g in got]).mean(dim=0), want["values"]) <= TOL
    for g in got:  # DDP averaged the per-shard gradients
        assert_grads_close(g["grads"], want["grads"])
    if kind != "l1":  # the local estimator is a different number from the global one
        assert rel(want["values"], w.reference_penalties(shards)[kind]["values"]) > 1e-3


def test_plain_all_gather_is_off_by_the_world_size(two):
    """Negative control: without an autograd-aware gather, the gradient is 1/W of the true one."""
    want = w.reference_penalties(w.pooled_shards())["cov_l1"]
    got = two[0]["penalties"]["naive"]
    assert rel(got["values"], want["values"]) <= TOL  # the value is right...
    for name in want["grads"]:  # ...the gradient is not
        assert rel(got["grads"][name], want["grads"][name]) > 0.1


def test_summed_eval_statistics(two):
    want = w.accumulator_reference()
    for result in two:
        got = result["penalties"]["accumulators"]
        assert got.keys() == want.keys() == {"a", "b"}
        for name in want:
            assert got[name][0] == want[name][0]
            assert rel(torch.tensor(got[name][1]), torch.tensor(want[name][1])) <= 1e-12


# ---- DecorrTrainer ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one(tmp_path_factory):
    """The same trainer runs in this single process (global batch of 8 on one device)."""
    root = tmp_path_factory.mktemp("single")
    return {name: w.run_trainer(str(root / name.replace("/", "_")), **kw)
            for name, kw in w.trainer_scenarios().items() if name != "tokens/local"}


@pytest.mark.parametrize("scenario", ["tokens", "mean"])
def test_eval_metrics_equal_one_process(two, one, scenario):
    want = one[scenario]["metrics"]
    keys = [k for k in want if k.startswith("eval_decorr_")]
    assert "eval_decorr_samples" in keys and "eval_decorr_mapc/bert.encoder.layer.0" in keys
    samples = want["eval_decorr_samples"]
    assert samples == (7 if scenario == "mean" else sum(len(r["input_ids"]) for r in w.bert_data(w.EVAL_SIZE, 11)))
    for result in two:
        got = result["trainer"][scenario]["metrics"]
        assert got["eval_decorr_samples"] == samples  # the duplicated example of the last batch is not counted
        for key in keys:
            assert got[key] == pytest.approx(want[key], rel=1e-5, abs=1e-7), key
        # (eval_loss is the Trainer's mean of per-batch mean losses: it depends on how batches are formed)


@pytest.mark.parametrize("scenario", ["tokens", "mean", "tokens/registered"])
def test_one_step_lands_on_the_single_process_parameters(two, one, scenario):
    """2 × 4 examples under DDP (tokens: stats strategy; mean pooling: gather) vs 1 × 8, one SGD step."""
    assert choose_strategy(32, 4, 2) == "gather" and choose_strategy(32, None, 2) == "stats"
    before = initial_params()
    want = one[scenario]["params"]
    moved = torch.cat([(want[n] - before[n]).reshape(-1) for n in want]).norm()
    assert moved > 1e-2
    for result in two:
        assert result["trainer"][scenario]["wrapper_class"] == "DistributedDataParallel"
        got = result["trainer"][scenario]["params"]
        err = torch.cat([(got[n] - want[n]).reshape(-1) for n in want]).norm()
        assert float(err / moved) <= TOL, float(err / moved)


@pytest.mark.parametrize("scenario", ["tokens", "mean", "tokens/registered"])
def test_training_logs_equal_one_process(two, one, scenario):
    want = one[scenario]["logs"]
    assert len(want) == 1
    keys = [k for k in want[0] if k == "loss" or k.startswith(("task_loss", "decorr_"))]
    assert {"loss", "task_loss", "decorr_loss", "decorr_weight", "decorr_loss/bert.encoder.layer.1"} <= set(keys)
    for result in two:
        got = result["trainer"][scenario]["logs"]
        for key in keys:
            assert got[0][key] == pytest.approx(want[0][key], rel=1e-5), key


def test_local_sync_logs_the_mean_of_shard_penalties(two, one):
    per_shard = torch.stack(w.initial_shard_penalties()).mean(dim=0)  # (layers,), layer order -1, -2
    for result in two:
        log = result["trainer"]["tokens/local"]["logs"][0]
        got = torch.tensor([log["decorr_loss/bert.encoder.layer.1"], log["decorr_loss/bert.encoder.layer.0"]])
        assert rel(got, per_shard.double()) <= 1e-5
        assert log["task_loss"] == pytest.approx(one["tokens"]["logs"][0]["task_loss"], rel=1e-5)


def test_penalty_weight_ignores_the_task_loss_world_size_factor(two, one):
    """With ``average_tokens_across_devices=True`` transformers multiplies BertForSequenceClassification's
    (mean) loss by W under DDP, so its task gradient doubles; the penalty's contribution must not."""
    before = initial_params()
    for result in two:
        runs = result["trainer"]
        penalty_2 = {n: runs["tokens/avg_tokens"]["params"][n] - runs["tokens/avg_tokens/no_penalty"]["params"][n]
                     for n in before}
        penalty_1 = {n: one["tokens/avg_tokens"]["params"][n] - one["tokens/avg_tokens/no_penalty"]["params"][n]
                     for n in before}
        flat2 = torch.cat([v.reshape(-1) for v in penalty_2.values()])
        flat1 = torch.cat([v.reshape(-1) for v in penalty_1.values()])
        assert flat1.norm() > 1e-3
        assert rel(flat2, flat1) <= 1e-4
        # the task-loss trap itself (documented in docs/DISTRIBUTED.md): W × the task update and logged loss
        no_penalty = runs["tokens/avg_tokens/no_penalty"]["params"]
        task_2 = torch.cat([(no_penalty[n] - before[n]).reshape(-1) for n in before])
        one_no_penalty = one["tokens/avg_tokens/no_penalty"]["params"]
        task_1 = torch.cat([(one_no_penalty[n] - before[n]).reshape(-1) for n in before])
        assert rel(task_2, 2 * task_1) <= 1e-4
        log2, log1 = runs["tokens/avg_tokens"]["logs"][0], one["tokens/avg_tokens"]["logs"][0]
        assert log2["task_loss"] == pytest.approx(2 * log1["task_loss"], rel=1e-5)
        assert log2["decorr_loss"] == pytest.approx(log1["decorr_loss"], rel=1e-5)


# ---- pieces that need no second process ---------------------------------------------------------------


def test_single_process_global_penalty_is_the_local_one():
    h = torch.randn(2, 9, 5, requires_grad=True)
    mask = torch.arange(9) < 7
    for kind in w.KINDS:
        for strategy in ("stats", "gather"):
            value, count = global_penalty_with_count(h, mask, kind, strategy, rows_bound=9)
            assert torch.equal(value, decorrelation_penalty(h, mask, kind))
            assert count.tolist() == [7, 7]
    with pytest.raises(ValueError, match="decorr_penalty"):
        global_penalty_with_count(h, mask, "nope")
    with pytest.raises(ValueError, match="strategy"):
        global_penalty_with_count(h, mask, "cov_l1", "broadcast")


def test_real_samples_in_the_padded_last_batch():
    # 7 examples, 2 processes × 2: the last global batch holds 3 real examples and 1 duplicate
    assert [real_samples_in_batch(3, r, 2) for r in (0, 1)] == [2, 1]
    assert [real_samples_in_batch(1, r, 4) for r in range(4)] == [1, 0, 0, 0]
    assert [real_samples_in_batch(8, r, 4) for r in (0, 1)] == [4, 4]


def test_sum_accumulators_single_process_drops_empty_layers():
    acc = CovarianceAccumulator()
    acc.update(torch.randn(4, 3))
    out = sum_accumulators({"a": acc, "b": CovarianceAccumulator()}, ["a", "b", "c"], "cpu")
    assert list(out) == ["a"] and out["a"] is acc


def test_communication_volume_for_a_llama_8b_layer():
    """p = 4096, 8 processes × 8192 tokens (see docs/DISTRIBUTED.md for the numbers)."""
    stats = communication_volume("stats", 4096, 8192, 8)
    gather = communication_volume("gather", 4096, 8192, 8)
    assert stats["payload"] == 4096 * 4096 + 4097
    assert stats["sent"] == pytest.approx(2 * 7 / 8 * 4096**2 + 7 * 4097)
    assert gather["received"] == 7 * 8192 * 4097
    assert gather["received"] / stats["received"] > 7  # stats is the cheaper one for token samples
    with pytest.raises(ValueError, match="strategy"):
        communication_volume("ring", 4096, 8192, 8)


# ---- FSDP2: parameters sharded with torch's fully_shard (CPU, gloo) ------------------------------------


@pytest.mark.parametrize("pooling", ["tokens", "mean"])
def test_fsdp2_sharded_parameters_same_penalty_and_gradients(two, pooling):
    want = w.fsdp2_step(pooling)  # one process, all 8 examples, nothing sharded
    for result in two:
        got = result["penalties"][f"fsdp2/{pooling}"]
        assert got["model_class"].startswith("FSDP") and got["sharded"] > 0  # fully_shard swapped the classes
        assert got["unwrapped_is_model"]  # accelerate's unwrapping returns the same (hooked) module objects
        assert got["names"] == want["names"] == ["bert.encoder.layer.1", "bert.encoder.layer.0"]
        assert got["strategy"] == ("stats" if pooling == "tokens" else "gather")
        assert rel(got["values"], want["values"]) <= TOL
        assert_grads_close(got["grads"], want["grads"])


def test_accelerate_recipes_load():
    """The four accelerate configs parse with accelerate's own loader and say what their names promise."""
    from accelerate.commands.config.config_args import load_config_from_file
    from accelerate.utils import DistributedType

    expected = {"ddp": DistributedType.MULTI_GPU, "fsdp": DistributedType.FSDP,
                "deepspeed_zero2": DistributedType.DEEPSPEED, "deepspeed_zero3": DistributedType.DEEPSPEED}
    for name, kind in expected.items():
        config = load_config_from_file(os.path.join(RECIPES, f"{name}.yaml"))
        assert config.distributed_type == kind, name
    assert load_config_from_file(os.path.join(RECIPES, "fsdp.yaml")).fsdp_config["fsdp_version"] == 2
    for stage in (2, 3):
        ds = load_config_from_file(os.path.join(RECIPES, f"deepspeed_zero{stage}.yaml")).deepspeed_config
        assert ds["zero_stage"] == stage
        # left to "auto", i.e. taken from the training arguments
        assert "gradient_accumulation_steps" not in ds and "gradient_clipping" not in ds
