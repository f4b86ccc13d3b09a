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
        raise UserError(f"{spec.name_or_path}: no model.safetensors or model.safetensors.index.json (this "
                        "project loads safetensors checkpoints only)")
    from safetensors import safe_open

    with safe_open(single, "pt") as f:
        return {name: Path(single) for name in f.keys()}


SAMPLED_BLOCKS = 16
SAMPLE_BYTES = 1 << 20


def weights_digest(files) -> str:
    """sha256 over each safetensors file (sorted by name) of: its header (tensor names, dtypes, shapes,
    offsets), its size, and SAMPLED_BLOCKS blocks of SAMPLE_BYTES spread evenly over its data.

    Sampled, not whole: hashing a 140 GB teacher at ~1 GB/s would add minutes to every training start
    and cache build; 16 MiB per file is read instead. Any retraining or fine-tuning changes every
    block, so a retrained teacher is caught; a change confined to unsampled bytes is not (dd-cache
    verify's shard checksums cover the cache itself, not the teacher).
    """
    import struct

    digest = hashlib.sha256()
    for path in sorted(set(Path(f) for f in files), key=lambda p: p.name):
        size = path.stat().st_size
        with open(path, "rb") as f:
            (head_len,) = struct.unpack("<Q", f.read(8))
            digest.update(path.name.encode() + size.to_bytes(8, "little") + f.read(head_len))
            data_start = 8 + head_len
            span = max(size - data_start - SAMPLE_BYTES, 0)
            for i in range(SAMPLED_BLOCKS):
                f.seek(data_start + span * i // max(SAMPLED_BLOCKS - 1, 1))
                digest.update(f.read(SAMPLE_BYTES))
    return digest.hexdigest()


def model_fingerprint(spec: ModelSpec, tokenizer=None) -> dict:
    """What a model is, not where it lies: hashes of its config (without ``_name_or_path`` and the
    transformers version), of its weights (`weights_digest`) and of its tokenizer's vocabulary; the
    name and revision are kept for the reader but not compared (a moved teacher is the same teacher,
    a retrained one at the same path is not)."""
    from transformers import AutoConfig

    check_model_source(spec, "teacher")  # a local path that is not there is an error, not a skipped check
    config = AutoConfig.from_pretrained(spec.name_or_path, revision=spec.revision,
                                        trust_remote_code=spec.trust_remote_code).to_dict()
    for key in ("_name_or_path", "transformers_version"):
        config.pop(key, None)
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec, "teacher")
    return {"name_or_path": spec.name_or_path, "revision": spec.revision, "config_sha256": config_hash,
            "weights_sha256": weights_digest(checkpoint_files(spec).values()),
            "tokenizer_sha256": tokenizer_fingerprint(tokenizer)}


FINGERPRINT_KEYS = ("config_sha256", "weights_sha256", "tokenizer_sha256")
"""The fields of model_fingerprint that say what a model is (compared); the others say where it was."""


def enable_activation_checkpointing(model) -> None:
    """Recompute each decoder layer in the backward pass (non-reentrant torch checkpointing, which works
    with ZeRO-3's parameter hooks and inputs that need no grad) and put the model in training mode
    (transformers checkpoints only while training). transformers >= 5 calls it activation checkpointing."""
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
