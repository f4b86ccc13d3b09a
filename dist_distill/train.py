"""Train a student under DeepSpeed (ZeRO-3 by default) from a recipe.

Launch with torchrun or the deepspeed launcher, e.g.::

    torchrun --nproc_per_node 2 -m dist_distill.train configs/tiny/distill.yaml
    deepspeed --num_gpus 8 -m dist_distill.train configs/r1_to_qwen1.5b.yaml --set optim.lr=3e-5

The life cycle is dist_distill.training.trainer.Trainer's (setup -> [load_checkpoint] -> train ->
save_checkpoint -> export -> cleanup). With teacher_source.kind=group the first ranks become the
teacher group (dist_distill.teacher.group) and serve the others. Outputs under ``output.dir``:
recipe.yaml (the resolved recipe), metrics.jsonl, tensorboard/, checkpoints/step-N/, model/.
"""

from __future__ import annotations

import argparse
import os

import torch

from dist_distill.errors import UserError, run_cli
from dist_distill.recipe import describe_recipe, load_recipe
from dist_distill.training.preemption import REQUEUE_EXIT_CODE, Preempted
from dist_distill.training.trainer import Trainer, is_communication_failure


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dd-train", description=__doc__.split("\n\n")[0],
                                     epilog="Run with --help-recipe for every recipe key.")
    parser.add_argument("recipe", nargs="?", help="YAML recipe (see configs/)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field, e.g. --set optim.lr=3e-5 (repeatable)")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the newest checkpoint in output.dir/checkpoints")
    parser.add_argument("--help-recipe", action="store_true", help="list every recipe key with its meaning and exit")
    parser.add_argument("--exit-duration-mins", type=float, default=None,
                        help="wall-clock budget of this run in minutes: commit a checkpoint and exit with the requeue "
                             "code (75) before the next step would pass it (slurm/train.sbatch sets it below --time)")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None,
                        help="set by the deepspeed launcher; not needed with torchrun")
    args = parser.parse_args(argv)
    if not args.help_recipe and args.recipe is None:
        parser.error("the recipe argument is required")
    if args.exit_duration_mins is not None and not args.exit_duration_mins > 0:
        parser.error(f"--exit-duration-mins={args.exit_duration_mins}: expected minutes > 0 (the run's wall-clock budget)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.help_recipe:
        print(describe_recipe())
        return 0
    recipe = load_recipe(args.recipe, args.set)
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from dist_distill.teacher.group.roles import split_world

    roles = split_world(recipe)
    if roles is not None and roles[0].is_teacher:  # teacher_source.kind=group: serve the students, then exit
        from dist_distill.teacher.group.server import serve

        serve(recipe, *roles)
        return 0
    from dist_distill.training.distributed import ensure_single_process_env

    ensure_single_process_env()
    trainer = Trainer(recipe, None if args.exit_duration_mins is None else args.exit_duration_mins * 60)
    try:
        trainer.setup()
        if args.resume and trainer.load_checkpoint() and trainer.rank == 0:
            print(f"resumed from step {trainer.step}")
        trainer.train()
        if recipe.output.export:
            target = trainer.export()
            if trainer.rank == 0:
                print(f"student exported to {target}")
    except Preempted as stop:  # checkpoint committed on every rank: exit for the requeue
        if trainer.rank == 0:
            print(f"preempted: {stop}", flush=True)
        trainer.cleanup()
        return REQUEUE_EXIT_CODE
    except RuntimeError as err:
        if not is_communication_failure(err):
            raise
        raise UserError(f"a collective operation failed: another rank died or hung (deepspeed.timeout_s="
                        f"{recipe.deepspeed.timeout_s}s after the first step). The newest committed checkpoint in "
                        f"{trainer.out / 'checkpoints'} is intact; resume with --resume. Cause: "
                        f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    if trainer.rank == 0:
        print(f"outputs in {trainer.out}: recipe.yaml, metrics.jsonl, tensorboard/, checkpoints/")
    trainer.cleanup()
    return 0


def cli() -> None:
    """Console-script entry point: bad input exits 2 with a one-paragraph message."""
    raise SystemExit(run_cli(main, "dd-train"))


if __name__ == "__main__":
    cli()
