"""Token store: preparation speed on synthetic records, and the memory of a process reading a large vs small store.

1. `prepare`: N synthetic prompt/answer records (words drawn from a fixed list, prompt 20-50 words, answer
   5-30) in a jsonl file, tokenized by one process with a BPE tokenizer trained here
   (dist_distill.tiny_world.train_tokenizer), into a store (data/store.py). Reported: wall time of
   `prepare` (reading, tokenizing, chunk files, concatenation, fingerprint pass) and tokens/s.
2. `rss`: a fresh process maps a store through `load_tokenized`, builds the run's StepSampler over all its
   samples and reads `--steps` steps of micro-batches (input_ids, attention_mask, targets, as the trainer
   does); VmRSS (anonymous + file pages mapped in) before loading torch-free state, after opening, and at
   the end, in MiB. Run once on an N-record store and once on a 1k-record store; the difference is what
   grows with the store.

    python benchmarks/bench_data_store.py --records 1000000 --small 1000 --out /tmp/dd_bench_store
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/memory.py, also under PYTHONSAFEPATH=1
from memory import rss_mib  # noqa: E402

WORDS = ("the of and to in is that for it as was with be by on not he this are or his from at which but have an "
         "they you were her she there been one all we their has would when if so no will more can who up said out "
         "two three four five six seven eight nine ten sum add plus minus times number answer question model").split()


def write_records(path: Path, n: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as f:
        for _ in range(n):
            prompt = " ".join(rng.choices(WORDS, k=rng.randint(20, 50)))
            answer = " ".join(rng.choices(WORDS, k=rng.randint(5, 30)))
            f.write(json.dumps({"prompt": prompt, "answer": answer}) + "\n")


def tokenizer_dir(out: Path) -> Path:
    from dist_distill.tiny_world import train_tokenizer

    d = out / "tokenizer"
    if not (d / "tokenizer.json").exists():
        rng = random.Random(1)
        train_tokenizer([" ".join(rng.choices(WORDS, k=50)) for _ in range(2000)], d)
    return d


def prepare_cell(args) -> None:
    from transformers import AutoTokenizer

    from dist_distill.data.store import TokenStore, prepare
    from dist_distill.recipe import DataSpec

    out = Path(args.out)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir(out))
    for n in (args.records, args.small):
        data = out / f"records-{n}.jsonl"
        if not data.exists():
            t0 = time.monotonic()
            write_records(data, n)
            print(f"wrote {n} records in {time.monotonic() - t0:.1f} s", flush=True)
        spec = DataSpec(train=str(data), max_seq_len=args.max_seq_len, store_dir=str(out / "stores"))
        t0 = time.monotonic()
        store = TokenStore(prepare(str(data), tok, spec))
        seconds = time.monotonic() - t0
        print(json.dumps({"cell": "prepare", "records": n, "samples": len(store), "tokens": store.meta["tokens"],
                          "seconds": round(seconds, 2), "tokens_per_s": round(store.meta["tokens"] / seconds),
                          "store": str(store.path)}), flush=True)


def rss_cell(args) -> None:
    base = rss_mib("VmRSS")
    import torch
    from transformers import AutoTokenizer

    from dist_distill.data.records import load_tokenized
    from dist_distill.data.sampler import StepSampler
    from dist_distill.recipe import DataSpec

    out = Path(args.out)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir(out))
    spec = DataSpec(train=str(out / f"records-{args.n}.jsonl"), max_seq_len=args.max_seq_len,
                    store_dir=str(out / "stores"))
    after_imports = rss_mib("VmRSS")
    data = load_tokenized(spec.train, tok, spec)
    opened = rss_mib("VmRSS")
    sampler = StepSampler(len(data), 8, 4, 64, 3, 1234)  # rank 3 of a 64-rank run
    tokens = 0
    for step in range(args.steps):
        for idx in sampler.step_indices(step):
            batch = (data.input_ids[idx], data.attention_mask[idx], data.targets[idx])
            tokens += int(batch[1].sum())
    end = rss_mib("VmRSS")
    print(json.dumps({"cell": "rss", "records": args.n, "samples": len(data), "steps": args.steps,
                      "tokens_read": tokens, "rss_start_mib": round(base, 1),
                      "rss_after_imports_mib": round(after_imports, 1), "rss_opened_mib": round(opened, 1),
                      "rss_end_mib": round(end, 1), "peak_mib": round(rss_mib("VmHWM"), 1),
                      "torch_threads": torch.get_num_threads()}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--records", type=int, default=1_000_000, help="records of the large store")
    p.add_argument("--small", type=int, default=1000, help="records of the small store")
    p.add_argument("--max-seq-len", type=int, default=256, help="data.max_seq_len (records are at most ~200 tokens)")
    p.add_argument("--steps", type=int, default=200, help="rss: optimizer steps read (4 micro-batches of 8)")
    p.add_argument("--out", default="/tmp/dd_bench_store", help="folder for the records, tokenizer and stores")
    p.add_argument("--cell", choices=["all", "prepare", "rss"], default="all", help=argparse.SUPPRESS)
    p.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args()
    Path(args.out).mkdir(parents=True, exist_ok=True)
    if args.cell == "prepare":
        return prepare_cell(args)
    if args.cell == "rss":
        return rss_cell(args)
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    common = ["--out", args.out, "--max-seq-len", str(args.max_seq_len), "--records", str(args.records),
              "--small", str(args.small), "--steps", str(args.steps)]
    subprocess.run([sys.executable, __file__, "--cell", "prepare", *common], check=True, env=env)
    for n in (args.records, args.small):
        subprocess.run([sys.executable, __file__, "--cell", "rss", "--n", str(n), *common], check=True, env=env)


if __name__ == "__main__":
    main()
