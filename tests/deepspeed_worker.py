"""Worker of tests/test_deepspeed.py: DecorrTrainer under DeepSpeed ZeRO-2 / ZeRO-3 on 2 CPU processes (gloo).

    torchrun --nproc_per_node 2 tests/deepspeed_worker.py --out DIR --stage 3
    accelerate launch --num_processes 2 --use_deepspeed --zero_stage 3 tests/deepspeed_worker.py --out DIR --stage 3

Every scenario builds the process state with ``hf_decorr.deepspeed_process_state()`` and the arguments with
``accelerator_config={"use_configured_state": True}`` (the supported way to make accelerate count both processes
on a machine without accelerators: docs/DISTRIBUTED.md), trains the tiny BERT of tests/dist_worker.py on the same
8 rows with SGD, and writes what the pytest process compares with one process on the whole batch: the logs, the
evaluation metrics, the rows each rank read, whether the parameters were partitioned, and the consolidated model
saved by ``save_model``. Rank r writes ``DIR/rank<r>.pt``; the models go to ``DIR/<scenario>/final``.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

from dist_worker import DECORR_WEIGHT, EVAL_SIZE, LR, TRAIN_SIZE, bert_data, collate  # noqa: E402

from hf_decorr import DecorrTrainer, DecorrTrainingArguments, DivergenceError, deepspeed_process_state  # noqa: E402
from hf_decorr._compat import checkpointing_args  # noqa: E402

#: the DeepSpeed config comes from ``accelerate launch --config_file recipes/accelerate/deepspeed_zero*.yaml``
LAUNCHER = "launcher"


def ds_config(stage: int, launcher: bool = False) -> dict | str:
    if launcher:
        return LAUNCHER
    zero = {"stage": stage}
    if stage == 3:
        # partition every parameter (the default threshold keeps a tiny model's parameters whole) and consolidate
        # the weights at save_model
        zero.update(stage3_param_persistence_threshold=0, stage3_gather_16bit_weights_on_model_save=True)
    return {"zero_optimization": zero, "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto", "gradient_clipping": "auto",
            "zero_allow_untested_optimizer": True}  # torch's SGD, as in the single-process reference


def arguments(output_dir: str, layers: str = "last", accumulation: int = 1, deepspeed: dict | str | None = None,
              weight: float = DECORR_WEIGHT, max_steps: int = 1, save_steps: int = 0, world: int = 2,
              **extra) -> DecorrTrainingArguments:
    """The arguments of a scenario; ``deepspeed=None`` is the single-process reference (``world=1``)."""
    kw = dict(
        output_dir=output_dir, report_to="none", max_steps=max_steps, logging_steps=1,
        per_device_train_batch_size=TRAIN_SIZE // world // accumulation, gradient_accumulation_steps=accumulation,
        per_device_eval_batch_size=2, optim="sgd", learning_rate=LR, lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=0.0, seed=0, average_tokens_across_devices=False, disable_tqdm=True,
        dataloader_num_workers=0, train_sampling_strategy="sequential",
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500,
        decorr_weight=weight, decorr_layers=[layers], decorr_sync="global",
        **checkpointing_args(True, use_reentrant=False), **extra,
    )
    if deepspeed == LAUNCHER:  # accelerate launch --config_file <deepspeed recipe>: the launcher's plugin
        kw.update(accelerator_config={"use_configured_state": True})
    elif deepspeed is not None:
        kw.update(deepspeed=deepspeed, accelerator_config={"use_configured_state": True})
    else:
        kw.update(use_cpu=True)
    return DecorrTrainingArguments(**kw)


class RowRecorder(DecorrTrainer):
    """Records the first token of every row of every training micro-batch (through the public override point)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.rows_read: list[list[int]] = []

    def decorr_samples(self, layer, output, inputs):
        if self.model.training and layer == self.decorr_layer_names[0]:
            self.rows_read.append(inputs["input_ids"][:, 0].tolist())
        return super().decorr_samples(layer, output, inputs)


def build(args: DecorrTrainingArguments) -> RowRecorder:
    from tiny_models import tiny_bert

    return RowRecorder(model=tiny_bert(layers=2, seed=0), args=args, train_dataset=bert_data(TRAIN_SIZE, 10),
                       eval_dataset=bert_data(EVAL_SIZE, 11), data_collator=collate)


def partitioned(trainer: DecorrTrainer) -> dict[str, int]:
    """A weight's full size and this process's part of it (ZeRO-3: ``ds_numel`` and ``ds_tensor``)."""
    weight = trainer.model_wrapped.module.bert.encoder.layer[0].intermediate.dense.weight
    shard = getattr(weight, "ds_tensor", None)
    return {"full": int(getattr(weight, "ds_numel", weight.numel())), "local": int(weight.numel()),
            "shard": int(shard.numel()) if shard is not None else -1}


def run(out: str, name: str, stage: int, launcher: bool = False, **kw) -> dict[str, object]:
    """Train (then evaluate and save) one scenario; every process returns what it saw."""
    deepspeed_process_state()
    root = os.path.join(out, name.replace("/", "_"))
    trainer = build(arguments(root, deepspeed=ds_config(stage, launcher), **kw))
    result: dict[str, object] = {"processes": trainer.accelerator.num_processes,
                                 "distributed_type": str(trainer.accelerator.distributed_type)}
    start = time.perf_counter()
    try:
        trainer.train()
    except DivergenceError as error:
        result["error"] = str(error).splitlines()[0]
    result["seconds"] = time.perf_counter() - start
    result["logs"] = [e for e in trainer.state.log_history if "task_loss" in e]
    result["rows_read"] = trainer.rows_read
    result["layers"] = trainer.decorr_layer_names
    result["partitioned"] = partitioned(trainer)
    if "error" not in result:
        result["metrics"] = trainer.evaluate()
        trainer.save_model(os.path.join(root, "final"))
    result["saved"] = os.path.join(root, "final")
    return result


def resume(out: str, stage: int) -> dict[str, object]:
    """Two steps saved at step 1, and a new trainer resumed from that ZeRO checkpoint for step 2."""
    deepspeed_process_state()
    root = os.path.join(out, "resume")
    trainer = build(arguments(root, deepspeed=ds_config(stage), max_steps=2, save_steps=1))
    trainer.train()
    trainer.save_model(os.path.join(root, "uninterrupted"))
    deepspeed_process_state()
    resumed = build(arguments(root, deepspeed=ds_config(stage), max_steps=2, save_steps=1))
    resumed.train(resume_from_checkpoint=os.path.join(root, "checkpoint-1"))
    resumed.save_model(os.path.join(root, "resumed"))
    return {"uninterrupted": os.path.join(root, "uninterrupted"), "resumed": os.path.join(root, "resumed"),
            "checkpoint": sorted(os.listdir(os.path.join(root, "checkpoint-1"))),
            "logs": [e for e in resumed.state.log_history if "task_loss" in e]}


#: scenario → the keywords of :func:`arguments` (all with activation checkpointing, decorr_sync="global")
SCENARIOS = {
    "last/ga1": {"layers": "last", "accumulation": 1},
    "last/ga2": {"layers": "last", "accumulation": 2},
    "all/ga1": {"layers": "all", "accumulation": 1},
    "all/ga2": {"layers": "all", "accumulation": 2},
}
#: ZeRO-2 runs the first one only
ZERO2 = ("last/ga1",)
#: λ large enough that the first step's update overflows the weights: the guard must stop both processes
DIVERGE = {"layers": "last", "accumulation": 1, "weight": 1e36, "max_steps": 3}


def miscounted(out: str, stage: int) -> str:
    """Without the configured state accelerate counts one process: the trainer must refuse, naming the fix."""
    from hf_decorr import DecorrError

    args = DecorrTrainingArguments(output_dir=os.path.join(out, "miscounted"), report_to="none", max_steps=1,
                                   deepspeed=ds_config(stage), decorr_weight=1.0)
    try:
        build(args)
    except DecorrError as error:
        return str(error)
    return ""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--stage", type=int, choices=[2, 3], required=True)
    parser.add_argument("--launcher_config", action="store_true",
                        help="take the DeepSpeed config from accelerate launch's --config_file (the recipes)")
    cli = parser.parse_args()
    start = time.perf_counter()
    result: dict[str, object] = {"stage": cli.stage, "scenarios": {}}
    if not cli.launcher_config:  # first, while no state is configured in this process
        result["miscounted"] = miscounted(cli.out, cli.stage)
    names = SCENARIOS if cli.stage == 3 else {name: SCENARIOS[name] for name in ZERO2}
    for name, kw in names.items():
        result["scenarios"][name] = run(cli.out, name, cli.stage, launcher=cli.launcher_config, **kw)
    if cli.stage == 3:
        result["diverge"] = run(cli.out, "diverge", cli.stage, **DIVERGE)
        result["resume"] = resume(cli.out, cli.stage)
    result["seconds"] = time.perf_counter() - start
    result["world"] = dist.get_world_size()
    rank = dist.get_rank()
    tmp = os.path.join(cli.out, f".rank{rank}.pt.tmp")
    torch.save(result, tmp)
    os.replace(tmp, os.path.join(cli.out, f"rank{rank}.pt"))
    dist.barrier()


if __name__ == "__main__":
    main()
