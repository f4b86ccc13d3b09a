#!/usr/bin/env bash
# README command 2: set up .venv and run the whole test suite (CPU; GPU tests skip without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
export TORCH_EXTENSIONS_DIR="${TORCH_EXTENSIONS_DIR:-$PWD/.venv/torch_extensions}"  # DeepSpeed's prebuilt CPU op
# PYTHONSAFEPATH=1: the root's kernels/ folder must not pass for the PyPI `kernels` package
# Two pytest-xdist workers (DD_TEST_WORKERS, 0 = none): most tests use one core, and a multi-process test's
# ranks spend much of their time starting up or waiting on each other. --dist loadfile keeps a file's tests
# (and its module fixtures, built once) on one worker.
PYTHONSAFEPATH=1 exec .venv/bin/python -m pytest -q -n "${DD_TEST_WORKERS:-2}" --dist loadfile "$@"
