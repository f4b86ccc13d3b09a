"""dd-data prepare: tokenize a recipe's data into the token store once, before training or cache builds.

Every process that reads data (dd-train, dd-cache build, the teacher group, evaluation during training)
builds the store itself on first use; this command does it ahead, e.g. on a CPU node or as a SLURM
array (`torchrun` / srun set RANK and WORLD_SIZE: each rank tokenizes a contiguous range of chunks,
rank 0 publishes). The library is dist_distill.data.store.
"""

from __future__ import annotations

import argparse
import time

from dist_distill.errors import run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dd-data", description="Token stores of a recipe's data.")
    sub = parser.add_subparsers(dest="command", required=True)
    prep = sub.add_parser("prepare", help="tokenize data.train (and data.eval) into the token store if not there yet")
    prep.add_argument("recipe", help="YAML recipe (configs/...)")
    prep.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="override a recipe field, e.g. --set data.max_seq_len=4096 (repeatable)")
    prep.add_argument("--split", choices=["train", "eval", "both"], default="both",
                      help="which of data.train (with data.replay) / data.eval to prepare (default both; each only when set)")
    prep.add_argument("--tokenizer", choices=["student", "teacher"], default="student",
                      help="whose tokenizer (and chat template) to use; they must agree for token-level distillation")
    args = parser.parse_args(argv)

    from dist_distill.data.records import load_tokenized
    from dist_distill.models.loading import load_tokenizer
    from dist_distill.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    tokenizer = load_tokenizer(getattr(recipe, args.tokenizer), args.tokenizer)
    from dist_distill.data.replay import replay_data_spec

    d = recipe.data
    jobs = [("train", d.train, d, d.max_samples)] if args.split in ("train", "both") else []
    if args.split in ("train", "both") and d.replay is not None:  # its own store, without data.augment
        jobs.append(("replay", d.replay.path, replay_data_spec(d), d.replay.max_samples))
    if args.split in ("eval", "both") and d.eval:
        jobs.append(("eval", d.eval, d, None))
    for name, source, spec, limit in jobs:
        t0 = time.monotonic()
        data = load_tokenized(source, tokenizer, spec, limit, progress=True)
        seconds = time.monotonic() - t0
        print(f"dd-data: {name} store ready in {seconds:.1f} s: {data.store.report()}", flush=True)
    return 0


def cli() -> None:
    """Console-script entry point: bad input exits 2 with a one-paragraph message."""
    raise SystemExit(run_cli(main, "dd-data"))


if __name__ == "__main__":
    cli()
