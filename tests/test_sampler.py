"""StepSampler: which samples each rank reads at each step is a pure function of (seed, step)."""

import pytest
import torch

from dist_distill.objective.schedules import Stage
from dist_distill.data.sampler import StepSampler


def global_step(n, mb, ga, world, seed, step, stages=None):
    """The multiset of samples that all ranks read at `step`."""
    ids = []
    for rank in range(world):
        ids += torch.cat(StepSampler(n, mb, ga, world, rank, seed, stages).step_indices(step)).tolist()
    return sorted(ids)


def test_same_samples_whatever_the_split():
    for step in (0, 3, 17):
        a = global_step(50, 4, 2, 1, 7, step)
        assert a == global_step(50, 4, 1, 2, 7, step) == global_step(50, 2, 1, 4, 7, step)


def test_epochs_cover_every_sample_once():
    sampler = StepSampler(48, 4, 1, 2, 0, 3)
    other = StepSampler(48, 4, 1, 2, 1, 3)
    seen = [i for s in range(6) for smp in (sampler, other) for i in torch.cat(smp.step_indices(s)).tolist()]
    assert sorted(seen) == list(range(48))


def test_pure_function_of_step():
    a = StepSampler(30, 3, 2, 2, 1, 5)
    b = StepSampler(30, 3, 2, 2, 1, 5)
    a_steps = [torch.cat(a.step_indices(s)).tolist() for s in range(12)]
    b_steps = [torch.cat(b.step_indices(s)).tolist() for s in reversed(range(12))][::-1]
    assert a_steps == b_steps  # order of calls (e.g. a resume) does not matter


def test_stages_draw_from_nested_prefixes():
    stages = [Stage("a", 0.2, 3, {"output": 1.0}), Stage("b", 0.5, 3, {"output": 1.0}),
              Stage("c", 1.0, 4, {"output": 1.0})]
    n = 100
    order = StepSampler(n, 4, 1, 1, 0, 9, stages).order
    for first, count, limit in ((0, 3, 20), (3, 3, 50), (6, 4, 100)):
        used = {i for s in range(first, first + count) for i in global_step(n, 4, 1, 1, 9, s, stages)}
        assert used <= set(order[:limit].tolist())
    resumed = StepSampler(n, 4, 1, 1, 0, 9, stages)
    assert torch.equal(torch.cat(resumed.step_indices(7)), torch.cat(StepSampler(n, 4, 1, 1, 0, 9, stages).step_indices(7)))


# ---- length-grouped and packed batching (data/batching.py) ----------------------------------------------
import numpy as np  # noqa: E402

from dist_distill.data.batching import LengthGroupedSampler, PackedSampler  # noqa: E402


def _lengths(n, seed=0):
    return np.random.default_rng(seed).integers(2, 40, n)


def test_length_grouped_covers_each_record_once_and_groups_by_length():
    n, mb, ga, world, group = 96, 4, 2, 2, 3  # mega-batch = 3 steps x 16 = 48 records: two per epoch
    lengths = _lengths(n)
    samplers = [LengthGroupedSampler(lengths, mb, ga, world, r, 5, group) for r in range(world)]
    per_epoch = n // (mb * ga * world)
    for epoch in range(2):
        seen = [i for s in range(epoch * per_epoch, (epoch + 1) * per_epoch) for smp in samplers
                for b in smp.step_indices(s) for i in b.tolist()]
        assert sorted(seen) == list(range(n))  # every record once per epoch
    # each micro-batch round (micro m of every rank) is a run of the length-sorted mega-batch
    spread = [np.ptp(lengths[torch.cat([smp.step_indices(s)[m] for smp in samplers]).numpy()])
              for s in range(per_epoch) for m in range(ga)]
    plain = StepSampler(n, mb, ga, world, 0, 5)
    plain_spread = [np.ptp(lengths[torch.cat([StepSampler(n, mb, ga, world, r, 5).step_indices(s)[m]
                                              for r in range(world)]).numpy()]) for s in range(per_epoch) for m in range(ga)]
    assert np.mean(spread) < 0.5 * np.mean(plain_spread), (np.mean(spread), np.mean(plain_spread))
    # the mega-batch holds the plain sampler's records of those steps (same stream, regrouped)
    assert sorted(i for s in range(group) for smp in samplers for b in smp.step_indices(s) for i in b.tolist()) == \
        sorted(i for s in range(group) for r in range(world) for b in StepSampler(n, mb, ga, world, r, 5).step_indices(s)
               for i in b.tolist())
    assert plain.step_indices(0)[0].dtype == samplers[0].step_indices(0)[0].dtype == torch.int64


def test_resume_mid_epoch_gives_the_uninterrupted_batches():
    """A fresh sampler (a restarted process) asked for steps k..n returns exactly the batches an uninterrupted
    sampler returned for them, for the length-grouped and the packed plans, on every rank."""
    lengths, n_steps, k = _lengths(200, 1), 14, 6
    for make in (lambda r: LengthGroupedSampler(lengths, 3, 2, 2, r, 11, 4),
                 lambda r: PackedSampler(lengths, 64, 3, 2, 2, r, 11, open_rows=4)):
        for rank in range(2):
            whole = make(rank)
            get = whole.step_rows if isinstance(whole, PackedSampler) else whole.step_indices
            straight = [_plain(get(s)) for s in range(n_steps)]
            resumed = make(rank)
            rget = resumed.step_rows if isinstance(resumed, PackedSampler) else resumed.step_indices
            assert [_plain(rget(s)) for s in range(k, n_steps)] == straight[k:]
            assert _plain(rget(2)) == straight[2]  # going back replays from the start
            assert whole.records_before(k) == resumed.records_before(k)


def _plain(micro):
    return [m.tolist() if torch.is_tensor(m) else m for m in micro]


def test_packed_plan_fills_rows_and_keeps_ranks_in_lock_step():
    lengths = _lengths(300, 2)
    max_len, mb, ga, world = 64, 2, 3, 2
    samplers = [PackedSampler(lengths, max_len, mb, ga, world, r, 4, open_rows=8) for r in range(world)]
    seen = []
    for s in range(6):
        steps = [smp.step_rows(s) for smp in samplers]
        assert all(len(micro) == ga and all(len(rows) == mb for rows in micro) for micro in steps)  # fixed shapes
        for micro in steps:
            for rows in micro:
                for row in rows:
                    assert 0 < lengths[row].sum() <= max_len
                    seen += row
    assert len(seen) == len(set(seen))  # no record twice within the first epoch
    fill = lengths[seen].sum() / (6 * world * ga * mb * max_len)
    assert fill > 0.85, fill  # vs lengths.mean() / max_len ~ 0.32 unpacked
    # the global plan is the same whichever rank computes it
    assert samplers[0].global_rows(0, 30) == samplers[1].global_rows(0, 30)
    # the stream is StepSampler's: the first rows hold the plain sampler's first records (up to the open window)
    first = StepSampler(300, 1, 1, 1, 0, 4)
    stream = [int(first.step_indices(s)[0][0]) for s in range(40)]
    assert set(stream[:20]) <= set(i for row in samplers[0].global_rows(0, 20) for i in row)
    with pytest.raises(ValueError, match="more than the packed length 16"):
        PackedSampler(lengths, 16, 1, 1, 1, 0, 4)
