"""Which samples each rank reads at each optimizer step."""

from __future__ import annotations

from fractions import Fraction

import torch

from dist_distill.errors import UserError


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



def apportion(total: int, weights: dict[str, float]) -> dict[str, int]:
    """Largest-remainder split of `total` slots by `weights` (exact on their decimal values; ties go to the
    bucket named first in `weights`): counts >= 0 summing to `total`, each within 1 of total * w / sum(w)."""
    exact = {b: Fraction(repr(float(w))) for b, w in weights.items()}
    norm = sum(exact.values())
    quota = {b: total * w / norm for b, w in exact.items()}
    counts = {b: int(q) for b, q in quota.items()}
    order = sorted(quota, key=lambda b: -(quota[b] - counts[b]))  # stable: first-named wins ties
    for b in order[:total - sum(counts.values())]:
        counts[b] += 1
    return counts


class BucketSampler:
    """Which samples each rank reads at each step when training draws by difficulty bucket (data/grading.py).

    A pure function of (seed, step), like StepSampler, so resuming at step s needs only s. At step s the
    weights w are the stage's `buckets` (objective/schedules.py; a stage without buckets draws from every
    sample) or `weights` (a run without stages). Each step's G = world * grad_accum * micro_batch samples
    are exactly `apportion(G, w)` per bucket -- a mix is exact at every step to within one sample per
    bucket, and that rounding is the same at every step (so over a run a share is off by up to 1/G; a bucket
    whose weight rounds to no sample is refused), a curriculum (stages with one bucket each) draws only that
    bucket. Bucket b of stage i keeps its own endless stream of per-epoch
    permutations of its pool (the stage's data_fraction prefix of one fixed shuffled order, the same as
    StepSampler's, restricted to b), so within a stage every sample of b is drawn once before any twice.
    The step's G draws are then shuffled by a permutation seeded by (seed, step), so every micro-batch and
    rank gets a mix, and dealt out as StepSampler does: slot (m * world + r) * micro_batch + j to rank r,
    micro-batch m. The set of a step's samples does not depend on the split into ranks and micro-batches.

    bucket: int8 [N] bucket id per sample (the grades file's, indexed by the store's sample index).
    """

    def __init__(self, bucket, micro_batch: int, grad_accum: int, world: int, rank: int, seed: int,
                 stages: list | None = None, weights: dict[str, float] | None = None):
        from dist_distill.objective.schedules import BUCKET_NAMES

        self.bucket = torch.as_tensor(bucket, dtype=torch.int8)
        self.n = len(self.bucket)
        self.mb, self.ga, self.world, self.rank, self.seed = micro_batch, grad_accum, world, rank, seed
        self.stages, self.weights, self.names = stages or [], weights, BUCKET_NAMES
        self.order = torch.randperm(self.n, generator=torch.Generator().manual_seed(seed - 1)) \
            if self.stages else torch.arange(self.n)
        self._pools: dict[int, dict[str, torch.Tensor]] = {}
        self._perms: dict[tuple, torch.Tensor] = {}
        for key in range(max(len(self.stages), 1)):  # refuse an empty bucket with weight > 0 before step 0
            self._stage_pools(key)

    def _stage(self, step: int):
        """(stream key, bucket weights or None for all samples, data fraction limit, step within the stage)."""
        if not self.stages:
            return 0, self.weights, self.n, step
        from dist_distill.objective.schedules import stage_at, stage_sample_limit

        index, stage, local = stage_at(step, self.stages)
        return index, stage.buckets, stage_sample_limit(stage, self.n), local

    def _stage_pools(self, key: int) -> dict[str, torch.Tensor]:
        if key not in self._pools:
            if self.stages:
                from dist_distill.objective.schedules import stage_sample_limit

                stage = self.stages[key]
                weights, limit, where = stage.buckets, stage_sample_limit(stage, self.n), f"stages[{key}] ({stage.name!r})"
            else:
                weights, limit, where = self.weights, self.n, "grading.weights"
            pool = self.order[:limit]
            if weights is None:
                self._pools[key] = {"all": pool}
            else:
                pools = {b: pool[self.bucket[pool] == self.names.index(b)] for b in weights}
                total = self.world * self.ga * self.mb
                counts = apportion(total, weights)
                for b, w in weights.items():
                    if w > 0 and counts[b] == 0:  # rounded per step, it would never be drawn
                        raise UserError(f"{where} gives the {b!r} bucket weight {w:g}, less than one of the step's "
                                        f"{total} samples (world x grad_accum x micro_batch_size), so it would never "
                                        "be drawn; raise its weight or the global batch")
                    if w > 0 and len(pools[b]) == 0:
                        counts = {n: int((self.bucket[pool] == i).sum()) for i, n in enumerate(self.names)}
                        raise UserError(f"{where} draws from the {b!r} bucket, which holds no sample of the "
                                          f"{limit} it may use (buckets: {counts}); change its weights or "
                                          "grading.edges")
                self._pools[key] = pools
        return self._pools[key]

    def _draw(self, key: int, name: str, pool: torch.Tensor, position: int) -> int:
        epoch = position // len(pool)
        tag = (key, name, epoch)
        if tag not in self._perms:
            seed = (self.seed + 1_000_003 * key + 7919 * self.names.index(name) + epoch) if name != "all" \
                else self.seed + 1_000_003 * key + epoch
            self._perms = {t: p for t, p in self._perms.items() if t[:2] != (key, name)}
            self._perms[tag] = torch.randperm(len(pool), generator=torch.Generator().manual_seed(seed))
        return int(pool[self._perms[tag][position % len(pool)]])

    def step_samples(self, step: int) -> torch.Tensor:
        """All G sample ids of optimizer step `step` (every rank's), int64 [G], in slot order."""
        key, weights, _, local = self._stage(step)
        pools = self._stage_pools(key)
        total = self.world * self.ga * self.mb
        counts = apportion(total, weights) if weights is not None else {"all": total}
        ids = [self._draw(key, b, pools[b], local * n + j) for b, n in counts.items() for j in range(n)]
        mix = torch.randperm(total, generator=torch.Generator().manual_seed(self.seed * 1_000_033 + step))
        return torch.tensor(ids, dtype=torch.int64)[mix]

    def step_indices(self, step: int) -> list[torch.Tensor]:
        """Sample indices of this rank's micro-batches at optimizer step `step`: grad_accum x int64 [micro_batch]."""
        ids = self.step_samples(step)
        return [ids[(m * self.world + self.rank) * self.mb:(m * self.world + self.rank + 1) * self.mb]
                for m in range(self.ga)]


def bucket_sampler(recipe, data, world: int, rank: int) -> BucketSampler:
    """The BucketSampler of a recipe that trains by difficulty bucket: the grades file (data/grading.py
    grades_path) checked against the training data, bucketed under grading.edges."""
    from dist_distill.data.grading import Grades, grades_path

    grades = Grades(grades_path(recipe), recipe.grading.edges).check_matches(data)
    return BucketSampler(grades.bucket, recipe.optim.micro_batch_size, recipe.optim.grad_accum, world, rank,
                         recipe.seed, recipe.stages, recipe.grading.weights)
