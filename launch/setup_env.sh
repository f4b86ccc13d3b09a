#!/usr/bin/env bash
# Create .venv in the repository root (if missing) and install dist_distill with its test tools.
# Idempotent: re-installs only when pyproject.toml, setup.py or the native decoder's C source changed. Needs python3 (3.10+) and a package index.
# TORCH_SPEC picks the torch build (default torch==2.13.0: the CPU build on this project's machines).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.dist_distill-installed"
want="$(cat pyproject.toml setup.py dist_distill/_codec_native.c | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  if ! .venv/bin/python -c "import torch" 2>/dev/null; then
    .venv/bin/pip install -q "${TORCH_SPEC:-torch==2.13.0}"
  fi
  .venv/bin/pip install -q -e ".[dev]"
  echo "$want" > "$stamp"
fi
