"""Which samples form each micro-batch beyond the plain sampler: length-grouped and packed batching.

Both read the same endless record stream as `sampler.StepSampler` without stages: position p of the stream
is sample ``perm_e[p % N]`` with ``perm_e = randperm(N, seed + e)``, e = p // N (so a packed or
length-grouped run visits the records in the order of an unpacked one, up to regrouping). Both are pure
functions of (seed, step, world, grad_accum, micro-batch size, the store's lengths): every data-parallel
rank computes the same global plan and takes its own part, so ranks stay in lock-step (each runs exactly
grad_accum micro-batches per step) and a resumed run at step s reads exactly the batches an uninterrupted
one reads (nothing but s is checkpointed).

- `LengthGroupedSampler` (data.group_by_length, unpacked runs): HF's group_by_length / LengthGroupedSampler
  idea. The stream is cut into mega-batches of data.length_group_steps optimizer steps; each is sorted by
  length (longest first) and cut into units of world * micro_batch records, one unit per micro-batch
  round (micro-batch m of every rank), so that the ranks of a step run micro-batches of similar length (no
  rank waits for another's long batch at the gradient all-reduce). The units' order within the mega-batch
  is shuffled (seeded), unlike HF, so a step's lengths do not trend from long to short within it. A batch
  is padded to its longest record (trainer), not to data.max_seq_len: that is where the compute is saved.
  Coverage: mega-batches are consecutive stream windows, so an epoch covers every record once when the
  mega-batch size divides N; otherwise records near an epoch boundary move by at most one mega-batch.
- `PackedSampler` (data.packing): rows of data.max_seq_len tokens filled from the stream by first fit
  over the last `open_rows` open rows (a row is emitted full or when a newer one pushes it out of that
  window); step s takes global rows [s * R, (s + 1) * R), R = world * grad_accum * micro_batch, and rank
  r's micro-batch m is rows (m * world + r) * micro_batch + j. A packed micro-batch is therefore always
  [micro_batch, max_seq_len] (fixed shapes: no allocator churn on CUDA); the number of records per step
  varies, and the loss is normalised by the step's target-token count as always (DESIGN fact 4).

Scale: both keep only the record lengths (int64 [N]: 8 MB at 1M records) and the current plan window.
Reaching step s the first time (start-up, resume) replays the packing from the stream's start: O(records
consumed) Python work: measured 9-23 us per record on a loaded 2-core box where a bare Python loop
iteration cost 0.3-0.6 us (benchmarks/bench_packing.py; docs/benchmarks.md), so one epoch of 1M records
replays in 10-20 s there, a few seconds on an idle host; a resume after ten such epochs pays that ten times
once. (Checkpointing the planner's state instead would make it O(1); not needed at these rates.)
"""

from __future__ import annotations

import threading
from collections import deque

import numpy as np
import torch


class EpochStream:
    """Position p -> sample id of the endless per-epoch-permutation stream (StepSampler's order, no stages)."""

    def __init__(self, num_samples: int, seed: int):
        self.n, self.seed = num_samples, seed
        self._epoch, self._perm = -1, None

    def perm(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch)).numpy()
            self._epoch = epoch
        return self._perm

    def window(self, start: int, stop: int) -> np.ndarray:
        """int64 [stop - start]: the sample ids at stream positions [start, stop)."""
        out = np.empty(stop - start, np.int64)
        p = start
        while p < stop:
            epoch, off = divmod(p, self.n)
            take = min(stop - p, self.n - off)
            out[p - start:p - start + take] = self.perm(epoch)[off:off + take]
            p += take
        return out


def record_lengths(data) -> np.ndarray:
    """int64 [N]: tokens of each sample of a TokenizedData (from the store's offsets; no token is read)."""
    store = getattr(data, "store", None)
    if store is not None:
        return np.diff(np.asarray(store.offsets, dtype=np.int64))
    return data.attention_mask.sum(1).numpy().astype(np.int64)


class LengthGroupedSampler:
    """Unpacked micro-batches of records of similar length; `step_indices` as StepSampler's."""

    def __init__(self, lengths: np.ndarray, micro_batch: int, grad_accum: int, world: int, rank: int, seed: int,
                 group_steps: int = 16):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        self.mb, self.ga, self.world, self.rank, self.seed = micro_batch, grad_accum, world, rank, seed
        self.group_steps = group_steps
        self.unit = world * micro_batch  # records of one micro-batch round, all ranks
        self.mega = group_steps * grad_accum * self.unit
        self.stream = EpochStream(len(self.lengths), seed)
        self._cache: tuple[int, np.ndarray] | None = None

    def _units(self, q: int) -> np.ndarray:
        """int64 [group_steps * grad_accum, world * micro_batch]: mega-batch q as sorted units, shuffled."""
        if self._cache is None or self._cache[0] != q:
            ids = self.stream.window(q * self.mega, (q + 1) * self.mega)
            ids = ids[np.argsort(-self.lengths[ids], kind="stable")].reshape(-1, self.unit)
            order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(self.seed + 7919 * (q + 1))).numpy()
            self._cache = (q, ids[order])
        return self._cache[1]

    def step_indices(self, step: int) -> list[torch.Tensor]:
        """This rank's micro-batches at optimizer step `step`: grad_accum x int64 [micro_batch]."""
        q, off = divmod(step, self.group_steps)
        units = self._units(q)
        lo = self.rank * self.mb
        return [torch.from_numpy(units[off * self.ga + m, lo:lo + self.mb].copy()) for m in range(self.ga)]

    def records_before(self, step: int) -> int:
        return step * self.world * self.ga * self.mb


class PackedSampler:
    """Rows of packed records; `step_rows(step)` gives this rank's micro-batches of rows."""

    def __init__(self, lengths: np.ndarray, max_len: int, micro_batch: int, grad_accum: int, world: int, rank: int,
                 seed: int, open_rows: int = 16):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if len(self.lengths) and int(self.lengths.max()) > max_len:
            i = int(self.lengths.argmax())
            raise ValueError(f"sample {i} has {int(self.lengths[i])} tokens, more than the packed length {max_len}")
        self.max_len, self.mb, self.ga, self.world, self.rank = max_len, micro_batch, grad_accum, world, rank
        self.seed, self.open_rows = seed, open_rows
        self.rows_per_step = world * grad_accum * micro_batch
        self.stream = EpochStream(len(self.lengths), seed)
        self._lock = threading.Lock()  # the input pipeline's worker and the checkpointing thread both ask
        self._restart()

    def _restart(self) -> None:
        self._pos = 0  # next stream position to place
        self._room: list[int] = []  # free tokens of each open row, oldest first
        self._members: list[list[int]] = []  # sample ids of each open row
        self._rows: deque = deque()  # emitted rows not yet dropped, global row ids from self._first
        self._first = 0
        self._records_before_first = 0
        self._chunk = np.empty(0, np.int64)
        self._chunk_at = 0

    def _place_next(self) -> None:
        if self._pos - self._chunk_at >= len(self._chunk):
            self._chunk_at = self._pos
            chunk = self.stream.window(self._pos, self._pos + 4096)
            self._chunk = list(zip(chunk.tolist(), self.lengths[chunk].tolist()))
        sample, n = self._chunk[self._pos - self._chunk_at]
        self._pos += 1
        room = self._room
        if room and n <= max(room):
            k = next(k for k, r in enumerate(room) if n <= r)
            room[k] -= n
            self._members[k].append(sample)
            if room[k] == 0:
                del room[k]
                self._rows.append(self._members.pop(k))
            return
        room.append(self.max_len - n)
        self._members.append([sample])
        if len(room) > self.open_rows:
            del room[0]
            self._rows.append(self._members.pop(0))

    def _rows_until(self, stop: int) -> None:
        while self._first + len(self._rows) < stop:
            self._place_next()

    def global_rows(self, start: int, stop: int) -> list[list[int]]:
        """Global rows [start, stop) of the plan: lists of sample ids, in row order. Rows before `start` are
        dropped from memory (a request for an earlier row replays the plan from the start)."""
        with self._lock:
            return self._global_rows(start, stop)

    def _global_rows(self, start: int, stop: int) -> list[list[int]]:
        if start < self._first:
            self._restart()
        self._rows_until(stop)
        while self._first < start:
            self._records_before_first += len(self._rows.popleft())
            self._first += 1
        return [self._rows[i - self._first] for i in range(start, stop)]

    def step_rows(self, step: int) -> list[list[list[int]]]:
        """This rank's micro-batches at optimizer step `step`: grad_accum x micro_batch rows of sample ids."""
        rows = self.global_rows(step * self.rows_per_step, (step + 1) * self.rows_per_step)
        return [[rows[(m * self.world + self.rank) * self.mb + j] for j in range(self.mb)] for m in range(self.ga)]

    def records_before(self, step: int) -> int:
        """Records in the rows of all steps before `step` (all ranks)."""
        with self._lock:
            self._global_rows(step * self.rows_per_step, step * self.rows_per_step)
            return self._records_before_first


def micro_batch_rows(rows: list[list[int]]) -> tuple[torch.Tensor, list[list[int]]]:
    """(samples int64 [n], bins): a micro-batch's rows of sample ids as pack_rows' arguments."""
    samples, bins = [], []
    for row in rows:
        bins.append(list(range(len(samples), len(samples) + len(row))))
        samples.extend(row)
    return torch.tensor(samples, dtype=torch.long), bins


def build_sampler(recipe, data, world: int, rank: int):
    """The run's sampler: sampler.BucketSampler (by difficulty bucket: recipe.uses_buckets()), PackedSampler
    (data.packing), LengthGroupedSampler (data.group_by_length) or the plain StepSampler. Packed and
    length-grouped need the records' lengths: read from the store's offsets, nothing else."""
    from dist_distill.data.sampler import StepSampler, bucket_sampler

    d, op = recipe.data, recipe.optim
    if recipe.uses_buckets():  # the recipe refuses buckets with packing / length grouping
        return bucket_sampler(recipe, data, world, rank)
    if d.packing:
        return PackedSampler(record_lengths(data), d.max_seq_len, op.micro_batch_size, op.grad_accum, world, rank,
                             recipe.seed, d.pack_open_rows)
    if d.group_by_length:
        return LengthGroupedSampler(record_lengths(data), op.micro_batch_size, op.grad_accum, world, rank,
                                    recipe.seed, d.length_group_steps)
    return StepSampler(len(data), op.micro_batch_size, op.grad_accum, world, rank, recipe.seed, recipe.stages)
