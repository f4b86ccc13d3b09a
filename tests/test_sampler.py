"""StepSampler: which samples each rank reads at each step is a pure function of (seed, step)."""

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
