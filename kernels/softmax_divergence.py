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

Large logits (|z| ~ 1e4, where float32's spacing is ~1e-3). The max is never folded into
the log-normaliser: ``log q = (z - max z) / T - log sum exp((z - max z) / T)`` (the
difference first, then the temperature), likewise the teacher, so every log-probability
is exact to its own relative precision. Reverse KL needs more: ``log q - log p`` and D are
both ~1e4 where the teacher is far below the student's mode, and ``q_j (r_j - D)`` with
``r = log q - log p`` cancels to the float32 spacing of 1e4 (and ``sum q != 1`` by a few
ulps, times 1e4). So rkl is computed PIVOTED on the student's mode ``c*``:

    b_c = r_c - r_c* = ((z_c - z_c*) - (y_c - y_c*)) / T     (raw logit differences)
    D = r_c* + sum_c q_c b_c,   h'_c = q_c b_c,   gradient q_j (b_j - sum_c q_c b_c)

(exact rewrites using sum q = 1: h' = h - q (r_c* + 1) leaves ``h - q sum h`` unchanged).
Every b_c is a difference of raw inputs and small wherever q_c is not, so nothing of
size 1e4 is subtracted. The top-k teacher arrives as log-probabilities; they are passed as
double-float pairs ``hi + lo`` (``_common.topk_teacher_logprobs``) so that
``log p_c - log p_c*`` is exact there too.
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
def _max_update(m, x):
    # Running max of raw logits and the shift to use (0 while everything is -inf).
    m_new = tl.maximum(m, tl.max(x, axis=0))
    return m_new, tl.where(m_new == float("-inf"), 0.0, m_new)


@triton.jit
def _sum_update(d, m, m_shift, x, scale):
    # Online sum of exp((x - max) * scale): d was taken relative to the old max m; exact for
    # -inf blocks. The difference x - max is formed before the scaling (large logits).
    return d * tl.exp((m - m_shift) * scale) + tl.sum(tl.exp((x - m_shift) * scale), axis=0)


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
def _rkl_terms(log_q, b):
    # Pivoted reverse KL (module doc): loss term and h' are both q_c b_c, b = r - r_pivot.
    loss = tl.where(log_q == float("-inf"), 0.0, tl.exp(log_q) * b)
    return loss, loss


@triton.jit
def _div_terms(log_p, log_q, a, log_a, log_1ma, KIND: tl.constexpr):
    # Elementwise (loss term, h = dD/dlog q) for one category; see the module doc.
    # (rkl is pivoted by the kernels, see _rkl_terms; this branch is its unpivoted form.)
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
    # pass 1 max and sum exp((x - max) / T) of both [and of x at T=1 if T != 1], for rkl the
    # teacher's logit at the student's argmax (the pivot); pass 2 (kinds other than fkl) D
    # and sum h; pass 3 gradient c_div (h - q sum h) + c_ce (softmax(z) - onehot) [+ D for fkl].
    row = tl.program_id(0).to(tl.int64)
    X += row * stride_x
    Y += row * stride_y
    G += row * stride_g
    c_div = tl.load(C_DIV + row)
    c_ce = tl.load(C_CE + row)
    active = (c_div != 0.0) | (c_ce != 0.0)

    m_x = float("-inf")
    d_s = 0.0
    d_z = 0.0
    m_y = float("-inf")
    d_t = 0.0
    y_piv = float("-inf")
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        x = tl.load(X + offs, mask=mask, other=float("-inf")).to(tl.float32)
        y = tl.load(Y + offs, mask=mask, other=float("-inf")).to(tl.float32)
        if KIND == 1:
            bx = tl.max(x, axis=0)
            y_at = tl.max(tl.where(x == bx, y, float("-inf")), axis=0)
            y_piv = tl.where(bx > m_x, y_at, y_piv)
        m_new, m_shift = _max_update(m_x, x)
        d_s = _sum_update(d_s, m_x, m_shift, x, inv_t)
        if HAS_CE and CE_SEP:
            d_z = _sum_update(d_z, m_x, m_shift, x, 1.0)
        m_x = m_new
        m_new, m_shift = _max_update(m_y, y)
        d_t = _sum_update(d_t, m_y, m_shift, y, inv_t)
        m_y = m_new
    m_x = tl.where(m_x == float("-inf"), 0.0, m_x)
    m_y = tl.where(m_y == float("-inf"), 0.0, m_y)
    log_d_s = tl.log(d_s)  # log q = (x - m_x) / T - log_d_s
    log_d_t = tl.log(d_t)
    log_d_z = log_d_s
    if CE_SEP:
        log_d_z = tl.log(d_z)
    # rkl pivot (module doc): b_j = (x_j - m_x) / T - (y_j - y_piv) / T, r_piv = r at the argmax
    y_piv = tl.where(y_piv == float("-inf"), m_y, y_piv)
    r_piv = (log_d_t - log_d_s) - (y_piv - m_y) * inv_t

    div = 0.0
    sum_h = -1.0  # fkl: sum h = -sum p = -1
    if KIND != 0:
        sum_h = 0.0
        for v0 in range(0, V, BLOCK_V):
            offs = v0 + tl.arange(0, BLOCK_V)
            mask = offs < V
            x = tl.load(X + offs, mask=mask, other=float("-inf")).to(tl.float32)
            y = tl.load(Y + offs, mask=mask, other=float("-inf")).to(tl.float32)
            ds = (x - m_x) * inv_t
            if KIND == 1:
                loss, h = _rkl_terms(ds - log_d_s, ds - (y - y_piv) * inv_t)
            else:
                loss, h = _div_terms((y - m_y) * inv_t - log_d_t, ds - log_d_s, a, log_a, log_1ma, KIND)
            div += tl.sum(tl.where(mask, loss, 0.0), axis=0)
            sum_h += tl.sum(tl.where(mask, h, 0.0), axis=0)
        if KIND == 1:
            div += r_piv

    label = 0
    if HAS_CE:
        label = tl.load(LABELS + row)
        # read before pass 3 overwrites X when G aliases it
        tl.store(CE_OUT + row, (m_x - tl.load(X + label).to(tl.float32)) + log_d_z)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        x = tl.load(X + offs, mask=mask, other=float("-inf")).to(tl.float32)
        y = tl.load(Y + offs, mask=mask, other=float("-inf")).to(tl.float32)
        ds = (x - m_x) * inv_t
        log_q = ds - log_d_s
        if KIND == 1:
            loss, h = _rkl_terms(log_q, ds - (y - y_piv) * inv_t)
        else:
            loss, h = _div_terms((y - m_y) * inv_t - log_d_t, log_q, a, log_a, log_1ma, KIND)
        if KIND == 0:
            div += tl.sum(tl.where(mask, loss, 0.0), axis=0)
        g = c_div * (h - tl.exp(log_q) * sum_h)
        if HAS_CE:
            g += c_ce * (tl.exp((x - m_x) - log_d_z) - tl.where(offs == label, 1.0, 0.0))
        g = tl.where(active, g, 0.0)
        tl.store(G + offs, g.to(G.dtype.element_ty), mask=mask)
    tl.store(DIV_OUT + row, div)


@triton.jit
def _topk_divergence_kernel(
    X, stride_x, IDS, stride_ids, LOGP_TOP, LO_TOP, stride_lp, LOGP_TAIL, LO_TAIL,
    LABELS, C_DIV, C_CE, DIV_OUT, CE_OUT,
    V, K, inv_t, a, log_a, log_1ma,
    KIND: tl.constexpr, HAS_CE: tl.constexpr, CE_SEP: tl.constexpr, BUCKET: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Sparse top-k teacher; X is the student logits row, overwritten IN PLACE by the gradient.
    # 1. gather the k student logits (and the label's), then mark the top-k ids -inf in X so
    #    that 2. one streaming pass gives the tail's max and sum exp exactly (never 1 - sum q);
    # 3. categories, all relative to the max m (of the top-k for renorm, of the row for bucket):
    #                renorm  log q_c = (z_c - m) / T - log sum_k exp((z - m) / T);
    #                bucket  the same over the k ids + the tail bucket;
    #    teacher log-probs come precomputed (host, O(k), as hi + lo); D and sum h over
    #    categories (rkl pivoted on the student's largest category, module doc);
    # 4. tail tokens: bucket c_div (q_j / q_tail h_tail - q_j sum h), renorm 0, + CE;
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
    lp_hi = tl.load(LOGP_TOP + row * stride_lp + offs_k, mask=mask_k, other=float("-inf"))
    lp_lo = tl.load(LO_TOP + row * stride_lp + offs_k, mask=mask_k, other=0.0)
    label = 0
    z_label = 0.0
    if HAS_CE:
        label = tl.load(LABELS + row)
        z_label = tl.load(X + label).to(tl.float32)
    tl.debug_barrier()
    tl.store(X + ids, tl.full([BLOCK_K], float("-inf"), tl.float32).to(X.dtype.element_ty), mask=mask_k)
    tl.debug_barrier()

    m_tail = float("-inf")  # tail = the row with the top-k ids masked out
    d_s = 0.0  # sum over the tail of exp((x - m_tail) / T)
    d_z = 0.0  # ... and of exp(x - m_tail)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        x = tl.load(X + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
        if BUCKET or HAS_CE:
            m_new, m_shift = _max_update(m_tail, x)
            if BUCKET:
                d_s = _sum_update(d_s, m_tail, m_shift, x, inv_t)
            if HAS_CE and (CE_SEP or not BUCKET):
                d_z = _sum_update(d_z, m_tail, m_shift, x, 1.0)
            m_tail = m_new

    m_top = tl.max(z_top, axis=0)
    m_full = tl.maximum(m_top, m_tail)
    m_full = tl.where(m_full == float("-inf"), 0.0, m_full)
    m = tl.where(m_top == float("-inf"), 0.0, m_top)
    if BUCKET:
        m = m_full
    ds_top = (z_top - m) * inv_t
    tail_ok = m_tail != float("-inf")
    m_tail_safe = tl.where(tail_ok, m_tail, 0.0)
    log_d_tail = 0.0
    ds_tail = float("-inf")
    if BUCKET:
        log_d_tail = tl.where(tail_ok, tl.log(d_s), 0.0)
        ds_tail = tl.where(tail_ok, (m_tail_safe - m) * inv_t + log_d_tail, float("-inf"))
        log_norm = _logaddexp(ds_tail, _block_lse(ds_top))
    else:
        log_norm = _block_lse(ds_top)
    log_q_top = ds_top - log_norm
    log_q_tail = ds_tail - log_norm
    lp_tail = tl.load(LOGP_TAIL + row)
    div = 0.0
    h_tail = 0.0
    if KIND == 1:
        # pivot: the student's largest category (top-k id or the tail bucket)
        a_s = tl.max(ds_top, axis=0)
        idx = tl.min(tl.where(ds_top == a_s, offs_k, BLOCK_K), axis=0)
        a_hi = tl.sum(tl.where(offs_k == idx, lp_hi, 0.0), axis=0)
        a_lo = tl.sum(tl.where(offs_k == idx, lp_lo, 0.0), axis=0)
        lo_tail = tl.load(LO_TAIL + row)
        if BUCKET:
            use_tail = ds_tail > a_s
            a_s = tl.where(use_tail, ds_tail, a_s)
            a_hi = tl.where(use_tail, lp_tail, a_hi)
            a_lo = tl.where(use_tail, lo_tail, a_lo)
        piv_ok = a_hi != float("-inf")
        a_hi = tl.where(piv_ok, a_hi, 0.0)
        a_lo = tl.where(piv_ok, a_lo, 0.0)
        div = (a_s - log_norm) - (a_hi + a_lo)
        loss_top, h_top = _rkl_terms(log_q_top, (ds_top - a_s) - ((lp_hi - a_hi) + (lp_lo - a_lo)))
        if BUCKET:
            div_tail, h_tail = _rkl_terms(log_q_tail, (ds_tail - a_s) - ((lp_tail - a_hi) + (lo_tail - a_lo)))
            div += div_tail
    else:
        loss_top, h_top = _div_terms(lp_hi, log_q_top, a, log_a, log_1ma, KIND)
        if BUCKET:
            div, h_tail = _div_terms(lp_tail, log_q_tail, a, log_a, log_1ma, KIND)
    div += tl.sum(tl.where(mask_k, loss_top, 0.0), axis=0)
    sum_h = h_tail + tl.sum(tl.where(mask_k, h_top, 0.0), axis=0)
    log_d_z = log_norm  # bucket at T=1: the categories' normaliser is the full one
    if HAS_CE and (CE_SEP or not BUCKET):
        log_d_z = _logaddexp(_block_lse(z_top - m_full), (m_tail - m_full) + tl.log(d_z))

    # q_j = exp((x_j - m_tail) / T + q_shift) for a tail token j
    q_shift = tl.where(tail_ok, (m_tail_safe - m) * inv_t - log_norm, 0.0)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        mask = offs < V
        x = tl.load(X + offs, mask=mask, other=float("-inf")).to(tl.float32)
        g = tl.zeros([BLOCK_V], dtype=tl.float32)
        if BUCKET:
            sh = (x - m_tail_safe) * inv_t
            g = c_div * (tl.exp(sh - log_d_tail) * h_tail - tl.exp(sh + q_shift) * sum_h)
        if HAS_CE:
            g += c_ce * (tl.exp((x - m_full) - log_d_z) - tl.where(offs == label, 1.0, 0.0))
        g = tl.where(active, g, 0.0)
        tl.store(X + offs, g.to(X.dtype.element_ty), mask=mask)
    tl.debug_barrier()
    g_top = c_div * (h_top - tl.exp(log_q_top) * sum_h)
    if HAS_CE:
        g_top += c_ce * (tl.exp((z_top - m_full) - log_d_z) - tl.where(ids == label, 1.0, 0.0))
        tl.store(CE_OUT + row, (m_full - z_label) + log_d_z)
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
        topk: ``(ids [n, k] int64, logp_top [n, k] fp32, logp_tail [n] fp32, lo_top [n, k],
            lo_tail [n])`` from ``_common.topk_teacher_logprobs`` (exclusive with ``teacher``).
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
        ids, logp_top, logp_tail, lo_top, lo_tail = topk
        k = ids.shape[1]
        assert lo_top.stride() == logp_top.stride()
        mod._topk_divergence_kernel[(n,)](
            grad, grad.stride(0), ids, ids.stride(0), logp_top, lo_top, logp_top.stride(0), logp_tail, lo_tail, *rows,
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
