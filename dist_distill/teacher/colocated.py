"""A frozen teacher replicated on every student rank (optionally 8-bit), run on the student's batch."""

from __future__ import annotations

import torch

from dist_distill.data.records import IGNORE_INDEX
from dist_distill.teacher.signal import TeacherSignal


def bnb_kwargs(bits: str, device: torch.device, what: str) -> dict:
    """``from_pretrained`` arguments that load a model with bitsandbytes "8bit" (LLM.int8) or "4bit"
    (NF4, bf16 compute) weights on `device` (CUDA, or the CPU: bitsandbytes >= 0.45 runs both there)."""
    from dist_distill.errors import UserError

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

    @property
    def attn_implementation(self) -> str:
        return self.model.config._attn_implementation

    @torch.no_grad()
    def signal(self, indices: torch.Tensor, batch: dict) -> TeacherSignal:
        """`batch`: input_ids, attention_mask, targets and, for a packed batch, position_ids, laid out for this
        teacher's attention implementation (data.packing.packed_model_inputs): the student's tokens exactly."""
        out = self.model.get_decoder()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                       position_ids=batch.get("position_ids"),
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
    from dist_distill.models.loading import load_model

    if not load_in_8bit:
        return load_model(spec, "teacher").to(device)
    return load_model(spec, "teacher", **bnb_kwargs("8bit", device, "teacher_source.load_in_8bit"))
