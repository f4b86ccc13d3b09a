"""The background input pipeline: the same inputs in the same order as producing in place, a resumed step
number restarts it, a worker's error reaches the training thread; a training run with it on equals one with
it off, loss for loss."""

from __future__ import annotations

import json
import threading

import pytest

from conftest import torchrun, world_overrides
from dist_distill.data.pipeline import InputPipeline


def test_pipeline_same_values_ahead_and_restart():
    threads = []

    def produce(step):
        threads.append(threading.current_thread().name)
        if step == 7:
            raise ValueError("bad step 7")
        return step * 10

    p = InputPipeline(produce, background=True)
    assert [p.get(s) for s in range(3)] == [0, 10, 20]
    assert p.get(5) == 50 and p.get(6) == 60  # a jump (resume) is produced afresh
    with pytest.raises(ValueError, match="bad step 7"):
        p.get(7)
    p.close()
    assert all(t.startswith("dd-input") for t in threads)
    q = InputPipeline(produce, background=False)
    assert [q.get(s) for s in range(3)] == [0, 10, 20]
    assert q.wait_s >= 0 and threads[-1] == threading.current_thread().name


@pytest.mark.slow
def test_training_with_and_without_the_pipeline_is_identical(tiny_world, tmp_path):
    cache = ["--set", f"teacher_source.cache_dir={tmp_path}/cache"]
    base = ["--set", "optim.max_steps=4", "--set", "optim.warmup_steps=1", "--set", "optim.grad_accum=2"]
    torchrun(1, "dist_distill.cache", "build", "configs/tiny/distill.yaml", *world_overrides(tiny_world, tmp_path / "c"),
             *cache, timeout=600)
    runs = {}
    for on in (True, False):
        out = tmp_path / f"run-{on}"
        torchrun(1, "dist_distill.train", "configs/tiny/distill.yaml", *world_overrides(tiny_world, out), *cache, *base,
                 "--set", f"data.prefetch={str(on).lower()}", timeout=900)
        runs[on] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(runs[True], runs[False], strict=True):
        assert (a["loss"], a["grad_norm"], a["target_tokens"]) == (b["loss"], b["grad_norm"], b["target_tokens"])
        assert a["input_wait_s"] >= 0 and a["bad_rows_dropped"] == 0
