"""Chunked fused-linear distillation loss: ``logits = h @ W^T`` per chunk of tokens, the
divergence + CE and its gradient for that chunk, then ``grad_h`` and ``grad_W`` from the
chunk's logit gradient -- the full ``[N, V]`` logits never exist (Liger-Kernel style: the
gradients are computed in forward; backward only scales them).

Precision: the logits GEMM accumulates in float32 and its float32 result goes to the
softmax (never rounded to bf16 first; a bf16 x bf16 product is exact in float32, so this
equals the float32 GEMM of the upcast operands up to summation order). The backward GEMMs
take the logit gradient rounded to the parameter dtype -- what autograd of an unfused
low-precision lm_head does -- and ``grad_W`` is accumulated over chunks in float32.
"""

from __future__ import annotations

import torch

from ._common import DivSpec, TokenCoefs

DEFAULT_CHUNK_BYTES = 256 * 2**20
# float32 [rows, V] buffers alive at once per chunk, student side: Triton works in place on
# the logits; the PyTorch path holds the logits and ~6 temporaries (measured on CPU: peak
# 357 MiB above inputs at the 256 MiB default, 153 MiB at 64 MiB; docs/benchmarks.md).
# +1 for a dense teacher's logits.
_WORK_BUFFERS = {"triton": 1, "torch": 7}


def chunk_rows(chunk_bytes: int, vocab: int, backend: str, dense_teacher: bool) -> int:
    """Rows per chunk so that the chunk's float32 ``[rows, vocab]`` buffers fit ``chunk_bytes``."""
    per_row = 4 * vocab * (_WORK_BUFFERS[backend] + int(dense_teacher))
    return max(1, int(chunk_bytes) // per_row)


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a [n, H] @ b [V, H]^T`` as float32, accumulated in float32 and not rounded."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b.T
    if a.is_cuda:
        try:  # bf16/fp16 tensor cores, float32 output (torch >= 2.8)
            return torch.mm(a, b.T, out_dtype=torch.float32)
        except (RuntimeError, TypeError):
            pass
    return a.float() @ b.float().T


def _addmm_f32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """``acc (float32) += a @ b`` without a full-size temporary."""
    if a.dtype != torch.float32 and a.is_cuda:
        try:
            torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
            return
        except (RuntimeError, TypeError):
            pass
    acc.addmm_(a.float(), b.float())


class DenseTeacher:
    """A teacher given by its final hidden states ``[N, Ht]`` and head ``[V_t, Ht]`` (+ bias);
    its logits are computed chunk by chunk, without gradient."""

    def __init__(self, hidden, weight, bias, vocab: int):
        upcast = not hidden.is_cuda and hidden.dtype != torch.float32
        self.hidden = hidden.float() if upcast else hidden
        self.weight = weight[:vocab].detach()
        self.weight = self.weight.float() if upcast else self.weight
        self.bias = None if bias is None else bias[:vocab].detach().float()

    def logits(self, sl: slice) -> torch.Tensor:
        """float32 ``[rows, vocab]`` teacher logits for rows ``sl``."""
        with torch.no_grad():
            t = _mm_f32(self.hidden[sl].detach(), self.weight)
            return t if self.bias is None else t.add_(self.bias)


def fused_linear_distill_forward(hidden, weight, bias, *, teacher: DenseTeacher | None, topk,
                                 coefs: TokenCoefs, spec: DivSpec, vocab: int, rows: int, run):
    """Loss rows and all gradients, chunk by chunk.

    Args:
        hidden: ``[N, H]`` student final hidden states; weight ``[V, H]`` lm_head (same dtype);
            bias ``[V]`` or None.
        teacher / topk: a :class:`DenseTeacher`, or ``(ids [N, k], logp_top [N, k],
            logp_tail [N], lo_top [N, k], lo_tail [N])`` (see ``_common.topk_teacher_logprobs``).
        coefs: per-token bookkeeping for all N rows; vocab: real vocab (rows of W used).
        rows: tokens per chunk; run: per-chunk divergence (``softmax_divergence_forward`` or
            ``torch_divergence_forward``), called with ``grad=logits`` (in place).
    Returns:
        ``(div [N], ce [N] | None, grad_h [N, H] hidden.dtype, grad_w [V, H] weight.dtype,
        grad_b [V] | None)``; gradients are those of ``sum c_div D + c_ce CE``.
    """
    n, h = hidden.shape
    upcast = not hidden.is_cuda and hidden.dtype != torch.float32
    h_mm = hidden.float() if upcast else hidden
    w_mm = weight[:vocab].float() if upcast else weight[:vocab]
    grad_h = torch.empty_like(hidden)
    acc_w = torch.zeros(vocab, h, dtype=torch.float32, device=hidden.device)
    acc_b = None if bias is None else torch.zeros(vocab, dtype=torch.float32, device=hidden.device)
    divs, ces = [], []
    for start in range(0, n, rows):
        sl = slice(start, min(start + rows, n))
        logits = _mm_f32(h_mm[sl], w_mm)
        if bias is not None:
            logits += bias[:vocab].float()
        kw = {"teacher": teacher.logits(sl)} if teacher is not None else {"topk": tuple(t[sl] for t in topk)}
        div, ce, g = run(logits, coefs=coefs.rows(sl), spec=spec, vocab=vocab, grad=logits, **kw)
        divs.append(div)
        ces.append(ce)
        if acc_b is not None:
            acc_b += g.sum(0)
        if hidden.dtype != torch.float32:
            g = g.to(hidden.dtype)  # as autograd of an unfused low-precision lm_head
            g = g.float() if upcast else g
        grad_h[sl] = g @ w_mm
        _addmm_f32_(acc_w, g.T, h_mm[sl])
        del logits, g
    grad_w = acc_w if weight.dtype == torch.float32 and vocab == weight.shape[0] else _pad_rows(acc_w, weight)
    grad_b = None if bias is None else _pad_rows(acc_b, bias)
    ce = torch.cat(ces) if spec.has_ce else None
    return torch.cat(divs), ce, grad_h, grad_w, grad_b


def _pad_rows(acc: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``acc`` (float32, first ``vocab`` rows) into a zero tensor shaped/typed like ``like``."""
    out = torch.zeros_like(like)
    out[: acc.shape[0]] = acc
    return out


def _scale(grad, grad_loss):
    if grad is None or torch.equal(grad_loss, torch.ones_like(grad_loss)):
        return grad
    return grad * grad_loss.to(grad.dtype)


class FusedLinearDistillFunction(torch.autograd.Function):
    """Autograd wrapper: ``run(hidden, weight, bias)`` does all the work in forward and
    returns ``(loss, parts, grad_h, grad_w, grad_b)``; backward scales the saved gradients by
    the (0-d) incoming gradient. Reads ``weight`` only through its argument, so under
    ZeRO-3 it must be called inside the lm_head module's forward (gathered weight)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, run):
        loss, parts, grad_h, grad_w, grad_b = run(hidden, weight, bias)
        ctx.save_for_backward(grad_h, grad_w, grad_b)
        ctx.mark_non_differentiable(parts["div"], parts["ce"])
        return loss, parts["div"], parts["ce"]

    @staticmethod
    def backward(ctx, grad_loss, _grad_div, _grad_ce):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        return _scale(grad_h, grad_loss), _scale(grad_w, grad_loss), _scale(grad_b, grad_loss), None
