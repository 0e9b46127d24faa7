#!/usr/bin/env bash
# Which RoPE scaling to pick (issue 18): one short model, extended x8 and x16 with every method of ringtrain rope
# (linear/PI, dynamic NTK, YaRN, llama3, LongRoPE, raised theta) on the same data, steps and seeds, evaluated on
# passkey, needle, multikey, multivalue, variable_tracking and perplexity by length. CPU, 2 processes.
#
#   scripts/compare_rope.sh [PART ...]       PART: short zeroshot x8 x16 report (default: all, in this order)
#
# Resumable: a stage whose output exists is skipped, so parts can run in separate sessions and an interrupted run
# continues where it stopped (delete a stage's folder to redo it). Results: $RUN/eval/<method>_x<factor>_<stage>/
# (stage: zeroshot, or s<seed> after fine-tuning), $RUN/table.md, $RUN/summary.png, $RUN/timings.txt (wall and CPU
# seconds per stage, all ranks). UPDATE_DOCS=1 copies the figure to docs/images/rope_methods.png.
#
# Settings (docs/rope_methods.md says why): the short model of configs/rope_short.yaml (trained once); fine-tuning
# with configs/rope_extend.yaml at 1,024 tokens for both factors, $STEPS steps, SP=2 (dynamic: SP=1 x DP=2, the same
# global batch, since its frequencies depend on each rank's largest position); seeds $SEEDS_X8 at x8, $SEEDS_X16 at
# x16. Every stage is a plain ringtrain command: rerun one by hand to look closer.
set -euo pipefail
source "$(dirname "$0")/env.sh"  # the project's virtual environment (made on first use); cds to the repository

RUN=${RUN:-runs/rope_compare}
STEPS=${STEPS:-100}
SEEDS_X8=${SEEDS_X8:-"0 1"}
SEEDS_X16=${SEEDS_X16:-"0"}
METHODS=${METHODS:-"linear dynamic yarn llama3 longrope theta"}
PARTS=${*:-"short zeroshot x8 x16 report"}
# --standalone picks a free rendezvous port: other jobs on the machine may hold torchrun's default one.
RT="torchrun --standalone --nproc_per_node 2 -m ringtrain.cli"
mkdir -p "$RUN/eval" "$RUN/ft"
stamp() { echo "[$(date +%H:%M:%S)] $*" | tee -a "$RUN/timings.txt"; }
# Wall and CPU seconds of each stage (all ranks): on a shared machine wall time also counts other jobs' turns.
timed() { local name=$1; shift; /usr/bin/time -a -o "$RUN/timings.txt" -f "  $name: %e s wall, %U s user + %S s sys CPU" "$@"; }

lengths() { if [[ $1 == 8 ]]; then echo "[128,256,512,1024]"; else echo "[128,256,512,1024,2048]"; fi; }

# The rope overrides of a method at a factor (also given to `eval`: re-applying them to the saved model is a no-op).
rope_args() {
    local method=$1 factor=$2
    if [[ $method == none ]]; then echo "rope.method=none rope.factor=null"; return; fi
    # transformers' dynamic NTK scales the base for length l by (f * l / L - (f - 1)) ** (d / (d - 2)): its factor f
    # is a slope, not the extension factor (f = 8 slows the slowest pair 57x at 8x the length). f = 1 is the YaRN
    # paper's Dynamic NTK (s = l / L at every length l), the same model for x8 and x16.
    if [[ $method == dynamic ]]; then echo "rope.method=dynamic rope.factor=1"; return; fi
    echo "rope.method=$method rope.factor=$factor"
    if [[ $method == longrope ]]; then python scripts/compare_rope.py longrope-factors configs/rope_extend.yaml "$factor"; fi
}
# dynamic picks its frequencies from each rank's largest position: ringtrain refuses it under SP > 1.
parallel_args() { if [[ $1 == dynamic ]]; then echo "parallel.sp_size=1 train.micro_batch_size=4"; fi; }

evaluate() {  # evaluate MODEL_DIR NAME METHOD FACTOR
    local model=$1 name=$2 method=$3 factor=$4
    [[ -f $RUN/eval/$name/results.json ]] && { echo "skip eval $name (done)"; return; }
    if [[ $method == dynamic ]]; then
        # transformers' dynamic RoPE is stateful: its frequencies grow to the longest sequence seen and are reset
        # only by one shorter than the original length, so in one process every task after the first would be
        # scored with the 2,048-token frequencies. One process per length, merged. No target length: the x16
        # lengths serve both factors.
        for length in 128 256 512 1024 2048; do
            [[ -f $RUN/eval/$name/len_$length/results.json ]] && continue
            # shellcheck disable=SC2046
            timed "eval $name@$length" $RT eval configs/rope_extend.yaml model.path="$model" \
                $(rope_args "$method" "$factor") parallel.sp_size=1 eval.lengths="[$length]" \
                eval.ppl_path="$RUN/ppl.jsonl" eval.output_dir="$RUN/eval/$name/len_$length" \
                train.output_dir="$RUN/eval/$name/len_$length"
        done
        python scripts/compare_rope.py merge "$RUN/eval/$name"
        return
    fi
    # shellcheck disable=SC2046
    timed "eval $name" $RT eval configs/rope_extend.yaml model.path="$model" $(rope_args "$method" "$factor") \
        parallel.sp_size=1 eval.lengths="$(lengths "$factor")" eval.ppl_path="$RUN/ppl.jsonl" \
        eval.output_dir="$RUN/eval/$name" train.output_dir="$RUN/eval/$name"
}

finetune() {  # finetune METHOD FACTOR SEED
    local method=$1 factor=$2 seed=$3 out=$RUN/ft/${1}_x${2}_s${3}
    if [[ $method == dynamic && $factor == 16 ]]; then echo "dynamic x16 = dynamic x8 (no factor): reused"; return; fi
    if [[ ! -f $out/final_model/config.json ]]; then
        rm -rf "$out"
        # shellcheck disable=SC2046
        timed "fine-tune ${method}_x${factor}_s$seed" $RT train configs/rope_extend.yaml \
            model.path="$RUN/short/final_model" $(rope_args "$method" "$factor") $(parallel_args "$method") \
            train.max_steps="$STEPS" train.seed="$seed" data.seed=$((100 + seed)) train.output_dir="$out"
    else
        echo "skip fine-tune ${method}_x${factor}_s$seed (done)"
    fi
    evaluate "$out/final_model" "${method}_x${factor}_s$seed" "$method" "$factor"
}

for part in $PARTS; do
    case $part in
    short)
        stamp "short: train at 128 tokens on the task mix (configs/rope_short.yaml)"
        if [[ ! -f $RUN/short/final_model/config.json ]]; then
            timed "short model" $RT train configs/rope_short.yaml train.output_dir="$RUN/short"
        fi
        [[ -f $RUN/ppl.jsonl ]] || python scripts/compare_rope.py ppl-text "$RUN/ppl.jsonl"
        # The unscaled model, a reference row of every table: evaluated once over the x16 lengths.
        evaluate "$RUN/short/final_model" none_x1_zeroshot none 16
        ;;
    zeroshot)
        stamp "zeroshot: every method without fine-tuning"
        for factor in 8 16; do
            for method in $METHODS; do
                [[ $method == dynamic && $factor == 16 ]] && continue  # dynamic x8 covers it
                evaluate "$RUN/short/final_model" "${method}_x${factor}_zeroshot" "$method" "$factor"
            done
        done
        ;;
    x8 | x16)
        factor=${part#x}
        seeds=$SEEDS_X8; [[ $factor == 16 ]] && seeds=$SEEDS_X16
        stamp "$part: fine-tune every method, $STEPS steps at 1024 tokens, seeds $seeds"
        for seed in $seeds; do
            for method in $METHODS; do finetune "$method" "$factor" "$seed"; done
        done
        ;;
    report)
        python scripts/compare_rope.py report "$RUN" --markdown "$RUN/table.md" --figure "$RUN/summary.png"
        if [[ ${UPDATE_DOCS:-0} == 1 ]]; then mkdir -p docs/images && cp "$RUN/summary.png" docs/images/rope_methods.png; fi
        ;;
    *) echo "unknown part '$part': use short, zeroshot, x8, x16 or report" >&2; exit 2 ;;
    esac
done
stamp "done: $PARTS"
