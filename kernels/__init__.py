"""Fused distillation-loss kernels (imported as ``dist_distill.kernels``).

- :func:`softmax_divergence` -- loss of given student logits ``[..., V]`` against a dense
  teacher's logits or a sparse top-k teacher; gradient computed in the forward pass.
- :func:`fused_linear_distill_loss` -- the same loss from the student's final hidden states
  and lm_head weight, chunked over tokens so the ``[N, V]`` logits never exist.

Both match ``dist_distill.losses.divergence`` / ``topk_divergence`` (same conventions and
arguments; see ``_common``). ``backend="auto"`` runs the Triton kernels on CUDA tensors and
the pure-PyTorch twin elsewhere; ``"triton"`` on CPU tensors needs ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import functools

import torch

from ._common import KINDS, TAILS, check_topk_ids, make_spec, reduce_rows, resolve_backend, token_coefs, topk_teacher_logprobs
from .fused_linear_distill import (
    DEFAULT_CHUNK_BYTES,
    DenseTeacher,
    FusedLinearDistillFunction,
    chunk_rows,
    fused_linear_distill_forward,
)
from .softmax_divergence import SoftmaxDivergenceFunction, softmax_divergence_forward
from .torch_divergence import torch_divergence_forward

__all__ = ["DEFAULT_CHUNK_BYTES", "KINDS", "TAILS", "fused_linear_distill_loss", "softmax_divergence"]


def _runner(backend: str, block_v):
    if backend == "triton":
        return functools.partial(softmax_divergence_forward, block_v=block_v)
    return torch_divergence_forward


def _topk_inputs(teacher_topk, coefs, spec, vocab: int, n: int):
    """``(ids, logp_top, logp_tail, lo_top, lo_tail)`` for the kernels from the user's
    ``(ids, logits, lse[, log_tail])`` (teacher log-probabilities as float32 pairs ``hi + lo``, see
    ``_common.topk_teacher_logprobs``)."""
    ids, top, lse, log_tail = (tuple(teacher_topk) + (None, None))[:4]
    k = ids.shape[-1]
    if ids.numel() != n * k or top.shape != ids.shape:
        raise ValueError(f"teacher_topk ids {tuple(ids.shape)} and logits {tuple(top.shape)} must be [N={n}, k]")
    ids = check_topk_ids(ids.reshape(n, k).to(coefs.valid.device), coefs.valid, vocab)
    if log_tail is not None:
        log_tail = log_tail.reshape(n).to(coefs.valid.device)
    return (ids.contiguous(), *topk_teacher_logprobs(top.reshape(n, k), lse, spec=spec, vocab=vocab, log_tail=log_tail))


def softmax_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    *,
    teacher_topk=None,
    kind: str = "fkl",
    temperature: float = 1.0,
    scale_by_t2: bool = True,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    tail: str = "renorm",
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    weights: torch.Tensor | None = None,
    ce_weight: float = 0.0,
    vocab_size: int | None = None,
    reduction: str = "mean",
    normalizer=None,
    backend: str = "auto",
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    block_v: int | None = None,
    return_parts: bool = False,
):
    """Distillation loss of ``student_logits [..., V]`` (fp32/bf16/fp16) against
    ``teacher_logits [..., V_t]`` or ``teacher_topk = (ids [..., k] int64, raw T=1 logits
    [..., k], full-vocab T=1 logsumexp [...] or None for renorm[, log tail mass [...] at the
    loss's temperature: makes tail="bucket" exact at any T, see dist_distill.teacher.tails])``.

    Same arguments and result as ``dist_distill.losses.divergence`` / ``topk_divergence``
    (kind in ``KINDS``, tail in ``TAILS``, ``reduction`` "none" -> ``[...]``, "sum", "mean";
    ``normalizer`` replaces the mean's denominator). The teacher gets no gradient; the
    student's gradient (dtype of ``student_logits``) is computed in forward.
    ``backend``: "auto" | "triton" | "torch"; ``chunk_bytes`` bounds the PyTorch path's
    float32 work buffers; ``block_v`` the Triton vocab block (tests).
    Returns ``loss``, or ``(loss, {"div": T^2-scaled divergence, "ce": CE})`` with
    ``return_parts`` (detached, reduced like the loss).
    """
    spec = make_spec(kind, beta=beta, skew_alpha=skew_alpha, temperature=temperature,
                     scale_by_t2=scale_by_t2, ce_weight=ce_weight, tail=tail if teacher_topk is not None else None)
    if (teacher_logits is None) == (teacher_topk is None):
        raise ValueError("pass exactly one of teacher_logits= or teacher_topk=")
    lead, v_full = student_logits.shape[:-1], student_logits.shape[-1]
    vocab = _vocab(vocab_size, v_full, teacher_logits)
    x = student_logits.reshape(-1, v_full)
    n = x.shape[0]
    backend = resolve_backend(backend, x)
    coefs = token_coefs(labels, weights, n=n, vocab=vocab, device=x.device, spec=spec,
                        ignore_index=ignore_index, reduction=reduction, normalizer=normalizer)
    if teacher_logits is not None:
        t2 = teacher_logits.reshape(n, -1)
        teacher = {"teacher": t2 if t2.stride(-1) == 1 else t2.contiguous()}
    else:
        teacher = {"topk": _topk_inputs(teacher_topk, coefs, spec, vocab, n)}
    run = _runner(backend, block_v)
    rows = n if backend == "triton" else chunk_rows(chunk_bytes, vocab, "torch", teacher_logits is not None)

    def forward(x):
        x = x if x.stride(-1) == 1 else x.contiguous()
        in_place = "topk" in teacher and backend == "triton"  # the top-k kernel overwrites its input
        grad = x.clone() if in_place else torch.zeros_like(x)
        grad[:, vocab:] = 0
        divs, ces = [], []
        for start in range(0, n, rows):
            sl = slice(start, min(start + rows, n))
            kw = {k: (t[sl] if k == "teacher" else tuple(u[sl] for u in t)) for k, t in teacher.items()}
            src = grad[sl] if in_place else x[sl]
            div, ce, g = run(src, coefs=coefs.rows(sl), spec=spec, vocab=vocab,
                             grad=grad[sl] if backend == "triton" else None, **kw)
            if backend == "torch":
                grad[sl] = g
            divs.append(div)
            ces.append(ce)
        ce = torch.cat(ces) if spec.has_ce else None
        loss, parts = reduce_rows(torch.cat(divs), ce, coefs, spec, reduction)
        if reduction == "none":
            loss, parts = loss.reshape(lead), {k: p.reshape(lead) for k, p in parts.items()}
        return loss, parts, grad

    loss, div, ce = SoftmaxDivergenceFunction.apply(student_logits.reshape(-1, v_full), forward)
    if reduction == "none":
        loss, div, ce = loss.reshape(lead), div.reshape(lead), ce.reshape(lead)
    return (loss, {"div": div, "ce": ce}) if return_parts else loss


def _vocab(vocab_size, v_student: int, teacher_logits) -> int:
    """The compared vocabulary; errors name ``vocab_size`` when the two vocabs differ."""
    if vocab_size is not None:
        if vocab_size > v_student or (teacher_logits is not None and vocab_size > teacher_logits.shape[-1]):
            raise ValueError(f"vocab_size={vocab_size} exceeds the logits' vocabulary dimension")
        return int(vocab_size)
    if teacher_logits is not None and teacher_logits.shape[-1] != v_student:
        raise ValueError(
            f"student vocab {v_student} != teacher vocab {teacher_logits.shape[-1]}; if one model's vocab is "
            "padded pass vocab_size=<real vocab size> (the tokenizers must match)")
    return v_student


def fused_linear_distill_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
    teacher_hidden: torch.Tensor | None = None,
    teacher_weight: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    teacher_topk=None,
    kind: str = "fkl",
    temperature: float = 1.0,
    scale_by_t2: bool = True,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
    tail: str = "renorm",
    ce_weight: float = 0.0,
    ignore_index: int = -100,
    weights: torch.Tensor | None = None,
    vocab_size: int | None = None,
    reduction: str = "mean",
    normalizer=None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
    backend: str = "auto",
    block_v: int | None = None,
    return_parts: bool = False,
):
    """Distillation loss from the student's final hidden states, never materialising ``[N, V]``.

    Args:
        hidden: ``[..., H]`` student final hidden states (fp32/bf16/fp16).
        weight: ``[V, H]`` student lm_head weight, same dtype; bias: ``[V]`` or None. Only
            these arguments are read (call it inside the lm_head module's forward under
            ZeRO-3); their gradients come out through autograd.
        teacher_hidden + teacher_weight (+ teacher_bias): dense teacher, ``[..., Ht]`` and
            ``[V_t, Ht]`` (no gradient); OR teacher_topk: ``(ids [..., k] int64, raw T=1
            logits [..., k], full-vocab T=1 logsumexp [...] or None for renorm[, log tail
            mass [...] at `temperature`])`` (as :func:`softmax_divergence`).
        kind, temperature, scale_by_t2, beta, skew_alpha, tail, ce_weight, labels,
            ignore_index, weights, vocab_size, normalizer: as ``dist_distill.losses``.
        reduction: "sum" or "mean" ("none" is not supported: the weight gradient is summed
            over tokens in forward).
        chunk_bytes: budget in bytes for the per-chunk float32 ``[rows, V]`` work buffers
            (default 256 MiB); rows per chunk = budget / (4 V x buffers of the backend).
        backend: "auto" (Triton on CUDA, PyTorch elsewhere) | "triton" | "torch".
    Returns:
        0-d float32 loss, or ``(loss, {"div": ..., "ce": ...})`` with ``return_parts``.
    """
    if reduction == "none":
        raise ValueError("fused_linear_distill_loss supports reduction='sum' or 'mean' (not 'none')")
    dense = teacher_hidden is not None or teacher_weight is not None
    if dense == (teacher_topk is not None) or (dense and (teacher_hidden is None or teacher_weight is None)):
        raise ValueError("pass either teacher_hidden= and teacher_weight= (dense teacher) or teacher_topk=")
    if hidden.dtype != weight.dtype:
        raise ValueError(f"hidden ({hidden.dtype}) and weight ({weight.dtype}) must share a dtype")
    spec = make_spec(kind, beta=beta, skew_alpha=skew_alpha, temperature=temperature,
                     scale_by_t2=scale_by_t2, ce_weight=ce_weight, tail=None if dense else tail)
    h2 = hidden.reshape(-1, hidden.shape[-1])
    n = h2.shape[0]
    vocab = _vocab(vocab_size, weight.shape[0], None)
    if dense and vocab_size is None and teacher_weight.shape[0] != weight.shape[0]:
        raise ValueError(f"student vocab {weight.shape[0]} != teacher vocab {teacher_weight.shape[0]}: pass vocab_size=")
    backend = resolve_backend(backend, h2)
    coefs = token_coefs(labels, weights, n=n, vocab=vocab, device=h2.device, spec=spec,
                        ignore_index=ignore_index, reduction=reduction, normalizer=normalizer)
    teacher = DenseTeacher(teacher_hidden.reshape(n, -1), teacher_weight, teacher_bias, vocab) if dense else None
    topk = None if dense else _topk_inputs(teacher_topk, coefs, spec, vocab, n)
    rows = chunk_rows(chunk_bytes, vocab, backend, dense)

    def run(h, w, b):
        div, ce, grad_h, grad_w, grad_b = fused_linear_distill_forward(
            h, w, b, teacher=teacher, topk=topk, coefs=coefs, spec=spec, vocab=vocab, rows=rows,
            run=_runner(backend, block_v))
        loss, parts = reduce_rows(div, ce, coefs, spec, reduction)
        return loss, parts, grad_h, grad_w, grad_b

    loss, div, ce = FusedLinearDistillFunction.apply(h2, weight, bias, run)
    return (loss, {"div": div, "ce": ce}) if return_parts else loss
