"""Peak memory of scoring a batch for a teacher cache: the old whole-logits path vs the teacher scorer.

Old (dd-cache before the scorer): ``model(...).logits`` for every position of the batch, then
a float32 copy, logsumexp and top-k over ``[B, L, V]``. New
(:class:`dist_distill.teacher.scorer.TeacherScorer`): the decoder's hidden states of the target
tokens, the lm_head chunk by chunk (``chunk_bytes`` of logits at a time), top-k and logsumexp
per chunk. A tiny Llama (2 layers, hidden 64) with a vocabulary of ``--vocab`` ids makes the
lm_head logits the dominant term, as they are for a real teacher at V = 152k.

Each (method, tokens per batch) runs in its own process; peak = VmHWM - VmRSS just before the
scoring call (MiB), with glibc's mmap threshold fixed at 1 MiB so RSS follows live tensors.
Both methods' outputs are compared (ids equal, logits and lse within 1e-4).

    python benchmarks/bench_cache_build_memory.py --vocab 131072 --tokens 1024,4096
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/memory.py, also under PYTHONSAFEPATH=1
from memory import MMAP_THRESHOLD, rss_mib  # noqa: E402


def make_model(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096)
    return LlamaForCausalLM(config).eval()


@torch.no_grad()
def old_path(model, ids, mask, k, vocab):
    """What dd-cache build did before the scorer (whole-batch logits)."""
    logits = model(input_ids=ids, attention_mask=mask).logits[..., :vocab].float()
    lse = torch.logsumexp(logits, dim=-1)
    values, top = logits.topk(k, dim=-1)
    return top.reshape(-1, k).long(), values.reshape(-1, k), lse.reshape(-1)


def worker(method: str, vocab: int, tokens: int, seq_len: int, k: int, chunk_mib: int) -> dict:
    from dist_distill.teacher.scorer import TeacherScorer

    torch.set_num_threads(1)
    model = make_model(vocab)
    batch = max(1, tokens // seq_len)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=gen)
    mask = torch.ones_like(ids)
    targets = ids.clone()  # every position is a target: the cache's worst case
    base = rss_mib("VmRSS")
    if method == "old":
        out = old_path(model, ids, mask, k, vocab)
    else:
        out = TeacherScorer(model, vocab, k, chunk_bytes=chunk_mib << 20).score(ids, mask, targets)
    peak = rss_mib("VmHWM") - base
    return {"method": method, "tokens": batch * seq_len, "peak_mib": peak,
            "ids": out[0][:64].tolist(), "logits": out[1][:64].tolist(), "lse": out[2][:64].tolist()}


def spawn(method, tokens, args) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), OMP_NUM_THREADS="1")
    cmd = [sys.executable, __file__, "--worker", method, "--vocab", str(args.vocab), "--tokens", str(tokens),
           "--seq-len", str(args.seq_len), "--k", str(args.k), "--chunk-mib", str(args.chunk_mib)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=131072, help="vocabulary size V")
    parser.add_argument("--tokens", default="1024,4096", help="tokens per teacher batch (comma-separated)")
    parser.add_argument("--seq-len", type=int, default=512, help="sequence length L (batch = tokens / L)")
    parser.add_argument("--k", type=int, default=64, help="top-k")
    parser.add_argument("--chunk-mib", type=int, default=256, help="the scorer's logits chunk (MiB)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.vocab, int(args.tokens), args.seq_len, args.k, args.chunk_mib)))
        return
    print(f"V={args.vocab}, L={args.seq_len}, k={args.k}, scorer chunk {args.chunk_mib} MiB; peak RSS above the "
          "loaded model, MiB (one process per cell, 1 thread)")
    print("| tokens/batch | old (whole logits) | scorer | old / scorer | [tokens, V] fp32 |")
    print("|---:|---:|---:|---:|---:|")
    for tokens in (int(t) for t in args.tokens.split(",")):
        old, new = spawn("old", tokens, args), spawn("new", tokens, args)
        assert old["ids"] == new["ids"], "top-k ids differ"
        err = max(max(abs(a - b) for a, b in zip(x, y)) for x, y in zip(old["logits"], new["logits"]))
        err = max(err, max(abs(a - b) for a, b in zip(old["lse"], new["lse"])))
        assert err < 1e-4, err
        dense = tokens * args.vocab * 4 / 2**20
        print(f"| {tokens} | {old['peak_mib']:.0f} | {new['peak_mib']:.0f} | {old['peak_mib'] / new['peak_mib']:.1f}x "
              f"| {dense:.0f} |")


if __name__ == "__main__":
    main()
