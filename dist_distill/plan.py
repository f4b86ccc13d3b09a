"""Plan a recipe on a cluster before a GPU hour is spent: per-GPU memory term by term, tokens/s, a dry run.

    dd-plan configs/seed/r1_to_llama70b.yaml --nodes 8 --gpus-per-node 8 --gpu-mem 80GB
    dd-plan configs/seed/r1distill_to_qwen1.5b.yaml --nodes 1 --gpus-per-node 8 --gpu-mem 80GB --dry-run

The models are built from their configs on the meta device (no weights, no network): a 70B student
plans on a laptop. Exit status: 0 when the recipe fits (and, with --dry-run, every check passes),
1 when it does not, 2 on bad input.
"""

from __future__ import annotations

import argparse
import os

import torch

from dist_distill.errors import UserError, run_cli


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dd-plan", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe", help="YAML recipe (see configs/seed/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field, e.g. --set optim.micro_batch_size=2 (repeatable)")
    parser.add_argument("--nodes", type=int, default=1, help="nodes in the job (default 1)")
    parser.add_argument("--gpus-per-node", type=int, default=8, help="GPUs per node (default 8)")
    parser.add_argument("--gpu-mem", default="80GB", help="memory per GPU, e.g. 80GB, 141GB, 80GiB (default 80GB)")
    parser.add_argument("--host-mem", default=None,
                        help="host memory per node (checked against offloaded states), e.g. 2TB; default unchecked")
    parser.add_argument("--mfu", type=float, default=0.40,
                        help="assumed model-FLOPs utilisation for the tokens/s estimate (default 0.40)")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="dense bf16 peak per GPU in TFLOP/s (default 989: H100 SXM; A100: 312)")
    parser.add_argument("--runtime-overhead", default="2GiB",
                        help="per-GPU allowance for CUDA context, NCCL and allocator fragmentation (default 2GiB)")
    parser.add_argument("--target-fraction", type=float, default=1.0,
                        help="share of a micro-batch's tokens that are loss targets (answers), sizing the fused "
                             "loss's rows (default 1.0, the upper bound)")
    parser.add_argument("--student-config", default=None, help="student config.json (or its folder) to plan with")
    parser.add_argument("--teacher-config", default=None, help="teacher config.json (or its folder) to plan with")
    parser.add_argument("--dry-run", action="store_true",
                        help="also run every pre-flight check (vocabularies, layer maps, chunks, cache, layout)")
    parser.add_argument("--print-recipe", action="store_true", help="print the resolved recipe (YAML) first")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    import yaml

    from dist_distill.planning.dryrun import dry_run
    from dist_distill.planning.memory import Cluster, format_plan, parse_size, plan_recipe
    from dist_distill.planning.models import load_architecture
    from dist_distill.recipe import load_recipe

    args = parse_args(argv)
    if not torch.cuda.is_available():  # the plan needs no accelerator: keep DeepSpeed from probing for one
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    recipe = load_recipe(args.recipe, args.set)
    cluster = Cluster(nodes=args.nodes, gpus_per_node=args.gpus_per_node, gpu_mem=parse_size(args.gpu_mem, "--gpu-mem"),
                      peak_tflops=args.peak_tflops, mfu=args.mfu,
                      runtime_overhead=parse_size(args.runtime_overhead, "--runtime-overhead"),
                      host_mem=parse_size(args.host_mem, "--host-mem") if args.host_mem else None)
    cluster.check()
    if args.print_recipe:
        print(yaml.safe_dump(recipe.to_dict(), sort_keys=False))
    student = load_architecture(recipe.student.name_or_path, "student", args.recipe, args.student_config)
    teacher = None
    if recipe.teacher.name_or_path:
        teacher = load_architecture(recipe.teacher.name_or_path, "teacher", args.recipe, args.teacher_config)
    elif args.teacher_config:
        raise UserError("--teacher-config given but the recipe has no teacher.name_or_path")
    if args.dry_run:
        run, plan = dry_run(recipe, student, teacher, cluster, args.recipe, args.target_fraction)
        if plan is not None:
            print(format_plan(plan))
            print()
        print(run.format())
        return 0 if run.passed() else 1
    plan = plan_recipe(recipe, student, teacher, cluster, args.recipe, args.target_fraction)
    print(format_plan(plan))
    return 0 if plan.fits() else 1


def cli() -> None:
    """Console-script entry point: bad input exits 2 with a one-paragraph message."""
    raise SystemExit(run_cli(main, "dd-plan"))


if __name__ == "__main__":
    cli()
