#!/usr/bin/env bash
# The GPU checks of hf_decorr's multi-process and CUDA paths, as one short prepared script.
# NOT YET RUN: no GPU was available when it was written (see docs/DISTRIBUTED.md, "What is verified").
#
#   bash scripts/gpu_check.sh            # from anywhere; about 2-3 minutes on one H200
#   PYTHON=/path/to/python bash scripts/gpu_check.sh
#   GPU_CHECK_DRY_RUN_CPU=1 GPU_CHECK_DRY_RUN_PROCESSES=2 PYTHON=.venv/bin/python bash scripts/gpu_check.sh
#       (the CPU stands in for the GPUs: checks the script itself, proves nothing about CUDA)
#
# Needs python with torch (CUDA), transformers and accelerate; DeepSpeed is optional (its checks are
# skipped without it), and no network (the models are tiny BERTs built from configs). Steps:
#   1. one process: every penalty and gradient on CUDA vs CPU (TF32 off), bf16 autocast and bf16-weight
#      DecorrTrainer steps (penalty finite and float32), eval_decorr_* on CUDA vs CPU;
#   1b. LLM scale: a ~1B Llama from a config (bf16, checkpointing, 8k tokens, all layers): step time and peak
#      memory of the penalty paths against a plain Trainer, and each decorr_precision against float64;
#   2. accelerate launch, 1 process, recipes/accelerate/ddp.yaml and fsdp.yaml (FSDP2): evaluate + one step,
#      hooks on the (sharded) modules, penalty logged; DeepSpeed ZeRO-2/3 recipes if deepspeed is installed;
#   3. with >= 2 GPUs only: the same over 2 processes (NCCL), compared with the 1-process step on the same
#      global batch, plus the global penalty and its DDP gradients against the concatenated batch.
# Every check prints PASS/FAIL; the exit status is non-zero if any check or step failed.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
RESULTS=${OUT:-$(mktemp -d)}            # the device tool's $OUT comes back; else a temporary folder
WORK=$(mktemp -d)
LOG="$RESULTS/gpu_check.log"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 \
       TOKENIZERS_PARALLELISM=false WANDB_DISABLED=true OMP_NUM_THREADS=4
failures=0
start=$(date +%s)

step() {  # step <name> <timeout s> <command...>
    local name=$1 limit=$2; shift 2
    echo "=== $name" | tee -a "$LOG"
    local t0=$(date +%s)
    timeout "$limit" "$@" 2>&1 | tee -a "$LOG" | grep -E "PASS|FAIL|passed|failed|Error|  (ddp|fsdp|deepspeed|bf16|cuda_vs|llm)"
    local rc=${PIPESTATUS[0]}
    echo "=== $name: exit $rc in $(( $(date +%s) - t0 ))s" | tee -a "$LOG"
    [ "$rc" -eq 0 ] || failures=$((failures + 1))
}

launch() {  # launch <recipe> <processes>
    step "$1 recipe, $2 process(es)" 240 "$PYTHON" -m accelerate.commands.launch \
        --config_file "recipes/accelerate/$1.yaml" --num_processes "$2" --num_machines 1 \
        --mixed_precision no --dynamo_backend no --main_process_port $((29500 + RANDOM % 1000)) \
        scripts/gpu_check.py launched --recipe "$1" --out "$WORK" $DRY
}

{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || echo "nvidia-smi: none"
    "$PYTHON" - <<'EOF'
import importlib.util, torch, transformers, accelerate
print(f"torch {torch.__version__} (CUDA {torch.version.cuda}, {torch.cuda.device_count()} GPU), "
      f"transformers {transformers.__version__}, accelerate {accelerate.__version__}, "
      f"deepspeed {'yes' if importlib.util.find_spec('deepspeed') else 'no'}")
EOF
} 2>&1 | tee -a "$LOG"
NGPU=$("$PYTHON" -c "import torch; print(torch.cuda.device_count())" 2>/dev/null || echo 0)
DRY=""
if [ "${GPU_CHECK_DRY_RUN_CPU:-0}" = 1 ]; then  # checks this script on a CPU machine; proves nothing about CUDA
    DRY="--dry-run-cpu"; NGPU=${GPU_CHECK_DRY_RUN_PROCESSES:-1}
    echo "DRY RUN: the CPU stands in for $NGPU GPU(s)" | tee -a "$LOG"
elif [ "$NGPU" -lt 1 ]; then
    echo "no CUDA GPU visible: nothing to check" | tee -a "$LOG"
    exit 2
fi

step "single process: CUDA vs CPU, bf16, eval metrics" 240 "$PYTHON" scripts/gpu_check.py single --out "$WORK" $DRY
step "LLM scale: ~1B Llama, bf16, checkpointing, 8k tokens, all layers" 300 \
    "$PYTHON" scripts/gpu_check.py llm --out "$RESULTS" $DRY
launch ddp 1
launch fsdp 1
if "$PYTHON" -c "import deepspeed" 2>/dev/null; then
    launch deepspeed_zero2 1
    launch deepspeed_zero3 1
else
    echo "=== deepspeed not installed: ZeRO-2/3 recipes not checked" | tee -a "$LOG"
fi
if [ "$NGPU" -ge 2 ]; then
    launch ddp 2
    launch fsdp 2
else
    echo "=== 1 GPU: the multi-process NCCL checks need >= 2 GPUs and were not run" | tee -a "$LOG"
fi
echo "=== gpu_check: $failures failed step(s) in $(( $(date +%s) - start ))s; log: $LOG" | tee -a "$LOG"
rm -rf "$WORK"
[ "$failures" -eq 0 ]
