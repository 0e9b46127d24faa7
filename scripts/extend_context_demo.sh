#!/usr/bin/env bash
# Context-extension demo (issue 8), on CPU with 2 processes, 25 minutes on an idle 2-core machine:
#   1. train a tiny byte-level Llama on synthetic passkey documents of up to 127 tokens (configs/passkey_short.yaml);
#   2. evaluate it over 128..1024 tokens: it retrieves at its trained length and fails beyond;
#   3. extend RoPE 8x with YaRN and fine-tune with sequence parallelism (SP=2), 512 then 1024 tokens
#      (configs/passkey_extend.yaml);
#   4. evaluate again over 128..1024 tokens.
# Results: $RUN/eval_{short,extended}/ (table.txt, results.json, passkey_heatmap.png) and $RUN/summary.png;
# UPDATE_DOCS=1 also copies the figures into docs/images/; REUSE_SHORT=1 keeps stages 1-2 of an earlier run; SEED=N
# trains the short model from another seed (initialisation, documents, order), to see how robust the recipe is.
# Every stage is a plain `ringtrain` command: rerun one by hand to tune it (overrides go after the config, e.g.
# train.max_steps=300). The train stages pass checkpoint.overwrite=true: a rerun starts each stage over in its folder.
set -euo pipefail
cd "$(dirname "$0")/.."

RUN=${RUN:-runs/context_extension}
SHORT_STEPS=${SHORT_STEPS:-1000}
SEED=${SEED:-0}
STEPS_512=${STEPS_512:-150}   # the 1024-token stage runs configs/passkey_extend.yaml's train.max_steps
# --standalone picks a free rendezvous port: other jobs on the machine may hold torchrun's default one.
RT="torchrun --standalone --nproc_per_node 2 -m ringtrain.cli"
mkdir -p "$RUN"
: > "$RUN/timings.txt"
t0=$(date +%s)
stamp() { echo "[$(( $(date +%s) - t0 ))s] $*" | tee -a "$RUN/timings.txt"; }
# Wall and CPU seconds of each stage (all ranks): on a shared machine wall time also counts other jobs' turns.
timed() { local name=$1; shift; /usr/bin/time -a -o "$RUN/timings.txt" -f "  $name: %e s wall, %U s user + %S s sys CPU" "$@"; }

if [[ "${REUSE_SHORT:-0}" == 1 && -f "$RUN/eval_short/results.json" ]]; then
    # Keep the short model and its evaluation: retune the extension alone.
    stamp "1-2/4 reusing $RUN/short and $RUN/eval_short (REUSE_SHORT=1)"
else
    stamp "1/4 train at 128 tokens ($SHORT_STEPS steps)"
    timed short $RT train configs/passkey_short.yaml checkpoint.overwrite=true train.output_dir="$RUN/short" train.max_steps="$SHORT_STEPS" \
        train.seed="$SEED" data.seed="$SEED"

    stamp "2/4 evaluate the 128-token model at 128..1024 tokens (no RoPE scaling)"
    timed eval_short $RT eval configs/passkey_extend.yaml model.path="$RUN/short/final_model" rope.method=none \
        rope.factor=null eval.output_dir="$RUN/eval_short" train.output_dir="$RUN/short"
fi

stamp "3/4 YaRN x8 + SP=2 fine-tune: 512 tokens ($STEPS_512 steps), then 1024 tokens"
timed extend_512 $RT train configs/passkey_extend.yaml checkpoint.overwrite=true model.path="$RUN/short/final_model" train.output_dir="$RUN/extend_512" \
    train.seq_len=512 train.micro_batch_size=16 train.max_steps="$STEPS_512"
timed extend_1024 $RT train configs/passkey_extend.yaml checkpoint.overwrite=true model.path="$RUN/extend_512/final_model" \
    train.output_dir="$RUN/extend_1024" data.seed=2

stamp "4/4 evaluate the extended model at 128..1024 tokens"
timed eval_extended $RT eval configs/passkey_extend.yaml model.path="$RUN/extend_1024/final_model" \
    eval.output_dir="$RUN/eval_extended" train.output_dir="$RUN/extend_1024"
stamp "done"

python scripts/plot_context_extension.py "$RUN/eval_short/results.json" "$RUN/eval_extended/results.json" \
    --out "$RUN/summary.png"
echo "== before (trained at 128 tokens) =="; cat "$RUN/eval_short/table.txt"
echo "== after (YaRN x8 + SP=2 fine-tune) =="; cat "$RUN/eval_extended/table.txt"
cat "$RUN/timings.txt"
if [[ "${UPDATE_DOCS:-0}" == 1 ]]; then
    mkdir -p docs/images
    cp "$RUN/summary.png" docs/images/context_extension_summary.png
    cp "$RUN/eval_short/passkey_heatmap.png" docs/images/context_extension_before.png
    cp "$RUN/eval_extended/passkey_heatmap.png" docs/images/context_extension_after.png
fi
