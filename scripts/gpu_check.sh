#!/usr/bin/env bash
# The one GPU script: every check a GPU lease should run, in order of value, each step capped by
# what is left of a budget of BUDGET_S seconds (default 480: 8 minutes on one H200, leaving a lease room to rerun):
#   1. tests: the CUDA kernels (cuDNN, flash, efficient, flash windows) and the multi-rank ring on CUDA, against
#      float64 references (pytest -m gpu);
#   2. attention: the virtual ring against one SDPA call (causal), flash varlen over the documents (packed
#      documents, mean length S/16) and the flash window op (window S/8), at 32K (P=4) and 128K (P=8); and the
#      Ulysses local attention (one call over S for H/U heads) against one SDPA call with H/U heads;
#   3. trainer: the 1.1B Llama shape at 8K/32K against a plain transformers loop, per recompute policy, and at 128K
#      with tiled MLP + offloaded layer inputs (docs/benchmarks.md has what recompute full alone needs there);
#      every ringtrain row carries `ringtrain plan`'s predicted peak next to the measured one;
#   4. the longest context that trains one step with tiled MLP (doubling from 256K until out of memory or time).
# Not in the default run (it needs most of a lease alone): long_context, one step of the 1.1B model at 512K tokens
# with tiled MLP and offloaded layer inputs (the one-GPU target). Run it on its own lease:
#   bash scripts/gpu_check.sh --only tests,long_context
# Writes OUT/summary.json (every step's status and figures) and OUT/summary.md (the tables for docs/benchmarks.md),
# and exits non-zero when any step failed or timed out.
#   bash scripts/gpu_check.sh [--out DIR]       default DIR: gpu_check/
#   bash scripts/gpu_check.sh --only A,B        only the named steps (tests, attention_small, attention_large,
#                                               trainer, max_context, long_context)
#   bash scripts/gpu_check.sh --cpu-smoke       every step (long_context included) end to end on CPU with tiny sizes
#                                               (the test suite runs it, so a lease is never spent on a broken script)
set -u
out=gpu_check
smoke=0
only=""
all_steps=" tests attention_small attention_large trainer max_context long_context "
while (($#)); do
    case $1 in
        --cpu-smoke) smoke=1; shift ;;
        --out) out=$2; shift 2 ;;
        --only) only=" ${2//,/ } "; shift 2 ;;
        *) echo "usage: bash scripts/gpu_check.sh [--cpu-smoke] [--out DIR] [--only STEP,...]" >&2; exit 2 ;;
    esac
done
for name in $only; do
    if [[ $all_steps != *" $name "* ]]; then
        echo "unknown step $name: choose among$all_steps" >&2; exit 2
    fi
done
mkdir -p "$out"
py=${PYTHON:-python3}
budget=${BUDGET_S:-480}
# The scripts import the package, installed editable by scripts/env.sh; a lease may run this checkout with a python
# that never installed it ($PYTHON), so the checkout is put on its path here, once, instead of in every script.
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTORCH_CUDA_ALLOC_CONF=${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}
status_file="$out/status.tsv"
: > "$status_file"
failed=0

# step NAME MAX_SECONDS CMD...: run CMD (output to $out/NAME.log) for at most MAX_SECONDS or what is left of the
# budget; skipped (and counted as failed) when under 20 s are left.
step() {
    local name=$1 max=$2 left=$((budget - SECONDS)) t0=$SECONDS rc
    shift 2
    # With --only, just the named steps; without, every step but long_context (except in the CPU smoke run).
    if [[ -n $only ]]; then
        [[ $only == *" $name "* ]] || return 0
    elif [[ $name == long_context ]] && ((!smoke)); then
        return 0
    fi
    ((left < max)) && max=$left
    if ((max < 20)); then
        echo "== $name: skipped, ${left}s of the budget left" | tee "$out/$name.log"
        printf '%s\tskipped\t0\n' "$name" >> "$status_file"
        failed=1
        return
    fi
    echo "== $name (at ${SECONDS}s, limit ${max}s): $*"
    timeout "$max" "$@" > "$out/$name.log" 2>&1
    rc=$?
    tail -n 25 "$out/$name.log"
    echo "== $name: rc=$rc after $((SECONDS - t0))s"
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - t0))" >> "$status_file"
    ((rc != 0)) && failed=1
}

{ if ((smoke)); then echo "cpu smoke run"; else nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; fi
  $py -c "import torch, transformers; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU')"
} > "$out/env.log" 2>&1
cat "$out/env.log"

if ((smoke)); then
    attn=(--seq 1024 --heads 4 --kv-heads 2 --head-dim 32 --dtype fp32 --iters 1 --warmup 0)
    step tests 120 $py -m pytest -m gpu -q -p no:cacheprovider tests/test_ring_layout.py tests/test_ring_cuda.py \
        tests/test_offload.py tests/test_tiled_mlp.py
    step attention_small 60 $py scripts/bench_attention.py --virtual-ring 2 "${attn[@]}" --json "$out/attention_small.json"
    step attention_large 60 $py scripts/bench_attention.py --virtual-ring 4 "${attn[@]}" --ulysses-local 2 \
        --json "$out/attention_large.json"
    step trainer 120 $py scripts/bench_gpu.py --quick --recompute none,full,full+tiled+offload \
        --json "$out/trainer.json"
    step max_context 60 $py scripts/bench_gpu.py --quick --max-context 1024 --max-context-limit 4096 \
        --recompute full+tiled --json "$out/max_context.json"
    step long_context 60 $py scripts/bench_gpu.py --quick --max-context 2048 --max-context-limit 2048 \
        --recompute full+tiled+offload --json "$out/long_context.json"
else
    attn=(--heads 32 --kv-heads 8 --head-dim 128 --dtype bf16)
    step tests 150 $py -m pytest -m gpu -q -p no:cacheprovider tests/test_ring_layout.py tests/test_ring_cuda.py \
        tests/test_offload.py tests/test_tiled_mlp.py
    step attention_small 50 $py scripts/bench_attention.py --virtual-ring 4 --seq 32768 "${attn[@]}" --iters 3 \
        --warmup 1 --ulysses-local 8 --json "$out/attention_small.json"
    step attention_large 80 $py scripts/bench_attention.py --virtual-ring 8 --seq 131072 "${attn[@]}" --iters 2 \
        --warmup 1 --json "$out/attention_large.json"
    step trainer 150 $py scripts/bench_gpu.py --recompute none,every:2,full,full+tiled+offload \
        --json "$out/trainer.json"
    step max_context 120 $py scripts/bench_gpu.py --max-context 262144 --max-context-limit 1048576 \
        --recompute full+tiled --json "$out/max_context.json"
    step long_context 450 $py scripts/bench_gpu.py --max-context 524288 --max-context-limit 524288 \
        --recompute full+tiled+offload --time-limit 440 --json "$out/long_context.json"
fi

$py scripts/gpu_summary.py "$out" || failed=1
echo "== summary: $out/summary.md, $out/summary.json (failed=$failed, ${SECONDS}s)"
exit $failed
