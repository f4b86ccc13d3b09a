"""Universal Logit Distillation (ULD): a logit loss between models whose tokenizers differ.

Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation Loss"
(arXiv:2402.12030; their code: Nicolas-BZRD/llm-recipes, models/distillation_model.py; TRL's GOLD
trainer has the same loss as ``ULDLoss``). Token-level KD compares ``p(v)`` and ``q(v)`` for the same
token id v, which means nothing across vocabularies. ULD compares the two distributions' SHAPES:

    p = softmax(teacher_logits / T) over the teacher's vocabulary (V_t tokens),
    q = softmax(student_logits / T) over the student's (V_s tokens),
    ULD(p, q) = sum_j | q_(j) - p_(j) |,

with ``p_(j)``, ``q_(j)`` the j-th largest probability, the shorter vector padded with zeros to
``max(V_t, V_s)`` (the paper's closed form of its Wasserstein distance). No temperature scaling by
T^2 (an L1 of probabilities, not a KL); the paper trains at T = 1 with ``CE + 1.5 * ULD``.

Alignment (what the paper's code does): per sample, the i-th response token of the student's
tokenization is paired with the i-th response token of the teacher's tokenization of the same
text, and the longer response is truncated to the shorter (dist_distill.teacher.cross_tokenizer).
Positions are "response tokens", i.e. the target positions: each position holds the model's
distribution over the token that follows.

Top-k form (what training computes, from a cache's top-k teacher): the teacher is known by its k
largest probabilities ``p_(1..k)`` (exact: raw logits and logsumexp, or the exact tail mass at T) and
its tail mass ``r = sum_{j>k} p_(j)``; the student by its k largest ``q_(1..k)`` (a top-k over the
vocabulary, no full sort) and ``S = sum_{j>k} q_(j)``:

    ULD_k = sum_{j<=k} | q_(j) - p_(j) | + | S - r |.

ERROR: by the triangle inequality ``|S - r| <= sum_{j>k} |q_(j) - p_(j)| <= S + r``, so
``0 <= ULD - ULD_k <= 2 min(S, r)``: a lower bound of the dense loss, exact when the teacher's top-k
holds all its mass (r = 0, e.g. k >= V_t) or the student's does, and whenever the tail differences
all have one sign. Gradient (a subgradient: sign(0) = 0, as torch's abs): ``dULD_k/dq_v =
sign(q_v - p_(rank of v))`` for the student's top-k tokens and ``sign(S - r)`` for the others, through
the softmax ``dL/dz_u = q_u (g_u - sum_v q_v g_v) / T``.

Shapes: rows ``[n, ...]`` are aligned positions; probabilities float32 (float64 stays float64).
"""

from __future__ import annotations

import torch


def teacher_sorted_topk(top_logits: torch.Tensor, lse: torch.Tensor | None = None,
                        log_tail: torch.Tensor | None = None, temperature: float = 1.0):
    """The teacher side of ULD_k from a top-k row: ``(p_sorted [n, k] decreasing, r [n])`` at `temperature`.

    `top_logits`: raw T=1 logits of the k kept tokens [n, k] (any order); `log_tail`: log of the teacher's
    exact mass outside them at `temperature` [n] (dist_distill.teacher.tails, what caches carry): then
    ``p = softmax(top/T) * (1 - r)``, exact. Without it (T = 1 only) ``p = exp(top - lse)`` and
    ``r = 1 - sum p`` from the full-vocabulary logsumexp `lse` [n] (cancels in float32 when r is tiny:
    an absolute error ~1e-7, harmless in an L1 term).
    """
    dtype = torch.float64 if top_logits.dtype == torch.float64 else torch.float32
    z = top_logits.to(dtype)
    if log_tail is not None:
        log_tail = log_tail.to(dtype)
        r = log_tail.exp()
        p = torch.softmax(z / temperature, -1) * (-torch.expm1(log_tail))[:, None]
    else:
        if temperature != 1.0 or lse is None:
            raise ValueError("teacher_sorted_topk: without log_tail only temperature 1 with lse is exact")
        p = (z - lse.to(dtype)[:, None]).exp()
        r = (1.0 - p.sum(-1)).clamp(min=0.0)
    return p.sort(-1, descending=True).values, r


def uld_dense(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """The paper's ULD per row, brute force: [n, V_s] and [n, V_t] logits (aligned rows) -> [n].

    Full sorts of both distributions, zero padding to the longer vocabulary; differentiable through
    autograd (the reference; memory [n, max(V)] several times over)."""
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    q = torch.softmax(student_logits.to(dtype) / temperature, -1).sort(-1, descending=True).values
    p = torch.softmax(teacher_logits.to(dtype) / temperature, -1).sort(-1, descending=True).values
    width = max(q.shape[-1], p.shape[-1])
    q = torch.nn.functional.pad(q, (0, width - q.shape[-1]))
    p = torch.nn.functional.pad(p, (0, width - p.shape[-1]))
    return (q - p).abs().sum(-1)


def uld_topk(student_logits: torch.Tensor, teacher_probs: torch.Tensor, teacher_tail: torch.Tensor,
             temperature: float = 1.0) -> torch.Tensor:
    """ULD_k per row with dense student ops (module doc): student logits [n, V_s] (the real vocabulary),
    the teacher's sorted top-k probabilities [n, k] and tail mass [n] (:func:`teacher_sorted_topk`) -> [n].

    A full sort of the student's distribution (autograd flows through sort to the permuted entries);
    the reference of the fused kernel (dist_distill.kernels.fused_linear_uld) and the unfused path."""
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    q = torch.softmax(student_logits.to(dtype) / temperature, -1).sort(-1, descending=True).values
    k = teacher_probs.shape[-1]
    q = torch.nn.functional.pad(q, (0, max(0, k - q.shape[-1])))  # a student vocabulary smaller than k
    top, tail = q[:, :k], q[:, k:].sum(-1)
    return (top - teacher_probs.to(dtype)).abs().sum(-1) + (tail - teacher_tail.to(dtype)).abs()
