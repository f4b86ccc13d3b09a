"""Load a Hugging Face causal LM straight into tensor-parallel shards: no rank ever holds it whole.

The model is built with its parameters on the meta device (``accelerate.init_empty_weights``,
buffers such as rotary frequencies real), sharded by a ``parallelize_module`` plan (meta
DTensors: placements and global shapes, no storage), and each parameter is then read from the
checkpoint's safetensors files as just this rank's slice (``safe_open(...).get_slice``). Peak
memory per rank: its shards plus the replicated parameters (embeddings, norms), not the model.

Shard(d) slices follow DTensor's layout: chunks of ceil(N / n) rows along d, the last ones
shorter or empty.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
import torch.distributed as dist

from dist_distill.errors import UserError
from dist_distill.models.loading import checkpoint_files


def shard_slices(shape: torch.Size, placements, mesh_size: int, rank: int) -> tuple[slice, ...]:
    """This rank's slice of a tensor of global `shape` under a 1-D mesh's `placements`."""
    from torch.distributed.tensor import Shard

    slices = [slice(None)] * len(shape)
    for p in placements:
        if isinstance(p, Shard):
            n = shape[p.dim]
            chunk = -(-n // mesh_size)
            lo = min(rank * chunk, n)
            slices[p.dim] = slice(lo, min(lo + chunk, n))
    return tuple(slices)


def load_tp_sharded(spec, tp_mesh, plan_fn, device: torch.device, config=None):
    """The causal LM of `spec` (its `config`, read here when None), sharded over the 1-D `tp_mesh` by
    ``plan_fn(model)``, on `device`, in eval mode without gradients; each rank reads only its
    slices from disk."""
    from accelerate import init_empty_weights
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor.parallel import parallelize_module
    from transformers import AutoConfig, AutoModelForCausalLM

    from dist_distill.models.loading import check_model_source, resolve_attn_implementation, resolve_dtype

    if config is None:
        check_model_source(spec, "teacher")
        config = AutoConfig.from_pretrained(spec.name_or_path, revision=spec.revision,
                                            trust_remote_code=spec.trust_remote_code)
    dtype = resolve_dtype(spec.dtype)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=spec.trust_remote_code,
                                                 attn_implementation=resolve_attn_implementation(spec.attn_implementation))
    parallelize_module(model, tp_mesh, plan_fn(model))
    files = checkpoint_files(spec)
    rank, size = tp_mesh.get_local_rank(), tp_mesh.size()
    with contextlib.ExitStack() as stack:  # each safetensors file opened once, closed at the end
        handles = {}
        for name, param in list(model.named_parameters()):
            if name not in files:
                raise UserError(f"teacher {spec.name_or_path}: parameter {name} is not in its safetensors files")
            path = files[name]
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(str(path), "pt", device="cpu"))
            sliced = handles[path].get_slice(name)
            if tuple(sliced.get_shape()) != tuple(param.shape):
                raise UserError(f"teacher {spec.name_or_path}: {name} has shape {tuple(sliced.get_shape())} in "
                                f"{path.name}, the model's config expects {tuple(param.shape)}")
            if isinstance(param, DTensor):
                local = sliced[shard_slices(param.shape, param.placements, size, rank)].to(device=device, dtype=dtype)
                value = DTensor.from_local(local, tp_mesh, param.placements, run_check=False, shape=param.shape,
                                           stride=param.stride())
            else:
                value = sliced[:].to(device=device, dtype=dtype)
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner).register_parameter(leaf, torch.nn.Parameter(value, requires_grad=False))
    for name, buf in model.named_buffers():
        if buf.device != device:
            owner, _, leaf = name.rpartition(".")
            model.get_submodule(owner)._buffers[leaf] = buf.to(device)  # keeps its persistence flag
    return model.eval()


# ---- the Megatron-style plan, 8-bit shards, vocabulary slices ------------------------------------------
COLWISE = ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj")
ROWWISE = ("o_proj", "down_proj")


def tp_plan(model) -> dict:
    """Megatron-style plan for Llama/Qwen2-like decoders (DESIGN fact 8, checked): q/k/v/gate/up
    column-parallel, o/down row-parallel, lm_head column-parallel keeping each rank's vocab slice."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {}
    for name, _ in model.named_modules():
        leaf = name.rsplit(".", 1)[-1]
        if leaf in COLWISE:
            plan[name] = ColwiseParallel()
        elif leaf in ROWWISE:
            plan[name] = RowwiseParallel()
    plan["lm_head"] = ColwiseParallel(use_local_output=True)
    return plan


def check_tp_shape(config, tp_size: int) -> None:
    for key in ("num_attention_heads", "num_key_value_heads", "intermediate_size"):
        value = getattr(config, key, None)
        if value is not None and value % tp_size:
            raise UserError(f"teacher_source.tp_size={tp_size} must divide the teacher's {key}={value}")
    if getattr(config, "tie_word_embeddings", False):
        raise UserError("the group teacher shards lm_head by vocabulary; a teacher with tied embeddings is not "
                        "supported yet (use teacher_source.kind=cache or colocated)")


def load_teacher_shards(spec, tp_mesh, device, load_in_8bit: bool = False):
    """The teacher of `spec` read from disk as this rank's TP shards only (no rank loads it whole),
    optionally with its sharded projections in bitsandbytes LLM.int8 (`quantize_tp_projections`);
    returns (model, vocab offset of this rank's slice)."""
    from transformers import AutoConfig

    from dist_distill.models.loading import check_model_source
    from dist_distill.teacher.tensor_parallel import load_tp_sharded

    check_model_source(spec, "teacher")
    config = AutoConfig.from_pretrained(spec.name_or_path, revision=spec.revision,
                                        trust_remote_code=spec.trust_remote_code)
    check_tp_shape(config, tp_mesh.size())
    model = load_tp_sharded(spec, tp_mesh, tp_plan, device, config)
    if load_in_8bit:
        quantize_tp_projections(model, tp_mesh.get_group(), device)
    return model, vocab_offset(model, tp_mesh)


class RowParallelOutput(torch.nn.Module):
    """A row-parallel projection on local tensors: this rank's partial product, summed over the TP
    group, plus the (replicated) bias -- what ``RowwiseParallel`` does with DTensors."""

    def __init__(self, local: torch.nn.Module, bias: torch.Tensor | None, group):
        super().__init__()
        self.local, self.group = local, group
        self.register_buffer("bias", bias, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.local(x)
        dist.all_reduce(y, group=self.group)
        return y if self.bias is None else y + self.bias


def quantize_tp_projections(model, group, device) -> None:
    """Replace the sharded q/k/v/gate/up (column-parallel) and o/down (row-parallel) projections by
    bitsandbytes LLM.int8 linears of this rank's weight slice (per-row int8 scales of the slice),
    working on local tensors: column-parallel ones take the replicated input and give this rank's
    output columns, row-parallel ones are wrapped in `RowParallelOutput`. The lm_head stays in
    the teacher's dtype (as transformers' 8-bit loading keeps it), vocab-parallel."""
    import bitsandbytes as bnb
    from torch.distributed.tensor import DTensor

    from dist_distill.teacher.colocated import bnb_kwargs

    bnb_kwargs("8bit", device, "teacher_source.load_in_8bit")  # refuses an unusable bitsandbytes clearly
    for name, module in list(model.named_modules()):
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in COLWISE + ROWWISE or not isinstance(module.weight, DTensor):
            continue
        weight = module.weight.to_local()
        bias = module.bias.to_local() if isinstance(module.bias, DTensor) else module.bias
        rowwise = leaf in ROWWISE
        int8 = bnb.nn.Linear8bitLt(weight.shape[1], weight.shape[0], bias=bias is not None and not rowwise,
                                   has_fp16_weights=False, threshold=6.0)
        state = {"weight": weight.detach().float().cpu()}
        if bias is not None and not rowwise:
            state["bias"] = bias.detach().float().cpu()
        int8.load_state_dict(state)
        int8 = int8.to(device)  # quantises the weight to int8 here
        replacement = RowParallelOutput(int8, None if bias is None else bias.detach(), group) if rowwise else int8
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner), attr, replacement.requires_grad_(False))


def vocab_offset(model, tp_mesh) -> int:
    """First vocabulary id of this rank's lm_head slice."""
    weight = model.get_output_embeddings().weight.to_local()
    local = weight.shape[0]
    # on the weight's device: the TP group is NCCL on GPUs, which refuses CPU tensors
    sizes = [torch.zeros(1, dtype=torch.int64, device=weight.device) for _ in range(tp_mesh.size())]
    dist.all_gather(sizes, torch.tensor([local], device=weight.device), group=tp_mesh.get_group())
    offset = int(sum(s.item() for s in sizes[:tp_mesh.get_local_rank()]))
    return offset

