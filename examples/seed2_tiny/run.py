"""Seed recipe 2 end to end on the tiny world, on CPU (configs/tiny/seed2_full.yaml):

    tiny world -> train the teacher -> generate (the teacher answers the prompts: sequence-level KD data)
    -> prepare (augmentation x3 + the base task's replay store) -> cache (dd-cache build over the augmented
    store; it grades every sample by the teacher's confidence) -> progressive three-stage distillation
    (ZeRO-3, colocated teacher, a curriculum over the difficulty buckets, replay 100 per 1000 steps)
    -> evaluation (dd-evaluate) -> summary.json

Every stage runs the command a user would, logs in <out>/logs/. From the repository root:

    python examples/seed2_tiny/run.py --out runs/seed2_tiny                # the figures in docs/reports/seed2_tiny
    python examples/seed2_tiny/run.py --out /tmp/s2 --smallest             # the test's size (tests/test_seed2_pipeline.py)
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from dist_distill.errors import run_cli
from dist_distill.quickstart import ROOT, run_stage, stage_env, torchrun

RECIPE = "configs/tiny/seed2_full.yaml"


def overrides(out: Path, teacher: str, a) -> list[str]:
    """--set pairs pointing configs/tiny/seed2_full.yaml's runs/seed2_tiny paths at `out`."""
    w = out / "world"
    sets = [f"teacher.name_or_path={teacher}", f"student.name_or_path={w}/student_init",
            f"generate.prompts={w}/data/student_train.jsonl", f"generate.output_dir={out}/generated",
            f"data.train={out}/generated/generated.jsonl", f"data.eval={w}/data/heldout.jsonl",
            f"data.replay.path={w}/data/teacher_train.jsonl", f"teacher_source.cache_dir={out}/cache",
            f"output.dir={out}/student", f"data.store_dir={out}/token_store"]
    if a.steps is not None or a.buckets is not None:
        import yaml

        stages = yaml.safe_load((ROOT / RECIPE).read_text())["stages"]
        if a.steps is not None:  # the stages' share of the run kept (20 / 30 / 50 %)
            total = sum(st["steps"] for st in stages)
            for st in stages[:-1]:
                st["steps"] = max(1, st["steps"] * a.steps // total)
            stages[-1]["steps"] = a.steps - sum(st["steps"] for st in stages[:-1])
            sets += [f"optim.max_steps={a.steps}", f"optim.warmup_steps={min(5, a.steps - 1)}"]
        if a.buckets is not None:
            for st in stages:
                st["buckets"] = {a.buckets: 1.0}
        sets.append("stages=" + json.dumps(stages))
    if a.replay_every is not None:
        sets += [f"data.replay.samples={a.replay_samples}", f"data.replay.every_steps={a.replay_every}"]
    return [x for s in sets for x in ("--set", s)]


def plan(out: Path, a) -> list[tuple[str, list[str]]]:
    w = out / "world"
    teacher = str(out / "teacher/model") if a.teacher_steps > 0 else str(w / "teacher_init")
    sets = overrides(out, teacher, a)
    stages = [("build the tiny world", [sys.executable, "-m", "dist_distill.tiny_world", str(w),
                                        "--teacher-samples", str(a.teacher_samples),
                                        "--student-samples", str(a.student_samples), "--heldout", str(a.heldout),
                                        "--seed", "2"])]
    if a.teacher_steps > 0:
        stages.append(("train the teacher (hard labels, large corpus)", torchrun(
            a.nproc, "dist_distill.train", "configs/tiny/teacher.yaml",
            "--set", f"student.name_or_path={w}/teacher_init", "--set", f"data.train={w}/data/teacher_train.jsonl",
            "--set", f"output.dir={out}/teacher", "--set", f"optim.max_steps={a.teacher_steps}",
            "--set", f"data.store_dir={out}/token_store")))
    stages += [
        ("generate: the teacher answers the prompts", [sys.executable, "-m", "dist_distill.generate", RECIPE, *sets,
                                                       "--quiet"]),
        ("prepare: augmentation x3 + the replay store", [sys.executable, "-m", "dist_distill.data_cli", "prepare",
                                                         RECIPE, *sets]),
        ("cache: teacher top-k over the augmented store, grading every sample",
         torchrun(a.nproc, "dist_distill.cache", "build", RECIPE, *sets, "--start-over", "--quiet")),
        ("train: progressive three-stage distillation with replay (ZeRO-3)",
         torchrun(a.nproc, "dist_distill.train", RECIPE, *sets)),
        ("evaluate on the held-out split", [
            sys.executable, "-m", "dist_distill.evaluate", "--model", f"teacher={teacher}",
            "--model", f"student (initial)={w}/student_init", "--model", f"student (seed 2)={out}/student/model",
            "--data", f"{w}/data/heldout.jsonl", "--teacher", "teacher", "--reference", "teacher",
            "--metrics", "exact_match,perplexity,kl,params", "--out", f"{out}/report", "--no-progress",
            "--runs", f"seed 2={out}/student", "--title", "Seed 2 on the tiny world (CPU)"]),
    ]
    return stages


def summary(out: Path, seconds: dict) -> dict:
    """The figures of a finished run, from its own files."""
    metrics = [json.loads(line) for line in (out / "student/metrics.jsonl").read_text().splitlines()]
    stores = {}
    for meta in sorted((out / "token_store").glob("*/meta.json")):
        m = json.loads(meta.read_text())
        stores[Path(m["identity"]["source"].get("file", "?")).name + (" (augmented)" if "augment" in m["identity"] else "")] = \
            {"records": m["records"], "samples": m["samples"], "tokens": m["tokens"]}
    manifest = json.loads((out / "generated/manifest.json").read_text())
    results = json.loads((out / "report/results.json").read_text())
    grades = {}
    if (out / "cache/grades.npz").exists():
        import numpy as np

        with np.load(out / "cache/grades.npz") as z:
            grades = {name: int((z["bucket"] == i).sum()) for i, name in enumerate(("hard", "medium", "easy"))}
    replay_steps = [r["step"] for r in metrics if r.get("replay_samples")]
    return {"seconds": seconds, "generated": manifest.get("counts", manifest.get("records")), "stores": stores,
            "grades": grades, "steps": len(metrics), "replay_steps": replay_steps,
            "replay_samples_total": metrics[-1].get("replay_samples_total"),
            "replay_ce": [r["replay_ce"] for r in metrics if "replay_ce" in r],
            "loss_first_last": [metrics[0]["loss"], metrics[-1]["loss"]],
            "stage_weights": sorted({(r["weight_output"], r["weight_hidden"], r["weight_attention"]) for r in metrics}),
            "evaluation": results}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/seed2_tiny", help="output directory")
    p.add_argument("--nproc", type=int, default=2, help="data-parallel ranks (teacher training, cache, distillation)")
    p.add_argument("--teacher-steps", type=int, default=300, help="teacher training steps (0: the untrained teacher)")
    p.add_argument("--teacher-samples", type=int, default=40000, help="records of the base task (teacher corpus, replay)")
    p.add_argument("--student-samples", type=int, default=600, help="prompts the teacher answers")
    p.add_argument("--heldout", type=int, default=500, help="held-out records")
    p.add_argument("--steps", type=int, default=None, help="distillation steps (default: the recipe's 60)")
    p.add_argument("--replay-samples", type=int, default=100, help="with --replay-every: replay samples per period")
    p.add_argument("--replay-every", type=int, default=None, help="replay period in steps (default: the recipe's 1000)")
    p.add_argument("--buckets", choices=("easy", "medium", "hard"), default=None,
                   help="every stage draws from this difficulty bucket only (default: the recipe's curriculum)")
    p.add_argument("--smallest", action="store_true",
                   help="the test's size: untrained teacher, 1000/64/32 records, 10 steps, replay 3 per 2 steps; "
                        "the untrained teacher grades every sample hard, so the stages draw from hard only")
    a = p.parse_args(argv)
    if a.smallest:
        a.teacher_steps, a.teacher_samples, a.student_samples, a.heldout = 0, 1000, 64, 32
        a.steps, a.replay_samples, a.replay_every, a.buckets = 10, 3, 2, a.buckets or "hard"
    out = (ROOT / a.out).resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    env = stage_env(PYTHONSAFEPATH="1")
    seconds, stages = {}, plan(out, a)
    for i, (title, cmd) in enumerate(stages, 1):
        t0 = time.time()
        run_stage(i, len(stages), title, cmd, out / "logs" / f"{i}.log", env)
        seconds[title.split(":")[0]] = round(time.time() - t0, 1)
    result = summary(out, seconds)
    (out / "summary.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "evaluation"}, indent=1))
    print(f"report: {out}/report/report.md; summary: {out}/summary.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main, "examples/seed2_tiny/run.py"))
