"""The CPU quickstart: a real distillation, end to end, on tiny local models.

    tiny world -> train teacher (ZeRO-3, 2 ranks) -> build teacher cache (2 ranks)
    -> train student on hard labels (baseline) -> distill student from the cache
    -> evaluate all of them on held-out data -> print the comparison table; write report.md, results.json and
       plots of the runs' TensorBoard curves (held-out loss and KL to the teacher evaluated during training)

Every stage runs the same command a user would (`python -m dist_distill.<command>`, under
torchrun where distributed); logs go to <out>/logs/. Run from the repository root.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

from dist_distill.training.distributed import free_port
from dist_distill.errors import UserError, run_cli

ROOT = Path(__file__).resolve().parents[1]


def torchrun(nproc: int, module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
            "--master_port", str(free_port()), "-m", module, *args]


def stages(out: str, nproc: int) -> list[tuple[str, list[str]]]:
    """(title, command) of each stage; the recipes' runs/quickstart paths are redirected to `out`."""
    def paths(recipe_out: str) -> list[str]:
        return ["--set", f"output.dir={out}/{recipe_out}", "--set", f"data.eval={out}/world/data/heldout.jsonl",
                "--set", "output.eval_every=50"]  # held-out loss / KL to the teacher during training

    world = f"{out}/world"
    student = ["--set", f"student.name_or_path={world}/student_init",
               "--set", f"data.train={world}/data/student_train.jsonl"]
    distill = student + ["--set", f"teacher.name_or_path={out}/teacher/model",
                         "--set", f"teacher_source.cache_dir={out}/cache"]
    teacher = ["--set", f"student.name_or_path={world}/teacher_init",
               "--set", f"data.train={world}/data/teacher_train.jsonl"]
    return [
        ("build the tiny world (data, tokenizer, initial models)",
         [sys.executable, "-m", "dist_distill.tiny_world", world]),
        ("train the teacher (ZeRO-3, hard labels, large noisy corpus)",
         torchrun(nproc, "dist_distill.train", "configs/tiny/teacher.yaml", *teacher, *paths("teacher"))),
        ("build the teacher top-k cache over the students' data",
         torchrun(nproc, "dist_distill.cache", "build", "configs/tiny/distill.yaml", *distill,
                  "--samples-per-shard", "256", "--start-over")),  # a re-run's retrained teacher: a new cache
        ("train the student on hard labels only (baseline)",
         torchrun(nproc, "dist_distill.train", "configs/tiny/student_hard.yaml", *student, *paths("student_hard"))),
        ("distill the student from the teacher cache (ZeRO-3)",
         torchrun(nproc, "dist_distill.train", "configs/tiny/distill.yaml", *distill, *paths("student_distill"),
                  "--set", "output.export_8bit=true")),
        ("evaluate on the held-out split",
         [sys.executable, "-m", "dist_distill.evaluate", "--model", f"teacher={out}/teacher/model",
          "--model", f"student (hard labels)={out}/student_hard/model",
          "--model", f"student (distilled)={out}/student_distill/model",
          "--model", f"student (distilled, 8-bit)={out}/student_distill/model-8bit",
          "--data", f"{world}/data/heldout.jsonl", "--reference", "teacher", "--teacher", "teacher",
          "--metrics", "exact_match,perplexity,kl,latency,memory,params", "--out", f"{out}/report", "--no-progress",
          "--runs", f"teacher={out}/teacher", "--runs", f"hard labels={out}/student_hard",
          "--runs", f"distilled={out}/student_distill",
          "--title", "dist_distill quickstart: tiny teacher -> small student (CPU, ZeRO-3, 2 ranks)"]),
    ]


def stage_env(**extra: str) -> dict[str, str]:
    """The environment of every end-to-end stage (quickstart, examples/*/run.py): this one, quieter, on the CPU
    accelerator unless DS_ACCELERATOR says otherwise, one OpenMP thread per rank (a 2-core box runs 2 ranks)."""
    return dict(os.environ, PYTHONWARNINGS="ignore", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false",
                DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), OMP_NUM_THREADS="1", **extra)


def run_stage(index: int, total: int, title: str, cmd: list[str], log: Path, env: dict) -> str:
    """Run one stage with its output in `log`; on failure show the log's tail and stop."""
    print(f"[{index}/{total}] {title} ...", flush=True)
    begin = time.time()
    with open(log, "w") as f:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0:
        tail = log.read_text().splitlines()[-40:]
        raise UserError(f"stage {index} ({title}) failed with exit code {proc.returncode}; last lines of {log}:\n"
                        + "\n".join(tail))
    print(f"      done in {time.time() - begin:.0f}s (log: {log})", flush=True)
    return log.read_text()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dist_distill.quickstart", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/quickstart", help="output directory, relative to the repository root")
    parser.add_argument("--nproc", type=int, default=2, help="data-parallel ranks for training and cache building")
    args = parser.parse_args(argv)
    if not (ROOT / "configs/tiny/distill.yaml").is_file():
        raise UserError(f"configs/tiny/ not found under {ROOT}: run the quickstart from a checkout of the repository")
    out = ROOT / args.out
    (out / "logs").mkdir(parents=True, exist_ok=True)
    env = stage_env()
    begin = time.time()
    plan = stages(args.out, args.nproc)
    for i, (title, cmd) in enumerate(plan, 1):
        text = run_stage(i, len(plan), title, cmd, out / "logs" / f"{i}.log", env)
    table = text[text.index("| model"):text.index("\nreport:")]
    print("\n" + table + "\n")
    print(f"finished in {time.time() - begin:.0f}s")
    print(f"report:       {out / 'report/report.md'}\nresults JSON: {out / 'report/results.json'}")
    print(f"plots:        {out / 'report/plots'}/*.png (loss parts, lr, held-out loss, KL to the teacher; linked "
          "from the report)")
    print(f"TensorBoard:  tensorboard --logdir {out}  (teacher/, student_hard/, student_distill/ each have tensorboard/)")
    print(f"checkpoints:  {out}/<run>/checkpoints/ (DeepSpeed ZeRO-3), exported models in {out}/<run>/model/")
    return 0


def cli() -> None:
    """Console-script entry point: bad input exits 2 with a one-paragraph message."""
    raise SystemExit(run_cli(main, "dist_distill.quickstart"))


if __name__ == "__main__":
    cli()
