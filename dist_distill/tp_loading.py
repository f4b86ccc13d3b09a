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

from .errors import UserError


def checkpoint_files(spec) -> dict[str, Path]:
    """Parameter name -> safetensors file of the checkpoint `spec` names (a local directory or a hub
    name, through transformers' file cache; one file or an index of shards)."""
    from transformers.utils import cached_file

    kw = {"revision": spec.revision, "_raise_exceptions_for_missing_entries": False}
    index = cached_file(spec.name_or_path, "model.safetensors.index.json", **kw)
    if index is not None:
        weight_map = json.loads(Path(index).read_text())["weight_map"]
        folder = Path(index).parent
        files = {f: Path(cached_file(spec.name_or_path, f, revision=spec.revision)) if not (folder / f).is_file()
                 else folder / f for f in set(weight_map.values())}
        return {name: files[f] for name, f in weight_map.items()}
    single = cached_file(spec.name_or_path, "model.safetensors", **kw)
    if single is None:
        raise UserError(f"teacher {spec.name_or_path}: no model.safetensors or model.safetensors.index.json (the "
                        "group teacher loads safetensors checkpoints only)")
    from safetensors import safe_open

    with safe_open(single, "pt") as f:
        return {name: Path(single) for name in f.keys()}


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

    from .models import check_model_source, resolve_attn_implementation, resolve_dtype

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
