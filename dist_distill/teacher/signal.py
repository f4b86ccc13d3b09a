"""The teacher's per-token signal, whatever its source."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TeacherSignal:
    """Teacher signal at the target tokens of a micro-batch (n = number of target tokens).

    topk: (ids int64 [n, k], raw T=1 logits fp32 [n, k], full-vocab logsumexp fp32 [n]) or None;
    hidden, weight, bias: dense teacher as final hidden states [n, Ht], lm_head weight [V_t, Ht]
        and bias [V_t] or None (its logits are hidden @ weight.T, computed chunk by chunk);
    layer_hidden: per-layer hidden states, tuple of [B, L, Ht] (index 0 = embeddings), or None;
    attentions: per-layer attention maps, tuple of [B, heads, L, L], or None.
    """

    topk: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    layer_hidden: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None

    def loss_inputs(self) -> dict:
        """Keyword arguments for `dist_distill.kernels.fused_linear_distill_loss` / the unfused loss."""
        if self.topk is not None:
            return {"teacher_topk": self.topk}
        return {"teacher_hidden": self.hidden, "teacher_weight": self.weight, "teacher_bias": self.bias}



def pack_rows(ids: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """Top-k rows as one float32 [n, 2k + 1] tensor on their device: logits | ids (int32 bit patterns) | lse.

    The form in which rows travel between ranks (the teacher group's messages, a cache build's
    pieces): one buffer per message, exact (ids < 2^31 are carried bit for bit)."""
    return torch.cat([logits.float(), ids.to(torch.int32).view(torch.float32), lse.float()[:, None]], 1)


def unpack_rows(rows: torch.Tensor, k: int):
    """Inverse of :func:`pack_rows`: ids int64 [n, k], logits float32 [n, k], lse float32 [n]."""
    return rows[:, k:2 * k].contiguous().view(torch.int32).long(), rows[:, :k].contiguous(), rows[:, 2 * k].contiguous()


def unpack_rows_numpy(rows, k: int):
    """:func:`unpack_rows` of a numpy float32 [n, 2k + 1]: ids int32, logits float32 [n, k], lse float32 [n]."""
    import numpy as np

    rows = np.ascontiguousarray(rows, dtype=np.float32)
    return np.ascontiguousarray(rows[:, k:2 * k]).view(np.int32), np.ascontiguousarray(rows[:, :k]), \
        np.ascontiguousarray(rows[:, 2 * k])
