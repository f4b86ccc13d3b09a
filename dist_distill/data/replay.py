"""Replay against forgetting: which optimizer steps carry samples of the replay dataset, and which ones.

The replay data (data.replay, recipe.ReplaySpec) is its own token store (data/store.py, built like
data.train: memory-mapped, read per batch; a 100k-record replay set costs its int64 offsets in RAM,
0.8 MB, and one int64 permutation of its sample ids, another 0.8 MB). The trainer adds this rank's
replay micro-batches after the step's main micro-batches and trains them with hard-label CE only
(objective/module.py `replay_settings`): no teacher source is asked for them.

Rate. With a rate of r = p/q replay samples per optimizer step (samples / every_steps, or fraction x
the step's global main samples), the replay samples of steps [0, s) are ``due(s) = floor((s p + phi) / q)``
with a phase phi in [0, q) drawn from the seed: every q consecutive steps carry exactly p samples
and the replay steps are spread evenly (100 per 1000 steps: one sample on every tenth step, which
tenth set by the seed). A pure function of (seed, step): a resumed run needs nothing but the step.

Layout of one step. Its c = due(s + 1) - due(s) replay slots are global slots due(s) .. due(s) + c - 1;
slot j of the step goes to rank j mod W at position j div W, and a rank's positions are cut into
micro-batches of micro_batch rows. Every rank runs ``ceil(ceil(c / W) / micro_batch)`` replay
micro-batches (the same number on all ranks: ZeRO-3 gathers parameters in every forward, so the ranks
must run the same number of them); a rank whose share is shorter gets an empty micro-batch, which the
trainer runs on a filler row with weight 0. At 64 ranks and 100 samples per 1000 steps, every tenth
step runs one extra one-row micro-batch on every rank (one real row, 63 fillers): at micro_batch 4 x
grad_accum 4 that is 1/16 of a step's rows every tenth step, about 0.6 % more compute.

Which records: global slot g reads replay sample ``perm_e[g mod N]``, e = g div N, perm_e a seeded
permutation of the N replay samples: every replay sample once per epoch of replay, in a fixed order.
"""

from __future__ import annotations

import dataclasses
import hashlib
from fractions import Fraction

import torch


def replay_rate(spec, world: int, grad_accum: int, micro_batch: int) -> Fraction:
    """Replay samples per optimizer step (all ranks together), exact."""
    if spec.fraction is not None:
        return Fraction(str(spec.fraction)) * world * grad_accum * micro_batch
    return Fraction(spec.samples, spec.every_steps)


def replay_data_spec(data_spec):
    """The DataSpec that builds the replay store: data.* with the replay's own source fields, no augmentation."""
    rp = data_spec.replay
    own = {k: getattr(rp, k) for k in ("split", "revision", "prompt_field", "answer_field", "format",
                                        "messages_field") if getattr(rp, k) is not None}
    return dataclasses.replace(data_spec, **own, max_samples=rp.max_samples, augment=[], replay=None)


class ReplaySchedule:
    """Replay samples of every step for one rank: a pure function of (seed, step).

    num_samples: samples in the replay store; rate: replay samples per step (replay_rate);
    world, rank: data-parallel ranks; micro_batch: rows per replay micro-batch."""

    def __init__(self, num_samples: int, rate: Fraction, world: int, rank: int, micro_batch: int, seed: int):
        if num_samples < 1:
            raise ValueError("a replay schedule needs at least one replay sample")
        self.n, self.rate, self.world, self.rank, self.mb, self.seed = num_samples, Fraction(rate), world, rank, \
            micro_batch, seed
        digest = hashlib.sha256(f"replay|{seed}".encode()).digest()
        self.phase = int.from_bytes(digest[:8], "little") % self.rate.denominator
        self._perm: tuple[int, torch.Tensor] | None = None

    def due(self, step: int) -> int:
        """Replay samples (all ranks) in optimizer steps [0, step)."""
        return (step * self.rate.numerator + self.phase) // self.rate.denominator

    def count(self, step: int) -> int:
        """Replay samples (all ranks) at optimizer step `step` (0-based)."""
        return self.due(step + 1) - self.due(step)

    def num_micro_batches(self, step: int) -> int:
        """Replay micro-batches every rank runs at `step` (the same on all ranks)."""
        per_rank = -(-self.count(step) // self.world)
        return -(-per_rank // self.mb)

    def sample(self, slot: int) -> int:
        """The replay sample id of global replay slot `slot`."""
        epoch = slot // self.n
        if self._perm is None or self._perm[0] != epoch:
            gen = torch.Generator().manual_seed((self.seed * 1_000_003 + 7919 * epoch) % 2**63)
            self._perm = (epoch, torch.randperm(self.n, generator=gen))
        return int(self._perm[1][slot % self.n])

    def step_indices(self, step: int) -> list[torch.Tensor]:
        """This rank's replay sample ids at `step`: num_micro_batches(step) x int64 [<= micro_batch] (an
        entry may be empty: this rank has no row in that micro-batch, the others do)."""
        first, c = self.due(step), self.count(step)
        mine = [self.sample(first + j) for j in range(self.rank, c, self.world)]
        return [torch.tensor(mine[m * self.mb:(m + 1) * self.mb], dtype=torch.int64)
                for m in range(self.num_micro_batches(step))]
