"""Activation memory of one student forward + backward with and without gradient checkpointing.

A Llama student (``--layers`` decoder layers, hidden ``--hidden``) runs the training loss
(DistillationModule, fused head, hard-label CE) on ``--batch`` x ``--seq-len`` tokens in
fp32 on the CPU, with Hugging Face activation checkpointing (non-reentrant, as
``optim.gradient_checkpointing`` turns it on) or without. Each cell runs in its own process;
peak = VmHWM - VmRSS just before the step (MiB), glibc's mmap threshold fixed at 1 MiB so RSS
follows live tensors; the two losses and gradient norms are compared in the run.

    python benchmarks/bench_grad_checkpointing.py --layers 8 --hidden 512 --seq-len 1024 --batch 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
import time

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/memory.py, also under PYTHONSAFEPATH=1
from memory import MMAP_THRESHOLD, rss_mib  # noqa: E402


def worker(args, checkpointing: bool) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from dist_distill.models.loading import enable_activation_checkpointing
    from dist_distill.objective.module import DistillationModule
    from dist_distill.recipe import LossSpec

    torch.set_num_threads(1)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=8,
                         max_position_embeddings=args.seq_len, attn_implementation="sdpa")
    model = LlamaForCausalLM(config).train()
    if checkpointing:
        enable_activation_checkpointing(model)
    module = DistillationModule(model, LossSpec(ce_weight=1.0), args.vocab)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=torch.Generator().manual_seed(1))
    base = rss_mib("VmRSS")
    t0 = time.perf_counter()
    loss, _ = module(ids, torch.ones_like(ids), ids)
    loss.backward()
    took = time.perf_counter() - t0
    grad_norm = torch.sqrt(sum((p.grad.double() ** 2).sum() for p in module.parameters() if p.grad is not None))
    return {"peak_mib": rss_mib("VmHWM") - base, "seconds": took, "loss": loss.item(), "grad_norm": grad_norm.item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--worker", choices=["on", "off"], default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args, args.worker == "on")))
        return
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(MMAP_THRESHOLD), OMP_NUM_THREADS="1")
    res = {}
    for mode in ("off", "on"):
        cmd = [sys.executable, __file__, "--worker", mode] + [f"--{k.replace('_', '-')}={v}" for k, v in
                                                              vars(args).items() if k != "worker"]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            raise RuntimeError(proc.stderr[-3000:])
        res[mode] = json.loads(proc.stdout.strip().splitlines()[-1])
    off, on = res["off"], res["on"]
    assert abs(on["loss"] - off["loss"]) <= 1e-5 * abs(off["loss"]), (on, off)
    assert abs(on["grad_norm"] - off["grad_norm"]) <= 1e-4 * off["grad_norm"], (on, off)
    print(f"{args.layers} layers, hidden {args.hidden}, {args.batch} x {args.seq_len} tokens, fp32, 1 thread")
    print("| checkpointing | peak MiB above the model | forward+backward s |")
    print("|---|---:|---:|")
    for mode in ("off", "on"):
        print(f"| {mode} | {res[mode]['peak_mib']:.0f} | {res[mode]['seconds']:.2f} |")
    print(f"peak on / off = {on['peak_mib'] / off['peak_mib']:.2f}; loss {off['loss']:.6f} vs {on['loss']:.6f}, "
          f"grad norm {off['grad_norm']:.6f} vs {on['grad_norm']:.6f}")


if __name__ == "__main__":
    main()
