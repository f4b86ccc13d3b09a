"""Token bookkeeping shared by every loss: flattening, masking, CE mixing, reduction.

Normalisation (DESIGN fact 4): the training loss of an optimizer step is
``sum over ALL non-ignored tokens of the step / (their number)``, across micro-batches
and data-parallel ranks. Each micro-batch therefore calls a loss with
``reduction="mean", normalizer=count_tokens(<labels of the whole step>)`` (computed once
per step, all-reduced over the data-parallel group) and gradients simply accumulate.
A per-micro-batch mean instead over-weights tokens of sparsely filled micro-batches.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

REDUCTIONS = ("none", "sum", "mean")


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """float64 stays float64 (gradcheck); every other float dtype is computed in float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def check_common_args(ce_weight: float, labels, reduction: str, normalizer) -> None:
    """Validate the arguments every loss shares; errors name the argument to change."""
    if not 0.0 <= float(ce_weight) <= 1.0:
        raise ValueError(f"ce_weight must lie in [0, 1], got {ce_weight}")
    if ce_weight > 0 and labels is None:
        raise ValueError("ce_weight > 0 mixes in hard-label cross-entropy: pass labels=")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if normalizer is not None and reduction != "mean":
        raise ValueError(f"normalizer= overrides the denominator of reduction='mean'; got reduction={reduction!r}")


def slice_vocab(logits: torch.Tensor, vocab_size: int | None, name: str) -> torch.Tensor:
    """``logits[..., :vocab_size]``: drop the padded vocabulary columns (DESIGN fact 7)."""
    if vocab_size is None:
        return logits
    if logits.shape[-1] < vocab_size:
        raise ValueError(f"{name} has {logits.shape[-1]} vocabulary columns < vocab_size={vocab_size}")
    return logits[..., :vocab_size]


def flatten_token_args(labels, weights, lead_shape: torch.Size, device) -> tuple:
    """Flatten ``labels`` / ``weights`` of shape ``lead_shape`` to ``[N]`` (or keep None)."""
    n = lead_shape.numel()
    out = []
    for name, x in (("labels", labels), ("weights", weights)):
        if x is None:
            out.append(None)
            continue
        if x.shape != lead_shape:
            raise ValueError(f"{name} must have shape {tuple(lead_shape)} (logits without the vocab dim), got {tuple(x.shape)}")
        out.append(x.reshape(n).to(device))
    return tuple(out)


def token_mask(labels, weights, ignore_index: int) -> torch.Tensor | None:
    """``[N]`` bool: rows that take part in the loss (label != ignore_index and weight != 0).

    Returns None when neither labels nor weights are given (every row counts).
    """
    valid = None
    if labels is not None:
        valid = labels != ignore_index
    if weights is not None:
        nonzero = weights != 0
        valid = nonzero if valid is None else valid & nonzero
    return valid


def detached_row_max(x: torch.Tensor) -> torch.Tensor:
    """``[..., 1]`` max over the last dim as a constant (0 where it is not finite): the shift
    applied to logits before anything else, so that no logit ~1e4 is scaled or summed."""
    m = x.detach().amax(-1, keepdim=True)
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def scaled_log_softmax(x: torch.Tensor, temperature: float) -> torch.Tensor:
    """``log_softmax(x / T)`` over the last dim, with the row max subtracted BEFORE dividing by T:
    at logits ~1e4, ``x / T`` would round every logit by ~1e-3 (float32) and with it every
    difference the softmax depends on. The max is a constant (detached): same gradient."""
    return torch.log_softmax((x - detached_row_max(x)) / temperature, dim=-1)


def zero_masked_rows(x: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Replace masked rows of ``x [N, C]`` by 0 so garbage (even inf/NaN) never reaches the math;
    ``torch.where`` gives those rows an exact 0 gradient."""
    if valid is None:
        return x
    return torch.where(valid.unsqueeze(-1), x, x.new_zeros(()))


def _cross_entropy(student: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``[N]`` hard-label CE of ``student [N, V]`` at T=1; 0 on masked rows."""
    safe = torch.where(valid, labels, torch.zeros_like(labels))
    if bool(((safe < 0) | (safe >= student.shape[-1])).any()):
        raise ValueError(f"labels must lie in [0, {student.shape[-1]}) (the real vocab) or equal ignore_index")
    return F.cross_entropy(student, safe, reduction="none")


def finish_token_losses(
    div: torch.Tensor,
    student: torch.Tensor,
    *,
    labels,
    weights,
    valid,
    temperature: float,
    scale_by_t2: bool,
    ce_weight: float,
    reduction: str,
    normalizer,
    lead_shape: torch.Size,
) -> torch.Tensor:
    """Scale by T^2, mix CE, weight, mask and reduce per-token divergences.

    Args:
        div: ``[N]`` divergence at temperature T (unscaled), float32/float64.
        student: ``[N, V]`` student logits at T=1 on the real vocab, masked rows zeroed
            (used only for the CE term).
        labels / weights / valid: ``[N]`` or None (see :func:`token_mask`).
    Returns:
        ``reduction="none"``: ``lead_shape`` per-token loss, exactly 0 on ignored rows;
        ``"sum"``: 0-d sum; ``"mean"``: 0-d ``sum / denominator`` where the denominator is
        ``normalizer`` if given, else the weight sum (weights given) or the count of valid
        rows. A zero denominator (fully masked batch) gives 0, not NaN.
    """
    if scale_by_t2:
        div = div * (float(temperature) ** 2)
    loss = div
    if ce_weight > 0:
        loss = (1.0 - ce_weight) * div + ce_weight * _cross_entropy(student, labels, valid)
    if weights is not None:
        loss = loss * weights.to(loss.dtype)
    if valid is not None:
        loss = torch.where(valid, loss, loss.new_zeros(()))
    if reduction == "none":
        return loss.reshape(lead_shape)
    total = loss.sum()
    if reduction == "sum":
        return total
    denom = _denominator(loss, weights, valid, normalizer)
    return total / torch.where(denom > 0, denom, torch.ones_like(denom))


def _denominator(loss: torch.Tensor, weights, valid, normalizer) -> torch.Tensor:
    """0-d denominator of the mean, in ``loss.dtype``."""
    if normalizer is not None:
        return torch.as_tensor(normalizer, dtype=loss.dtype, device=loss.device)
    if weights is not None:
        w = weights.to(loss.dtype)
        return (w if valid is None else torch.where(valid, w, w.new_zeros(()))).sum()
    if valid is not None:
        return valid.sum().to(loss.dtype)
    return torch.tensor(float(loss.numel()), dtype=loss.dtype, device=loss.device)


def count_tokens(labels: torch.Tensor, ignore_index: int = -100, weights=None, group=None) -> torch.Tensor:
    """Global normaliser of an optimizer step: non-ignored tokens (or their weight sum).

    Args:
        labels: int tensor, any shape; the labels of everything this rank will process in
            the step (all its micro-batches concatenated or stacked).
        ignore_index: label value of ignored tokens.
        weights: optional float tensor shaped like ``labels``; counts ``sum(weights)``
            over non-ignored tokens instead of their number.
        group: ``torch.distributed`` process group to sum over (default: the world).
    Returns:
        0-d float64 tensor on ``labels.device``, all-reduced (SUM) over ``group`` when
        ``torch.distributed`` is initialised and the group has more than one rank. Every
        rank must call it (it is a collective). Pass it as ``normalizer=`` with
        ``reduction="mean"``.
    """
    valid = labels != ignore_index
    if weights is None:
        count = valid.sum().to(torch.float64)
    else:
        w = weights.to(torch.float64)
        count = torch.where(valid, w, w.new_zeros(())).sum()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1:
        dist.all_reduce(count, op=dist.ReduceOp.SUM, group=group)
    return count
