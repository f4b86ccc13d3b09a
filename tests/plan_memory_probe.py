"""Measure a training run's per-rank memory peak on CPU, for tests/test_plan.py (run under torchrun).

    python -m torch.distributed.run --nproc_per_node 2 tests/plan_memory_probe.py OUT.json RECIPE WARM_MODEL [--set k=v ...]

Each rank first trains one step of the same recipe on WARM_MODEL, a tiny model of the same architecture, so
that every module and code path the run uses is loaded (a process's RSS grows by some 300 MiB of code and
libraries during its first set-up and step); its RSS then is the baseline, the CPU's counterpart of a GPU's
empty context. Then it runs Trainer.setup() on the real recipe, resets the kernel's peak counter
(/proc/self/clear_refs "5", so model loading's transients are not counted), runs the optimizer steps and
reports VmHWM minus the baseline: the memory the run's tensors held at their peak. glibc's mmap threshold is
lowered (MALLOC_MMAP_THRESHOLD_, set by the test) so freed buffers leave RSS, as in benchmarks/memory.py.
"""

from __future__ import annotations

import json
import sys


def status_mib(field: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(field)


def main() -> None:
    import gc

    import torch

    from dist_distill.recipe import load_recipe
    from dist_distill.training.trainer import Trainer

    out, recipe_path, warm_model, rest = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    overrides = [rest[i + 1] for i in range(len(rest)) if rest[i] == "--set"]
    recipe = load_recipe(recipe_path, overrides)
    # warm-up: the same recipe on a tiny model of the same architecture, one step: every module, op and
    # code path the run uses is loaded, while its tensors weigh under a MiB
    warm = Trainer(load_recipe(recipe_path, overrides + [f"student.name_or_path={warm_model}",
                                                         f"output.dir={recipe.output.dir}-warmup"]))
    warm.setup()
    warm.train_step()
    del warm
    gc.collect()
    base = status_mib("VmRSS")
    trainer = Trainer(recipe)
    trainer.setup()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    for _ in range(recipe.optim.max_steps):
        trainer.train_step()
    peak = status_mib("VmHWM")
    rank = torch.distributed.get_rank()
    results = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(results, {"rank": rank, "baseline_mib": base, "peak_mib": peak,
                                                  "peak_above_baseline_mib": peak - base})
    if rank == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    trainer.cleanup()


if __name__ == "__main__":
    main()
