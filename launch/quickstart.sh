#!/usr/bin/env bash
# README command 1: set up .venv and run a real distillation on CPU, end to end, on tiny local models.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}"  # DeepSpeed's prebuilt CPU op
# PYTHONSAFEPATH=1: the root's kernels/ folder must not pass for the PyPI `kernels` package
PYTHONSAFEPATH=1 exec .venv/bin/python -m dist_distill.quickstart "$@"
