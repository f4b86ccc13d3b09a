#!/usr/bin/env bash
# Create .venv in the repository root (if missing) and install dist_distill with its test tools.
# Idempotent: re-installs only when pyproject.toml, setup.py or the native decoder's C source changed. Needs python3 (3.10+) and a package index.
# TORCH_SPEC picks the torch build (default torch==2.13.0: the CPU build on this project's machines).
# Without CUDA it also builds DeepSpeed's CPU shared-memory comm op (deepspeed_shm_comm) and its CPU fused
# Adam (fused_adam, used with optimizer offload), 1-5 minutes each, once, into .venv/torch_extensions, so
# that no timed test builds them; launch/*.sh export that folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.dist_distill-installed"
want="$(cat pyproject.toml setup.py dist_distill/teacher/cache/_codec_native.c | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install -q "${TORCH_SPEC:-torch==2.13.0}"
  fi
  .venv/bin/pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}"
if .venv/bin/python -c "import torch, sys; sys.exit(1 if torch.cuda.is_available() else 0)" 2>/dev/null; then
  DS_ACCELERATOR=cpu PYTHONSAFEPATH=1 .venv/bin/python -c \
    "from deepspeed.ops.op_builder.cpu import FusedAdamBuilder, ShareMemCommBuilder
ShareMemCommBuilder().load(verbose=False)
FusedAdamBuilder().load(verbose=False)" >/dev/null
fi
