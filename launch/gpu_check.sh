#!/usr/bin/env bash
# One command for a machine with one GPU: the CUDA checks, results in ONE file (default gpu_check/results.md,
# or $OUT/results.md when the device tool's $OUT is set). Budget: under 8 minutes on an H100/H200.
#   1. the CUDA tests (Triton kernels, fused loss in bf16): pytest -m gpu
#   2. the fused-loss benchmark vs Liger-Kernel at BT 8192 and 16384, H=4096, V=128256, bf16
#   3. a 1-GPU ZeRO-3 run over NCCL with a checkpoint, then --resume
#   4. a teacher-cache build on the GPU, and training from it; colocated and 8-bit colocated teachers
# Without a GPU it says so in one line and exits 0. Each step has its own timeout; a failed step is
# recorded and the next one runs. Usage: bash launch/gpu_check.sh [OUTPUT_DIR]
# On the lent GPU machine (no deepspeed/datasets/bitsandbytes/liger there): carry the wheels of
# ../shared/gpu/fetch-wheels.sh --with-liger --with-bnb and install them first (its README).
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
  echo "gpu_check: no GPU here (torch.cuda.is_available() is False): nothing to check"
  exit 0
fi
export PYTHONSAFEPATH=1 PYTHONWARNINGS=ignore TRANSFORMERS_VERBOSITY=error TOKENIZERS_PARALLELISM=false
dir=${1:-${OUT:-gpu_check}}
mkdir -p "$dir"
report="$dir/results.md"
work=$(mktemp -d)
status=0
{
  echo "# gpu_check $(date -u +%Y-%m-%dT%H:%MZ)"
  echo
  echo "revision: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | sed 's/^/gpu: /'
  "$PY" -c "import torch, triton; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}, triton {triton.__version__}')"
} > "$report"

step() {  # step NAME SECONDS COMMAND...: run, append its tail and exit code to the report
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$work/$name.log" 2>&1
  local rc=$?
  [ $rc -ne 0 ] && status=1
  { echo; echo "## $name (exit $rc, $((SECONDS - t0)) s)"; echo '```'; tail -n 40 "$work/$name.log"; echo '```'; } >> "$report"
}

step cuda-tests 150 "$PY" -m pytest -q -m gpu tests/test_kernel_softmax_divergence.py tests/test_kernel_fused_linear.py
step fused-loss-bench 180 "$PY" benchmarks/bench_fused_loss.py --device cuda --shapes 8192,16384 --hidden 4096 \
  --vocab 128256 --dtype bfloat16 --reps 3
"$PY" -m dist_distill.tiny_world "$work/world" > "$work/world.log" 2>&1 || status=1
W="$work/world"
common=(--set "student.name_or_path=$W/student_init" --set "teacher.name_or_path=$W/teacher_init"
        --set "data.train=$W/data/student_train.jsonl" --set "data.eval=$W/data/heldout.jsonl"
        --set "teacher_source.cache_dir=$work/cache" --set "optim.max_steps=6")
step zero3-nccl-save 120 "$PY" -m torch.distributed.run --nproc_per_node 1 -m dist_distill.train configs/tiny/distill.yaml \
  "${common[@]}" --set teacher_source.kind=none --set loss.ce_weight=1.0 --set output.save_every=3 \
  --set "output.dir=$work/run" --set optim.max_steps=3
step zero3-nccl-resume 120 "$PY" -m torch.distributed.run --nproc_per_node 1 -m dist_distill.train configs/tiny/distill.yaml \
  "${common[@]}" --set teacher_source.kind=none --set loss.ce_weight=1.0 --set "output.dir=$work/run" --resume
step cache-build-gpu 120 "$PY" -m dist_distill.cache build configs/tiny/distill.yaml "${common[@]}" --quiet
step train-from-cache 120 "$PY" -m torch.distributed.run --nproc_per_node 1 -m dist_distill.train configs/tiny/distill.yaml \
  "${common[@]}" --set "output.dir=$work/cache-run"
step colocated-teacher 120 "$PY" -m torch.distributed.run --nproc_per_node 1 -m dist_distill.train configs/tiny/distill.yaml \
  "${common[@]}" --set teacher_source.kind=colocated --set "output.dir=$work/colocated"
step colocated-8bit-teacher 120 "$PY" -m torch.distributed.run --nproc_per_node 1 -m dist_distill.train \
  configs/tiny/distill.yaml "${common[@]}" --set teacher_source.kind=colocated --set teacher_source.load_in_8bit=true \
  --set "output.dir=$work/colocated8"
echo "gpu_check: results in $report (overall exit $status)"
exit $status
