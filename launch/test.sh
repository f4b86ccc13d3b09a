#!/usr/bin/env bash
# README command 2: set up .venv and run the whole test suite (CPU; GPU tests skip without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}"  # DeepSpeed's prebuilt CPU op
# PYTHONSAFEPATH=1: the root's kernels/ folder must not pass for the PyPI `kernels` package
PYTHONSAFEPATH=1 exec .venv/bin/python -m pytest -q "$@"
