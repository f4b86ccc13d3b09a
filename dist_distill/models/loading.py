"""Loading models and tokenizers through `from_pretrained`, with clear errors for bad paths."""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path

import torch

from dist_distill.errors import UserError
from dist_distill.recipe import ModelSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "float64": torch.float64}


def resolve_dtype(name: str) -> torch.dtype:
    """Recipe dtype name -> torch dtype; "auto" is bfloat16 on a CUDA device that supports it, else float32."""
    if name == "auto":
        cuda_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if cuda_bf16 else torch.float32
    return DTYPES[name]


def resolve_attn_implementation(name: str) -> str:
    """"auto" -> flash_attention_2 when flash-attn is importable and CUDA is present, else sdpa."""
    if name != "auto":
        if name == "flash_attention_2" and not (torch.cuda.is_available() and importlib.util.find_spec("flash_attn")):
            raise UserError("attn_implementation=flash_attention_2 needs CUDA and the flash-attn package "
                            "(pip install 'dist_distill[gpu]'); use attn_implementation=sdpa or auto")
        return name
    if torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


def _looks_local(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or Path(name).exists() or name.count("/") > 1


def check_model_source(spec: ModelSpec, role: str) -> None:
    """Refuse a local model path that does not exist or holds no config.json, naming the recipe key."""
    name = spec.name_or_path
    if not name:
        raise UserError(f"{role}.name_or_path is empty: give a hub name or a local model directory")
    if _looks_local(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise UserError(f"{role}.name_or_path={name}: no such model directory (expected a directory "
                            "with config.json and *.safetensors, e.g. one written by save_pretrained)")
        if not (path / "config.json").is_file():
            raise UserError(f"{role}.name_or_path={name}: the directory has no config.json; "
                            "is it a Hugging Face model directory?")


def load_tokenizer(spec: ModelSpec, role: str):
    """The tokenizer stored with a model (hub or local directory)."""
    from transformers import AutoTokenizer

    check_model_source(spec, role)
    try:
        return AutoTokenizer.from_pretrained(spec.name_or_path, revision=spec.revision,
                                             trust_remote_code=spec.trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load the tokenizer of {role}.name_or_path={spec.name_or_path}: {err}") from None


def load_model(spec: ModelSpec, role: str, **kwargs):
    """A causal LM via `AutoModelForCausalLM.from_pretrained`, dtype and attention from the recipe.

    Under an active `HfDeepSpeedConfig` with ZeRO-3, transformers builds the model inside
    `deepspeed.zero.Init`, so no rank ever holds the whole model.
    """
    from transformers import AutoModelForCausalLM

    check_model_source(spec, role)
    try:
        return AutoModelForCausalLM.from_pretrained(
            spec.name_or_path, revision=spec.revision, dtype=resolve_dtype(spec.dtype),
            attn_implementation=resolve_attn_implementation(spec.attn_implementation),
            trust_remote_code=spec.trust_remote_code, use_safetensors=True, **kwargs)
    except OSError as err:
        raise UserError(f"cannot load {role}.name_or_path={spec.name_or_path}: {err}") from None


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 of the vocabulary (token -> id, sorted) and special tokens; equal iff token ids mean the same."""
    payload = {"vocab": sorted(tokenizer.get_vocab().items()),
               "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}}
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()


def model_fingerprint(spec: ModelSpec) -> dict:
    """Name, revision and a hash of config.json of a model (what a cache was built from)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(spec.name_or_path, revision=spec.revision,
                                        trust_remote_code=spec.trust_remote_code)
    config_hash = hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest()
    return {"name_or_path": spec.name_or_path, "revision": spec.revision, "config_sha256": config_hash}


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer in the backward pass (non-reentrant torch checkpointing, which works
    with ZeRO-3's parameter hooks and inputs that need no grad) and put the model in training mode
    (transformers checkpoints only while training). transformers >= 5 calls it activation checkpointing."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
