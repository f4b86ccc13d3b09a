"""Pure-PyTorch twin of the Triton kernels (``softmax_divergence.py``), for machines without
CUDA: same arguments, same outputs, same math (see that module's doc for the derivations),
written with whole-row tensor ops on a chunk of rows. Analytic gradients, no autograd graph.
"""

from __future__ import annotations

import torch

from ._common import DivSpec

_NEG_INF = float("-inf")


def _div_terms(log_p, log_q, spec: DivSpec):
    """Elementwise ``(loss term, h = dD/dlog q)``; zero-probability terms are exactly 0."""
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


def _sum_h(h, spec: DivSpec):
    """``sum_c h_c`` per row, ``[n, 1]``; exactly -1 for fkl (``-sum p``)."""
    return h.new_full((h.shape[0], 1), -1.0) if spec.code == 0 else h.sum(-1, keepdim=True)


def _ce(z, labels, lse_z):
    """``[n]`` CE at T=1 from float32 logits ``z [n, V]`` and their logsumexp ``[n, 1]``."""
    return (lse_z - z.gather(1, labels[:, None])).squeeze(1)


def _add_ce_grad_(g, z, lse_z, labels, c_ce):
    """``g += c_ce (softmax(z) - onehot(labels))`` in place."""
    g.add_(torch.exp(z - lse_z).mul_(c_ce[:, None]))
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
    s = z * spec.inv_t
    lse_s = s.logsumexp(-1, keepdim=True)
    log_q = s.sub_(lse_s)
    log_p = torch.log_softmax(t * spec.inv_t, dim=-1)
    loss, h = _div_terms(log_p, log_q, spec)
    del log_p
    div = loss.sum(-1)
    del loss
    g = h.sub_(log_q.exp_().mul_(_sum_h(h, spec))).mul_(coefs.c_div[:, None])
    ce = None
    if spec.has_ce:
        lse_z = lse_s if spec.temperature == 1.0 else z.logsumexp(-1, keepdim=True)
        ce = _ce(z, coefs.labels, lse_z)
        _add_ce_grad_(g, z, lse_z, coefs.labels, coefs.c_ce)
    return div, ce, g


def _topk(z, ids, logp_top, logp_tail, coefs, spec: DivSpec):
    s = z * spec.inv_t
    s_top = s.gather(1, ids)
    zero = s.new_zeros(())
    if spec.tail == "bucket":
        s_tail = s.scatter_(1, ids, _NEG_INF)  # exact tail logsumexp: top-k masked out
        lse_tail = s_tail.logsumexp(-1, keepdim=True)
        lse_s = torch.logaddexp(lse_tail, s_top.logsumexp(-1, keepdim=True))
        div_tail, h_tail = _div_terms(logp_tail[:, None], lse_tail - lse_s, spec)
    else:
        lse_s = s_top.logsumexp(-1, keepdim=True)
        div_tail = h_tail = zero
    log_q_top = s_top - lse_s
    loss_top, h_top = _div_terms(logp_top, log_q_top, spec)
    div = (loss_top.sum(-1, keepdim=True) + div_tail).squeeze(1)
    sum_h = h_top.sum(-1, keepdim=True) + h_tail
    c_div = coefs.c_div[:, None]
    if spec.tail == "bucket":
        lse_tail_safe = torch.where(lse_tail == _NEG_INF, zero, lse_tail)
        g = torch.exp(s_tail - lse_tail_safe).mul_(h_tail).sub_(torch.exp(s_tail - lse_s).mul_(sum_h)).mul_(c_div)
    else:
        g = torch.zeros_like(s)
    g_top = c_div * (h_top - log_q_top.exp() * sum_h)
    ce = None
    if spec.has_ce:
        lse_z = z.logsumexp(-1, keepdim=True)
        ce = _ce(z, coefs.labels, lse_z)
        _add_ce_grad_(g, z, lse_z, coefs.labels, coefs.c_ce)
        onehot = (ids == coefs.labels[:, None]).float()
        g_top += coefs.c_ce[:, None] * (torch.exp(z.gather(1, ids) - lse_z) - onehot)
    return div, ce, g.scatter_(1, ids, g_top)
