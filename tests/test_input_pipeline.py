"""The background input pipeline: the same inputs in the same order as producing in place, a resumed step
number restarts it, a worker's error reaches the training thread; a training run with it on equals one with
it off, loss for loss; a packed run reads the teacher rows an unpacked one reads, token for token."""

from __future__ import annotations

import json
import math
import threading

import numpy as np
import pytest
import torch

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


def test_pipeline_never_produces_ahead_past_stop():
    """A teacher group serves steps [0, max_steps) only: a step past them would wait out the timeout."""
    produced = []

    def produce(step):
        produced.append(step)
        return step

    p = InputPipeline(produce, background=True, stop=3)
    assert [p.get(s) for s in range(3)] == [0, 1, 2]
    assert p.pending is None
    p.close()
    assert produced == [0, 1, 2]


# 48-token samples: the tiny world's 15-token records leave 2/3 of an unpacked sample as padding
SEQ = ["--set", "data.max_seq_len=48"]
BASE = ["--set", "optim.max_steps=4", "--set", "optim.warmup_steps=1", "--set", "optim.grad_accum=2"]


@pytest.fixture(scope="module")
def cache48(tiny_world, tmp_path_factory):
    """A teacher cache of the tiny world at data.max_seq_len=48, shared by this module's training runs."""
    out = tmp_path_factory.mktemp("cache48")
    torchrun(1, "dist_distill.cache", "build", "configs/tiny/distill.yaml", *world_overrides(tiny_world, out / "c"),
             "--set", f"teacher_source.cache_dir={out}/cache", *SEQ, timeout=600)
    return out / "cache"


@pytest.mark.slow
def test_training_with_and_without_the_pipeline_is_identical(tiny_world, cache48, tmp_path):
    runs = {}
    for on in (True, False):
        out = tmp_path / f"run-{on}"
        torchrun(1, "dist_distill.train", "configs/tiny/distill.yaml", *world_overrides(tiny_world, out),
                 "--set", f"teacher_source.cache_dir={cache48}", *SEQ, *BASE,
                 "--set", f"data.prefetch={str(on).lower()}", timeout=900)
        runs[on] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(runs[True], runs[False], strict=True):
        assert (a["loss"], a["grad_norm"], a["target_tokens"]) == (b["loss"], b["grad_norm"], b["target_tokens"])
        assert a["input_wait_s"] >= 0 and a["bad_rows_dropped"] == 0


@pytest.mark.slow
def test_packed_run_reads_the_unpacked_teacher_rows(tiny_world, cache48, tmp_path):
    """dd-train with data.packing=true (4 rows of 48 tokens per micro-batch, pipeline on) from the cache an
    unpacked run reads: every target token the packed loss read (DD_INPUT_TRACE) carries exactly the teacher
    rows that CacheTeacher.signal -- the unpacked run's path -- gives that (record, position) in an unpacked
    batch; a quarter of the token slots, little padding, losses finite."""
    from dist_distill.data.records import IGNORE_INDEX, load_tokenized
    from dist_distill.models.loading import load_tokenizer
    from dist_distill.recipe import load_recipe
    from dist_distill.teacher.cache.reader import CacheTeacher, TeacherCache

    out, trace = tmp_path / "run-packed", tmp_path / "trace-packed"
    sets = world_overrides(tiny_world, out) + ["--set", f"teacher_source.cache_dir={cache48}", *SEQ, *BASE,
                                               "--set", "data.packing=true", "--set", "optim.micro_batch_size=4"]
    proc = torchrun(1, "dist_distill.train", "configs/tiny/distill.yaml", *sets, timeout=900,
                    DD_INPUT_TRACE=str(trace))
    assert "packing: sdpa with a 4-D block-diagonal causal mask" in proc.stdout + proc.stderr
    packed = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(packed) == 4 and all(math.isfinite(r["loss"]) for r in packed)
    assert all(r["padding_fraction"] < 0.1 for r in packed), [r["padding_fraction"] for r in packed]

    rows = _trace_rows(trace)
    recipe = load_recipe("configs/tiny/distill.yaml", [s for s in sets if s != "--set"])
    data = load_tokenized(recipe.data.train, load_tokenizer(recipe.student, "student"), recipe.data)
    samples = torch.tensor(sorted({s for s, _ in rows}))
    assert len(samples) >= 8 * 3 * 2  # 4 steps x 2 micro-batches x 4 rows x 3 records, less repeats
    unpacked = {"input_ids": data.input_ids[samples], "attention_mask": data.attention_mask[samples],
                "targets": data.targets[samples]}
    # the same records unpacked: two thirds padding at 48 tokens per sample
    assert 1 - unpacked["attention_mask"].sum() / unpacked["attention_mask"].numel() > 0.6
    signal = CacheTeacher(TeacherCache(cache48), recipe.teacher_source.top_k, torch.device("cpu")).signal(samples, unpacked)
    where = unpacked["targets"] != IGNORE_INDEX
    keys = zip(samples[:, None].expand_as(where)[where].tolist(), torch.arange(where.shape[1]).expand_as(where)[where].tolist())
    want = {key: (signal.topk[0][j].numpy(), signal.topk[1][j].numpy(), signal.topk[2][j].numpy())
            for j, key in enumerate(keys)}
    assert rows.keys() <= want.keys() and len(rows) > 200
    for key, got in rows.items():
        for a, b in zip(got, want[key], strict=True):
            np.testing.assert_array_equal(a, b, err_msg=f"teacher row of (sample, position) {key}")
    slots = sum(_trace_slots(trace))
    assert slots == 4 * 2 * 4 * 48  # vs 4 * 2 * 16 * 48 unpacked at micro-batch 16


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
