"""dd-generate: the teacher writes responses for a prompt set (sequence-level KD; library: dist_distill.generation).

    dd-generate RECIPE [--set generate.KEY=VALUE ...]             # one process (one GPU, or the CPU)
    torchrun --nproc_per_node 8 -m dist_distill.generate RECIPE    # 8 workers, one teacher replica per GPU
    sbatch --array=0-7 slurm/generate.sbatch RECIPE                # 8 tasks x 8 GPUs (--shard from SLURM)

Reads recipe.generate (prompts, output_dir, temperature, top_p, top_k, max_new_tokens, num_samples, seed,
batch_size, chunk_prompts, backend, device_map) and the record settings of recipe.data (format,
prompt_field / answer_field / messages_field, split, revision, bad_rows, too_long). Output:
generate.output_dir/generated.jsonl in the prompt/answer (or messages) columns of recipe.data, with
prompt_index, sample_index, finish_reason, answer_tokens, and manifest.json (teacher fingerprint,
sampling, prompt set, counts). Train on it with ``--set data.train=<output_dir>/generated.jsonl``.

Resumable: re-run the same command after a kill; complete chunks are skipped and the result equals an
uninterrupted run. Workers need no process group (RANK / WORLD_SIZE from torchrun, the task from
--shard or SLURM_ARRAY_TASK_ID / SLURM_ARRAY_TASK_COUNT); the last one to finish merges. A teacher too
large for one GPU: generate.backend=vllm with teacher_source.tp_size, or generate.device_map=auto with
one process per node (see dist_distill/generation/runner.py).
"""

from __future__ import annotations

import argparse
import os

from dist_distill.errors import run_cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dd-generate", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("recipe", help="YAML recipe with a generate: section (and teacher:, data:)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe field, e.g. --set generate.temperature=0.6 (repeatable)")
    parser.add_argument("--shard", default=None, metavar="I/N",
                        help="this task is I of N (0-based); default SLURM_ARRAY_TASK_ID/COUNT, else 0/1")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from dist_distill.generation.runner import run_generation, shard_from_env
    from dist_distill.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    task, num_tasks = shard_from_env(args.shard)
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    summary = run_generation(recipe, task, num_tasks, rank, world, progress=not args.quiet and rank == 0)
    where = summary["output_dir"]
    print(f"dd-generate task {task}/{num_tasks} rank {rank}/{world}: {summary['written']} chunk(s) written, "
          f"{summary['complete_before']} already complete, of {summary['chunks']} ({summary['seconds']:.1f} s)", flush=True)
    if summary["merged"]:
        print(f"dd-generate: complete: {where}/generated.jsonl (manifest {where}/manifest.json)", flush=True)
    else:
        print(f"dd-generate: other workers' chunks are missing; {where}/generated.jsonl is written by the last worker "
              "to finish (or re-run this command once they are done)", flush=True)
    return 0


def cli() -> None:
    """Console-script entry point: bad input exits 2 with a one-paragraph message."""
    raise SystemExit(run_cli(main, "dd-generate"))


if __name__ == "__main__":
    cli()
