"""Fraction of training time spent waiting for input, with the background input pipeline on and off.

Builds a tiny world and its teacher cache, then trains the tiny recipe (1 process, CPU, ZeRO-3, cache
teacher) twice: data.prefetch=true and false. From metrics.jsonl: input_wait_s (cumulative time the training
thread waited in InputPipeline.get: producing the step in place when off, waiting on the worker when on)
over the training time (sum of tokens / tokens_per_s of the last record). Losses of the two runs are
compared (they must be equal).

    python benchmarks/bench_input_wait.py --out /tmp/dd_bench_wait --steps 30
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(args: list[str]) -> None:
    env = dict(os.environ, PYTHONSAFEPATH="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               DS_ACCELERATOR="cpu", PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error")
    subprocess.run([sys.executable, *args], cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/dd_bench_wait", help="folder for the world, cache and runs")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per run")
    p.add_argument("--micro-batch", type=int, default=8, help="optim.micro_batch_size")
    p.add_argument("--grad-accum", type=int, default=4, help="optim.grad_accum")
    a = p.parse_args()
    out = Path(a.out)
    world = out / "world"
    if not (world / "student_init").exists():
        run(["-m", "dist_distill.tiny_world", str(world)])
    sets = [f"student.name_or_path={world}/student_init", f"teacher.name_or_path={world}/teacher_init",
            f"data.train={world}/data/student_train.jsonl", f"data.eval={world}/data/heldout.jsonl",
            f"teacher_source.cache_dir={out}/cache", f"data.store_dir={out}/stores", f"optim.max_steps={a.steps}",
            f"optim.micro_batch_size={a.micro_batch}", f"optim.grad_accum={a.grad_accum}", "output.save_every=0"]
    flags = [x for s in sets for x in ("--set", s)]
    if not (out / "cache").exists():
        run(["-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "dist_distill.cache", "build",
             "configs/tiny/distill.yaml", *flags, "--set", f"output.dir={out}/cachebuild"])
    results = {}
    for on in (True, False):
        run_dir = out / f"run-prefetch-{on}"
        run(["-m", "torch.distributed.run", "--nproc_per_node", "1", "-m", "dist_distill.train",
             "configs/tiny/distill.yaml", *flags, "--set", f"data.prefetch={str(on).lower()}",
             "--set", f"output.dir={run_dir}"])
        m = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        train_s = sum(r["tokens"] for r in m) / m[-1]["tokens_per_s"]
        results[on] = m
        print(json.dumps({"prefetch": on, "steps": len(m), "train_s": round(train_s, 2),
                          "input_wait_s": round(m[-1]["input_wait_s"], 4),
                          "input_wait_fraction": round(m[-1]["input_wait_s"] / train_s, 5)}), flush=True)
    same = all(x["loss"] == y["loss"] for x, y in zip(results[True], results[False]))
    print(json.dumps({"losses_equal": same}))


if __name__ == "__main__":
    main()
