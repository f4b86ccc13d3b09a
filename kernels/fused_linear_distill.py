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
    head = ChunkedHead(hidden, weight, bias, vocab)
    divs, ces = [], []
    for start in range(0, hidden.shape[0], rows):
        sl = slice(start, min(start + rows, hidden.shape[0]))
        logits = head.logits(sl)
        kw = {"teacher": teacher.logits(sl)} if teacher is not None else {"topk": tuple(t[sl] for t in topk)}
        div, ce, g = run(logits, coefs=coefs.rows(sl), spec=spec, vocab=vocab, grad=logits, **kw)
        divs.append(div)
        ces.append(ce)
        head.backward(sl, g)
        del logits, g
    ce = torch.cat(ces) if spec.has_ce else None
    return (torch.cat(divs), ce, head.grad_h, *head.weight_grads())


class ChunkedHead:
    """The lm_head of a chunked loss: float32 logits of a slice of rows, and the gradients accumulated chunk by
    chunk from each chunk's float32 ``[rows, vocab]`` gradient of the logits (fused_linear_distill_forward and
    losses.fused_uld). Holds grad_h ``[N, H]`` (hidden.dtype) and float32 accumulators ``[vocab, H]`` and
    ``[vocab]``; on the CPU a low-precision head is computed in float32 (upcast)."""

    def __init__(self, hidden, weight, bias, vocab: int):
        self.upcast = not hidden.is_cuda and hidden.dtype != torch.float32
        self.hidden_dtype, self.vocab, self.weight, self.bias = hidden.dtype, vocab, weight, bias
        self.h_mm = hidden.float() if self.upcast else hidden
        self.w_mm = weight[:vocab].float() if self.upcast else weight[:vocab]
        self.grad_h = torch.empty_like(hidden)
        self.acc_w = torch.zeros(vocab, hidden.shape[1], dtype=torch.float32, device=hidden.device)
        self.acc_b = None if bias is None else torch.zeros(vocab, dtype=torch.float32, device=hidden.device)

    def logits(self, sl: slice) -> torch.Tensor:
        """float32 ``[rows, vocab]`` logits of rows ``sl`` (a new buffer the caller may overwrite)."""
        z = _mm_f32(self.h_mm[sl], self.w_mm)
        if self.bias is not None:
            z += self.bias[:self.vocab].float()
        return z

    def backward(self, sl: slice, g: torch.Tensor) -> None:
        """Accumulate the gradients of rows ``sl`` from ``g`` (float32 ``[rows, vocab]``, d loss / d logits)."""
        if self.acc_b is not None:
            self.acc_b += g.sum(0)
        if self.hidden_dtype != torch.float32:
            g = g.to(self.hidden_dtype)  # as autograd of an unfused low-precision lm_head
            g = g.float() if self.upcast else g
        self.grad_h[sl] = g @ self.w_mm
        _addmm_f32_(self.acc_w, g.T, self.h_mm[sl])

    def weight_grads(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(grad_w ``[V, H]`` weight.dtype, grad_b ``[V]`` or None), padded back to the weight's rows."""
        w = self.weight
        grad_w = self.acc_w if w.dtype == torch.float32 and self.vocab == w.shape[0] else _pad_rows(self.acc_w, w)
        return grad_w, None if self.bias is None else _pad_rows(self.acc_b, self.bias)


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
