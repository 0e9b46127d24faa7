#!/usr/bin/env bash
# The checks only a GPU can make, in one run of at most BUDGET_S seconds (default 540); docs/benchmarks.md holds
# their figures. In order of value, each step capped by what is left of the budget:
#   1. the CUDA kernels, and the multi-rank ring on CUDA, against float64 references (pytest -m gpu);
#   2. ring attention on one GPU: the virtual ring against SDPA, time and working memory, 32K and 128K tokens;
#   3. the trainer on CUDA against a plain transformers loop: tokens/s, MFU, peak memory, 8K-128K tokens;
#   4. the trainer alone at 256K tokens (memory at long context on one device).
# On one H200 (2026-11-26): tests 23 s, virtual rings 56 s, trainer ~210 s (each 1.1B build then took 35-60 s: init
# on the host, since moved to the device), so step 4 (~170 s) fits a 540 s budget. Add the device's start-up
# (1-2 min) when sizing a lease.
# Usage: bash scripts/gpu_check.sh [OUT_DIR]      logs and JSON land in OUT_DIR (default: gpu_check/)
set -u
out=${1:-gpu_check}
mkdir -p "$out"
py=${PYTHON:-python3}
budget=${BUDGET_S:-540}
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

# step NAME MAX_SECONDS CMD...: run CMD (output to $out/NAME.log and the terminal) for at most MAX_SECONDS or
# what is left of the budget; skipped when under 30 s are left.
step() {
    local name=$1 max=$2 left=$((budget - SECONDS))
    shift 2
    ((left < max)) && max=$left
    if ((max < 30)); then
        echo "== $name: skipped, ${left}s of the budget left" | tee "$out/$name.log"
        return
    fi
    echo "== $name (at ${SECONDS}s, limit ${max}s): $*"
    timeout "$max" "$@" > "$out/$name.log" 2>&1
    local rc=$?
    tail -n 40 "$out/$name.log"
    echo "== $name: rc=$rc after ${SECONDS}s"
}

{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
  $py -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, torch.cuda.get_device_name())"; } 2>&1 | tee "$out/env.log"

step tests 200 $py -m pytest -m gpu -q -p no:cacheprovider tests/test_ring_layout.py tests/test_ring_cuda.py
step vring_32k 60 $py scripts/bench_attention.py --virtual-ring 4 --seq 32768 --heads 32 --kv-heads 8 \
    --head-dim 128 --dtype bf16 --iters 3 --warmup 1
step vring_128k 120 $py scripts/bench_attention.py --virtual-ring 8 --seq 131072 --heads 32 --kv-heads 8 \
    --head-dim 128 --dtype bf16 --iters 2 --warmup 1
step trainer 240 $py scripts/bench_gpu.py --json "$out/trainer.json"
# One step of ~100 s after a ~60 s build (a 1.1B random init on the host): the peak, not a throughput figure.
step trainer_256k 200 $py scripts/bench_gpu.py --ringtrain-contexts 262144 --plain-contexts --warmup 0 --steps 1 \
    --json "$out/trainer_256k.json"
