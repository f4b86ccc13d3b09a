"""Pure-PyTorch twin of the Triton kernels (``softmax_divergence.py``), for machines without
CUDA: same arguments, same outputs, same math (see that module's doc for the derivations,
including the large-logit form: max kept apart from the log-normaliser, rkl pivoted on the
student's mode), written with whole-row tensor ops on a chunk of rows. Analytic gradients,
no autograd graph.
"""

from __future__ import annotations

import torch

from ._common import DivSpec

_NEG_INF = float("-inf")


def _div_terms(log_p, log_q, spec: DivSpec):
    """Elementwise ``(loss term, h = dD/dlog q)``; zero-probability terms are exactly 0.
    (rkl is pivoted by the callers, see :func:`_rkl_terms`; its branch here is unpivoted.)"""
    kind, a = spec.code, spec.param
    zero = log_p.new_zeros(())
    p, q = log_p.exp(), log_q.exp()
    p_zero, q_zero = log_p == _NEG_INF, log_q == _NEG_INF
    if kind == 0:  # fkl
        return torch.where(p_zero, zero, p * (log_p - log_q)), -p
    if kind == 1:  # rkl
        loss = torch.where(q_zero, zero, q * (log_q - log_p))
        return loss, loss + q
    if kind == 2:  # jsd
        log_m = torch.logaddexp(spec.log_a + log_p, spec.log_1ma + log_q)
        kp = torch.where(p_zero, zero, p * (log_p - log_m))
        kq = torch.where(q_zero, zero, q * (log_q - log_m))
        return a * kp + (1.0 - a) * kq, (1.0 - a) * kq
    if kind == 3:  # skew_fkl
        log_m = torch.logaddexp(spec.log_a + log_p, spec.log_1ma + log_q)
        loss = torch.where(p_zero, zero, p * (log_p - log_m))
        return loss, -torch.where(p_zero | q_zero, zero, (spec.log_1ma + log_p + log_q - log_m).exp())
    if kind == 4:  # skew_rkl
        log_m = torch.logaddexp(spec.log_a + log_q, spec.log_1ma + log_p)
        loss = torch.where(q_zero, zero, q * (log_q - log_m))
        return loss, loss + q - torch.where(q_zero, zero, (spec.log_a + 2.0 * log_q - log_m).exp())
    diff = q - p  # tvd
    return 0.5 * diff.abs(), 0.5 * q * diff.sign()


def _rkl_terms(log_q, b):
    """Pivoted reverse KL: loss term and ``h'`` are both ``q b`` (``b = r - r_pivot``); in place on ``b``."""
    return (b.mul_(log_q.exp()).masked_fill_(log_q == _NEG_INF, 0.0),) * 2


def _row_max(x):
    """``[n, 1]`` max of each row, 0 for a row that is all -inf (the shift of a log-sum-exp)."""
    m = x.max(-1, keepdim=True).values
    return torch.where(m == _NEG_INF, torch.zeros_like(m), m)


def _shifted(x, m, inv_t: float):
    """``(x - m) / T`` as a new tensor: the difference is formed before the scaling."""
    y = x - m
    return y if inv_t == 1.0 else y.mul_(inv_t)


def _sum_h(h, spec: DivSpec):
    """``sum_c h_c`` per row, ``[n, 1]``; exactly -1 for fkl (``-sum p``)."""
    return h.new_full((h.shape[0], 1), -1.0) if spec.code == 0 else h.sum(-1, keepdim=True)


def _ce(z, labels, m, log_d):
    """``[n]`` CE at T=1 from float32 logits ``z [n, V]``, their max ``m`` and
    ``log_d = log sum exp(z - m)`` (``[n, 1]`` each)."""
    return (m - z.gather(1, labels[:, None]) + log_d).squeeze(1)


def _add_ce_grad_(g, z, m, log_d, labels, c_ce):
    """``g += c_ce (softmax(z) - onehot(labels))`` in place."""
    g.add_((z - m).sub_(log_d).exp_().mul_(c_ce[:, None]))
    g.scatter_add_(1, labels[:, None], -c_ce[:, None])


def torch_divergence_forward(x, *, teacher=None, topk=None, coefs, spec: DivSpec, vocab: int, grad=None):
    """Same contract as ``softmax_divergence.softmax_divergence_forward`` (x is left untouched
    here; ``grad`` defaults to a new float32 tensor of ``x``'s shape when None)."""
    z = x[:, :vocab].float()
    if grad is None:
        grad = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    if topk is None:
        div, ce, g = _dense(z, teacher[:, :vocab].float(), coefs, spec)
    else:
        div, ce, g = _topk(z, *topk, coefs, spec)
    active = (coefs.c_div != 0) | (coefs.c_ce != 0)
    grad[:, :vocab] = torch.where(active[:, None], g, g.new_zeros(()))
    return div, ce, grad


def _dense(z, t, coefs, spec: DivSpec):
    inv_t = spec.inv_t
    m_s = _row_max(z)
    ds = _shifted(z, m_s, inv_t)  # (z - max) / T
    log_d_s = ds.logsumexp(-1, keepdim=True)
    m_t = _row_max(t)
    if spec.code == 1:  # rkl, pivoted on the student's argmax (softmax_divergence module doc)
        y_piv = t.gather(1, z.argmax(-1, keepdim=True))
        y_piv = torch.where(y_piv == _NEG_INF, m_t, y_piv)
        log_d_t = _shifted(t, m_t, inv_t).logsumexp(-1, keepdim=True)
        r_piv = (log_d_t - log_d_s) - (y_piv - m_t) * inv_t
        b = _shifted(t, y_piv, inv_t).neg_().add_(ds)  # (z - z*) / T - (y - y*) / T
        log_q = ds.sub_(log_d_s)
        loss, h = _rkl_terms(log_q, b)
        div = loss.sum(-1) + r_piv.squeeze(1)
    else:
        log_p = _shifted(t, m_t, inv_t)
        log_p = log_p.sub_(log_p.logsumexp(-1, keepdim=True))
        log_q = ds.sub_(log_d_s)
        loss, h = _div_terms(log_p, log_q, spec)
        del log_p
        div = loss.sum(-1)
    del loss
    g = h.sub_(log_q.exp_().mul_(_sum_h(h, spec))).mul_(coefs.c_div[:, None])
    ce = None
    if spec.has_ce:
        log_d_z = log_d_s if spec.temperature == 1.0 else (z - m_s).logsumexp(-1, keepdim=True)
        ce = _ce(z, coefs.labels, m_s, log_d_z)
        _add_ce_grad_(g, z, m_s, log_d_z, coefs.labels, coefs.c_ce)
    return div, ce, g


def _topk(z, ids, logp_top, logp_tail, lo_top, lo_tail, coefs, spec: DivSpec):
    inv_t = spec.inv_t
    bucket = spec.tail == "bucket"
    z_top = z.gather(1, ids)
    m_top = _row_max(z_top)
    m_full = _row_max(z) if bucket or spec.has_ce else m_top
    m = m_full if bucket else m_top  # categories relative to their max
    ds_top = _shifted(z_top, m, inv_t)
    logp_tail, lo_tail = logp_tail[:, None], lo_tail[:, None]
    if bucket:
        z_tail = z.scatter(1, ids, _NEG_INF)  # exact tail sums: top-k masked out
        m_tail = z_tail.max(-1, keepdim=True).values  # -inf: empty tail (k = V)
        tail_ok = m_tail != _NEG_INF
        m_tail = torch.where(tail_ok, m_tail, torch.zeros_like(m_tail))
        sh_tail = _shifted(z_tail, m_tail, inv_t)
        del z_tail
        log_d_tail = sh_tail.logsumexp(-1, keepdim=True)
        ds_tail = torch.where(tail_ok, (m_tail - m) * inv_t + log_d_tail, log_d_tail)
        log_norm = torch.logaddexp(ds_top.logsumexp(-1, keepdim=True), ds_tail)
        log_q_tail = ds_tail - log_norm
    else:
        log_norm = ds_top.logsumexp(-1, keepdim=True)
    log_q_top = ds_top - log_norm
    if spec.code == 1:  # rkl, pivoted on the student's largest category
        a_s, idx = ds_top.max(-1, keepdim=True)
        a_hi, a_lo = logp_top.gather(1, idx), lo_top.gather(1, idx)
        if bucket:
            use_tail = ds_tail > a_s
            a_s = torch.where(use_tail, ds_tail, a_s)
            a_hi = torch.where(use_tail, logp_tail, a_hi)
            a_lo = torch.where(use_tail, lo_tail, a_lo)
        piv_ok = a_hi != _NEG_INF
        a_hi, a_lo = torch.where(piv_ok, a_hi, 0.0), torch.where(piv_ok, a_lo, 0.0)

        def pivoted(ds, hi, lo):
            return (ds - a_s) - ((hi - a_hi) + (lo - a_lo))

        loss_top, h_top = _rkl_terms(log_q_top, pivoted(ds_top, logp_top, lo_top))
        r_piv = (a_s - log_norm) - (a_hi + a_lo)  # r at the pivot: D = r_piv + sum q b
        div_tail = h_tail = 0.0
        if bucket:
            div_tail, h_tail = _rkl_terms(log_q_tail, pivoted(ds_tail, logp_tail, lo_tail))
        div_tail = r_piv + div_tail
    else:
        loss_top, h_top = _div_terms(logp_top, log_q_top, spec)
        div_tail = h_tail = 0.0
        if bucket:
            div_tail, h_tail = _div_terms(logp_tail, log_q_tail, spec)
    div = (loss_top.sum(-1, keepdim=True) + div_tail).squeeze(1)
    sum_h = h_top.sum(-1, keepdim=True) + h_tail
    c_div = coefs.c_div[:, None]
    if bucket:
        # tail token j: q_j / q_tail = exp(sh_j - log_d_tail), q_j = exp(sh_j + q_shift)
        log_d_tail = torch.where(tail_ok, log_d_tail, 0.0)
        q_shift = torch.where(tail_ok, (m_tail - m) * inv_t - log_norm, 0.0)
        g = (sh_tail - log_d_tail).exp_().mul_(h_tail).sub_(sh_tail.add_(q_shift).exp_().mul_(sum_h)).mul_(c_div)
        del sh_tail
    else:
        g = torch.zeros_like(z)
    g_top = c_div * (h_top - log_q_top.exp() * sum_h)
    ce = None
    if spec.has_ce:
        log_d_z = log_norm if bucket and spec.temperature == 1.0 else (z - m_full).logsumexp(-1, keepdim=True)
        ce = _ce(z, coefs.labels, m_full, log_d_z)
        _add_ce_grad_(g, z, m_full, log_d_z, coefs.labels, coefs.c_ce)
        onehot = (ids == coefs.labels[:, None]).float()
        g_top += coefs.c_ce[:, None] * ((z_top - m_full).sub_(log_d_z).exp_() - onehot)
    return div, ce, g.scatter_(1, ids, g_top)
