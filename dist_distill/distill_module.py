"""The module DeepSpeed trains: the student, its loss head and any projections, in one nn.Module.

ZeRO-3 trap (DESIGN fact 5): parameters are partitioned, and outside its module's forward
``lm_head.weight`` is an empty placeholder. The fused loss therefore runs INSIDE the
lm_head's forward: :func:`install_loss_head` gives the student's output-embedding module a
forward that, when called with loss inputs, reads ``self.weight`` there. Calling it through
the module (``head(h, loss_inputs)``) fires ZeRO-3's hooks, which gather the weight before
and route its gradient to this rank's partition after.
"""

from __future__ import annotations

import types

import torch
import torch.nn as nn
import torch.nn.functional as F

from .data import IGNORE_INDEX
from .recipe import LossSpec
from .teacher import TeacherSignal


def install_loss_head(head: nn.Linear) -> None:
    """Give `head` (the student's lm_head) a forward(hidden, loss_inputs=None).

    Without loss_inputs it is the plain linear layer (generation, evaluation); with them it
    returns ``(loss, parts)`` of `dist_distill.kernels.fused_linear_distill_loss` on `hidden` [n, H].
    """
    def forward(self, hidden: torch.Tensor, loss_inputs: dict | None = None):
        if loss_inputs is None:
            return F.linear(hidden, self.weight, self.bias)
        from .kernels import fused_linear_distill_loss

        return fused_linear_distill_loss(hidden, self.weight, bias=self.bias, return_parts=True, **loss_inputs)

    head.forward = types.MethodType(forward, head)


def unfused_output_loss(logits: torch.Tensor, labels: torch.Tensor, teacher: TeacherSignal | None, spec: LossSpec,
                        vocab_size: int) -> tuple[torch.Tensor, dict]:
    """Reference path with materialised logits [n, V]: (loss sum, {"div": sum, "ce": sum})."""
    from .losses import divergence, topk_divergence

    student = logits[:, :vocab_size].float()
    ce = F.cross_entropy(student, labels, reduction="sum")
    if teacher is None:
        return ce, {"div": torch.zeros_like(ce).detach(), "ce": ce.detach()}
    kw = dict(temperature=spec.temperature, scale_by_t2=spec.scale_by_t2, beta=spec.beta,
              skew_alpha=spec.skew_alpha, vocab_size=vocab_size, reduction="sum")
    if teacher.topk is not None:
        div = topk_divergence(student, *teacher.topk, spec.kind, tail=spec.tail, **kw)
    else:
        t_logits = F.linear(teacher.hidden.float(), teacher.weight.float(),
                            None if teacher.bias is None else teacher.bias.float())
        div = divergence(student, t_logits[:, :vocab_size], spec.kind, **kw)
    loss = (1.0 - spec.ce_weight) * div + spec.ce_weight * ce
    return loss, {"div": div.detach(), "ce": ce.detach()}


class DistillationModule(nn.Module):
    """student (an HF causal LM) + optional projections; forward returns the micro-batch loss SUM.

    forward(input_ids, attention_mask, targets: int64 [B, L], teacher: TeacherSignal | None)
    -> (loss sum over target tokens: fp32 scalar, parts: dict of detached fp32 sums).
    """

    def __init__(self, student: nn.Module, loss: LossSpec, vocab_size: int):
        super().__init__()
        self.student = student
        self.loss_spec = loss
        self.vocab_size = vocab_size
        if loss.fused:
            install_loss_head(student.get_output_embeddings())

    def _loss_inputs(self, labels: torch.Tensor, teacher: TeacherSignal | None) -> dict:
        s = self.loss_spec
        inputs = dict(labels=labels, vocab_size=self.vocab_size, reduction="sum", backend=s.backend,
                      chunk_bytes=int(s.chunk_mib * 2**20))
        if teacher is None:
            # hard labels only: CE through the same fused path (the divergence against itself is 0)
            return dict(inputs, kind="fkl", ce_weight=1.0, teacher_topk=_self_topk(labels))
        return dict(inputs, kind=s.kind, temperature=s.temperature, scale_by_t2=s.scale_by_t2, beta=s.beta,
                    skew_alpha=s.skew_alpha, tail=s.tail, ce_weight=s.ce_weight, **teacher.loss_inputs())

    def forward(self, input_ids, attention_mask, targets, teacher: TeacherSignal | None = None):
        out = self.student.get_decoder()(input_ids=input_ids, attention_mask=attention_mask)
        mask = targets != IGNORE_INDEX
        hidden, labels = out.last_hidden_state[mask], targets[mask]
        head = self.student.get_output_embeddings()
        if self.loss_spec.fused:
            return head(hidden, self._loss_inputs(labels, teacher))
        return unfused_output_loss(head(hidden), labels, teacher, self.loss_spec, self.vocab_size)


def _self_topk(labels: torch.Tensor):
    """A one-hot 'teacher' at the labels; with ce_weight=1 only the CE term counts."""
    n = labels.shape[0]
    return labels[:, None], torch.zeros(n, 1, device=labels.device), torch.zeros(n, device=labels.device)
