"""The module DeepSpeed trains: the student, its loss head and any projections, in one nn.Module.

ZeRO-3 trap (DESIGN fact 5): parameters are partitioned, and outside its module's forward
``lm_head.weight`` is an empty placeholder. The fused loss therefore runs INSIDE the
lm_head's forward: :func:`install_loss_head` gives the student's output-embedding module a
forward that, when called with loss inputs, reads ``self.weight`` there. Calling it through
the module (``head(h, loss_inputs)``) fires ZeRO-3's hooks, which gather the weight before
and route its gradient to this rank's partition after.
"""

from __future__ import annotations

import dataclasses
import types
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from dist_distill.data.records import IGNORE_INDEX
from dist_distill.objective.intermediate import (attention_transfer_loss, check_layer_map, hidden_state_loss, layer_attention, layer_hidden, make_projection, projection_l2, uniform_layer_map)
from dist_distill.recipe import IntermediateSpec, LossSpec
from dist_distill.teacher.signal import TeacherSignal


def install_loss_head(head: nn.Linear) -> None:
    """Give `head` (the student's lm_head) a forward(hidden, loss_inputs=None).

    Without loss_inputs it is the plain linear layer (generation, evaluation); with them it
    returns ``(loss, parts)`` of `dist_distill.kernels.fused_linear_distill_loss` on `hidden` [n, H]
    (of `dist_distill.losses.fused_uld.fused_linear_uld_loss` when ``cross_tokenizer="uld"``).
    """
    def forward(self, hidden: torch.Tensor, loss_inputs: dict | None = None):
        if loss_inputs is None:
            return F.linear(hidden, self.weight, self.bias)
        if loss_inputs.get("cross_tokenizer") == "uld":
            from dist_distill.losses.fused_uld import fused_linear_uld_loss

            kw = {k: v for k, v in loss_inputs.items() if k != "cross_tokenizer"}
            return fused_linear_uld_loss(hidden, self.weight, bias=self.bias, return_parts=True, **kw)
        from dist_distill.kernels import fused_linear_distill_loss

        return fused_linear_distill_loss(hidden, self.weight, bias=self.bias, return_parts=True, **loss_inputs)

    head.forward = types.MethodType(forward, head)


def unfused_output_loss(logits: torch.Tensor, labels: torch.Tensor, teacher: TeacherSignal | None, spec: LossSpec,
                        vocab_size: int) -> tuple[torch.Tensor, dict]:
    """Reference path with materialised logits [n, V]: (loss sum, {"div": sum, "ce": sum})."""
    from dist_distill.losses import divergence, topk_divergence

    student = logits[:, :vocab_size].float()
    ce = F.cross_entropy(student, labels, reduction="sum")
    if teacher is None:
        return ce, {"div": torch.zeros_like(ce).detach(), "ce": ce.detach()}
    if spec.cross_tokenizer == "uld":
        from dist_distill.losses.uld import uld_topk

        u = teacher.uld_inputs(spec.temperature)
        uld = uld_topk(student[u["aligned_rows"]], u["teacher_probs"], u["teacher_tail"], spec.temperature).sum()
        return spec.ce_weight * ce + spec.uld_weight * uld, {"div": uld.detach(), "ce": ce.detach()}
    kw = dict(temperature=spec.temperature, scale_by_t2=spec.scale_by_t2, beta=spec.beta,
              skew_alpha=spec.skew_alpha, vocab_size=vocab_size, reduction="sum")
    if teacher.topk is not None:
        ids, top, lse, *log_tail = teacher.loss_inputs(spec.temperature, spec.tail)["teacher_topk"]
        div = topk_divergence(student, ids, top, lse, spec.kind, tail=spec.tail,
                              teacher_log_tail=log_tail[0] if log_tail else None, **kw)
    else:
        t_logits = F.linear(teacher.hidden.float(), teacher.weight.float(),
                            None if teacher.bias is None else teacher.bias.float())
        div = divergence(student, t_logits[:, :vocab_size], spec.kind, **kw)
    loss = (1.0 - spec.ce_weight) * div + spec.ce_weight * ce
    return loss, {"div": div.detach(), "ce": ce.detach()}


class DistillationModule(nn.Module):
    """student (an HF causal LM) + projections for intermediate terms; DeepSpeed trains this module.

    forward(input_ids, attention_mask, targets int64 [B, L], teacher: TeacherSignal | None,
    step: StepSettings) -> (loss SUM over the micro-batch's target tokens, fp32 scalar;
    parts: dict of detached fp32 sums "div", "ce", "hidden", "attention").
    Hidden-state and attention terms are averaged over mapped layer pairs and, like the
    output term, summed over target tokens; the caller divides by the step's token count.
    """

    def __init__(self, student: nn.Module, loss: LossSpec, vocab_size: int,
                 intermediate: IntermediateSpec | None = None, teacher_config=None,
                 uses_hidden: bool = False, uses_attention: bool = False):
        super().__init__()
        self.student = student
        self.loss_spec = loss
        self.vocab_size = vocab_size
        self.intermediate = intermediate or IntermediateSpec()
        self.layer_pairs: list[tuple[int, int]] = []
        self.projections = nn.ModuleList()
        if uses_hidden or uses_attention:
            self.layer_pairs = _layer_pairs(self.intermediate, teacher_config, student.config)
        if uses_hidden:
            self.projections.extend(make_projection(self.intermediate.projection, student.config.hidden_size,
                                                    teacher_config.hidden_size, key="intermediate.projection")
                                    for _ in self.layer_pairs)
        if loss.fused:
            install_loss_head(student.get_output_embeddings())

    def register_external_parameters(self) -> None:
        """Under ZeRO-3, let this module's forward read the projections' weights (for their L2 penalty)."""
        import deepspeed

        for p in self.projections.parameters():
            deepspeed.zero.register_external_parameter(self, p)

    def _loss_inputs(self, labels: torch.Tensor, teacher: TeacherSignal | None, temperature: float) -> dict:
        s = self.loss_spec
        inputs = dict(labels=labels, vocab_size=self.vocab_size, reduction="sum", backend=s.backend,
                      chunk_bytes=int(s.chunk_mib * 2**20))
        if teacher is None:
            # hard labels only: CE through the same fused path (the divergence against itself is 0)
            return dict(inputs, kind="fkl", ce_weight=1.0, teacher_topk=_self_topk(labels))
        if s.cross_tokenizer == "uld":  # CE on every student target + ULD on the rows paired with teacher rows
            return dict(labels=labels, vocab_size=self.vocab_size, chunk_bytes=inputs["chunk_bytes"],
                        cross_tokenizer="uld", temperature=temperature, ce_weight=s.ce_weight,
                        uld_weight=s.uld_weight, **teacher.uld_inputs(temperature))
        return dict(inputs, kind=s.kind, temperature=temperature, scale_by_t2=s.scale_by_t2, beta=s.beta,
                    skew_alpha=s.skew_alpha, tail=s.tail, ce_weight=s.ce_weight, **teacher.loss_inputs(temperature, s.tail))

    def _output_loss(self, hidden, labels, teacher, temperature):
        head = self.student.get_output_embeddings()
        if self.loss_spec.fused:
            return head(hidden, self._loss_inputs(labels, teacher, temperature))
        spec = dataclasses.replace(self.loss_spec, temperature=temperature)
        return unfused_output_loss(head(hidden), labels, teacher, spec, self.vocab_size)

    def _attention_term(self, student_attn, teacher_attn, attention_mask, target_mask) -> torch.Tensor:
        """Attention KL as a SUM over target tokens: rows and key columns of all real tokens (attention
        rows are distributions over every real key), averaged, times the micro-batch's target count."""
        total, rows = attention_transfer_loss(student_attn, teacher_attn, attention_mask.bool(),
                                              self.intermediate.attention_heads)
        return total / rows.clamp(min=1) * target_mask.sum()

    def forward(self, input_ids, attention_mask, targets, teacher: TeacherSignal | None = None,
                step: StepSettings | None = None, position_ids=None):
        """position_ids: None, or int64 like input_ids for a packed batch (then attention_mask is the 4-D block
        mask, or None under flash_attention_2: data.packing.packed_model_inputs)."""
        step = step or StepSettings(temperature=self.loss_spec.temperature)
        w = step.weights
        need_hidden, need_attn = w.get("hidden", 0.0) > 0, w.get("attention", 0.0) > 0
        out = self.student.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                         output_hidden_states=need_hidden, output_attentions=need_attn)
        mask = targets != IGNORE_INDEX
        loss, parts = self._output_loss(out.last_hidden_state[mask], targets[mask], teacher, step.temperature)
        loss = w.get("output", 1.0) * loss
        zero = torch.zeros((), device=loss.device)
        parts = dict(parts, hidden=zero, attention=zero)
        if need_hidden:
            hidden = sum(hidden_state_loss(layer_hidden(out.hidden_states, s, "student"),
                                           layer_hidden(teacher.layer_hidden, t, "teacher"),
                                           proj, mask, self.intermediate.hidden_loss)[0]
                         for (s, t), proj in zip(self.layer_pairs, self.projections)) / len(self.layer_pairs)
            loss = loss + w["hidden"] * hidden
            parts["hidden"] = hidden.detach()
        if need_attn:
            attn = sum(self._attention_term(layer_attention(out.attentions, s, "student"),
                                            layer_attention(teacher.attentions, t, "teacher"), attention_mask, mask)
                       for s, t in self.layer_pairs) / len(self.layer_pairs)
            loss = loss + w["attention"] * attn
            parts["attention"] = attn.detach()
        if self.intermediate.projection_l2 > 0 and len(self.projections) and step.l2_scale > 0:
            loss = loss + self.intermediate.projection_l2 * step.l2_scale * projection_l2(self.projections)
        return loss, parts


@dataclass
class StepSettings:
    """What changes from step to step: term weights, temperature, and the L2 scale.

    l2_scale: factor that turns the once-per-step L2 penalty into a per-micro-batch SUM term,
    (step target tokens) / (world size * grad_accum), so that after the trainer's division by
    the step's token count it contributes exactly projection_l2 * L2 per optimizer step.
    """

    weights: dict = field(default_factory=lambda: {"output": 1.0, "hidden": 0.0, "attention": 0.0})
    temperature: float = 1.0
    l2_scale: float = 0.0


def replay_settings(step: StepSettings) -> StepSettings:
    """The settings of a replay micro-batch (data/replay.py) at the step whose settings are `step`: the
    output term alone at weight 1 (with no teacher signal the output term is hard-label CE), no hidden
    or attention term, no projection L2 (it is counted once per step on the main micro-batches)."""
    return StepSettings(weights={"output": 1.0, "hidden": 0.0, "attention": 0.0},
                        temperature=step.temperature, l2_scale=0.0)


def _layer_pairs(spec: IntermediateSpec, teacher_config, student_config) -> list[tuple[int, int]]:
    nt, ns = teacher_config.num_hidden_layers, student_config.num_hidden_layers
    if spec.layer_map is None:
        return uniform_layer_map(nt, ns)
    return check_layer_map(spec.layer_map, nt, ns, key="intermediate.layer_map")


def _self_topk(labels: torch.Tensor):
    """A one-hot 'teacher' at the labels; with ce_weight=1 only the CE term counts."""
    n = labels.shape[0]
    return labels[:, None], torch.zeros(n, 1, device=labels.device), torch.zeros(n, device=labels.device)
