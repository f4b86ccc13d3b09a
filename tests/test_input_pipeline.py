"""The background input pipeline: the same inputs in the same order as producing in place, a resumed step
number restarts it, a worker's error reaches the training thread; a training run with it on equals one with
it off, loss for loss."""

from __future__ import annotations

import json
import math
import threading

import numpy as np

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
    """Three 4-step runs from one cache: unpacked with the pipeline on and off (equal, loss for loss), and packed
    (data.packing=true, pipeline on): every target token the packed loss read carries the very teacher rows the
    unpacked loss read for that (record, position), with less padding and more records per step."""
    # 48-token samples: the tiny world's 15-token records leave 2/3 of an unpacked sample as padding
    cache = ["--set", f"teacher_source.cache_dir={tmp_path}/cache", "--set", "data.max_seq_len=48"]
    base = ["--set", "optim.max_steps=4", "--set", "optim.warmup_steps=1", "--set", "optim.grad_accum=2"]
    torchrun(1, "dist_distill.cache", "build", "configs/tiny/distill.yaml", *world_overrides(tiny_world, tmp_path / "c"),
             *cache, timeout=600)
    runs, logs = {}, {}
    for name, sets in (("on", ["data.prefetch=true"]), ("off", ["data.prefetch=false"]),
                       ("packed", ["data.prefetch=true", "data.packing=true", "optim.micro_batch_size=4"])):
        out = tmp_path / f"run-{name}"
        proc = torchrun(1, "dist_distill.train", "configs/tiny/distill.yaml", *world_overrides(tiny_world, out), *cache,
                        *base, *[x for s in sets for x in ("--set", s)], timeout=900,
                        **({"DD_INPUT_TRACE": str(tmp_path / f"trace-{name}")} if name != "off" else {}))
        runs[name] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        logs[name] = proc.stdout + proc.stderr
    for a, b in zip(runs["on"], runs["off"], strict=True):
        assert (a["loss"], a["grad_norm"], a["target_tokens"]) == (b["loss"], b["grad_norm"], b["target_tokens"])
        assert a["input_wait_s"] >= 0 and a["bad_rows_dropped"] == 0

    assert "packing: sdpa with a 4-D block-diagonal causal mask" in logs["packed"]
    packed, plain = runs["packed"], runs["on"]
    assert len(packed) == len(plain) == 4 and all(math.isfinite(r["loss"]) for r in packed + plain)
    # 4 rows of 48 tokens hold 3 records each: a quarter of the slots of 16 padded samples, little padding
    for p, u in zip(packed, plain):
        assert p["padding_fraction"] < 0.1 < 0.6 < u["padding_fraction"], (p["padding_fraction"], u["padding_fraction"])
        assert p["target_tokens"] > 0.6 * u["target_tokens"]  # 24 records per step vs 32
    rows = {name: _trace_rows(tmp_path / f"trace-{name}") for name in ("on", "packed")}
    common = rows["on"].keys() & rows["packed"].keys()
    assert len(common) >= 0.5 * len(rows["packed"]) and len(common) > 100, (len(common), len(rows["packed"]))
    for key in common:
        for a, b in zip(rows["on"][key], rows["packed"][key], strict=True):
            np.testing.assert_array_equal(a, b, err_msg=f"teacher row of (sample, position) {key}")
    slots = {name: sum(_trace_slots(tmp_path / f"trace-{name}")) for name in ("on", "packed")}
    assert slots["packed"] == 4 * 2 * 4 * 48 and slots["on"] == 4 * 2 * 16 * 48


def _trace_rows(folder) -> dict:
    """(sample, position) -> (ids, logits, lse) the loss read, over every traced micro-batch."""
    out = {}
    for path in sorted(folder.glob("*.npz")):
        z = np.load(path)
        assert len(z["sample"]) == len(z["ids"]) > 0
        for j, key in enumerate(zip(z["sample"].tolist(), z["position"].tolist())):
            out[key] = (z["ids"][j], z["logits"][j], z["lse"][j])
    return out


def _trace_slots(folder) -> list[int]:
    return [int(np.load(path)["slots"]) for path in sorted(folder.glob("*.npz"))]
