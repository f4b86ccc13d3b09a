"""dd-export: write a DeepSpeed ZeRO checkpoint of a student as a Hugging Face directory (safetensors).

The library is dist_distill.models.export.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dist_distill.errors import run_cli
from dist_distill.models.export import export_checkpoint, quantize_8bit


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dd-export", description="Write a DeepSpeed ZeRO checkpoint of a student "
                                     "as a Hugging Face model directory with safetensors weights.")
    parser.add_argument("checkpoint_dir", help="the run's checkpoints/ directory (holding step-N/ and latest)")
    parser.add_argument("--model-dir", required=True, help="directory with the student's config.json and tokenizer")
    parser.add_argument("--out", required=True, help="target directory for the Hugging Face model")
    parser.add_argument("--tag", default=None, help="checkpoint tag, e.g. step-300 (default: the newest committed one)")
    parser.add_argument("--quantize", choices=["none", "8bit"], default="none",
                        help="8bit: also write a bitsandbytes LLM.int8 copy at <out>-8bit, with its measured "
                             "memory in quantization.json")
    parser.add_argument("--load-pickled", action="store_true",
                        help="load the checkpoint files with torch.load(weights_only=False), which runs code stored in "
                             "them: only for checkpoints you wrote yourself (default: weights_only=True)")
    args = parser.parse_args(argv)
    target = export_checkpoint(args.checkpoint_dir, args.model_dir, args.out, args.tag, args.load_pickled)
    print(f"exported to {target}")
    if args.quantize == "8bit":
        q_target = Path(args.out).with_name(Path(args.out).name + "-8bit")
        report = quantize_8bit(target, q_target)
        print(f"8-bit model at {q_target}: memory {report['footprint_bytes_8bit'] / 2**20:.2f} MiB vs "
              f"{report['footprint_bytes_full'] / 2**20:.2f} MiB full precision ({report['footprint_ratio']:.1%}), "
              f"max |logit diff| {report['logits_max_abs_diff']:.4f} on {report['probe']}")
    return 0


def cli() -> None:
    """Console-script entry point: bad input exits 2 with a one-paragraph message."""
    raise SystemExit(run_cli(main, "dd-export"))


if __name__ == "__main__":
    cli()
