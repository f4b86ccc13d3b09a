"""The DeepSpeed JSON config generated from a recipe."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dist_distill.errors import UserError
from dist_distill.recipe import Recipe


def deepspeed_config(recipe: Recipe, world_size: int) -> dict:
    """The DeepSpeed JSON generated from the recipe, with `deepspeed.config` keys merged on top."""
    op, ds = recipe.optim, recipe.deepspeed
    precision = ds.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    config = {
        "train_micro_batch_size_per_gpu": op.micro_batch_size,
        "gradient_accumulation_steps": op.grad_accum,
        "train_batch_size": op.micro_batch_size * op.grad_accum * world_size,
        "gradient_clipping": op.grad_clip,
        "zero_optimization": {"stage": ds.zero_stage, "stage3_gather_16bit_weights_on_model_save": True},
        "bf16": {"enabled": precision == "bf16"},
        "fp16": {"enabled": precision == "fp16"},
        # torch's AdamW, except for optimizer states offloaded from CUDA: DeepSpeed's CPU Adam (a built op)
        "optimizer": {"type": "AdamW", "params": {"lr": op.lr, "betas": list(op.betas), "eps": 1e-8,
                                                  "weight_decay": op.weight_decay,
                                                  "torch_adam": not (ds.offload_optimizer != "none" and
                                                                     torch.cuda.is_available())}},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    zero = config["zero_optimization"]
    if ds.offload_optimizer != "none":  # ZeRO-Offload: fp32 states and the Adam step on the host (pinned)
        zero["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": torch.cuda.is_available()}
    if ds.offload_params != "none":  # ZeRO-Infinity-style parameter offload of the 16-bit partitions
        zero["offload_param"] = {"device": ds.offload_params, "pin_memory": torch.cuda.is_available()}
    if ds.config:
        path = Path(ds.config)
        if not path.is_file():
            raise UserError(f"deepspeed.config={ds.config}: no such DeepSpeed JSON file")
        _deep_update(config, json.loads(path.read_text()))
    return config


def _deep_update(base: dict, extra: dict) -> None:
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = value

