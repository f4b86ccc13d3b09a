"""Pairing a student's tokens with a teacher's of another tokenizer, for the ULD loss (loss.cross_tokenizer).

The same records are tokenized twice: by the student's tokenizer into the run's token store, and by
the teacher's tokenizer into the teacher's store, which is what ``dd-cache build`` scores (the cache
is keyed by (teacher sample, position in the teacher's tokens)). Two steps pair them:

1. Sample: a student sample and a teacher sample belong together when they come from the same
   source record (each store's ``records.npy``). Bad-row or too-long policies may drop a record on
   one side only (its tokenizations differ in length): that sample then has no teacher rows and
   trains on CE alone.
2. Position (what the ULD paper's code does): within a record, the i-th response token of the
   student's tokenization is paired with the i-th response token of the teacher's, for i below the
   shorter of the two responses; the rest of the longer one is left out (truncation). A response
   token is a target position (``targets != IGNORE_INDEX``: the answer and its EOS), holding the
   model's distribution over the token that follows. At 4k-token reasoning traces the two
   tokenizations of the same text differ by a few percent in length, so the positions drift apart
   along the response: ULD compares sorted distributions, which tolerates that, but the pairing is
   positional, not by text span (GOLD-style span merging would be the next refinement).

Memory: the two ``records.npy`` are memory-mapped (8 bytes per sample each, 8 MB per 1M samples) and
searched per micro-batch, O(B log S).
"""

from __future__ import annotations

import numpy as np
import torch

from dist_distill.errors import UserError


def align_rows(student_counts: torch.Tensor, teacher_counts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Response-token pairing of a micro-batch: int64 [B] target counts of each sample on both sides ->
    (student rows int64 [M], teacher rows int64 [M]), row-major indices into each side's target rows,
    sample b contributing its first min(student_counts[b], teacher_counts[b]) rows; both increase."""
    s_counts, t_counts = student_counts.long().cpu(), teacher_counts.long().cpu()
    m = torch.minimum(s_counts, t_counts)
    sample = torch.repeat_interleave(torch.arange(len(m)), m)
    first = torch.cumsum(m, 0) - m
    within = torch.arange(int(m.sum())) - first[sample]
    s_off, t_off = torch.cumsum(s_counts, 0) - s_counts, torch.cumsum(t_counts, 0) - t_counts
    return s_off[sample] + within, t_off[sample] + within


class RecordAlignment:
    """Student sample -> the teacher sample tokenized from the same source record (step 1 of the module doc)."""

    def __init__(self, student_data, teacher_data):
        for role, data in (("student", student_data), ("teacher", teacher_data)):
            if data.store is None:
                raise UserError(f"loss.cross_tokenizer: the {role}'s data has no token store to read its source "
                                "records from")
        self.student = np.load(student_data.store.path / "records.npy", mmap_mode="r")
        self.teacher = np.load(teacher_data.store.path / "records.npy", mmap_mode="r")

    def teacher_samples(self, indices) -> tuple[np.ndarray, np.ndarray]:
        """(teacher sample int64 [B], found bool [B]) of student samples `indices` [B]."""
        idx = np.asarray(indices.cpu() if torch.is_tensor(indices) else indices, dtype=np.int64).reshape(-1)
        records = np.asarray(self.student[idx])
        pos = np.minimum(np.searchsorted(self.teacher, records), max(len(self.teacher) - 1, 0))
        found = (np.asarray(self.teacher[pos]) == records) if len(self.teacher) else np.zeros(len(idx), bool)
        return pos.astype(np.int64), found
