#!/usr/bin/env bash
# The deepspeed launcher over the job's nodes: writes a hostfile (host slots=GPUS) from SLURM's node list
# (or localhost) and starts MODULE on every node from this one (pdsh/ssh, the launcher's default;
# DS_LAUNCHER=slurm makes it use srun instead).
#   bash launch/deepspeed.sh dist_distill.train configs/seed/r1distill_to_qwen1.5b.yaml --resume
# Run it on the first node only (not under srun --ntasks-per-node). Preemption: the deepspeed
# launcher answers SIGTERM by terminating its workers at once, so a SLURM job that must checkpoint
# before it is stopped uses launch/torchrun.sh (slurm/train.sbatch); here, send SIGUSR1 to the workers.
set -euo pipefail
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
export PYTHONSAFEPATH=1
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}"
if [ $# -lt 1 ]; then
  echo "usage: launch/deepspeed.sh MODULE [ARGS...]" >&2
  exit 2
fi
module=$1; shift
eval "$("$PY" -m dist_distill.planning.cluster env)"
hostfile=${DD_HOSTFILE:-${TMPDIR:-/tmp}/dd-hostfile-${SLURM_JOB_ID:-$$}}
"$PY" -m dist_distill.planning.cluster hostfile > "$hostfile"
echo "deepspeed over $NNODES node(s) x $NPROC_PER_NODE: hostfile $hostfile, master $MASTER_ADDR:$MASTER_PORT"
exec "$PY" -m deepspeed.launcher.runner --hostfile "$hostfile" --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  --launcher "${DS_LAUNCHER:-pdsh}" --module "$module" "$@"
