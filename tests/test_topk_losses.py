"""Top-k teacher losses: both tail treatments vs float64 references and vs the dense loss."""

from __future__ import annotations

import math

import pytest
import torch

from dist_distill.losses import KINDS, TAILS, divergence, topk_divergence
from asserts import assert_verbose_allclose


# ----------------------------------------------------------------------------- reference
def ref_kind(p, q, kind, beta=0.5, alpha=0.1):
    """Divergence of probability rows ``p`` (teacher), ``q`` (student), float64, prob space."""

    def kl(a, b):
        return (torch.xlogy(a, a) - torch.xlogy(a, b)).sum(-1)

    m = beta * p + (1 - beta) * q
    return {
        "fkl": lambda: kl(p, q),
        "rkl": lambda: kl(q, p),
        "jsd": lambda: beta * kl(p, m) + (1 - beta) * kl(q, m),
        "skew_fkl": lambda: kl(p, alpha * p + (1 - alpha) * q),
        "skew_rkl": lambda: kl(q, alpha * q + (1 - alpha) * p),
        "tvd": lambda: 0.5 * (p - q).abs().sum(-1),
    }[kind]()


def ref_topk(s, t, ids, kind, tail, T):
    """Per-token float64 reference built from the DENSE teacher logits ``t`` (no T^2 scaling).

    renorm: both softmaxes restricted to ``ids`` and renormalised.
    bucket: full softmaxes at T, categories = ids + the summed rest. The teacher at T uses the
    documented approximation: its non-top-k logits replaced by one uniform logit carrying
    the exact T=1 tail mass (exact at T=1).
    """
    s, t = s.double(), t.double()
    if tail == "renorm":
        p = torch.softmax(t.gather(-1, ids) / T, -1)
        q = torch.softmax(s.gather(-1, ids) / T, -1)
        return ref_kind(p, q, kind)
    V, k = s.shape[-1], ids.shape[-1]
    in_top = torch.zeros_like(s, dtype=torch.bool).scatter(-1, ids, True)
    p1 = torch.softmax(t, -1)
    r = (p1 * ~in_top).sum(-1, keepdim=True)
    z_tail = torch.logsumexp(t, -1, keepdim=True) + torch.log(r / (V - k))
    t_approx = torch.where(in_top, t, z_tail)
    p, q = torch.softmax(t_approx / T, -1), torch.softmax(s / T, -1)
    cat = lambda x: torch.cat((x.gather(-1, ids), (x * ~in_top).sum(-1, keepdim=True)), -1)  # noqa: E731
    return ref_kind(cat(p), cat(q), kind)


def make_teacher(t, k):
    """Cache view of dense teacher logits: (ids, raw top-k logits, lse) at T=1."""
    top, ids = t.topk(k, dim=-1)
    return ids, top, torch.logsumexp(t.double(), -1).to(t.dtype)


def peaked_logits(n, V, generator, scale=2.5):
    """Zipf-like teacher: logit = -scale * log(rank) + noise, ranks shuffled per token."""
    ranks = torch.argsort(torch.rand(n, V, generator=generator), -1).double() + 1
    return -scale * torch.log(ranks) + 0.3 * torch.randn(n, V, generator=generator, dtype=torch.float64)


# ----------------------------------------------------------------------------- k = V
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("kind", KINDS)
def test_k_equal_V_matches_dense(kind, tail, dtype):
    g = torch.Generator().manual_seed(0)
    N, V_pad, V = 41, 409, 401
    s = (torch.randn(N, V_pad, generator=g) * 2).to(dtype)
    t = (torch.randn(N, V, generator=g) * 3).to(dtype)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::5] = -100
    ids, top, lse = make_teacher(t, V)
    tol = (1e-12, 1e-10) if dtype == torch.float64 else (2e-6, 2e-5)
    for T in (1.0, 2.5):
        kw = dict(temperature=T, labels=labels, ce_weight=0.2, reduction="none", beta=0.3, skew_alpha=0.2)
        dense = divergence(s, t, kind, vocab_size=V, **kw)
        sparse = topk_divergence(s, ids, top, lse, kind, tail=tail, vocab_size=V, **kw)
        assert_verbose_allclose(sparse, dense, *tol, what=f"{kind}/{tail}/T={T}")


# ----------------------------------------------------------------------------- k < V
# dtype of the student logits and of the cached top-k logits -> (grad atol relative to the
# largest gradient, grad rtol); the reference sees the same rounded values, lse stays fp32.
GRAD_TOL = {torch.float32: (1e-5, 1e-4), torch.bfloat16: (1e-5, 1.6e-2)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("T", [1.0, 2.0, 0.7])
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("kind", KINDS)
def test_topk_matches_reference(kind, tail, T, dtype):
    g = torch.Generator().manual_seed(1)
    N, V, k = 41, 1271, 16
    s = (torch.randn(N, V, generator=g) * 2).to(dtype)
    t = peaked_logits(N, V, g).to(dtype).float()
    ids, top, lse = make_teacher(t, k)
    top = top.to(dtype)
    s_ours = s.clone().requires_grad_(True)
    grad_out = torch.randn(N, generator=g)
    loss = topk_divergence(s_ours, ids, top, lse, kind, tail=tail, temperature=T, reduction="none")
    (loss * grad_out).sum().backward()
    s_ref = s.double().requires_grad_(True)
    ref = ref_topk(s_ref, t, ids, kind, tail, T) * T**2
    (ref * grad_out.double()).sum().backward()
    assert loss.dtype == torch.float32 and s_ours.grad.dtype == dtype
    assert_verbose_allclose(loss, ref, 1e-6, 1e-4, what=f"{kind}/{tail}/T={T}/{dtype} loss")
    atol, rtol = GRAD_TOL[dtype]
    atol *= s_ref.grad.abs().max().item()
    assert_verbose_allclose(s_ours.grad, s_ref.grad.to(dtype), atol, rtol, what=f"{kind}/{tail}/T={T}/{dtype} grad")


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_topk(kind, tail):
    g = torch.Generator().manual_seed(2)
    s = torch.randn(4, 9, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 9, generator=g, dtype=torch.float64) * 2
    ids, top, lse = make_teacher(t, 3)
    labels = torch.tensor([1, -100, 8, 0])
    for kw in (dict(temperature=1.0), dict(temperature=1.6, beta=0.3, skew_alpha=0.25, ce_weight=0.4,
                                               labels=labels, reduction="none")):
        fn = lambda x: topk_divergence(x, ids, top, lse, kind, tail=tail, **kw)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (s,))
    assert fn(s).dtype == torch.float64


def test_error_to_dense_shrinks_with_k():
    g = torch.Generator().manual_seed(3)
    N, V = 32, 1024
    t = peaked_logits(N, V, g).float()
    s = (t + torch.randn(N, V, generator=g, dtype=torch.float64).float() * 1.5)
    ks = [1, 4, 16, 64, 256, V]
    for T in (1.0, 2.0):
        dense = divergence(s, t, "fkl", temperature=T, reduction="none")
        for tail in TAILS:
            errs = []
            for k in ks:
                ids, top, lse = make_teacher(t, k)
                sparse = topk_divergence(s, ids, top, lse, "fkl", tail=tail, temperature=T, reduction="none")
                errs.append((sparse - dense).abs().mean().item())
            violations = sum(b > a for a, b in zip(errs, errs[1:]))
            assert violations <= 1 and errs[-2] < errs[0] and errs[-1] < 1e-5, (T, tail, errs)


@pytest.mark.parametrize("kind", KINDS)
def test_temperature_on_cached_T1_teacher_is_exact_on_topk(kind):
    """A cache holds raw T=1 logits: renorm at any T equals the dense softmax(z/T) restricted
    to the top-k and renormalised; bucket top-k ratios p_T(a)/p_T(b) are exact too."""
    g = torch.Generator().manual_seed(4)
    N, V, k = 8, 300, 20
    s = torch.randn(N, V, generator=g, dtype=torch.float64)
    t = peaked_logits(N, V, g)
    ids, top, lse = make_teacher(t, k)
    for T in (0.5, 2.0, 4.0):
        ours = topk_divergence(s, ids, top, lse, kind, temperature=T, scale_by_t2=False, reduction="none")
        p_ref = torch.softmax(t / T, -1).gather(-1, ids)
        p_ref = p_ref / p_ref.sum(-1, keepdim=True)
        q_ref = torch.softmax(s.gather(-1, ids) / T, -1)
        assert_verbose_allclose(ours, ref_kind(p_ref, q_ref, kind), 1e-12, 1e-10, what=f"renorm T={T}")
    from dist_distill.losses.topk import _teacher_bucket

    logp_top, _ = _teacher_bucket(top, lse, 2.0, V - k)
    ratios = logp_top - logp_top[:, :1]
    assert_verbose_allclose(ratios, (top - top[:, :1]) / 2.0, 1e-12, 1e-12, what="bucket ratios")


# ----------------------------------------------------------------------------- numerics / masking
@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("kind", KINDS)
def test_extreme_teacher_is_finite(kind, tail):
    """Top-1 holds all the mass in float32 (tail mass r rounds to 0), logits +-1e4."""
    g = torch.Generator().manual_seed(5)
    N, V, k = 6, 200, 4
    t = torch.full((N, V), -1e4)
    t[:, 7] = 1e4
    s = ((torch.randint(0, 2, (N, V), generator=g) * 2 - 1) * 1e4).float().requires_grad_(True)
    ids, top, lse = make_teacher(t, k)
    for T in (1.0, 2.0):
        loss = topk_divergence(s, ids, top, lse, kind, tail=tail, temperature=T)
        loss.backward()
        assert torch.isfinite(loss) and bool(torch.isfinite(s.grad).all()), (T, loss)
        s.grad = None


@pytest.mark.parametrize("tail", TAILS)
@pytest.mark.parametrize("kind", KINDS)
def test_masked_rows_with_garbage_are_ignored(kind, tail):
    g = torch.Generator().manual_seed(6)
    N, V, k = 10, 60, 5
    s, t = torch.randn(N, V, generator=g), torch.randn(N, V, generator=g)
    ids, top, lse = make_teacher(t, k)
    labels = torch.randint(0, V, (N,), generator=g)
    labels[::3] = -100
    s[::3], top[::3], lse[::3] = float("inf"), float("nan"), float("-inf")
    ids[::3] = 10**6  # padded cache rows may hold anything
    s.requires_grad_(True)
    per = topk_divergence(s, ids, top, lse, kind, tail=tail, labels=labels, ce_weight=0.3,
                          temperature=2.0, reduction="none")
    per.sum().backward()
    assert bool((per[::3] == 0).all()) and bool((s.grad[::3] == 0).all()) and bool(torch.isfinite(s.grad).all())
    s.grad = None
    labels[:] = -100
    loss = topk_divergence(s, ids, top, lse, kind, tail=tail, labels=labels)
    loss.backward()
    assert loss.item() == 0.0 and bool((s.grad == 0).all())


def test_vocab_padding_and_errors():
    g = torch.Generator().manual_seed(7)
    N, V, V_pad, k = 5, 50, 64, 6
    t = torch.randn(N, V, generator=g)
    s = torch.randn(N, V_pad, generator=g)
    ids, top, lse = make_teacher(t, k)
    sliced = topk_divergence(s[:, :V], ids, top, lse, "fkl", tail="bucket", temperature=2.0)
    padded = topk_divergence(s, ids, top, lse, "fkl", tail="bucket", temperature=2.0, vocab_size=V)
    assert torch.equal(sliced, padded)
    bad = ids.clone()
    bad[2, 0] = V + 3
    with pytest.raises(ValueError, match="topk_ids"):
        topk_divergence(s, bad, top, lse, "fkl", vocab_size=V)
    with pytest.raises(ValueError, match="teacher_lse"):
        topk_divergence(s, ids, top, None, "fkl", tail="bucket")
    with pytest.raises(ValueError, match="tail"):
        topk_divergence(s, ids, top, lse, "fkl", tail="uniform")
    with pytest.raises(ValueError, match="labels"):
        topk_divergence(s, ids, top, lse, "fkl", ce_weight=0.5)
    assert torch.isfinite(topk_divergence(s, ids, top, None, "fkl", tail="renorm"))


def test_leading_dims_and_reductions():
    g = torch.Generator().manual_seed(8)
    B, L, V, k = 2, 5, 40, 8
    s, t = torch.randn(B, L, V, generator=g), torch.randn(B, L, V, generator=g)
    ids, top, lse = make_teacher(t, k)
    w = torch.rand(B, L, generator=g) + 0.5
    labels = torch.randint(0, V, (B, L), generator=g)
    labels[0, -2:] = -100
    kw = dict(tail="bucket", labels=labels, weights=w, temperature=1.5)
    per = topk_divergence(s, ids, top, lse, "jsd", reduction="none", **kw)
    assert per.shape == (B, L)
    total = topk_divergence(s, ids, top, lse, "jsd", reduction="sum", **kw)
    mean = topk_divergence(s, ids, top, lse, "jsd", **kw)
    normed = topk_divergence(s, ids, top, lse, "jsd", normalizer=torch.tensor(7.0), **kw)
    assert math.isclose(per.sum().item(), total.item(), rel_tol=1e-6)
    assert math.isclose(mean.item(), total.item() / w[labels != -100].sum().item(), rel_tol=1e-6)
    assert math.isclose(normed.item(), total.item() / 7.0, rel_tol=1e-6)
