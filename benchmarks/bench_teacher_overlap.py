"""Does the online teacher group hide behind the student's step? Student step time with
teacher_source.kind=group vs kind=cache, and the teacher's busy / idle time per step.

Runs ``dd-train`` (torchrun) twice on the same recipe, data and students:
  cache: S student ranks reading a top-k cache built beforehand by ``dd-cache build``;
  group: tp_size teacher ranks + S student ranks, the teacher up to --prefetch micro-batches ahead.
Student step time per step is read from metrics.jsonl (elapsed = cumulative tokens /
tokens_per_s); so is the training thread's wait for its inputs (input_wait_s: the step's
batches and, with data.prefetch, the cache rows or the group's signals that the input
pipeline's worker prepares one step ahead). The teacher's per-step busy (forward +
vocab-parallel top-k + posting the sends) and idle (waiting for the students to take earlier
signals) times come from teacher-group0.jsonl; the time the students' receives took (in the
input worker with data.prefetch, else in the training thread) from teacher-wait-rank*.jsonl.
The first `--skip` steps (start-up) are left out of the medians. `--repeat N` runs N
cache/group pairs one after the other on the same world and cache (each pair side by side in
time, so a load that changes between pairs shows as a spread); the load average is printed
before each run: on a shared machine the ratio is only as good as the load was steady. A run of 25
steps varies about +-20 % between pairs on an idle 2-core box, one of 300 steps about +-10 %: for a
verdict use `--steps 300 --skip 10 --repeat 5` (docs/benchmarks.md).

    .venv/bin/python benchmarks/bench_teacher_overlap.py            # tiny world, CPU, gloo
    .venv/bin/python benchmarks/bench_teacher_overlap.py --world runs/quickstart/world --steps 40
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--world", default=None, help="tiny-world directory (default: build a fresh one in a temp dir)")
    ap.add_argument("--recipe", default="configs/tiny/distill.yaml", help="recipe (default configs/tiny/distill.yaml)")
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per run (default 30)")
    ap.add_argument("--skip", type=int, default=5, help="first steps left out of the medians (default 5)")
    ap.add_argument("--students", type=int, default=2, help="student ranks (default 2)")
    ap.add_argument("--tp-size", type=int, default=2, help="teacher tensor-parallel ranks (default 2)")
    ap.add_argument("--micro-batch", type=int, default=8, help="optim.micro_batch_size (default 8)")
    ap.add_argument("--grad-accum", type=int, default=2, help="optim.grad_accum (default 2)")
    ap.add_argument("--prefetch", type=int, default=4, help="teacher_source.prefetch_micro_batches (default 4)")
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every process (default 1)")
    ap.add_argument("--repeat", type=int, default=1, help="cache/group pairs, one after the other (default 1)")
    ap.add_argument("--teacher", default=None, help="teacher model directory (default: the world's trained teacher, "
                                                  "else teacher_init; e.g. WORLD/student_init for a cheap teacher)")
    return ap.parse_args()


def run(args: list[str], threads: int) -> None:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error",
               TOKENIZERS_PARALLELISM="false")
    env.setdefault("DS_ACCELERATOR", "cpu")
    proc = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode:
        sys.exit(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")


def torchrun(nproc: int, module: str, *args: str, threads: int) -> None:
    from dist_distill.training.distributed import free_port

    run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port",
         str(free_port()), "-m", module, *args], threads)


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def step_times(run_dir: Path) -> tuple[list[float], list[float]]:
    """(seconds per optimizer step, seconds the training thread waited for the step's inputs), from
    metrics.jsonl (tokens_per_s and input_wait_s are cumulative since this process's first step)."""
    records = jsonl(run_dir / "metrics.jsonl")
    total, elapsed = 0, []
    for r in records:
        total += r["tokens"]
        elapsed.append(total / r["tokens_per_s"])
    waits = [r["input_wait_s"] for r in records]
    diff = lambda xs: [b - a for a, b in zip([0.0] + xs[:-1], xs)]  # noqa: E731
    return diff(elapsed), diff(waits)


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def main() -> None:
    a = parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="bench-overlap-"))
    world = Path(a.world) if a.world else tmp / "world"
    if not a.world:
        from dist_distill.tiny_world import build_world

        build_world(world, teacher_samples=2000, student_samples=512, num_heldout=64, seed=3)
    teacher = world / "teacher" / "model" if (world / "teacher" / "model").is_dir() else world / "teacher_init"
    if a.teacher:
        teacher = Path(a.teacher.replace("WORLD", str(world)))
    common = [f"student.name_or_path={world}/student_init", f"teacher.name_or_path={teacher}",
              f"data.train={world}/data/student_train.jsonl", f"optim.max_steps={a.steps}", "optim.warmup_steps=1",
              f"optim.micro_batch_size={a.micro_batch}", f"optim.grad_accum={a.grad_accum}", "output.export=false",
              f"teacher_source.cache_dir={tmp}/cache", "output.save_every=0"]
    sets = lambda extra: [x for s in common + extra for x in ("--set", s)]  # noqa: E731
    torchrun(1, "dist_distill.cache", "build", a.recipe, *sets([]), "--mode", "lossless", threads=a.threads)
    import torch

    print(f"students={a.students} tp_size={a.tp_size} micro_batch={a.micro_batch} grad_accum={a.grad_accum} "
          f"prefetch={a.prefetch} steps={a.steps} (medians over steps {a.skip + 1}..{a.steps}) "
          f"threads/process={a.threads} cpus={os.cpu_count()} torch={torch.__version__}")
    print("| pair | run | load avg (1 min) at start | student step (s) | ratio vs cache | training thread's input "
          "wait per step (s) | signal receive per step (s) | teacher busy per step (s) | teacher idle per step (s) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for pair in range(1, a.repeat + 1):
        runs = {"cache": tmp / f"cache-run{pair}", "group": tmp / f"group-run{pair}"}
        load = {"cache": os.getloadavg()[0]}
        torchrun(a.students, "dist_distill.train", a.recipe, *sets([f"output.dir={runs['cache']}"]), threads=a.threads)
        group = ["teacher_source.kind=group", f"teacher_source.tp_size={a.tp_size}", "teacher_source.num_groups=1",
                 f"teacher_source.prefetch_micro_batches={a.prefetch}", f"output.dir={runs['group']}"]
        load["group"] = os.getloadavg()[0]
        torchrun(a.tp_size + a.students, "dist_distill.train", a.recipe, *sets(group), threads=a.threads)

        (cache_t, cache_w), (group_t, group_w) = ([x[a.skip:] for x in step_times(runs[k])] for k in ("cache", "group"))
        teacher = jsonl(runs["group"] / "teacher-group0.jsonl")[a.skip:]
        receive: dict[int, float] = {}
        for path in runs["group"].glob("teacher-wait-rank*.jsonl"):
            for r in jsonl(path):
                receive[r["step"]] = receive.get(r["step"], 0.0) + r["wait_s"] / a.students  # mean over students
        recv = [v for s, v in sorted(receive.items()) if s > a.skip]
        c, g = median(cache_t), median(group_t)
        print(f"| {pair} | cache | {load['cache']:.2f} | {c:.3f} | 1.00 | {median(cache_w):.4f} | - | - | - |")
        print(f"| {pair} | group | {load['group']:.2f} | {g:.3f} | {g / c:.2f} | {median(group_w):.4f} | "
              f"{median(recv):.4f} | {median([r['busy_s'] for r in teacher]):.3f} | "
              f"{median([r['idle_s'] for r in teacher]):.3f} |", flush=True)
    print(f"runs (metrics.jsonl, teacher-*.jsonl) in {tmp}")


if __name__ == "__main__":
    main()
