"""Dense (full-vocabulary) distillation loss: the reference every other path is tested against."""

from __future__ import annotations

import torch

from .core import check_kind_args, divergence_from_logprobs
from .reduction import (
    check_common_args,
    compute_dtype,
    finish_token_losses,
    flatten_token_args,
    scaled_log_softmax,
    slice_vocab,
    token_mask,
    zero_masked_rows,
)


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str,
    *,
    temperature: float = 1.0,
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
) -> torch.Tensor:
    """Distillation loss between full student and teacher logits.

    ``p = softmax(teacher / T)`` (teacher), ``q = softmax(student / T)`` (student); the
    divergence ``kind`` is one of ``KINDS`` (see
    :func:`dist_distill.losses.core.divergence_from_logprobs`): ``fkl = KL(p||q)``
    (gradient wrt student logits ``(q - p) / T``, i.e. ``T (q - p)`` with T^2 scaling),
    ``rkl = KL(q||p)``, ``jsd`` (``m = beta p + (1-beta) q``, ``beta KL(p||m) +
    (1-beta) KL(q||m)``; ``beta=0`` returns fkl and ``beta=1`` returns rkl exactly, TRL's
    convention; in between the unscaled JSD tends to 0 at both ends, with
    ``JSD / beta -> fkl`` as ``beta -> 0`` and ``JSD / (1-beta) -> rkl`` as ``beta -> 1``),
    ``skew_fkl = KL(p || a p + (1-a) q)``, ``skew_rkl = KL(q || a q + (1-a) p)`` with
    ``a = skew_alpha`` (DistiLLM; ``a = 0`` gives fkl / rkl), ``tvd = 0.5 sum |p - q|``.

    Args:
        student_logits: ``[..., V_s]`` any float dtype; upcast to float32 (float64 stays
            float64) before any softmax.
        teacher_logits: ``[..., V_t]``, same leading dims; upcast likewise.
        temperature: T > 0.
        scale_by_t2: multiply the divergence (every kind) by T^2 (Hinton et al. 2015: the
            soft-target gradients scale as 1/T^2; this keeps them comparable across
            temperatures and relative to the CE term).
        beta: JSD mixture weight of the teacher. skew_alpha: skew KL mixture weight.
        labels: ``[...]`` int64; rows with ``labels == ignore_index`` are ignored (exactly 0
            loss and 0 gradient, whatever their logits). Required when ``ce_weight > 0``.
        weights: ``[...]`` optional per-token weights multiplying the per-token loss.
        ce_weight: per-token loss ``(1 - ce_weight) * div + ce_weight * CE(student at T=1, labels)``.
        vocab_size: compare only ``logits[..., :vocab_size]`` on both sides (padded model
            vocab, DESIGN fact 7). Without it ``V_s`` must equal ``V_t``.
        reduction: ``"none"`` -> ``[...]`` per-token loss; ``"sum"``; ``"mean"`` -> sum /
            (non-ignored tokens, or their weight sum if ``weights``).
        normalizer: float or 0-d tensor overriding the denominator of ``"mean"``: the
            global token count of the optimizer step (see
            :func:`dist_distill.losses.count_tokens`).
    Returns:
        float32 (float64 for float64 input) loss, shape per ``reduction``.
    """
    check_kind_args(kind, beta, skew_alpha, temperature)
    check_common_args(ce_weight, labels, reduction, normalizer)
    student = slice_vocab(student_logits, vocab_size, "student_logits")
    teacher = slice_vocab(teacher_logits, vocab_size, "teacher_logits")
    if student.shape != teacher.shape:
        raise ValueError(
            f"student logits {tuple(student.shape)} and teacher logits {tuple(teacher.shape)} differ; "
            "if one model's vocab is padded pass vocab_size=<real vocab size> (the tokenizers must match)"
        )
    lead_shape, v = student.shape[:-1], student.shape[-1]
    dtype = compute_dtype(student)
    labels, weights = flatten_token_args(labels, weights, lead_shape, student.device)
    valid = token_mask(labels, weights, ignore_index)
    student = zero_masked_rows(student.reshape(-1, v).to(dtype), valid)
    teacher = zero_masked_rows(teacher.reshape(-1, v).to(dtype), valid)
    logq = scaled_log_softmax(student, temperature)
    logp = scaled_log_softmax(teacher, temperature)
    div = divergence_from_logprobs(logp, logq, kind, beta=beta, skew_alpha=skew_alpha)
    return finish_token_losses(
        div, student, labels=labels, weights=weights, valid=valid, temperature=temperature,
        scale_by_t2=scale_by_t2, ce_weight=ce_weight, reduction=reduction,
        normalizer=normalizer, lead_shape=lead_shape,
    )
