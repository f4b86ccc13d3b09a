"""Forward + backward time and peak memory of a distillation loss with the lm_head GEMMs.

Objective for every method: forward KL at temperature T between softmax(student/T) and a
dense teacher's softmax(teacher/T) (teacher = its own hidden states @ its own head), mixed
50/50 with hard-label CE. Methods:
  ours    dist_distill.kernels.fused_linear_distill_loss, backend="auto"
  eager   materialised logits, F.kl_div(log_target=True) + F.cross_entropy, autograd
  liger   Liger-Kernel's chunked LigerFusedLinearJSDLoss(beta=0 -> forward KL), torch.compile
          (and "liger-nocompile"); skipped with a note when liger_kernel is not installed
  gemms   (CUDA only) the same GEMMs alone: student + teacher logits, grad h, grad W

CPU: every method runs in its own subprocess; peak = VmHWM - VmRSS measured just before the
first loss call (inputs allocated). By default the workers run with glibc's mmap threshold
fixed at 1 MiB (``MALLOC_MMAP_THRESHOLD_``), so every large buffer is mapped on allocation and
unmapped on free and RSS follows the live tensors. With glibc's default *dynamic* threshold
(``--malloc default``) the first freed chunk buffer raises the threshold, later buffers come
from the heap, and the heap's fragmentation -- not the algorithm -- sets the peak RSS (it
varies from run to run; docs/benchmarks.md). CUDA: peak = max_memory_allocated - memory before the
first call (inputs and .grad buffers preallocated).

    python benchmarks/bench_fused_loss.py --device cpu --reps 3
    python benchmarks/bench_fused_loss.py --device cuda --shapes 1024,4096,8192,16384
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # benchmarks/memory.py, also under PYTHONSAFEPATH=1
from memory import MMAP_THRESHOLD, rss_mib  # noqa: E402

T, CE_WEIGHT = 2.0, 0.5
METHODS = ["eager", "ours", "liger", "liger-nocompile"]


def make_inputs(n, h, v, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    mk = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(dtype).to(device)  # noqa: E731
    x = mk(n, h).requires_grad_()
    w = mk(v, h, scale=h**-0.5).requires_grad_()
    xt, wt = mk(n, h), mk(v, h, scale=h**-0.5)
    labels = torch.randint(0, v, (n,), generator=g).to(device)
    labels[::17] = -100
    return x, w, xt, wt, labels


def loss_fn(method: str):
    """A callable (x, w, xt, wt, labels) -> scalar loss for ``method``."""
    if method == "ours" or method.startswith("ours:"):  # "ours:64" = chunk_bytes 64 MiB
        from dist_distill.kernels import DEFAULT_CHUNK_BYTES, fused_linear_distill_loss

        chunk = int(method[5:]) * 2**20 if ":" in method else DEFAULT_CHUNK_BYTES
        return lambda x, w, xt, wt, y: fused_linear_distill_loss(
            x, w, labels=y, teacher_hidden=xt, teacher_weight=wt, kind="fkl", temperature=T, ce_weight=CE_WEIGHT,
            chunk_bytes=chunk)
    if method == "eager":
        def eager(x, w, xt, wt, y):
            logits = (x @ w.T).float()
            with torch.no_grad():
                t_logits = (xt @ wt.T).float()
            valid = y != -100
            kl = F.kl_div(torch.log_softmax(logits / T, -1), torch.log_softmax(t_logits / T, -1),
                          reduction="none", log_target=True).sum(-1)
            div = (kl * valid).sum() / valid.sum() * T * T
            return (1 - CE_WEIGHT) * div + CE_WEIGHT * F.cross_entropy(logits, y, ignore_index=-100)
        return eager
    if method.startswith("liger"):
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss

        mod = LigerFusedLinearJSDLoss(weight_hard_loss=CE_WEIGHT, weight_soft_loss=1 - CE_WEIGHT, beta=0.0,
                                      temperature=T, compiled=method == "liger")
        return lambda x, w, xt, wt, y: mod(x, w, xt, wt, y)
    if method == "gemms":
        def gemms(x, w, xt, wt, y):
            logits = x @ w.T
            with torch.no_grad():
                xt @ wt.T
            return logits.float().sum() * 0  # backward: grad h and grad W GEMMs
        return gemms
    raise ValueError(method)


def run_one(method, n, h, v, dtype, device, reps):
    """Time ``reps`` fwd+bwd after one warm-up call; returns a result dict."""
    x, w, xt, wt, y = make_inputs(n, h, v, dtype, device)
    fn = loss_fn(method)
    cuda = device == "cuda"
    if cuda:
        x.grad, w.grad = torch.zeros_like(x), torch.zeros_like(w)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = rss_mib("VmRSS")
    times = []
    for i in range(reps + 1):
        t0 = time.perf_counter()
        fn(x, w, xt, wt, y).backward()
        if cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20 if cuda else rss_mib("VmHWM") - base
    return {"method": method, "n": n, "time_s": sum(times) / len(times), "peak_mib": peak, "base_mib": base}


def worker(args):
    dtype = getattr(torch, args.dtype)
    try:
        res = run_one(args.worker, args.n, args.hidden, args.vocab, dtype, args.device, args.reps)
    except ImportError as e:
        res = {"method": args.worker, "n": args.n, "skipped": f"not importable: {e}"}
    print("RESULT " + json.dumps(res))


def spawn(method, n, args):
    cmd = [sys.executable, __file__, "--worker", method, "--device", args.device, "--n", str(n),
           "--hidden", str(args.hidden), "--vocab", str(args.vocab), "--dtype", args.dtype, "--reps", str(args.reps)]
    env = dict(os.environ)
    if args.malloc == "mmap":
        env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    for line in out.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    return {"method": method, "n": n, "skipped": "failed: " + out.stderr.strip().splitlines()[-1][:200]}


def table(results, device):
    eager = {r["n"]: r for r in results if r["method"] == "eager" and "skipped" not in r}
    mem = "peak RSS above baseline" if device == "cpu" else "peak CUDA memory above inputs"
    lines = [f"| tokens | method | fwd+bwd time (s) | {mem} (MiB) | time vs eager | memory vs eager |",
             "|---|---|---|---|---|---|"]
    for r in results:
        if "skipped" in r:
            lines.append(f"| {r['n']} | {r['method']} | skipped: {r['skipped']} | | | |")
            continue
        e = eager.get(r["n"])
        ratio = (f"{r['time_s'] / e['time_s']:.2f}x", f"{r['peak_mib'] / e['peak_mib']:.1%}") if e else ("", "")
        lines.append(f"| {r['n']} | {r['method']} | {r['time_s']:.3f} | {r['peak_mib']:.0f} | {ratio[0]} | {ratio[1]} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"],
                    help="cpu: N=4096 H=256 V=32000 fp32; cuda: H=4096 V=128256 bf16 (default: cuda if available)")
    ap.add_argument("--shapes", default=None, help="comma-separated token counts (default cpu 4096; cuda 1024,4096,8192,16384)")
    ap.add_argument("--reps", type=int, default=3, help="timed repetitions after one warm-up call")
    ap.add_argument("--hidden", type=int, default=None, help="hidden size (default per device)")
    ap.add_argument("--vocab", type=int, default=None, help="vocabulary size (default per device)")
    ap.add_argument("--dtype", default=None, help="float32 | bfloat16 (default per device)")
    ap.add_argument("--methods", default=None, help="comma-separated subset of " + ",".join(METHODS + ["gemms"])
                    + "; ours:M = ours with chunk_bytes M MiB")
    ap.add_argument("--malloc", default="mmap", choices=["mmap", "default"],
                    help="CPU workers: mmap = glibc mmap threshold fixed at 1 MiB (RSS follows live tensors); "
                         "default = glibc's dynamic threshold (RSS includes heap fragmentation)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    cuda = args.device == "cuda"
    args.hidden = args.hidden or (4096 if cuda else 256)
    args.vocab = args.vocab or (128256 if cuda else 32000)
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    if args.worker:
        return worker(args)
    shapes = [int(s) for s in (args.shapes or ("1024,4096,8192,16384" if cuda else "4096")).split(",")]
    methods = args.methods.split(",") if args.methods else METHODS + (["gemms"] if cuda else [])
    results = [spawn(m, n, args) for n in shapes for m in methods]
    malloc = f" malloc={args.malloc}" if args.device == "cpu" else ""
    print(f"device={args.device}{malloc} H={args.hidden} V={args.vocab} dtype={args.dtype} T={T} "
          f"ce_weight={CE_WEIGHT} reps={args.reps} torch={torch.__version__} threads={torch.get_num_threads()}")
    print(table(results, args.device))


if __name__ == "__main__":
    main()
