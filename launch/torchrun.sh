#!/usr/bin/env bash
# One torchrun per node, single- or multi-node, with SLURM's environment read when present.
#   bash launch/torchrun.sh dist_distill.train configs/seed/r1_to_llama70b.yaml --resume [--set k=v ...]
#   srun --ntasks-per-node=1 bash launch/torchrun.sh dist_distill.train RECIPE   (slurm/train.sbatch does this)
# Ranks: node n, local rank l -> global rank n * GPUS_PER_NODE + l (static rendezvous at the first
# node of SLURM_JOB_NODELIST; `python -m dist_distill.planning.cluster env` computes it, tests check it).
# Without SLURM: one node, MASTER_ADDR=127.0.0.1, GPUs from DD_GPUS_PER_NODE or CUDA_VISIBLE_DEVICES.
#
# Signals (preemption): torchrun is started with SIGUSR1 and SIGTERM ignored and told not to handle
# SIGTERM (TORCHELASTIC_SIGNALS_TO_HANDLE), because on SIGTERM it would SIGTERM its workers and SIGKILL
# them 30 s later, mid-checkpoint. This script traps USR1 and TERM itself and forwards SIGUSR1 to the
# workers (torchrun's children), whose handler sets a flag (dist_distill/training/preemption.py); a
# signal SLURM sends to the whole process group reaches the workers the same way and torchrun ignores
# it. Workers that stopped for preemption write $DD_REQUEUE_FILE; torchrun reports any worker's
# non-zero exit as 1, so this script exits 75 (the requeue code) when that file exists.
# DD_LOG_DIR: per-rank logs under DD_LOG_DIR/node<N>/ (torchrun --log-dir, teed to this node's output).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONSAFEPATH=1  # the root's kernels/ folder must not pass for the PyPI `kernels` package
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}"
if [ $# -lt 1 ]; then
  echo "usage: launch/torchrun.sh MODULE [ARGS...]   e.g. dist_distill.train RECIPE --resume" >&2
  exit 2
fi
module=$1; shift
exports=$("$PY" -m dist_distill.planning.cluster env) || exit 2
eval "$exports"
export DD_REQUEUE_FILE="${DD_REQUEUE_FILE:-${TMPDIR:-/tmp}/dd-requeue-${SLURM_JOB_ID:-$$}-node${NODE_RANK}.json}"
rm -f "$DD_REQUEUE_FILE"
logs=()
if [ -n "${DD_LOG_DIR:-}" ]; then
  mkdir -p "$DD_LOG_DIR/node$NODE_RANK"
  logs=(--log-dir "$DD_LOG_DIR/node$NODE_RANK" --redirects 3 --tee 3)
fi
echo "node $NODE_RANK/$NNODES ($(hostname)): $NPROC_PER_NODE ranks from $((NODE_RANK * NPROC_PER_NODE)), master $MASTER_ADDR:$MASTER_PORT"
export TORCHELASTIC_SIGNALS_TO_HANDLE=SIGINT,SIGHUP,SIGQUIT
(
  trap '' USR1 TERM
  exec "$PY" -m torch.distributed.run --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$NPROC_PER_NODE" \
    --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" "${logs[@]}" -m "$module" "$@"
) &
child=$!
# shellcheck disable=SC2329  # invoked by the traps below
forward() {
  echo "node $NODE_RANK: $1 received, asking the ranks to checkpoint and stop at the next step" >&2
  pkill -USR1 -P "$child" 2>/dev/null || true
}
trap 'forward SIGUSR1' USR1
trap 'forward SIGTERM' TERM
while :; do
  wait "$child"
  rc=$?
  kill -0 "$child" 2>/dev/null || break  # a trapped signal interrupted wait: keep waiting for torchrun
done
if [ -f "$DD_REQUEUE_FILE" ]; then
  echo "node $NODE_RANK: stopped for preemption at step $(sed 's/.*"step": \([0-9]*\).*/\1/' "$DD_REQUEUE_FILE"): exit 75 (requeue)"
  exit 75
fi
exit "$rc"
