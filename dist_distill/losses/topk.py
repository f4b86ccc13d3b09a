"""Distillation loss against a sparse top-k teacher (cache or vocab-parallel TP teacher).

The teacher is given per token by its k largest RAW logits at T=1 (``topk_logits``, sorted
descending, ids ``topk_ids``) and its full-vocabulary logsumexp at T=1 (``teacher_lse``),
so ``log p(v) = z_v - lse`` is exact for the top-k ids and the tail mass
``r = 1 - sum_topk p`` is known (DESIGN fact 3). Two treatments of the tail:

``tail="renorm"`` (k categories)
    Teacher renormalised over its top-k: ``p_hat = softmax(topk_logits / T)``; student
    renormalised over the same ids: ``log q_hat = s[ids]/T - logsumexp(s[ids]/T)``.
    ``teacher_lse`` is unused. Exact for every T (a temperature change on a cached T=1
    teacher only rescales logits), but it ignores the tail mass entirely.

``tail="bucket"`` (k + 1 categories)
    The k ids plus one tail bucket on both sides. Student: full ``softmax(s / T)`` over the
    real vocab, ``q(ids)`` and ``q_tail = sum_{v not in ids} q(v)``, taken in log space as
    ``logsumexp`` over the vocab with the top-k masked out (never ``1 - sum``, which
    cancels). Teacher at T=1: ``log p(v) = z_v - lse`` and ``log r`` with
    ``r = 1 - exp(logsumexp(topk) - lse)`` (via ``expm1``); exact up to the float rounding
    of the stored ``lse`` (~1 ulp of lse: about 1e-6 absolute for fp32 at logits ~10, 5e-4
    at logits ~1e4). ``r`` is floored at the dtype's smallest normal number so that
    ``KL(q || p)`` stays finite when the top-k holds all the teacher's mass in floating
    point; an ``lse`` rounded below ``logsumexp(topk)`` is raised to it, so that the
    teacher's probabilities never sum above 1. Everything is computed relative to the top
    logit (never a logsumexp or a division by T of logits ~1e4).
    EXACT at any T with ``teacher_log_tail`` (``log r_T``, the teacher's mass outside its top-k
    at T, which the cache and the teacher group carry: dist_distill.teacher.tails): the top-k
    share ``1 - r_T`` in the ratios of ``softmax(topk_logits / T)`` and the bucket holds ``r_T``;
    ``teacher_lse`` is then unused. Training always passes it (and refuses a temperature the
    teacher does not carry). Without it, for T != 1 the top-k is exact up to the normaliser (``log p_T(v) = z_v/T - lse_T``) but
    ``lse_T`` needs the unknown tail logits. APPROXIMATION (direct callers only): the V - k tail tokens are taken
    to share the T=1 tail mass uniformly, each with logit ``z_tail = lse + log(r / (V-k))``,
    so ``lse_T = logsumexp(topk / T, log(V-k) + z_tail / T)`` and the tail bucket holds
    ``exp(log(V-k) + z_tail/T - lse_T)``. This is exact at T=1 and whenever the real tail is
    flat. By Jensen (``x -> x^(1/T)`` is concave for T > 1) a uniform tail is the LARGEST
    tail consistent with the T=1 tail mass for T > 1 (the smallest for T < 1): for T > 1 the
    teacher's tail bucket is over-estimated and its top-k probabilities under-estimated by
    the same normaliser; their ratios stay exact.
    ``V = vocab_size`` if given, else ``student_logits.shape[-1]``.

With ``k = V`` both treatments equal the dense loss (the tail bucket is then empty and
dropped).
"""

from __future__ import annotations

import math

import torch

from .core import check_kind_args, divergence_from_logprobs
from .reduction import (
    check_common_args,
    compute_dtype,
    detached_row_max,
    finish_token_losses,
    flatten_token_args,
    scaled_log_softmax,
    slice_vocab,
    token_mask,
    zero_masked_rows,
)

TAILS = ("renorm", "bucket")


def topk_divergence(
    student_logits: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_logits: torch.Tensor,
    teacher_lse: torch.Tensor | None,
    kind: str,
    *,
    temperature: float = 1.0,
    tail: str = "renorm",
    scale_by_t2: bool = True,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    weights: torch.Tensor | None = None,
    ce_weight: float = 0.0,
    vocab_size: int | None = None,
    reduction: str = "mean",
    normalizer=None,
    teacher_log_tail: torch.Tensor | None = None,
) -> torch.Tensor:
    """Distillation loss of full student logits against a top-k teacher (see module doc).

    Args:
        student_logits: ``[..., V_s]`` any float dtype (computed in float32; float64 kept).
        topk_ids: ``[..., k]`` int64 teacher top-k ids, each < V (the real vocab).
        topk_logits: ``[..., k]`` the teacher's RAW logits at T=1 for those ids.
        teacher_lse: ``[...]`` the teacher's full-vocabulary logsumexp at T=1; needed for
            ``tail="bucket"``, unused (may be None) for ``tail="renorm"``. Keep it in
            float32: the tail mass is recovered to about one ulp of lse, and a bf16 lse
            (ulp 0.125 at 20) would make it meaningless.
        kind, temperature, scale_by_t2, beta, skew_alpha, labels, ignore_index, weights,
        ce_weight, reduction, normalizer: as in :func:`dist_distill.losses.divergence`
            (p = teacher, q = student, T^2 scaling applies to every kind).
        tail: ``"renorm"``: k categories, teacher ``softmax(topk_logits / T)`` and student
            ``softmax(s[ids] / T)``, both renormalised over the ids (exact at any T, tail
            ignored). ``"bucket"``: k + 1 categories, the ids plus one tail bucket holding
            the rest of each full distribution (student tail via a masked logsumexp); exact
            at T=1, and for T != 1 the teacher's ``lse_T`` is estimated from a uniform tail
            carrying the T=1 tail mass (module doc says exactly what is approximate).
        vocab_size: real vocab; the student is sliced to ``[..., :vocab_size]`` and
            ``topk_ids`` must be below it.
        teacher_log_tail: ``[...]`` float32 log of the teacher's probability mass outside its
            top-k at `temperature` (bucket only): makes the bucket exact at every T.
    Returns:
        float32 (float64 for float64 student logits) loss, shape per ``reduction``.
    """
    check_kind_args(kind, beta, skew_alpha, temperature)
    check_common_args(ce_weight, labels, reduction, normalizer)
    if tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    if tail == "bucket" and teacher_lse is None and teacher_log_tail is None:
        raise ValueError("tail='bucket' needs teacher_lse (the teacher's full-vocab logsumexp at T=1)")
    student = slice_vocab(student_logits, vocab_size, "student_logits")
    lead_shape, v = student.shape[:-1], student.shape[-1]
    k = _check_topk_shapes(topk_ids, topk_logits, teacher_lse, lead_shape, v)
    dtype = compute_dtype(student)
    labels, weights = flatten_token_args(labels, weights, lead_shape, student.device)
    valid = token_mask(labels, weights, ignore_index)
    student = zero_masked_rows(student.reshape(-1, v).to(dtype), valid)
    top = zero_masked_rows(topk_logits.reshape(-1, k).to(dtype), valid)
    ids = zero_masked_rows(topk_ids.reshape(-1, k), valid)
    _check_ids(ids, v)
    if tail == "renorm":
        logp, logq = _renorm_logprobs(student, ids, top, temperature)
    else:
        if teacher_log_tail is not None:
            if teacher_log_tail.shape != lead_shape:
                raise ValueError(f"teacher_log_tail must have shape {tuple(lead_shape)}, got {tuple(teacher_log_tail.shape)}")
            tail_or_lse = zero_masked_rows(teacher_log_tail.reshape(-1, 1).to(dtype), valid).squeeze(-1)
        else:
            tail_or_lse = zero_masked_rows(teacher_lse.reshape(-1, 1).to(dtype), valid).squeeze(-1)
        logp, logq = _bucket_logprobs(student, ids, top, tail_or_lse, temperature,
                                      exact_tail=teacher_log_tail is not None)
    div = divergence_from_logprobs(logp, logq, kind, beta=beta, skew_alpha=skew_alpha)
    return finish_token_losses(
        div, student, labels=labels, weights=weights, valid=valid, temperature=temperature,
        scale_by_t2=scale_by_t2, ce_weight=ce_weight, reduction=reduction,
        normalizer=normalizer, lead_shape=lead_shape,
    )


def _check_topk_shapes(topk_ids, topk_logits, teacher_lse, lead_shape: torch.Size, v: int) -> int:
    """Validate the top-k shapes against the student's; return k."""
    k = topk_ids.shape[-1]
    if topk_ids.shape[:-1] != lead_shape or topk_logits.shape != topk_ids.shape:
        raise ValueError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_logits {tuple(topk_logits.shape)} must both be "
            f"{tuple(lead_shape)} + (k,) to match student_logits"
        )
    if teacher_lse is not None and teacher_lse.shape != lead_shape:
        raise ValueError(f"teacher_lse must have shape {tuple(lead_shape)}, got {tuple(teacher_lse.shape)}")
    if topk_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"topk_ids must be an integer tensor (int64), got {topk_ids.dtype}")
    if not 1 <= k <= v:
        raise ValueError(f"k = {k} must lie in [1, V = {v}]")
    return k


def _check_ids(ids: torch.Tensor, v: int) -> None:
    """Raise if a (non-ignored) top-k id falls outside the real vocab ``[0, v)``."""
    if bool(((ids < 0) | (ids >= v)).any()):
        raise ValueError(
            f"topk_ids must lie in [0, {v}) (vocab_size or student vocab); got min {int(ids.min())}, "
            f"max {int(ids.max())}: a teacher id in the padded vocab means the cache and vocab_size disagree"
        )


def _renorm_logprobs(student, ids, top, temperature: float):
    """``tail="renorm"``: ``(logp, logq)`` over the k ids, both ``[N, k]``."""
    logq = scaled_log_softmax(student.gather(-1, ids.long()), temperature)
    logp = scaled_log_softmax(top, temperature)
    return logp, logq


def _bucket_logprobs(student, ids, top, lse, temperature: float, exact_tail: bool = False):
    """``tail="bucket"``: ``(logp, logq)`` over the k ids + 1 tail bucket, ``[N, k+1]``
    (``[N, k]`` when k = V: the bucket is empty and dropped). ``exact_tail``: `lse` holds the
    teacher's log tail mass at `temperature` instead of its T=1 logsumexp."""
    ids = ids.long()
    # relative to the row max before dividing by T and kept apart from the log-sum (logits ~1e4)
    m = detached_row_max(student)
    scaled = (student - m) / temperature
    lse_q = torch.logsumexp(scaled, dim=-1, keepdim=True)
    logq_top = scaled.gather(-1, ids) - lse_q
    n_tail = student.shape[-1] - ids.shape[-1]
    if n_tail == 0:
        return scaled_log_softmax(top, temperature), logq_top
    if exact_tail:
        logp_top, logp_tail = _teacher_bucket_exact(top, lse, temperature)
    else:
        logp_top, logp_tail = _teacher_bucket(top, lse, temperature, n_tail)
    # The tail in log space: logsumexp over the vocab with the top-k ids masked out.
    masked = scaled.scatter(-1, ids, float("-inf"))
    logq_tail = torch.logsumexp(masked, dim=-1, keepdim=True) - lse_q
    return torch.cat((logp_top, logp_tail), dim=-1), torch.cat((logq_top, logq_tail), dim=-1)


def _teacher_tail_logmass(top_rel: torch.Tensor, lse_rel: torch.Tensor):
    """``([N, 1] log r, [N, 1] logsumexp(top - m))``, ``r = 1 - sum_topk exp(z - lse)`` floored at
    the smallest normal, from ``top - m`` and ``lse - m`` (``m`` the top logit: never a
    logsumexp of logits ~1e4)."""
    lse_top = torch.logsumexp(top_rel, dim=-1, keepdim=True)
    log_r = torch.log(-torch.expm1((lse_top - lse_rel).clamp(max=0.0)))
    return log_r.clamp(min=math.log(torch.finfo(top_rel.dtype).tiny)), lse_top


def _teacher_bucket(top, lse, temperature: float, n_tail: int):
    """Teacher ``(log p_T(top-k) [N, k], log p_T(tail) [N, 1])`` from the T=1 cache.

    Exact at T=1; for T != 1 the tail is taken as ``n_tail`` equal logits carrying the T=1
    tail mass (see module doc). Computed relative to the top logit ``m``."""
    m = detached_row_max(top)
    top_rel, lse_rel = top - m, lse.unsqueeze(-1) - m
    log_r, lse_top = _teacher_tail_logmass(top_rel, lse_rel)
    if temperature == 1.0:  # an lse rounded below the top-k's own: the top-k holds all the mass
        return top_rel - torch.maximum(lse_rel, lse_top), log_r
    log_n = math.log(n_tail)
    z_tail = lse_rel + log_r - log_n  # each tail token's logit, relative to m
    log_tail_t = log_n + z_tail / temperature  # log of the summed tail exp((z - m)/T)
    scaled = top_rel / temperature
    lse_t = torch.logsumexp(torch.cat((scaled, log_tail_t), dim=-1), dim=-1, keepdim=True)
    return scaled - lse_t, log_tail_t - lse_t


def _teacher_bucket_exact(top, log_tail, temperature: float):
    """Teacher ``(log p_T(top-k) [N, k], log p_T(tail) [N, 1])`` from the log tail mass at T:
    ``log_softmax((top - m) / T) + log(1 - r_T)`` and ``log r_T``, with r_T floored at the dtype's
    smallest normal and kept below 1."""
    tiny = torch.finfo(top.dtype).tiny
    log_r = log_tail.unsqueeze(-1).clamp(min=math.log(tiny), max=-tiny)
    scaled = (top - detached_row_max(top)) / temperature
    log_top = torch.where(log_r > -math.log(2.0), torch.log(-torch.expm1(log_r)), torch.log1p(-torch.exp(log_r)))
    return scaled - torch.logsumexp(scaled, dim=-1, keepdim=True) + log_top, log_r
