"""How far is the top-k teacher loss from the dense loss, as a function of k?

Prints a markdown table of ``mean_token |topk_divergence - divergence|`` for both tail
treatments at T=1 and T=2, on synthetic teacher logits with a Zipf-like shape
(``logit = -a * log(rank) + noise``, the exponent ``a`` drawn per token so that some tokens
are peaked and some are flat) and a student that is the teacher plus Gaussian noise.
The last column is an oracle: the bucket loss at T=2 given the teacher's EXACT
``logsumexp(z / 2)`` (which a T=1 cache does not hold); it separates the error of the tail
bucket itself from that of the uniform-tail estimate of ``lse_T`` used for T != 1.

    .venv/bin/python benchmarks/topk_error.py            # V=32000, 512 tokens, fkl
"""

from __future__ import annotations

import argparse

import torch

from dist_distill.losses import divergence, topk_divergence

TEMPERATURES = (1.0, 2.0)
TAILS = ("renorm", "bucket")


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--vocab", type=int, default=32000, help="vocabulary size V (default 32000)")
    ap.add_argument("--tokens", type=int, default=512, help="number of tokens N (default 512)")
    ap.add_argument("--kind", default="fkl", help="divergence kind (default fkl)")
    ap.add_argument("--zipf-min", type=float, default=1.0, help="smallest per-token Zipf exponent a (default 1.0)")
    ap.add_argument("--zipf-max", type=float, default=2.5, help="largest per-token Zipf exponent a (default 2.5)")
    ap.add_argument("--student-noise", type=float, default=1.0, help="std of the noise added to the teacher logits to make the student (default 1.0)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    return ap.parse_args()


def synthetic_logits(n: int, v: int, a_min: float, a_max: float, noise: float, seed: int):
    """Teacher ``[n, v]``: ``-a * log(rank) + N(0, 0.5)``, ranks shuffled per token; student = teacher + N(0, noise)."""
    g = torch.Generator().manual_seed(seed)
    a = a_min + (a_max - a_min) * torch.rand(n, 1, generator=g)
    ranks = torch.argsort(torch.rand(n, v, generator=g), dim=-1).float() + 1
    teacher = -a * torch.log(ranks) + 0.5 * torch.randn(n, v, generator=g)
    student = teacher + noise * torch.randn(n, v, generator=g)
    return student, teacher


def k_values(v: int) -> list[int]:
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096) if k < v]
    return ks + [v]


def oracle_bucket(student, teacher, ids, kind: str, T: float) -> torch.Tensor:
    """Bucket loss at T with the exact teacher ``lse_T``: a T=1 loss on logits pre-divided by T."""
    scaled = teacher / T
    loss = topk_divergence(student / T, ids, scaled.gather(-1, ids), torch.logsumexp(scaled, -1), kind,
                           tail="bucket", temperature=1.0, reduction="none")
    return loss * T**2


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    student, teacher = synthetic_logits(args.tokens, args.vocab, args.zipf_min, args.zipf_max,
                                        args.student_noise, args.seed)
    lse = torch.logsumexp(teacher, dim=-1)
    p = torch.softmax(teacher, dim=-1)
    entropy = -(p * torch.log_softmax(teacher, dim=-1)).sum(-1)
    dense = {T: divergence(student, teacher, args.kind, temperature=T, reduction="none") for T in TEMPERATURES}
    print(f"V={args.vocab}, N={args.tokens}, kind={args.kind}, T^2-scaled, float32; teacher: mean top-1 prob "
          f"{p.max(-1).values.mean():.3f}, mean entropy {entropy.mean():.2f} nats; dense loss (mean per token): "
          + ", ".join(f"T={T:g}: {dense[T].mean():.4f}" for T in TEMPERATURES))
    print()
    cols = [f"T={T:g} {tail}" for T in TEMPERATURES for tail in TAILS] + ["T=2 bucket, exact lse_T (oracle)"]
    p2 = torch.softmax(teacher / 2.0, dim=-1)
    print("| k | teacher top-k mass T=1 | T=2 | " + " | ".join(cols) + " |")
    print("|---:|---:|---:|" + "---:|" * len(cols))
    for k in k_values(args.vocab):
        top, ids = teacher.topk(k, dim=-1)
        mass = p.gather(-1, ids).sum(-1).mean().item()
        mass2 = p2.gather(-1, ids).sum(-1).mean().item()
        errs = []
        for T in TEMPERATURES:
            for tail in TAILS:
                loss = topk_divergence(student, ids, top, lse, args.kind, tail=tail, temperature=T, reduction="none")
                errs.append((loss - dense[T]).abs().mean().item())
        errs.append((oracle_bucket(student, teacher, ids, args.kind, 2.0) - dense[2.0]).abs().mean().item())
        print(f"| {k} | {mass:.4f} | {mass2:.4f} | " + " | ".join(f"{e:.3e}" for e in errs) + " |")


if __name__ == "__main__":
    main()
