"""The training objective of one micro-batch: divergence on the teacher's top-k mixed with CE.

Returned values are SUMS over the micro-batch's target tokens; the trainer divides by the
number of target tokens of the whole optimizer step on all ranks (DESIGN fact 4), so that
padding, uneven micro-batches and gradient accumulation do not change the gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import IGNORE_INDEX
from .losses import topk_divergence
from .recipe import LossSpec


@dataclass
class TeacherTopK:
    """Teacher signal at the target tokens: ids int64 [n, k], raw T=1 logits fp32 [n, k], logsumexp fp32 [n]."""

    ids: torch.Tensor
    logits: torch.Tensor
    lse: torch.Tensor


def micro_batch_loss(logits: torch.Tensor, targets: torch.Tensor, teacher: TeacherTopK | None,
                     spec: LossSpec, vocab_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(loss sum, {"divergence": sum, "ce": sum}) over the target tokens of a micro-batch.

    logits: student logits [B, L, V_model] (V_model may be padded past `vocab_size`);
    targets: int64 [B, L], IGNORE_INDEX where no loss applies; `teacher` holds one row per
    target token, in row-major order of ``targets != IGNORE_INDEX``.
    """
    mask = targets != IGNORE_INDEX
    student = logits[mask][:, :vocab_size].float()
    labels = targets[mask]
    ce = F.cross_entropy(student, labels, reduction="sum")
    parts = {"ce": ce.detach()}
    if teacher is None or spec.ce_weight == 1.0:
        parts["divergence"] = torch.zeros((), device=ce.device)
        return ce, parts
    div = topk_divergence(student, teacher.ids, teacher.logits, teacher.lse, spec.kind,
                          temperature=spec.temperature, tail=spec.tail, scale_by_t2=spec.scale_by_t2,
                          beta=spec.beta, skew_alpha=spec.skew_alpha, vocab_size=vocab_size, reduction="sum")
    parts["divergence"] = div.detach()
    return (1.0 - spec.ce_weight) * div + spec.ce_weight * ce, parts
