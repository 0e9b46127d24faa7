#!/usr/bin/env bash
# The main job: a tiny Llama trained on CPU by 2 torchrun processes sharing each sequence (SP=2).
# Extra arguments are config overrides, e.g. `bash scripts/demo.sh train.max_steps=20`.
source "$(dirname "$0")/env.sh"
exec torchrun --standalone --nproc_per_node 2 -m ringtrain.cli train configs/tiny_cpu.yaml "$@"
