"""Export a trained student as a Hugging Face directory (config, tokenizer, safetensors weights).

Two ways in: at the end of training (the engine gathers its ZeRO-3 partitions), or later
from a DeepSpeed checkpoint directory with ``dd-export``. The target directory is written
beside its final name and renamed into place only when complete, so an interrupted export
never leaves a directory that looks whole, and an older export is replaced only then.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from dist_distill.errors import UserError


def write_hf_model(model, state_dict: dict | None, tokenizer, target: str | Path, recipe=None, extra: dict | None = None) -> Path:
    """Save `model`'s config with `state_dict` (None: the model's own) as safetensors, plus tokenizer,
    recipe and `extra` JSON files ({file name: object}), atomically."""
    target = Path(target)
    tmp = target.with_name(target.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    if recipe is not None:
        recipe.save(tmp / "recipe.yaml")
    for name, obj in (extra or {}).items():
        (tmp / name).write_text(json.dumps(obj, indent=2) + "\n")
    _publish(tmp, target)
    return target


def _publish(tmp: Path, target: Path) -> None:
    """Move the finished directory `tmp` to `target`; an older `target` is removed only after that."""
    old = target.with_name(target.name + ".old")
    if target.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(tmp, target)
    if old.exists():
        shutil.rmtree(old)


@contextlib.contextmanager
def outside_zero3_init():
    """Within the block, ``from_pretrained`` builds whole models, even in a training process whose
    ``HfDeepSpeedConfig`` (ZeRO-3) is still alive: there it would partition the new model and
    broadcast -- a collective that hangs when one rank alone exports."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref  # transformers keeps no public getter
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed._hf_deepspeed_config_weak_ref = ref


QUANT_REPORT = "quantization.json"
PROBE_SHAPE = (4, 64)  # token ids of the logit comparison: batch x length, drawn with a fixed seed


def quantize_8bit(source: str | Path, target: str | Path) -> dict:
    """Write the Hugging Face model in `source` as a bitsandbytes LLM.int8 model directory at `target`.

    Every ``nn.Linear`` but the lm_head becomes ``bnb.nn.Linear8bitLt`` (int8 weights, per-row
    scales; outlier threshold 6.0); the weights are saved as safetensors with the
    quantisation config in config.json, so ``from_pretrained(target)`` loads it 8-bit again.
    Runs on CUDA when available, else on the CPU (bitsandbytes >= 0.45 has CPU int8 kernels).
    Returns, and writes to `target`/quantization.json, what was measured: the models' memory
    footprints in bytes (``get_memory_footprint``: parameters and buffers), the saved weight
    bytes, and the max / mean absolute logit difference to the full-precision model on
    ``PROBE_SHAPE`` random token ids. Both models are in memory at once (the full one in its
    saved dtype): run it where the student fits twice, e.g. ``dd-export --quantize 8bit`` on a
    large node after training.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dist_distill.teacher.colocated import bnb_kwargs

    source = Path(source)
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    kwargs = bnb_kwargs("8bit", device, "8-bit export")
    with outside_zero3_init():
        full = AutoModelForCausalLM.from_pretrained(source, dtype="auto").to(device).eval()
        try:
            quant = AutoModelForCausalLM.from_pretrained(source, **kwargs).eval()
        except (RuntimeError, ValueError, NotImplementedError) as err:
            raise UserError(f"8-bit export of {source} is not supported on this machine ({device}): {err}") from None
    gen = torch.Generator().manual_seed(0)
    probe = torch.randint(0, full.config.vocab_size, PROBE_SHAPE, generator=gen).to(device)
    with torch.no_grad():
        diff = (quant(probe).logits.float() - full(probe).logits.float()).abs()
    report = {"method": "bitsandbytes LLM.int8 (load_in_8bit, threshold 6.0)", "device": device.type,
              "footprint_bytes_full": int(full.get_memory_footprint()),
              "footprint_bytes_8bit": int(quant.get_memory_footprint()),
              "logits_max_abs_diff": float(diff.max()), "logits_mean_abs_diff": float(diff.mean()),
              "probe": f"{PROBE_SHAPE[0]}x{PROBE_SHAPE[1]} random token ids, seed 0"}
    report["footprint_ratio"] = report["footprint_bytes_8bit"] / report["footprint_bytes_full"]
    write_hf_model(quant, None, AutoTokenizer.from_pretrained(source), target, extra={QUANT_REPORT: report})
    report["weights_bytes_8bit"] = sum(f.stat().st_size for f in Path(target).glob("*.safetensors"))
    return report


STUDENT_PREFIX = "student."


def student_state(state: dict) -> dict:
    """The student's own weights from a DistillationModule state dict (drops projections etc.)."""
    return {k[len(STUDENT_PREFIX):]: v for k, v in state.items() if k.startswith(STUDENT_PREFIX)}


def export_checkpoint(checkpoint_dir: str | Path, model_dir: str | Path, target: str | Path, tag: str | None = None,
                      trust_pickles: bool = False) -> Path:
    """Consolidate a ZeRO checkpoint (all ranks' partitions) into fp32 weights and write an HF directory.

    checkpoint_dir: output.dir/checkpoints of a run; tag: e.g. "step-300" (default: the newest committed);
    model_dir: a directory with the student's config.json and tokenizer (the run's initial model).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from dist_distill.training.checkpoint import latest_committed, weights_only_loads

    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        raise UserError(f"checkpoint directory {checkpoint_dir} does not exist")
    if tag is None:
        found = latest_committed(checkpoint_dir)
        if found is None:
            raise UserError(f"{checkpoint_dir} holds no committed checkpoint (a step-N directory with a COMMITTED "
                            "marker); pass --tag to export a specific one")
        tag = found[1].name
    elif not (checkpoint_dir / tag).is_dir():
        raise UserError(f"checkpoint tag {tag} not found in {checkpoint_dir}")
    if not (Path(model_dir) / "config.json").is_file():
        raise UserError(f"--model-dir {model_dir}: no config.json (give the student's model directory)")
    with weights_only_loads(trust_pickles):  # DeepSpeed's consolidation calls torch.load(weights_only=False)
        state = student_state(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag))
    config = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint {checkpoint_dir} does not fit the model in {model_dir}: "
                        f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return write_hf_model(model, model.state_dict(), AutoTokenizer.from_pretrained(model_dir), target)

