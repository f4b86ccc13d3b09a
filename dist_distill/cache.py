"""dd-cache: build, inspect and verify a teacher top-k logit cache (the library is dist_distill.teacher.cache).

    dd-cache build RECIPE [--set KEY=VALUE ...]      # one process
    torchrun --nproc_per_node 8 -m dist_distill.cache build RECIPE --set teacher_source.tp_size=8
                                                     # one teacher tensor-parallel over 8 GPUs
    dd-cache info CACHE_DIR
    dd-cache verify CACHE_DIR
    dd-cache grade RECIPE [--set grading.grades=FILE]  # difficulty grades without a cache (a build writes them too)
"""

from __future__ import annotations

import argparse
import time

import torch

from dist_distill.errors import UserError, run_cli
from dist_distill.teacher.cache import codec
from dist_distill.teacher.cache.reader import TeacherCache, info_text, verify_cache
from dist_distill.teacher.cache.writer import build_cache, finalize_cache


def _cmd_build(args) -> int:
    from dist_distill.recipe import load_recipe
    from dist_distill.training.distributed import init_from_env, mixed_backend

    recipe = load_recipe(args.recipe, args.set)
    rank, world = init_from_env(backend=mixed_backend())
    started = time.time()
    manifest = build_cache(recipe, shard_index=args.shard_index, num_shards=args.num_shards,
                           samples_per_shard=args.samples_per_shard, rank=rank, world_size=world,
                           progress=rank == 0 and not args.quiet, mode=args.mode, max_kl=args.max_kl,
                           quantize=args.quantize, start_over=args.start_over)
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        where = recipe.teacher_source.cache_dir
        if finalize_cache(where, manifest):
            print(f"teacher cache complete: {where} ({time.time() - started:.1f}s)\n" + info_text(where))
        else:
            print(f"this worker's shards are written to {where}; the manifest is written when all shards exist "
                  "(re-run any task, or the last one to finish writes it)")
    return 0


def _cmd_grade(args) -> int:
    from dist_distill.recipe import load_recipe
    from dist_distill.teacher.grading import grade_data
    from dist_distill.training.distributed import init_from_env, mixed_backend

    recipe = load_recipe(args.recipe, args.set)
    rank, world = init_from_env(backend=mixed_backend())
    grade_data(recipe, rank, world, quantize=args.quantize, progress=rank == 0 and not args.quiet)
    return 0


def _cmd_info(args) -> int:
    print(info_text(args.cache_dir))
    return 0


def _cmd_verify(args) -> int:
    n = verify_cache(args.cache_dir)
    print(f"ok: manifest and {n} shards verified in {args.cache_dir}")
    if args.recipe:
        from dist_distill.recipe import load_recipe
        from dist_distill.teacher.sources import expected_cache_fields

        recipe = load_recipe(args.recipe, args.set)
        TeacherCache(args.cache_dir).check_matches(expected_cache_fields(recipe))
        print(f"ok: built for {args.recipe}'s teacher {recipe.teacher.name_or_path} (weights, config, tokenizer) and data")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dd-cache", description="Build, inspect and verify a teacher top-k logit cache.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="run the teacher over the recipe's training data and write the cache")
    build.add_argument("recipe", help="YAML recipe (teacher, data, teacher_source.cache_dir/top_k/batch_size)")
    build.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe field, e.g. --set teacher_source.top_k=32 (repeatable)")
    build.add_argument("--shard-index", type=int, default=0, help="this task's index in a SLURM array (0-based)")
    build.add_argument("--num-shards", type=int, default=1, help="number of tasks sharing the work")
    build.add_argument("--samples-per-shard", type=int, default=4096, help="samples per cache shard file")
    build.add_argument("--mode", choices=codec.MODES, default="kl",
                       help="value coding: kl (lossy, top-k KL per token <= --max-kl) or lossless (default kl)")
    build.add_argument("--max-kl", type=float, default=1e-3,
                       help="mode kl: bound on KL(exact || stored) of each token's top-k distribution, nats (default 1e-3)")
    build.add_argument("--quantize", choices=("none", "8bit", "4bit"), default="none",
                       help="load the teacher with bitsandbytes 8-bit or 4-bit (NF4) weights, on CUDA or the CPU (default none)")
    build.add_argument("--start-over", action="store_true",
                       help="the cache directory was made by another build (teacher, data, settings): move it aside to "
                            "<dir>.old-<time> and build anew (default: refuse, naming what differs)")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    build.set_defaults(func=_cmd_build)
    grade = sub.add_parser("grade", help="score every training sample by the teacher's confidence (mean probability "
                                         "of its target tokens) and write the grades file (grading.grades)")
    grade.add_argument("recipe", help="YAML recipe (teacher, data, grading; teacher_source.tp_size/batch_size)")
    grade.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    grade.add_argument("--quantize", choices=("none", "8bit", "4bit"), default="none",
                       help="load the teacher with bitsandbytes 8-bit or 4-bit weights (default none)")
    grade.add_argument("--quiet", action="store_true", help="no progress bar")
    grade.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    grade.set_defaults(func=_cmd_grade)
    info = sub.add_parser("info", help="print k, tokens, bytes per token and compression of a cache")
    info.add_argument("cache_dir", help="cache directory")
    info.set_defaults(func=_cmd_info)
    verify = sub.add_parser("verify", help="check the manifest and every shard (size, header, sha256)")
    verify.add_argument("cache_dir", help="cache directory")
    verify.add_argument("--recipe", default=None, help="also check that the cache was built for this recipe's teacher "
                                                       "(weights, config, tokenizer) and data")
    verify.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe field")
    verify.set_defaults(func=_cmd_verify)
    args = parser.parse_args(argv)
    if getattr(args, "num_shards", 1) < 1 or not 0 <= getattr(args, "shard_index", 0) < getattr(args, "num_shards", 1):
        raise UserError(f"--shard-index must lie in [0, --num-shards); got {args.shard_index} of {args.num_shards}")
    return args.func(args)


def cli() -> None:
    """Console-script entry point: bad input exits 2 with a one-paragraph message."""
    raise SystemExit(run_cli(main, "dd-cache"))


if __name__ == "__main__":
    cli()
