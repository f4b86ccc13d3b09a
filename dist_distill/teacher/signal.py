"""The teacher's per-token signal, whatever its source."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class TeacherSignal:
    """Teacher signal at the target tokens of a micro-batch (n = number of target tokens).

    topk: (ids int64 [n, k], raw T=1 logits fp32 [n, k], full-vocab logsumexp fp32 [n]) or None;
    log_tails: with topk, fp32 [n, len(tail_temperatures)]: log of the teacher's probability mass
        outside the top-k at each of `tail_temperatures` (teacher.tails; what loss.tail=bucket reads);
    hidden, weight, bias: dense teacher as final hidden states [n, Ht], lm_head weight [V_t, Ht]
        and bias [V_t] or None (its logits are hidden @ weight.T, computed chunk by chunk);
    layer_hidden: per-layer hidden states, tuple of [B, L, Ht] (index 0 = embeddings), or None;
    attentions: per-layer attention maps, tuple of [B, heads, L, L], or None;
    aligned_rows: cross-tokenizer (loss.cross_tokenizer): int64 [M], increasing: the student target row
        (row-major index into the micro-batch's target tokens) each of the M top-k teacher rows is paired
        with (teacher.cross_tokenizer); None: row i is the student's target token i (same tokenizer).
    """

    topk: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
    log_tails: torch.Tensor | None = None
    tail_temperatures: tuple[float, ...] = (1.0,)
    hidden: torch.Tensor | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    layer_hidden: tuple[torch.Tensor, ...] | None = None
    attentions: tuple[torch.Tensor, ...] | None = None
    aligned_rows: torch.Tensor | None = None
    source: str = "the teacher signal"
    """Who produced it, for errors (e.g. "teacher cache runs/x/cache")."""

    def uld_inputs(self, temperature: float) -> dict:
        """Keyword arguments for `dist_distill.losses.fused_uld.fused_linear_uld_loss`: the aligned teacher rows'
        sorted top-k probabilities and exact tail mass at `temperature` (a temperature the rows do not carry is
        refused, naming both), and the student rows they pair with."""
        from dist_distill.losses.uld import teacher_sorted_topk
        from dist_distill.teacher.tails import column_of

        if self.topk is None or self.aligned_rows is None or self.log_tails is None:
            from dist_distill.errors import UserError

            raise UserError(f"loss.cross_tokenizer=uld: {self.source} carries no aligned top-k rows with tail masses")
        j = column_of(self.tail_temperatures, temperature, self.source)
        probs, tail = teacher_sorted_topk(self.topk[1], log_tail=self.log_tails[:, j], temperature=temperature)
        return {"teacher_probs": probs, "teacher_tail": tail, "aligned_rows": self.aligned_rows}

    def loss_inputs(self, temperature: float = 1.0, tail: str = "renorm") -> dict:
        """Keyword arguments for `dist_distill.kernels.fused_linear_distill_loss` / the unfused loss.

        A top-k teacher with ``tail="bucket"`` gets the 4-tuple ``(ids, logits, lse, log_tail [n])``
        with the exact tail mass at `temperature`; a temperature it does not carry is refused (UserError
        naming both)."""
        if self.topk is not None:
            if tail == "bucket":
                if self.log_tails is None:
                    from dist_distill.errors import UserError

                    raise UserError(f"loss.tail=bucket: {self.source} carries no tail masses; rebuild it")
                from dist_distill.teacher.tails import column_of

                j = column_of(self.tail_temperatures, temperature, self.source)
                return {"teacher_topk": (*self.topk, self.log_tails[:, j].contiguous())}
            return {"teacher_topk": self.topk}
        return {"teacher_hidden": self.hidden, "teacher_weight": self.weight, "teacher_bias": self.bias}


def pack_rows(ids: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor, log_tails: torch.Tensor) -> torch.Tensor:
    """Top-k rows as one float32 [n, 2k + 1 + nT] tensor on their device: logits | ids (int32 bit
    patterns) | lse | log_tails [n, nT].

    The form in which rows travel between ranks (the teacher group's messages, a cache build's
    pieces): one buffer per message, exact (ids < 2^31 are carried bit for bit)."""
    return torch.cat([logits.float(), ids.to(torch.int32).view(torch.float32), lse.float()[:, None],
                      log_tails.float().reshape(len(lse), -1)], 1)


def unpack_rows(rows: torch.Tensor, k: int):
    """Inverse of :func:`pack_rows`: ids int64 [n, k], logits float32 [n, k], lse float32 [n], log_tails [n, nT]."""
    return (rows[:, k:2 * k].contiguous().view(torch.int32).long(), rows[:, :k].contiguous(),
            rows[:, 2 * k].contiguous(), rows[:, 2 * k + 1:].contiguous())


def unpack_rows_numpy(rows, k: int):
    """:func:`unpack_rows` of a numpy float32 [n, 2k + 1 + nT]: ids int32, logits float32 [n, k], lse float32 [n],
    log_tails float32 [n, nT]."""
    import numpy as np

    rows = np.ascontiguousarray(rows, dtype=np.float32)
    return np.ascontiguousarray(rows[:, k:2 * k]).view(np.int32), np.ascontiguousarray(rows[:, :k]), \
        np.ascontiguousarray(rows[:, 2 * k]), np.ascontiguousarray(rows[:, 2 * k + 1:])
