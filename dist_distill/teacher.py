"""Where the teacher's per-token signal comes from: one abstraction, several sources.

Every source answers `signal(indices, batch)` with a :class:`TeacherSignal` whose rows are
the target tokens of the batch (row-major order of ``targets != IGNORE_INDEX``), so the
loss path is the same whichever source a recipe names:

- ``cache``: a top-k logit cache built offline by ``dd-cache build`` (ids, raw logits, lse);
- ``colocated``: a frozen teacher replicated on every student rank, run forward on the same
  batch; it gives its final hidden states and lm_head (a dense teacher for the fused loss)
  and, when intermediate terms need them, its per-layer hidden states and attention maps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import IGNORE_INDEX


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


class CacheTeacher:
    """Reads a teacher top-k cache by sample index."""

    def __init__(self, cache, top_k: int, device: torch.device):
        self.cache, self.top_k, self.device = cache, top_k, device

    def signal(self, indices: torch.Tensor, batch: dict) -> TeacherSignal:
        ids, logits, lse = self.cache.fetch(indices, self.top_k)
        mask = batch["targets"].cpu() != IGNORE_INDEX
        return TeacherSignal(topk=(ids[mask].to(self.device), logits[mask].to(self.device), lse[mask].to(self.device)))


def bnb_kwargs(bits: str, device: torch.device, what: str) -> dict:
    """``from_pretrained`` arguments that load a model with bitsandbytes "8bit" (LLM.int8) or "4bit"
    (NF4, bf16 compute) weights on `device` (CUDA, or the CPU: bitsandbytes >= 0.45 runs both there)."""
    from .errors import UserError

    try:
        import bitsandbytes
        from transformers import BitsAndBytesConfig
    except ImportError as err:
        raise UserError(f"{what} needs bitsandbytes: pip install bitsandbytes ({err})") from None
    if device.type == "cpu" and tuple(int(x) for x in bitsandbytes.__version__.split(".")[:2]) < (0, 45):
        raise UserError(f"{what} on the CPU needs bitsandbytes >= 0.45 (installed: {bitsandbytes.__version__}); "
                        "upgrade it or run on CUDA")
    config = (BitsAndBytesConfig(load_in_8bit=True) if bits == "8bit" else
              BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_type="nf4"))
    return {"quantization_config": config, "device_map": {"": device.index or 0} if device.type == "cuda" else "cpu"}


class ColocatedTeacher:
    """A frozen teacher model on this rank, run forward (no grad) on each micro-batch."""

    def __init__(self, model, need_layers: bool = False, need_attentions: bool = False):
        self.model = model.eval().requires_grad_(False)
        self.need_layers, self.need_attentions = need_layers, need_attentions

    @torch.no_grad()
    def signal(self, indices: torch.Tensor, batch: dict) -> TeacherSignal:
        out = self.model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       output_hidden_states=self.need_layers,
                                       output_attentions=self.need_attentions)
        mask = batch["targets"] != IGNORE_INDEX
        head = self.model.get_output_embeddings()
        return TeacherSignal(hidden=out.last_hidden_state[mask], weight=head.weight, bias=head.bias,
                             layer_hidden=out.hidden_states if self.need_layers else None,
                             attentions=out.attentions if self.need_attentions else None)


def load_colocated_teacher(spec, device: torch.device, load_in_8bit: bool = False):
    """The frozen teacher of a colocated source, replicated on this rank; optionally in 8-bit.

    8-bit: bitsandbytes LLM.int8 weights (about half the memory of bf16, a quarter of fp32) for
    every linear layer but the lm_head; on CUDA, or on the CPU with bitsandbytes >= 0.45.
    """
    from .models import load_model

    if not load_in_8bit:
        return load_model(spec, "teacher").to(device)
    return load_model(spec, "teacher", **bnb_kwargs("8bit", device, "teacher_source.load_in_8bit"))
