"""The teacher scorer behind the cache builder and the teacher group: chunked, vocab-parallel, exact."""

from __future__ import annotations

import re

import pytest
import torch

from asserts import assert_verbose_allclose, dense_teacher_topk
from conftest import torchrun, world_overrides
from dist_distill.data.records import IGNORE_INDEX, load_tokenized
from dist_distill.models.loading import load_model, load_tokenizer
from dist_distill.recipe import DataSpec, ModelSpec, load_recipe
from dist_distill.teacher.scorer import TeacherScorer


def _teacher(world, dtype="float32"):
    spec = ModelSpec(name_or_path=f"{world}/teacher_init", dtype=dtype)
    tok = load_tokenizer(spec, "teacher")
    data = load_tokenized(f"{world}/data/student_train.jsonl", tok, DataSpec(max_seq_len=24), 10)
    return load_model(spec, "teacher").eval(), tok, data


@pytest.mark.parametrize("chunk_bytes", [1 << 28, 4 * 32 * 3])  # one chunk; 3 rows per chunk (many chunks)
def test_scorer_equals_dense_logits(tiny_world, chunk_bytes):
    """Top-k ids, logits, logsumexp and the tail masses at T = 1, 4, 0.5 at the target rows equal the
    brute-force [B, L, V] computation, whatever the chunking; the padded vocabulary columns (15 real
    tokens of 32) never enter."""
    model, tok, data = _teacher(tiny_world)
    k, temps = 6, (1.0, 4.0, 0.5)
    scorer = TeacherScorer(model, len(tok), k, chunk_bytes=chunk_bytes, temperatures=temps)
    assert scorer.chunk_rows() == (1 if chunk_bytes < 1000 else (1 << 28) // (8 * 32))
    ids, logits, lse, tails = scorer.score(data.input_ids[:], data.attention_mask[:], data.targets[:])
    ref_ids, ref_logits, ref_lse, ref_tails = dense_teacher_topk(model, data.input_ids[:], data.attention_mask[:], k,
                                                                 len(tok), temps)
    mask = data.targets[:] != IGNORE_INDEX
    assert ids.shape == (int(mask.sum()), k) and ids.dtype == torch.int64 and int(ids.max()) < len(tok)
    assert torch.equal(ids, ref_ids[mask].long())
    assert_verbose_allclose(logits, ref_logits[mask], 1e-5, 1e-5, what="top-k logits")
    assert_verbose_allclose(lse, ref_lse[mask], 1e-5, 1e-5, what="logsumexp")
    assert tails.shape == (int(mask.sum()), 3) and tails.dtype == torch.float32
    assert_verbose_allclose(tails.double(), ref_tails[mask], 1e-5, 1e-5, what="log tail masses")
    *same, target_lp = scorer.score_with_targets(data.input_ids[:], data.attention_mask[:], data.targets[:])
    assert all(torch.equal(x, y) for x, y in zip(same, (ids, logits, lse, tails)))
    dense = model(input_ids=data.input_ids[:], attention_mask=data.attention_mask[:]).logits[..., :len(tok)].double()
    want = torch.log_softmax(dense, -1).gather(-1, data.targets[:].clamp(min=0)[..., None])[..., 0][mask]
    assert target_lp.dtype == torch.float64
    assert_verbose_allclose(target_lp, want, 1e-5, 1e-5, what="log p(target)")
    assert_verbose_allclose(scorer.target_logprobs(data.input_ids[:], data.attention_mask[:], data.targets[:]), target_lp,
                            1e-6, 1e-6, what="target_logprobs")


def test_scorer_batch_without_targets(tiny_world):
    model, tok, data = _teacher(tiny_world)
    targets = torch.full_like(data.targets[:2], IGNORE_INDEX)
    ids, logits, lse, tails = TeacherScorer(model, len(tok), 4).score(data.input_ids[:2], data.attention_mask[:2],
                                                                      targets)
    assert ids.shape == (0, 4) and logits.shape == (0, 4) and lse.shape == (0,) and tails.shape == (0, 1)


def _cache_recipe(world, out, extra=()):
    sets = world_overrides(world, out / "run") + ["--set", f"teacher_source.cache_dir={out}/cache", "--set",
                                                  "teacher.dtype=float64", "--set", "teacher_source.top_k=8",
                                                  *extra]
    return sets


def _files(directory):
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.suffix in (".ddc", ".json")}


@pytest.mark.slow
def test_tp_cache_build_equals_one_process_byte_for_byte(tiny_world, tmp_path):
    """`torchrun --nproc_per_node 2 -m dist_distill.cache build ... --set teacher_source.tp_size=2` (the
    teacher sharded over 2 ranks, each reading only its slices) writes the same bytes as a
    one-process build, in lossless mode. The teacher runs in float64 so that the TP all-reduces
    round the same way as the one-process matmuls once results are cast to float32 (in float32
    they differ by ~1e-7, which a lossless cache would keep)."""
    from dist_distill.teacher.cache.reader import TeacherCache

    one, two = tmp_path / "one", tmp_path / "two"
    torchrun(1, "dist_distill.cache", "build", "configs/tiny/distill.yaml", *_cache_recipe(tiny_world, one),
             "--mode", "lossless", "--samples-per-shard", "100", timeout=600)
    proc = torchrun(2, "dist_distill.cache", "build", "configs/tiny/distill.yaml",
                    *_cache_recipe(tiny_world, two, ["--set", "teacher_source.tp_size=2"]),
                    "--mode", "lossless", "--samples-per-shard", "100", timeout=900,
                    DD_CHECK_DEVICES="1")  # the device test mode (training/device_check.py) on a TP build
    assert "teacher cache complete" in proc.stdout and "tp 2" in proc.stdout, proc.stdout[-3000:]
    assert "device test mode (DD_CHECK_DEVICES=1)" in proc.stderr
    a, b = _files(one / "cache"), _files(two / "cache")
    assert len([n for n in a if n.endswith(".ddc")]) == 3 and a.keys() == b.keys()
    for name in a:
        if name != "manifest.json":
            assert a[name] == b[name], name  # the sidecars hold the samples' teacher confidence (grading) too
    assert (one / "cache/grades.npz").read_bytes() == (two / "cache/grades.npz").read_bytes()
    # read back: the cache holds the scorer's rows of the whole teacher (ids exact, logits and lse 1e-5)
    recipe = load_recipe("configs/tiny/distill.yaml", [s for s in _cache_recipe(tiny_world, one) if s != "--set"])
    model, tok, _ = _teacher(tiny_world, "float64")
    data = load_tokenized(recipe.data.train, tok, recipe.data)
    idx = torch.arange(0, 40)
    cache = TeacherCache(two / "cache")
    ids, logits, lse, tails = TeacherScorer(model, len(tok), 8, temperatures=cache.tail_temperatures).score(
        data.input_ids[idx], data.attention_mask[idx], data.targets[idx])
    got_ids, got_logits, got_lse, got_tails = cache.fetch(idx)
    mask = data.targets[idx] != IGNORE_INDEX
    got_ids, got_logits = got_ids[mask], got_logits[mask]
    mine, theirs = ids.argsort(dim=1), got_ids.argsort(dim=1)  # the cache's storage order is not value order
    assert torch.equal(got_ids.gather(1, theirs), ids.gather(1, mine))
    assert_verbose_allclose(got_logits.gather(1, theirs), logits.gather(1, mine), 1e-5, 1e-5, what="cached logits")
    assert_verbose_allclose(got_lse[mask], lse, 1e-5, 1e-5, what="cached lse")
    assert_verbose_allclose(got_tails[mask], tails, 1e-5, 1e-5, what="cached log tail masses")


@pytest.mark.slow
def test_one_shard_build_splits_over_every_rank(tiny_world, tmp_path):
    """All records in one shard (the default 4096 samples per shard): both ranks score half of its
    batches (rank 1 hands its rows to the shard's writer), and the bytes equal a one-process build."""
    one, two = tmp_path / "one", tmp_path / "two"
    torchrun(1, "dist_distill.cache", "build", "configs/tiny/distill.yaml", *_cache_recipe(tiny_world, one),
             "--mode", "lossless", timeout=600)
    proc = torchrun(2, "dist_distill.cache", "build", "configs/tiny/distill.yaml", *_cache_recipe(tiny_world, two),
                    "--mode", "lossless", timeout=600)
    scored = {int(r): int(n) for r, n in re.findall(r"rank (\d)/2: scored (\d+) tokens", proc.stdout)}
    assert set(scored) == {0, 1} and min(scored.values()) > 0.3 * sum(scored.values()), proc.stdout[-3000:]
    a, b = _files(one / "cache"), _files(two / "cache")
    assert [n for n in a if n.endswith(".ddc")] == ["shard-00000.ddc"]
    assert a["shard-00000.ddc"] == b["shard-00000.ddc"]
    from dist_distill.teacher.cache.format import MAGIC

    assert a["shard-00000.ddc"][:8] == MAGIC
