"""Chunked fused-linear ULD + CE: the cross-tokenizer loss from the student's final hidden states.

(Pure PyTorch, beside the reference maths in ``uld``; it shares the lm_head GEMM helpers and the
autograd wrapper of ``dist_distill.kernels.fused_linear_distill``.)

The top-k form of Universal Logit Distillation (dist_distill.losses.uld: the maths, its error bound
``0 <= ULD - ULD_k <= 2 min(S, r)`` and its gradient) plus hard-label cross-entropy, computed chunk by
chunk of tokens like ``fused_linear_distill``: ``logits = h_c @ W^T`` for one chunk, CE on every row of
it, ULD_k on the chunk's rows that are aligned with a teacher row, ``grad_h`` and ``grad_W`` from the
chunk's logit gradient in the same pass -- no ``[N, V]`` logits, no full sort of the vocabulary (the
student's k largest probabilities come from ``torch.topk``, O(V) per row).

Memory per chunk (float32 ``[rows, V]``): the logits, their gradient, the student's probabilities at
T and the rank-sign matrix of the aligned rows, ~2 softmax temporaries: ``ULD_BUFFERS`` per row, which
sizes the chunk from the recipe's ``loss.chunk_mib``. At V=128k and the 256 MiB default: 104 rows a
chunk, so a 4k-token micro-batch takes 40 chunks. Measured on CPU (1024 rows, all paired, V=32000, k=64):
transient peak 87 MiB at a 64 MiB budget and 43 MiB at 16 MiB above the kept gradients, i.e. ~0.9x the
budget plus ~28 MiB that does not grow with it. PyTorch ops (no Triton kernel): on a GPU the GEMMs
dominate, and topk over the vocabulary is one kernel per chunk.
"""

from __future__ import annotations

import torch

from dist_distill.kernels.fused_linear_distill import DEFAULT_CHUNK_BYTES, ChunkedHead, FusedLinearDistillFunction

ULD_BUFFERS = 5
"""float32 [rows, V] buffers alive per chunk (see the module doc); planning/memory.py reads it."""


def uld_chunk_rows(chunk_bytes: int, vocab: int) -> int:
    """Rows per chunk so that the chunk's float32 ``[rows, vocab]`` buffers fit ``chunk_bytes``."""
    return max(1, int(chunk_bytes) // (4 * vocab * ULD_BUFFERS))


def _uld_rows(z: torch.Tensor, p: torch.Tensor, r: torch.Tensor, inv_t: float):
    """ULD_k of student logits ``z`` [m, V] (float32) against sorted teacher probabilities ``p`` [m, k] and tail
    masses ``r`` [m]: (loss [m], dL/dz [m, V])."""
    k = p.shape[1]
    q = torch.softmax(z * inv_t, -1)
    kk = min(k, q.shape[1])
    q_top, idx = q.topk(kk, dim=1)
    tail = (q.sum(-1) - q_top.sum(-1)).clamp(min=0.0)
    d = q_top - p[:, :kk]
    loss = d.abs().sum(-1) + p[:, kk:].sum(-1) + (tail - r).abs()  # teacher ranks past V_s meet zeros
    g_tail = (tail - r).sign()
    g_top = d.sign()
    mean_g = (q_top * g_top).sum(-1) + tail * g_tail  # sum_v q_v g_v
    g = g_tail[:, None].expand_as(q).clone().scatter_(1, idx, g_top)
    return loss, q.mul_(g.sub_(mean_g[:, None])).mul_(inv_t)


def fused_linear_uld_forward(hidden, weight, bias, *, labels, teacher_probs, teacher_tail, aligned_rows,
                             temperature: float, ce_weight: float, uld_weight: float, vocab: int, rows: int,
                             ignore_index: int = -100):
    """Loss SUM and gradients, chunk by chunk.

    Args:
        hidden ``[N, H]`` student final hidden states at its target tokens; weight ``[V, H]`` (same dtype), bias
        ``[V]`` or None; labels int64 ``[N]`` (CE targets; `ignore_index` rows carry no CE);
        teacher_probs ``[M, k]`` the aligned teacher rows' probabilities in decreasing order and teacher_tail
        ``[M]`` their mass outside the top-k, at `temperature` (losses.uld.teacher_sorted_topk);
        aligned_rows int64 ``[M]``, increasing: the student row (index into N) each teacher row is paired with.
    Returns:
        ``(loss, {"div": ULD_k sum, "ce": CE sum}, grad_h, grad_w, grad_b)`` for
        ``loss = ce_weight * sum CE + uld_weight * sum ULD_k``.
    """
    n = hidden.shape[0]
    head = ChunkedHead(hidden, weight, bias, vocab)
    aligned_rows = aligned_rows.to(hidden.device)
    bounds = torch.searchsorted(aligned_rows, torch.arange(0, n + rows, rows, device=hidden.device)).tolist()
    valid = labels != ignore_index
    safe = torch.where(valid, labels, 0)
    c_ce = valid.float() * ce_weight
    ce_sum = torch.zeros((), dtype=torch.float64, device=hidden.device)
    uld_sum = torch.zeros((), dtype=torch.float64, device=hidden.device)
    for c, start in enumerate(range(0, n, rows)):
        sl = slice(start, min(start + rows, n))
        z = head.logits(sl)
        log_d = z.logsumexp(-1, keepdim=True)
        ce = log_d.squeeze(1) - z.gather(1, safe[sl, None]).squeeze(1)
        ce_sum += (ce * valid[sl]).double().sum()
        g = (z - log_d).exp_().mul_(c_ce[sl, None])
        g.scatter_add_(1, safe[sl, None], -c_ce[sl, None])
        a, b = bounds[c], bounds[c + 1]
        if b > a:
            local = aligned_rows[a:b] - start
            loss, dz = _uld_rows(z[local], teacher_probs[a:b].float(), teacher_tail[a:b].float(), 1.0 / temperature)
            uld_sum += loss.double().sum()
            g.index_add_(0, local, dz.mul_(uld_weight))
            del dz
        head.backward(sl, g)
        del z, g
    grad_h, (grad_w, grad_b) = head.grad_h, head.weight_grads()
    ce_sum, uld_sum = ce_sum.float(), uld_sum.float()
    loss = ce_weight * ce_sum + uld_weight * uld_sum
    return loss, {"div": uld_sum, "ce": ce_sum}, grad_h, grad_w, grad_b


def fused_linear_uld_loss(hidden: torch.Tensor, weight: torch.Tensor, *, labels: torch.Tensor,
                          teacher_probs: torch.Tensor, teacher_tail: torch.Tensor, aligned_rows: torch.Tensor,
                          bias: torch.Tensor | None = None, temperature: float = 1.0, ce_weight: float = 0.0,
                          uld_weight: float = 1.0, vocab_size: int | None = None,
                          chunk_bytes: int = DEFAULT_CHUNK_BYTES, return_parts: bool = False):
    """``ce_weight * sum CE + uld_weight * sum ULD_k`` over the rows of `hidden` [N, H] (arguments: see
    :func:`fused_linear_uld_forward`), gradients for hidden, weight and bias computed in the forward pass.
    Reads `weight` only through its argument: under ZeRO-3 call it inside the lm_head's forward.
    Returns the 0-d loss, or ``(loss, {"div": ULD_k sum, "ce": CE sum})`` (detached) with `return_parts`."""
    vocab = weight.shape[0] if vocab_size is None else vocab_size
    m = aligned_rows.shape[0]
    if teacher_probs.shape[0] != m or teacher_tail.shape != (m,):
        raise ValueError(f"teacher_probs {tuple(teacher_probs.shape)} and teacher_tail {tuple(teacher_tail.shape)} "
                         f"must be [M={m}, k] and [M] (one per aligned row)")
    if m and (bool((aligned_rows[1:] <= aligned_rows[:-1]).any()) or int(aligned_rows[0]) < 0
              or int(aligned_rows[-1]) >= hidden.shape[0]):
        raise ValueError(f"aligned_rows must increase strictly within [0, {hidden.shape[0]})")
    rows = uld_chunk_rows(chunk_bytes, vocab)

    def run(h, w, b):
        return fused_linear_uld_forward(h, w, b, labels=labels, teacher_probs=teacher_probs,
                                        teacher_tail=teacher_tail, aligned_rows=aligned_rows, temperature=temperature,
                                        ce_weight=ce_weight, uld_weight=uld_weight, vocab=vocab, rows=rows)

    loss, div, ce = FusedLinearDistillFunction.apply(hidden, weight, bias, run)
    return (loss, {"div": div, "ce": ce}) if return_parts else loss
