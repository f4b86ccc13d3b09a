"""Seed recipe 2 end to end at its smallest size (examples/seed2_tiny/run.py --smallest): generate -> prepare
with augmentation and replay -> cache (which grades) -> progressive three-stage distillation by difficulty
bucket under ZeRO-3 on 2 ranks -> evaluation. One run; it asserts on each stage's output."""

from __future__ import annotations

import json
import sys
from fractions import Fraction

import pytest

from conftest import run_cmd


@pytest.mark.slow
def test_seed2_pipeline_smallest(tmp_path):
    out = tmp_path / "s2"
    run_cmd([sys.executable, "examples/seed2_tiny/run.py", "--out", str(out), "--smallest"], timeout=900)
    summary = json.loads((out / "summary.json").read_text())

    # generate: at most one teacher answer per prompt (64 prompts; an answer that decodes to blank text is left out)
    generated = (out / "generated/generated.jsonl").read_text().splitlines()
    assert 32 <= len(generated) <= 64
    # prepare: the augmented store holds the original + two shuffled copies of each record (a copy identical
    # to its original is not made); the replay store is the base task, not augmented
    stores = summary["stores"]
    aug = stores["generated.jsonl (augmented)"]
    assert aug["records"] == len(generated) and 2.5 * aug["records"] < aug["samples"] <= 3 * aug["records"]
    assert stores["teacher_train.jsonl"]["samples"] == stores["teacher_train.jsonl"]["records"] == 1000
    # cache: every sample graded; the untrained teacher's confidence is ~1/15 per token: all hard (the
    # stages then draw from the hard bucket only, run.py --smallest)
    assert summary["grades"] == {"hard": aug["samples"], "medium": 0, "easy": 0}

    # train: 10 steps in three stages; replay 3 samples per 2 steps, exactly, as the schedule says
    from dist_distill.data.replay import ReplaySchedule

    metrics = [json.loads(line) for line in (out / "student/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in metrics] == list(range(1, 11))
    sched = ReplaySchedule(1000, Fraction(3, 2), 2, 0, 16, seed=2)
    assert [r["replay_samples"] for r in metrics] == [sched.count(s) for s in range(10)]
    assert metrics[-1]["replay_samples_total"] == 15 == sum(r["replay_samples"] for r in metrics)
    assert all(r["replay_tokens"] >= r["replay_samples"] > 0 for r in metrics if r["replay_samples"])
    assert all(0 < r["replay_ce"] < 20 for r in metrics if r["replay_samples"])
    assert {(r["weight_output"], r["weight_hidden"]) for r in metrics} == {(1.0, 0.0), (0.7, 0.3), (0.7, 0.2)}
    assert all(r["temperature"] == 4.0 for r in metrics)
    # evaluation: the distilled student is in the report
    results = summary["evaluation"]
    assert "student (seed 2)" in json.dumps(results)
    assert (out / "student/model/model.safetensors").exists()
