#!/usr/bin/env bash
# README command 1: set up .venv and run a real distillation on CPU, end to end, on tiny local models.
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
exec .venv/bin/python -m dist_distill.quickstart "$@"
