"""Difficulty grading: the teacher's confidence per sample (scorer, cache build, dd-cache grade) against a
float64 brute force, buckets by configurable edges, and the bucket sampler (mix exact per step, curriculum
in order, resumable, independent of the rank split)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import world_overrides
from dist_distill.data.grading import BUCKETS, Grades, buckets_of, check_edges, sample_confidence
from dist_distill.data.sampler import BucketSampler, apportion
from dist_distill.errors import UserError
from dist_distill.objective.schedules import Stage
from dist_distill.recipe import load_recipe
from dist_distill.teacher.scorer import vocab_parallel_target_logprob


def test_confidence_and_buckets_by_hand():
    lp = np.log([0.9, 0.8, 0.5, 0.95, 0.99, 0.6])
    assert np.allclose(sample_confidence(lp, np.array([2, 1, 3])), [0.85, 0.5, (0.95 + 0.99 + 0.6) / 3], rtol=1e-15)
    c = [0.95, 0.9000001, 0.9, 0.85, 0.7, 0.6999999, 0.1]
    assert buckets_of(c).tolist() == [2, 2, 1, 1, 1, 0, 0]  # easy > 0.9 >= medium >= 0.7 > hard
    assert buckets_of(c, (0.5, 0.8)).tolist() == [2, 2, 2, 2, 1, 1, 0]
    assert [BUCKETS[b] for b in buckets_of([0.95, 0.8, 0.3])] == ["easy", "medium", "hard"]
    with pytest.raises(UserError, match=r"grading.edges=\[0.9, 0.7\]: expected two probabilities lo < hi"):
        check_edges([0.9, 0.7])


def test_target_logprob_from_vocabulary_slices():
    """Each TP rank's share (its columns' target logit, -inf elsewhere) combined by MAX equals the float64
    log-softmax over the real vocabulary; padded columns (37 real of 40) never count."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(9, 40, generator=g, dtype=torch.float64) * 3
    targets = torch.tensor([0, 5, 19, 20, 21, 36, 36, 1, 30])
    want = torch.log_softmax(z[:, :37], -1).gather(1, targets[:, None])[:, 0]
    whole = vocab_parallel_target_logprob(z, 0, 37, targets, None)
    assert torch.allclose(whole, want, atol=1e-12, rtol=0)
    lse = torch.logsumexp(z[:, :37], -1)
    shares = [vocab_parallel_target_logprob(z[:, a:a + 20], a, 37, targets, None, lse) for a in (0, 20)]
    assert torch.allclose(torch.maximum(*shares), want, atol=1e-12, rtol=0)
    assert ((shares[0] == -torch.inf) == (targets >= 20)).all()


def dense_confidence(recipe, data) -> np.ndarray:
    """float64 brute force: the teacher's whole [B, L, V] logits, log-softmax over the real vocabulary, the
    probability of each target token, averaged per sample."""
    from dist_distill.data.records import IGNORE_INDEX
    from dist_distill.models.loading import load_model, load_tokenizer

    model = load_model(recipe.teacher, "teacher").eval()
    vocab = len(load_tokenizer(recipe.teacher, "teacher"))
    with torch.no_grad():
        z = model(input_ids=data.input_ids[:], attention_mask=data.attention_mask[:]).logits.double()[..., :vocab]
    t = data.targets[:]
    p = torch.log_softmax(z, -1).gather(-1, t.clamp(min=0)[..., None])[..., 0].exp()
    mask = t != IGNORE_INDEX
    return ((p * mask).sum(1) / mask.sum(1)).numpy()


def test_cache_build_and_dd_cache_grade_match_the_dense_teacher(tiny_world, tmp_path):
    from dist_distill.data.records import load_tokenized
    from dist_distill.data.sampler import bucket_sampler
    from dist_distill.models.loading import load_tokenizer
    from dist_distill.teacher.cache.writer import build_cache, finalize_cache
    from dist_distill.teacher.grading import grade_data

    sets = [s for s in world_overrides(tiny_world, tmp_path / "run") if s != "--set"]
    sets += [f"teacher_source.cache_dir={tmp_path}/cache", "teacher.dtype=float64", "data.max_samples=40",
             "teacher_source.top_k=4", "teacher_source.batch_size=7"]
    recipe = load_recipe("configs/tiny/distill.yaml", sets)
    data = load_tokenized(recipe.data.train, load_tokenizer(recipe.teacher, "teacher"), recipe.data, 40)
    want = dense_confidence(recipe, data)
    lo, hi = np.sort(want)[[13, 26]]
    edges = [float(lo) + 1e-9, float(hi) + 1e-9]  # thirds of this teacher's (untrained) confidences
    recipe = load_recipe("configs/tiny/distill.yaml", sets + [f"grading.edges={edges}"])

    manifest = build_cache(recipe, samples_per_shard=16, progress=False)
    assert finalize_cache(recipe.teacher_source.cache_dir, manifest)
    cached = Grades(tmp_path / "cache/grades.npz", edges)
    assert np.allclose(cached.confidence, want, rtol=2e-6, atol=0), np.abs(cached.confidence - want).max()
    ref = np.where(want > edges[1], 2, np.where(want < edges[0], 0, 1))
    assert cached.bucket.tolist() == ref.tolist() and np.bincount(ref).tolist() == [14, 13, 13]
    assert cached.meta["edges"] == edges and cached.meta["counts"] == {"hard": 14, "medium": 13, "easy": 13}
    assert cached.records.tolist() == list(range(40))  # no bad rows: sample i is record i
    assert Grades(tmp_path / "cache/grades.npz").bucket.tolist() == buckets_of(cached.confidence).tolist()

    out = tmp_path / "graded.npz"
    assert grade_data(load_recipe("configs/tiny/distill.yaml", sets + [f"grading.edges={edges}",
                                                                        f"grading.grades={out}"])) == out
    graded = Grades(out, edges).check_matches(data)
    assert np.allclose(graded.confidence, want, rtol=1e-12, atol=0)  # float64 all the way
    assert graded.bucket.tolist() == ref.tolist() and graded.meta["made_by"] == "dd-cache grade"

    # training by bucket reads the cache's grades; a curriculum stage draws only its bucket
    trained = load_recipe("configs/tiny/distill.yaml", sets + [
        f"grading.edges={edges}", "optim.max_steps=4", "optim.warmup_steps=0", "optim.micro_batch_size=4",
        "stages=[{name: easy, data_fraction: 1.0, steps: 2, buckets: {easy: 1}}, "
        "{name: hard, data_fraction: 1.0, steps: 2, buckets: {hard: 1}}]"])
    sampler = bucket_sampler(trained, data, 1, 0)
    assert all(ref[i] == 2 for s in (0, 1) for i in torch.cat(sampler.step_indices(s)).tolist())
    assert all(ref[i] == 0 for s in (2, 3) for i in torch.cat(sampler.step_indices(s)).tolist())
    other = load_tokenized(recipe.data.train, load_tokenizer(recipe.teacher, "teacher"), recipe.data, 30)
    with pytest.raises(UserError, match="was made for other data"):
        graded.check_matches(other)


BUCKET = torch.tensor([2] * 10 + [1] * 6 + [0] * 4, dtype=torch.int8)  # 10 easy, 6 medium, 4 hard


def test_bucket_mix_is_exact_per_step_resumable_and_split_free():
    weights = {"easy": 0.5, "medium": 0.25, "hard": 0.25}
    assert apportion(8, weights) == {"easy": 4, "medium": 2, "hard": 2}
    assert apportion(7, {"easy": 0.2, "medium": 0.5, "hard": 0.3}) == {"easy": 1, "medium": 4, "hard": 2}
    one = BucketSampler(BUCKET, 4, 2, 1, 0, 5, weights=weights)  # G = 8 on one rank
    two = [BucketSampler(BUCKET, 2, 2, 2, r, 5, weights=weights) for r in range(2)]  # G = 8 on two ranks
    drawn = {b: [] for b in range(3)}
    for step in range(10):
        ids = torch.cat(one.step_indices(step))
        assert sorted(ids.tolist()) == sorted(torch.cat([torch.cat(s.step_indices(step)) for s in two]).tolist())
        got = BUCKET[ids].tolist()
        assert (got.count(2), got.count(1), got.count(0)) == (4, 2, 2)  # exact at every step
        for i in ids.tolist():
            drawn[int(BUCKET[i])].append(i)
    # each bucket's stream: every sample once per epoch of that bucket (easy: 10 samples, 4 a step: 2 epochs in 5)
    assert len(set(drawn[2][:8])) == 8 and sorted(drawn[2][:20]) == sorted(list(range(10)) * 2)
    assert sorted(drawn[0][:4]) == [16, 17, 18, 19] and sorted(drawn[1][:6]) == list(range(10, 16))
    fresh = BucketSampler(BUCKET, 4, 2, 1, 0, 5, weights=weights)  # resuming at step 7 needs only 7
    assert torch.equal(torch.cat(fresh.step_indices(7)), torch.cat(one.step_indices(7)))
    assert not torch.equal(torch.cat(BucketSampler(BUCKET, 4, 2, 1, 0, 6, weights=weights).step_indices(0)),
                           torch.cat(one.step_indices(0)))  # the seed matters


@pytest.mark.bad_inputs(4)
def test_curriculum_stages_and_refusals(tiny_world):
    stages = [Stage("easy", 1.0, 3, buckets={"easy": 1.0}), Stage("mid", 1.0, 2, buckets={"easy": 1, "medium": 3}),
              Stage("hard", 1.0, 3, buckets={"hard": 1.0}), Stage("all", 1.0, 1)]
    s = BucketSampler(BUCKET, 4, 1, 1, 0, 3, stages)
    per_step = [BUCKET[torch.cat(s.step_indices(i))].tolist() for i in range(9)]
    assert all(b == [2] * 4 for b in per_step[:3]) and all(sorted(b) == [1, 1, 1, 2] for b in per_step[3:5])
    assert all(b == [0] * 4 for b in per_step[5:8])
    assert sorted(torch.cat(s.step_indices(5)).tolist()) == [16, 17, 18, 19]  # the hard stream starts anew
    assert len(per_step[8]) == 4  # a stage without buckets draws from every sample
    assert torch.equal(torch.cat(BucketSampler(BUCKET, 4, 1, 1, 0, 3, stages).step_indices(6)),
                       torch.cat(s.step_indices(6)))
    with pytest.raises(UserError, match=r"stages\[0\] \('x'\) draws from the 'hard' bucket, which holds no sample"):
        BucketSampler(torch.full((8,), 2, dtype=torch.int8), 4, 1, 1, 0, 3, [Stage("x", 1.0, 1, buckets={"hard": 1})])
    # G = 4: weight 0.1 of 4 samples rounds to none at every step, so 'hard' would never be drawn
    with pytest.raises(UserError, match=r"gives the 'hard' bucket weight 0.1, less than one of the step's 4 samples"):
        BucketSampler(BUCKET, 4, 1, 1, 0, 3, weights={"easy": 0.9, "hard": 0.1})
    base = [s for s in world_overrides(tiny_world, tiny_world / "unused") if s != "--set"]
    with pytest.raises(UserError, match=r"stages\[0\] \('a'\).buckets: unknown bucket 'tricky'"):
        load_recipe("configs/tiny/distill.yaml", base + ["optim.max_steps=1", "optim.warmup_steps=0",
                                                          "stages=[{name: a, data_fraction: 1.0, steps: 1, buckets: {tricky: 1}}]"])
    with pytest.raises(UserError, match="grading.weights: every weight is 0"):
        load_recipe("configs/tiny/distill.yaml", base + ["grading.weights={easy: 0}"])
