"""Which samples each rank reads at each optimizer step."""

from __future__ import annotations

import torch


class StepSampler:
    """Which samples each rank reads at each optimizer step; a pure function of (seed, step).

    Samples are drawn from an endless stream of per-epoch permutations of a pool. Step s
    consumes pool slots [s*G, (s+1)*G), G = world * grad_accum * micro_batch; slot
    (m * world + r) * micro_batch + j goes to rank r, micro-batch m. The same step therefore
    covers the same samples whatever the split into ranks and micro-batches, and resuming
    at step s needs nothing but s. With progressive stages, stage i's pool is the first
    ceil(fraction * N) samples of one fixed shuffled order, and its stream starts at its first step.
    """

    def __init__(self, num_samples: int, micro_batch: int, grad_accum: int, world: int, rank: int, seed: int,
                 stages: list | None = None):
        self.n, self.mb, self.ga, self.world, self.rank, self.seed = num_samples, micro_batch, grad_accum, world, rank, seed
        self.stages = stages or []
        self.order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed - 1)) \
            if self.stages else torch.arange(num_samples)
        self._perms: dict[tuple[int, int], torch.Tensor] = {}

    def _pool(self, step: int) -> tuple[int, torch.Tensor, int]:
        """(stream key, pool of sample ids, step within the stream)."""
        if not self.stages:
            return 0, self.order, step
        from dist_distill.objective.schedules import stage_at, stage_sample_limit

        index, stage, step_in_stage = stage_at(step, self.stages)
        return index, self.order[:stage_sample_limit(stage, self.n)], step_in_stage

    def _sample(self, key: int, pool: torch.Tensor, position: int) -> int:
        epoch = position // len(pool)
        if (key, epoch) not in self._perms:
            seed = self.seed + 1_000_003 * key + epoch
            self._perms = {(key, epoch): torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))}
        return int(pool[self._perms[(key, epoch)][position % len(pool)]])

    def step_indices(self, step: int) -> list[torch.Tensor]:
        """Sample indices of this rank's micro-batches at optimizer step `step`: grad_accum x int64 [micro_batch]."""
        key, pool, local_step = self._pool(step)
        base = local_step * self.world * self.ga * self.mb
        return [torch.tensor([self._sample(key, pool, base + (m * self.world + self.rank) * self.mb + j)
                              for j in range(self.mb)]) for m in range(self.ga)]

