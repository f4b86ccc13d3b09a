"""Export a trained student as a Hugging Face directory (config, tokenizer, safetensors weights).

Two ways in: at the end of training (the engine gathers its ZeRO-3 partitions), or later
from a DeepSpeed checkpoint directory with ``dd-export``. The target directory is written
beside its final name and renamed into place only when complete, so an interrupted export
never leaves a directory that looks whole, and an older export is replaced only then.
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

from .errors import UserError, run_cli


def write_hf_model(model, state_dict: dict, tokenizer, target: str | Path, recipe=None) -> Path:
    """Save `model`'s config with `state_dict` as safetensors, plus tokenizer (and recipe), atomically."""
    target = Path(target)
    tmp = target.with_name(target.name + ".partial")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, state_dict=state_dict)
    tokenizer.save_pretrained(tmp)
    if recipe is not None:
        recipe.save(tmp / "recipe.yaml")
    old = target.with_name(target.name + ".old")
    if target.exists():
        if old.exists():
            shutil.rmtree(old)
        os.replace(target, old)
    os.replace(tmp, target)
    if old.exists():
        shutil.rmtree(old)
    return target


STUDENT_PREFIX = "student."


def student_state(state: dict) -> dict:
    """The student's own weights from a DistillationModule state dict (drops projections etc.)."""
    return {k[len(STUDENT_PREFIX):]: v for k, v in state.items() if k.startswith(STUDENT_PREFIX)}


def export_checkpoint(checkpoint_dir: str | Path, model_dir: str | Path, target: str | Path, tag: str | None = None) -> Path:
    """Consolidate a ZeRO checkpoint (all ranks' partitions) into fp32 weights and write an HF directory.

    checkpoint_dir: output.dir/checkpoints of a run; tag: e.g. "step-300" (default: the newest committed);
    model_dir: a directory with the student's config.json and tokenizer (the run's initial model).
    """
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .checkpoint import latest_committed

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
    state = student_state(get_fp32_state_dict_from_zero_checkpoint(str(checkpoint_dir), tag=tag))
    config = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise UserError(f"checkpoint {checkpoint_dir} does not fit the model in {model_dir}: "
                        f"missing {missing[:5]}, unexpected {unexpected[:5]}")
    return write_hf_model(model, model.state_dict(), AutoTokenizer.from_pretrained(model_dir), target)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dd-export", description="Write a DeepSpeed ZeRO checkpoint of a student "
                                     "as a Hugging Face model directory with safetensors weights.")
    parser.add_argument("checkpoint_dir", help="the run's checkpoints/ directory (holding step-N/ and latest)")
    parser.add_argument("--model-dir", required=True, help="directory with the student's config.json and tokenizer")
    parser.add_argument("--out", required=True, help="target directory for the Hugging Face model")
    parser.add_argument("--tag", default=None, help="checkpoint tag, e.g. step-300 (default: the newest committed one)")
    args = parser.parse_args(argv)
    target = export_checkpoint(args.checkpoint_dir, args.model_dir, args.out, args.tag)
    print(f"exported to {target}")
    return 0


def cli() -> None:
    """Console-script entry point: bad input exits 2 with a one-paragraph message."""
    raise SystemExit(run_cli(main, "dd-export"))


if __name__ == "__main__":
    cli()
