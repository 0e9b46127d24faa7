#!/usr/bin/env bash
# One node, N processes: torchrun with a standalone rendezvous around `ringtrain train CONFIG [key=value ...]`.
#
#   launch/torchrun.sh [--nproc N] CONFIG [key=value ...]
#   RINGTRAIN_NPROC=2 launch/torchrun.sh configs/tiny_cpu.yaml train.max_steps=20
#
# N: --nproc, else $RINGTRAIN_NPROC, else the number of visible GPUs, else 1 (CPU, gloo).
# The exit status is torchrun's: 0 when every rank finished; non-zero when a rank failed (torchrun's
# summary names it) or when the run stopped on SIGTERM/SIGUSR1 after saving a checkpoint (ranks exit 75,
# see docs/launching.md); rerun the same command to resume.
set -euo pipefail

usage() { sed -n '4,5p' "$0" | sed 's/^# \{0,3\}//' >&2; exit 2; }

nproc="${RINGTRAIN_NPROC:-}"
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nproc) [[ $# -ge 2 ]] || usage; nproc="$2"; shift 2 ;;
    --nproc=*) nproc="${1#*=}"; shift ;;
    -h|--help) usage ;;
    *) break ;;
  esac
done
[[ $# -ge 1 ]] || usage

if [[ -z "$nproc" ]]; then
  nproc=1
  if command -v nvidia-smi >/dev/null 2>&1; then
    # CUDA_VISIBLE_DEVICES (when set) is what this process may use, not what the machine has.
    if [[ -n "${CUDA_VISIBLE_DEVICES:-}" ]]; then
      nproc=$(tr ',' '\n' <<<"$CUDA_VISIBLE_DEVICES" | grep -c .)
    else
      nproc=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
    fi
    [[ "$nproc" -ge 1 ]] || nproc=1
  fi
fi

# torchrun otherwise sets OMP_NUM_THREADS=1 with a warning; one thread per rank is also right on a shared CPU
# node, and train.threads overrides it inside the trainer.
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Surface NCCL errors as exceptions instead of hangs (the trainer sets it too; here it also covers the agent).
export TORCH_NCCL_ASYNC_ERROR_HANDLING="${TORCH_NCCL_ASYNC_ERROR_HANDLING:-3}"

# --max-restarts 0: a failed rank ends the run (torchrun stops the others and names it) instead of
# restarting the group behind the user's back. --shutdown-timeout: how long ranks get to save a
# checkpoint after torchrun forwards SIGTERM/SIGINT before it SIGKILLs them.
# USR1 is ignored by torchrun (the exec keeps it ignored): before torch 2.9 torchrun has no handler for
# it, and dying would orphan the ranks; the ranks' own handler still saves on a USR1 sent to them.
trap '' USR1
exec "${RINGTRAIN_PYTHON:-python}" -m torch.distributed.run \
  --standalone --nnodes 1 --nproc-per-node "$nproc" --max-restarts 0 \
  --shutdown-timeout "${RINGTRAIN_SHUTDOWN_TIMEOUT:-120}" \
  -m ringtrain.cli train "$@"
