"""Temperature-softmax divergence + hard-label CE over the vocabulary: Triton kernels.

Layout (Liger-Kernel style): ``@triton.jit`` kernels (math in comments) -> host launchers
``softmax_divergence_forward`` / ``softmax_divergence_backward`` ->
``SoftmaxDivergenceFunction``. One program handles one row (token); the vocabulary is
streamed in blocks of ``BLOCK_V`` with an online logsumexp, all math in float32 whatever
the input dtype (fp32 / bf16 / fp16). The gradient is written in the forward pass.

Math (s = z / T student, t = teacher / T, log q = s - lse(s), log p = t - lse(t)).
For a divergence D over categories c with student probabilities q_c (a category is one
token for the dense teacher; a top-k id or the tail bucket for the sparse teacher), let
``h_c = q_c dD/dq_c = dD/d(log q_c)``. Through the softmax, for a token j in category c(j):

    dD/ds_j = (q_j / q_c(j)) h_c(j) - q_j sum_c h_c        (= h_j - q_j sum h for dense)

and dD/dz_j = dD/ds_j / T, so the T^2-scaled loss has gradient ``T * dD/ds``. Per kind
(``_div_terms``):

    fkl  D = sum p (log p - log q)          h = -p,             sum h = -1
         -> T^2-scaled gradient T (q - p)  (DESIGN fact 1)
    rkl  D = sum q (log q - log p)          h = q (log q - log p + 1),  sum h = D + 1
         -> gradient T q_j (log q_j - log p_j - D)
    jsd  m = b p + (1-b) q, D = b KL(p||m) + (1-b) KL(q||m)
         dD/dq_c = (1-b)(log q_c - log m_c)   [the b p/m and (1-b) q/m terms cancel]
         h = (1-b) q (log q - log m),  sum h = (1-b) KL(q||m)
    skew_fkl  m = a p + (1-a) q, D = KL(p||m)   h = -(1-a) p q / m
    skew_rkl  m = a q + (1-a) p, D = KL(q||m)   h = q (log q - log m) + q - a q^2 / m
    tvd  D = 0.5 sum |p - q|                 h = 0.5 q sign(q - p)

CE at T=1: ``lse(z) - z_label``, gradient ``softmax(z) - onehot(label)``. Terms with a zero
probability (``log = -inf``) are 0 and mixtures are built in log space, so nothing
produces ``0 * inf`` when probabilities underflow in both distributions.
"""

from __future__ import annotations

import importlib
import os
import sys

import torch
import triton
import triton.language as tl

from ._common import DivSpec

NEG_INF = float("-inf")


@triton.jit
def _lse_update(m, d, x):
    # Online logsumexp: running max m, running sum d = sum exp(x - m); exact for -inf blocks.
    m_new = tl.maximum(m, tl.max(x, axis=0))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    d = d * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
    return m_new, d


@triton.jit
def _logaddexp(a, b):
    # log(e^a + e^b), -inf when both are -inf (never inf - inf).
    mx = tl.maximum(a, b)
    mx_safe = tl.where(mx == float("-inf"), 0.0, mx)
    return mx_safe + tl.log(tl.exp(a - mx_safe) + tl.exp(b - mx_safe))


@triton.jit
def _block_lse(x):
    # logsumexp of a block with at least one finite entry.
    mx = tl.max(x, axis=0)
    return mx + tl.log(tl.sum(tl.exp(x - mx), axis=0))


@triton.jit
def _div_terms(log_p, log_q, a, log_a, log_1ma, KIND: tl.constexpr):
    # Elementwise (loss term, h = dD/dlog q) for one category; see the module doc.
    p = tl.exp(log_p)
    q = tl.exp(log_q)
    p_zero = log_p == float("-inf")
    q_zero = log_q == float("-inf")
    if KIND == 0:  # fkl
        loss = tl.where(p_zero, 0.0, p * (log_p - log_q))
        h = -p
    elif KIND == 1:  # rkl
        loss = tl.where(q_zero, 0.0, q * (log_q - log_p))
        h = loss + q
    elif KIND == 2:  # jsd(beta = a)
        log_m = _logaddexp(log_a + log_p, log_1ma + log_q)
        kp = tl.where(p_zero, 0.0, p * (log_p - log_m))
        kq = tl.where(q_zero, 0.0, q * (log_q - log_m))
        loss = a * kp + (1.0 - a) * kq
        h = (1.0 - a) * kq
    elif KIND == 3:  # skew_fkl(alpha = a)
        log_m = _logaddexp(log_a + log_p, log_1ma + log_q)
        loss = tl.where(p_zero, 0.0, p * (log_p - log_m))
        h = -tl.where(p_zero | q_zero, 0.0, tl.exp(log_1ma + log_p + log_q - log_m))
    elif KIND == 4:  # skew_rkl(alpha = a)
        log_m = _logaddexp(log_a + log_q, log_1ma + log_p)
        loss = tl.where(q_zero, 0.0, q * (log_q - log_m))
        h = loss + q - tl.where(q_zero, 0.0, tl.exp(log_a + 2.0 * log_q - log_m))
    else:  # tvd
        diff = q - p
        loss = 0.5 * tl.abs(diff)
        h = 0.5 * q * tl.where(diff > 0, 1.0, tl.where(diff < 0, -1.0, 0.0))
    return loss, h


@triton.jit
def _softmax_divergence_kernel(
    X, stride_x, Y, stride_y, G, stride_g,
    LABELS, C_DIV, C_CE, DIV_OUT, CE_OUT,
    V, inv_t, a, log_a, log_1ma,
    KIND: tl.constexpr, HAS_CE: tl.constexpr, CE_SEP: tl.constexpr, BLOCK_V: tl.constexpr,
):
    # Dense teacher. X student logits, Y teacher logits, G gradient (may alias X):
    # pass 1 lse(s), lse(t) [and lse(z) if T != 1]; pass 2 (kinds other than fkl) D and
    # sum h; pass 3 gradient c_div (h - q sum h) + c_ce (softmax(z) - onehot) [+ D for fkl].
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    Y += row * stride_y
    G += row * stride_g
    c_div = tl.load(C_DIV + row)
    c_ce = tl.load(C_CE + row)
    active = (c_div != 0.0) | (c_ce != 0.0)

    m_s = float("-inf")
    d_s = 0.0
    m_t = float("-inf")
    d_t = 0.0
    m_z = float("-inf")
    d_z = 0.0
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        x = tl.load(X + offs, mask=mask, other=float("-inf")).to(tl.float32)
        t = tl.load(Y + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
        m_s, d_s = _lse_update(m_s, d_s, x * inv_t)
        m_t, d_t = _lse_update(m_t, d_t, t)
        if HAS_CE and CE_SEP:
            m_z, d_z = _lse_update(m_z, d_z, x)
    lse_s = m_s + tl.log(d_s)
    lse_t = m_t + tl.log(d_t)
    lse_z = lse_s
    if CE_SEP:
        lse_z = m_z + tl.log(d_z)

    div = 0.0
    sum_h = -1.0  # fkl: sum h = -sum p = -1
    if KIND != 0:
        sum_h = 0.0
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            mask = offs < V
            x = tl.load(X + offs, mask=mask, other=float("-inf")).to(tl.float32)
            t = tl.load(Y + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
            loss, h = _div_terms(t - lse_t, x * inv_t - lse_s, a, log_a, log_1ma, KIND)
            div += tl.sum(tl.where(mask, loss, 0.0), axis=0)
            sum_h += tl.sum(tl.where(mask, h, 0.0), axis=0)

    label = 0
    if HAS_CE:
        label = tl.load(LABELS + row)
        # read before pass 3 overwrites X when G aliases it
        tl.store(CE_OUT + row, lse_z - tl.load(X + label).to(tl.float32))
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        x = tl.load(X + offs, mask=mask, other=float("-inf")).to(tl.float32)
        t = tl.load(Y + offs, mask=mask, other=float("-inf")).to(tl.float32) * inv_t
        log_q = x * inv_t - lse_s
        loss, h = _div_terms(t - lse_t, log_q, a, log_a, log_1ma, KIND)
        if KIND == 0:
            div += tl.sum(tl.where(mask, loss, 0.0), axis=0)
        g = c_div * (h - tl.exp(log_q) * sum_h)
        if HAS_CE:
            g += c_ce * (tl.exp(x - lse_z) - tl.where(offs == label, 1.0, 0.0))
        g = tl.where(active, g, 0.0)
        tl.store(G + offs, g.to(G.dtype.element_ty), mask=mask)
    tl.store(DIV_OUT + row, div)


@triton.jit
def _topk_divergence_kernel(
    X, stride_x, IDS, stride_ids, LOGP_TOP, stride_lp, LOGP_TAIL,
    LABELS, C_DIV, C_CE, DIV_OUT, CE_OUT,
    V, K, inv_t, a, log_a, log_1ma,
    KIND: tl.constexpr, HAS_CE: tl.constexpr, CE_SEP: tl.constexpr, BUCKET: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Sparse top-k teacher; X is the student logits row, overwritten IN PLACE by the gradient.
    # 1. gather the k student logits (and the label's), then mark the top-k ids -inf in X so
    #    that 2. one streaming pass gives the tail logsumexp exactly (never 1 - sum q);
    # 3. categories: renorm  log q_c = s_c - lse_k(s_top);
    #                bucket  log q_c = s_c - lse(s), log q_tail = lse_tail(s) - lse(s);
    #    teacher log-probs come precomputed (host, O(k)); D and sum h over categories;
    # 4. tail tokens: bucket c_div (e^(s_j - lse_tail) h_tail - q_j sum h), renorm 0, + CE;
    # 5. scatter the top-k tokens' gradient c_div (h_c - q_c sum h) + CE over step 4's values.
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    c_div = tl.load(C_DIV + row)
    c_ce = tl.load(C_CE + row)
    active = (c_div != 0.0) | (c_ce != 0.0)
    offs_k = tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    ids = tl.load(IDS + row * stride_ids + offs_k, mask=mask_k, other=0)
    z_top = tl.load(X + ids, mask=mask_k, other=float("-inf")).to(tl.float32)
    log_p_top = tl.load(LOGP_TOP + row * stride_lp + offs_k, mask=mask_k, other=float("-inf"))
    label = 0
    z_label = 0.0
    if HAS_CE:
        label = tl.load(LABELS + row)
        z_label = tl.load(X + label).to(tl.float32)
    tl.debug_barrier()
    tl.store(X + ids, tl.full([BLOCK_K], float("-inf"), tl.float32).to(X.dtype.element_ty), mask=mask_k)
    tl.debug_barrier()

    m_s = float("-inf")
    d_s = 0.0
    m_z = float("-inf")
    d_z = 0.0
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(X + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        if BUCKET:
            m_s, d_s = _lse_update(m_s, d_s, x * inv_t)
        if HAS_CE and (CE_SEP or not BUCKET):
            m_z, d_z = _lse_update(m_z, d_z, x)

    s_top = z_top * inv_t
    lse_tail_s = m_s + tl.log(d_s)
    lse_tail_safe = tl.where(lse_tail_s == float("-inf"), 0.0, lse_tail_s)
    div = 0.0
    sum_h = 0.0
    h_tail = 0.0
    if BUCKET:
        lse_s = _logaddexp(lse_tail_s, _block_lse(s_top))
        div, h_tail = _div_terms(tl.load(LOGP_TAIL + row), lse_tail_s - lse_s, a, log_a, log_1ma, KIND)
        sum_h = h_tail
    else:
        lse_s = _block_lse(s_top)
    log_q_top = s_top - lse_s
    loss_top, h_top = _div_terms(log_p_top, log_q_top, a, log_a, log_1ma, KIND)
    div += tl.sum(tl.where(mask_k, loss_top, 0.0), axis=0)
    sum_h += tl.sum(tl.where(mask_k, h_top, 0.0), axis=0)
    lse_z = lse_s
    if HAS_CE and (CE_SEP or not BUCKET):
        lse_z = _logaddexp(m_z + tl.log(d_z), _block_lse(z_top))

    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        x = tl.load(X + offs, mask=mask, other=float("-inf")).to(tl.float32)
        g = tl.zeros([BLOCK_V], dtype=tl.float32)
        if BUCKET:
            s = x * inv_t
            g = c_div * (tl.exp(s - lse_tail_safe) * h_tail - tl.exp(s - lse_s) * sum_h)
        if HAS_CE:
            g += c_ce * (tl.exp(x - lse_z) - tl.where(offs == label, 1.0, 0.0))
        g = tl.where(active, g, 0.0)
        tl.store(X + offs, g.to(X.dtype.element_ty), mask=mask)
    tl.debug_barrier()
    g_top = c_div * (h_top - tl.exp(log_q_top) * sum_h)
    if HAS_CE:
        g_top += c_ce * (tl.exp(z_top - lse_z) - tl.where(ids == label, 1.0, 0.0))
        tl.store(CE_OUT + row, lse_z - z_label)
    g_top = tl.where(active, g_top, 0.0)
    tl.store(X + ids, g_top.to(X.dtype.element_ty), mask=mask_k)
    tl.store(DIV_OUT + row, div)


def _ensure_interpreter(x: torch.Tensor) -> None:
    """CPU tensors need the kernels built by the interpreter. ``@triton.jit`` reads
    TRITON_INTERPRET when this module is imported; if it was imported before the variable
    was set, re-execute the module once so that its kernels are interpreted ones."""
    if x.is_cuda:
        return
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("Triton kernels on CPU tensors need TRITON_INTERPRET=1 (use backend='torch')")
    if type(_softmax_divergence_kernel).__name__ != "InterpretedFunction":
        importlib.reload(sys.modules[__name__])


def _block_v(v: int, block_v: int | None) -> int:
    return block_v or min(triton.next_power_of_2(v), 4096)


def softmax_divergence_forward(x, *, teacher=None, topk=None, coefs, spec: DivSpec, vocab: int,
                               grad=None, block_v: int | None = None):
    """Launch the kernel on ``n`` rows; returns ``(div [n], ce [n] | None, grad)``.

    Args:
        x: ``[n, >= vocab]`` student logits (fp32/bf16/fp16, unit stride on the vocab).
            Only read, unless ``grad`` is ``x`` (or None for top-k): the top-k kernel works
            in place, so it first copies ``x`` into a separate ``grad``.
        teacher: ``[n, >= vocab]`` dense teacher logits, or None.
        topk: ``(ids [n, k] int64, logp_top [n, k] fp32, logp_tail [n] fp32)`` from
            ``_common.topk_teacher_logprobs`` (exclusive with ``teacher``).
        coefs: row slice of ``_common.TokenCoefs`` (labels, c_div, c_ce).
        vocab: columns taken into account; columns beyond are left untouched in ``grad``.
        grad: ``[n, >= vocab]`` output, default ``empty_like(x)`` (dense) / ``x`` itself (top-k).
        block_v: vocabulary block (power of 2), default ``min(next_pow2(vocab), 4096)``.
    Returns:
        raw divergence D and raw CE per row (float32), and the gradient of
        ``c_div * D + c_ce * CE`` w.r.t. the logits in ``grad`` (dtype of ``grad``).
    """
    _ensure_interpreter(x)
    mod = sys.modules[__name__]  # after a reload the kernels live in the new namespace
    n = x.shape[0]
    div = torch.empty(n, dtype=torch.float32, device=x.device)
    ce = torch.empty(n, dtype=torch.float32, device=x.device) if spec.has_ce else div
    if n == 0:
        return div, (ce if spec.has_ce else None), (x if grad is None else grad)
    common = dict(KIND=spec.code, HAS_CE=spec.has_ce, CE_SEP=spec.temperature != 1.0,
                  BLOCK_V=_block_v(vocab, block_v), num_warps=8)
    scalars = (vocab, spec.inv_t, spec.param, spec.log_a, spec.log_1ma)
    rows = (coefs.labels, coefs.c_div, coefs.c_ce, div, ce)
    if topk is None:
        grad = torch.empty_like(x) if grad is None else grad
        mod._softmax_divergence_kernel[(n,)](
            x, x.stride(0), teacher, teacher.stride(0), grad, grad.stride(0), *rows, *scalars, **common)
    else:
        if grad is None:
            grad = x
        elif grad.data_ptr() != x.data_ptr():
            grad[:, :vocab].copy_(x[:, :vocab])
        ids, logp_top, logp_tail = topk
        k = ids.shape[1]
        mod._topk_divergence_kernel[(n,)](
            grad, grad.stride(0), ids, ids.stride(0), logp_top, logp_top.stride(0), logp_tail, *rows,
            vocab, k, *scalars[1:], BUCKET=spec.tail == "bucket",
            BLOCK_K=max(triton.next_power_of_2(k), 2), **common)
    return div, (ce if spec.has_ce else None), grad


def softmax_divergence_backward(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """Scale the forward-computed gradient ``[N, V]`` by ``grad_output`` (0-d, or ``[N]`` for
    ``reduction="none"``); no multiply when it is exactly 1."""
    if grad_output.dim() == 0:
        if torch.equal(grad_output, torch.ones_like(grad_output)):
            return grad
        return grad * grad_output.to(grad.dtype)
    return grad * grad_output.reshape(-1, 1).to(grad.dtype)


class SoftmaxDivergenceFunction(torch.autograd.Function):
    """Loss of student logits vs a (dense or top-k) teacher; the gradient is computed in
    forward. ``run(x)`` is the forward work: ``x [N, V]`` -> ``(loss, parts, grad [N, V])``
    (see ``kernels.softmax_divergence``). The teacher is a constant (no gradient)."""

    @staticmethod
    def forward(ctx, student_logits, run):
        loss, parts, grad = run(student_logits)
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(parts["div"], parts["ce"])
        return loss, parts["div"], parts["ce"]

    @staticmethod
    def backward(ctx, grad_loss, _grad_div, _grad_ce):
        (grad,) = ctx.saved_tensors
        return softmax_divergence_backward(grad, grad_loss), None
