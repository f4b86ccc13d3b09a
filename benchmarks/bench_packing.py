"""Padding and records per step of the three batching plans, and the packing planner's cost.

1. The tiny world's student data through the token store (the tiny recipe: max_seq_len 16 or
   --max-seq-len, micro-batch 16, grad_accum 1, one rank), one epoch of steps under each plan of data/batching.py: plain StepSampler
   (padded to max_seq_len), length-grouped (padded to each micro-batch's longest record), packed
   (micro_batch rows of max_seq_len). Reports token slots per step, real tokens per step, records per step
   and the padding fraction (slots on padding / slots). Counts only: no model runs.
2. Synthetic lengths (uniform 50..4096, 1M records; L = 4096, 64 ranks x grad_accum 4 x 8 rows): the row
   fill of the packed plan and the planner's time per record over one epoch (what a resume replays); then
   rank 0's view of the three plans over 100 steps.

    python benchmarks/bench_packing.py --out /tmp/dd_bench_packing [--max-seq-len 64] [--synthetic 0]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def plan_stats(name: str, sampler, lengths: np.ndarray, max_len: int, steps: int) -> dict:
    slots = real = records = 0
    for s in range(steps):
        if name == "packed":
            micro = sampler.step_rows(s)
            rows = [r for m in micro for r in m]
            slots += len(rows) * max_len
            real += sum(int(lengths[r].sum()) for r in rows)
            records += sum(len(r) for r in rows)
        else:
            for idx in sampler.step_indices(s):
                n = lengths[idx.numpy()]
                width = int(n.max()) if name == "length-grouped" else max_len
                slots += len(n) * width
                real += int(n.sum())
                records += len(n)
    return {"plan": name, "steps": steps, "slots_per_step": slots / steps, "real_tokens_per_step": real / steps,
            "records_per_step": records / steps, "padding_fraction": round(1 - real / slots, 4)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/dd_bench_packing", help="folder for the tiny world and its store")
    p.add_argument("--synthetic", type=int, default=1_000_000, help="records of the synthetic planner test")
    p.add_argument("--max-seq-len", type=int, default=16, help="data.max_seq_len (the tiny recipe's: 16)")
    a = p.parse_args()
    os.environ.setdefault("DD_DATA_STORE", str(Path(a.out) / "stores"))
    from dist_distill.data.batching import LengthGroupedSampler, PackedSampler, record_lengths
    from dist_distill.data.records import load_tokenized
    from dist_distill.data.sampler import StepSampler
    from dist_distill.models.loading import load_tokenizer
    from dist_distill.recipe import load_recipe

    world = Path(a.out) / "world"
    if not (world / "student_init").exists():
        subprocess.run([sys.executable, "-m", "dist_distill.tiny_world", str(world)], cwd=REPO, check=True,
                       stdout=subprocess.DEVNULL)
    r = load_recipe(REPO / "configs/tiny/distill.yaml", [f"student.name_or_path={world}/student_init",
                                                          f"data.train={world}/data/student_train.jsonl",
                                                          f"data.max_seq_len={a.max_seq_len}"])
    data = load_tokenized(r.data.train, load_tokenizer(r.student, "student"), r.data, r.data.max_samples)
    lengths, max_len, mb = record_lengths(data), r.data.max_seq_len, r.optim.micro_batch_size
    steps = len(lengths) // mb  # one epoch of the plain plan
    plans = {"plain": StepSampler(len(lengths), mb, 1, 1, 0, r.seed),
             "length-grouped": LengthGroupedSampler(lengths, mb, 1, 1, 0, r.seed, r.data.length_group_steps),
             "packed": PackedSampler(lengths, max_len, mb, 1, 1, 0, r.seed, r.data.pack_open_rows)}
    print(json.dumps({"records": len(lengths), "mean_length": round(float(lengths.mean()), 2), "max_seq_len": max_len,
                      "micro_batch": mb}))
    for name, sampler in plans.items():
        print(json.dumps(plan_stats(name, sampler, lengths, max_len, steps)), flush=True)

    if not a.synthetic:
        return
    rng = np.random.default_rng(0)
    syn = rng.integers(50, 4097, a.synthetic)
    sampler = PackedSampler(syn, 4096, 8, 4, 64, 3, 1234)
    rows = int(syn.sum() / 4096)
    t0 = time.perf_counter()
    got = sampler.global_rows(0, rows)
    dt = time.perf_counter() - t0
    placed = sampler._pos
    fill = sum(int(syn[np.asarray(row)].sum()) for row in got) / (len(got) * 4096)
    print(json.dumps({"synthetic_records": a.synthetic, "rows": len(got), "records_placed": placed,
                      "row_fill": round(fill, 4), "unpacked_fill": round(float(syn.mean()) / 4096, 4),
                      "planner_s": round(dt, 2), "us_per_record": round(dt / placed * 1e6, 2)}), flush=True)
    # rank 0 of 64, micro-batch 8, grad_accum 4, 100 steps: its view of the three plans
    syn_plans = {"plain": StepSampler(len(syn), 8, 4, 64, 0, 1234),
                 "length-grouped": LengthGroupedSampler(syn, 8, 4, 64, 0, 1234, 16),
                 "packed": PackedSampler(syn, 4096, 8, 4, 64, 0, 1234)}
    for name, smp in syn_plans.items():
        print(json.dumps({"synthetic": True, **plan_stats(name, smp, syn, 4096, 100)}), flush=True)


if __name__ == "__main__":
    main()
