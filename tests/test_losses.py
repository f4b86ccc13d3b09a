"""Dense distillation losses vs an independent float64 reference, plus properties and numerics."""

from __future__ import annotations

import math

import pytest
import torch

from dist_distill.losses import KINDS, count_tokens, divergence
from asserts import assert_verbose_allclose

# dtype -> tolerances. Inputs are rounded to the dtype first and the reference sees the
# same rounded values, so the loss only carries float32-math error for every input dtype;
# the gradient is returned in the input dtype and carries its rounding. Gradient atol is
# relative to the largest reference gradient (cancellation in q (log q - log p - KL) makes
# small entries carry the absolute error of the large ones);
# fp16 adds one subnormal spacing (2**-24) to the gradient atol.
TOL = {
    torch.float32: {"loss": (1e-6, 2e-5), "grad": (1e-5, 1e-4)},
    torch.bfloat16: {"loss": (1e-6, 2e-5), "grad": (1e-5, 1.6e-2)},
    torch.float16: {"loss": (1e-6, 2e-5), "grad": (1e-5, 2e-3)},
}
SUBNORMAL = {torch.float16: 2.0**-24}


# ----------------------------------------------------------------------------- reference
def ref_kind(p, q, kind, beta=0.5, alpha=0.1):
    """Divergence of probability rows ``p`` (teacher), ``q`` (student), float64, prob space."""

    def kl(a, b):
        return (torch.xlogy(a, a) - torch.xlogy(a, b)).sum(-1)

    if kind == "fkl":
        return kl(p, q)
    if kind == "rkl":
        return kl(q, p)
    if kind == "jsd":
        if beta == 0:
            return kl(p, q)
        if beta == 1:
            return kl(q, p)
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if kind == "skew_fkl":
        return kl(p, alpha * p + (1 - alpha) * q)
    if kind == "skew_rkl":
        return kl(q, alpha * q + (1 - alpha) * p)
    if kind == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise AssertionError(kind)


def ref_softmax(z):
    e = torch.exp(z - z.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def ref_loss(s, t, kind, *, temperature=1.0, scale_by_t2=True, beta=0.5, skew_alpha=0.1, labels=None,
             ignore_index=-100, weights=None, ce_weight=0.0, vocab_size=None, reduction="mean", normalizer=None):
    """Row-by-row float64 loss; ignored rows are skipped, never computed."""
    V = vocab_size or s.shape[-1]
    lead = s.shape[:-1]
    s = s.double().reshape(-1, s.shape[-1])[:, :V]
    t = t.double().reshape(-1, t.shape[-1])[:, :V]
    n = s.shape[0]
    labels = None if labels is None else labels.reshape(n)
    weights = None if weights is None else weights.double().reshape(n)
    rows, denom = [], 0.0
    for i in range(n):
        if (labels is not None and labels[i] == ignore_index) or (weights is not None and weights[i] == 0):
            rows.append(s.new_zeros(()) * s[i, 0])  # keeps the graph
            continue
        p, q = ref_softmax(t[i] / temperature), ref_softmax(s[i] / temperature)
        loss = ref_kind(p, q, kind, beta, skew_alpha) * (temperature**2 if scale_by_t2 else 1.0)
        if ce_weight > 0:
            ce = -torch.log(ref_softmax(s[i])[labels[i]])
            loss = (1 - ce_weight) * loss + ce_weight * ce
        w = 1.0 if weights is None else weights[i]
        rows.append(loss * w)
        denom = denom + w
    out = torch.stack(rows)
    if reduction == "none":
        return out.reshape(lead)
    if reduction == "sum":
        return out.sum()
    if normalizer is not None:
        denom = float(normalizer)
    return out.sum() / denom if float(denom) > 0 else out.sum()


# ----------------------------------------------------------------------------- fixtures
def make_case(name, dtype, seed=0):
    """(student, teacher, kwargs, grad_output) for one configuration; logits in ``dtype``."""
    g = torch.Generator().manual_seed(seed)
    lead, V, kw = {
        "plain": ((41,), 1271, dict(temperature=1.0)),
        "ce_ignore_none": ((41,), 401, dict(temperature=2.0, ce_weight=0.3, reduction="none")),
        "padded_weights_sum": ((41,), 409, dict(temperature=0.7, scale_by_t2=False, vocab_size=401, reduction="sum")),
        "normalizer": ((41,), 1271, dict(temperature=3.0, ce_weight=0.5, beta=0.3, skew_alpha=0.2, normalizer=123.0)),
        "leading_dims": ((3, 7), 401, dict(temperature=1.5, beta=0.7, reduction="none")),
    }[name]
    s = (torch.randn(*lead, V, generator=g) * 2).to(dtype)
    t = (torch.randn(*lead, V, generator=g) * 3).to(dtype)
    Vr = kw.get("vocab_size", V)
    labels = torch.randint(0, Vr, lead, generator=g)
    if name in ("ce_ignore_none", "normalizer", "leading_dims"):
        ignored = torch.rand(lead, generator=g) < 0.3
        labels[ignored] = -100
        s[ignored] = 1e4  # garbage on ignored rows must not leak
        kw["labels"] = labels
    if name in ("padded_weights_sum", "normalizer"):
        kw["weights"] = torch.rand(lead, generator=g) + 0.5
    if "vocab_size" in kw:
        s[..., Vr:] = 50.0  # padded columns are garbage
        t[..., Vr:] = -30.0
    grad_out = torch.randn(lead, generator=g) if kw.get("reduction") == "none" else torch.tensor(0.7)
    return s, t, kw, grad_out


CASES = ["plain", "ce_ignore_none", "padded_weights_sum", "normalizer", "leading_dims"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("kind", KINDS)
def test_dense_matches_reference(kind, case, dtype):
    s, t, kw, grad_out = make_case(case, dtype)
    s_ours = s.clone().requires_grad_(True)
    loss = divergence(s_ours, t, kind, **kw)
    assert loss.dtype == torch.float32
    (loss * grad_out).sum().backward()

    s_ref = s.double().requires_grad_(True)
    ref = ref_loss(s_ref, t, kind, **kw)
    (ref * grad_out.double()).sum().backward()

    tol = TOL[dtype]
    assert_verbose_allclose(loss, ref, *tol["loss"], what=f"{kind}/{case}/{dtype} loss")
    assert s_ours.grad.dtype == dtype
    g_atol, g_rtol = tol["grad"]
    g_atol = g_atol * s_ref.grad.abs().max().item() + SUBNORMAL.get(dtype, 0.0)
    assert_verbose_allclose(s_ours.grad, s_ref.grad.to(dtype), g_atol, g_rtol, what=f"{kind}/{case}/{dtype} grad")


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
def test_fkl_gradient_is_T_times_q_minus_p(temperature):
    """DESIGN fact 1: d(T^2 KL(p||q)) / d student logits = T (q - p) per token."""
    g = torch.Generator().manual_seed(1)
    s = torch.randn(5, 33, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 33, generator=g, dtype=torch.float64)
    divergence(s, t, "fkl", temperature=temperature, reduction="sum").backward()
    p, q = torch.softmax(t / temperature, -1), torch.softmax(s.detach() / temperature, -1)
    assert_verbose_allclose(s.grad, temperature * (q - p), 1e-12, 1e-10, what="fkl grad")


@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck_dense(kind):
    g = torch.Generator().manual_seed(2)
    s = torch.randn(4, 7, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(4, 7, generator=g, dtype=torch.float64)
    labels = torch.tensor([1, -100, 6, 0])
    w = torch.tensor([0.5, 1.0, 2.0, 1.5], dtype=torch.float64)
    for kw in (dict(temperature=1.0), dict(temperature=1.7, beta=0.3, skew_alpha=0.25, ce_weight=0.4,
                                               labels=labels, weights=w, reduction="none")):
        assert torch.autograd.gradcheck(lambda x: divergence(x, t, kind, **kw), (s,))
    assert divergence(s, t, kind).dtype == torch.float64


# ----------------------------------------------------------------------------- properties
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 3.0])
def test_nonnegative_and_zero_on_identical(kind, temperature):
    g = torch.Generator().manual_seed(3)
    s, t = torch.randn(17, 101, generator=g) * 4, torch.randn(17, 101, generator=g) * 4
    assert bool((divergence(s, t, kind, temperature=temperature, reduction="none") >= 0).all())
    same = divergence(s, s.clone(), kind, temperature=temperature, reduction="none")
    assert_verbose_allclose(same, torch.zeros(17), 1e-6, 0, what="identical")


def test_jsd_symmetric_at_half():
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(9, 64, generator=g) * 3, torch.randn(9, 64, generator=g) * 3
    kw = dict(kind="jsd", beta=0.5, reduction="none", temperature=1.3)
    assert_verbose_allclose(divergence(a, b, **kw), divergence(b, a, **kw), 1e-7, 1e-6, what="jsd swap")


def test_jsd_and_skew_endpoints_exact():
    g = torch.Generator().manual_seed(5)
    s, t = torch.randn(9, 64, generator=g) * 3, torch.randn(9, 64, generator=g) * 3
    fkl, rkl = divergence(s, t, "fkl", reduction="none"), divergence(s, t, "rkl", reduction="none")
    assert torch.equal(divergence(s, t, "jsd", beta=0.0, reduction="none"), fkl)
    assert torch.equal(divergence(s, t, "jsd", beta=1.0, reduction="none"), rkl)
    assert torch.equal(divergence(s, t, "skew_fkl", skew_alpha=0.0, reduction="none"), fkl)
    assert torch.equal(divergence(s, t, "skew_rkl", skew_alpha=0.0, reduction="none"), rkl)
    for kind in ("skew_fkl", "skew_rkl"):  # alpha = 1 mixes the distribution with itself
        assert_verbose_allclose(divergence(s, t, kind, skew_alpha=1.0, reduction="none"), torch.zeros(9), 1e-7, 0)


def test_jsd_limits():
    """Unscaled JSD -> 0 at both ends; JSD/beta -> fkl (beta -> 0), JSD/(1-beta) -> rkl (beta -> 1)."""
    g = torch.Generator().manual_seed(6)
    s = torch.randn(6, 50, generator=g, dtype=torch.float64) * 2
    t = torch.randn(6, 50, generator=g, dtype=torch.float64) * 2
    fkl, rkl = divergence(s, t, "fkl", reduction="none"), divergence(s, t, "rkl", reduction="none")
    errs_f, errs_r = [], []
    for eps in (1e-2, 1e-3, 1e-4):
        lo = divergence(s, t, "jsd", beta=eps, reduction="none")
        hi = divergence(s, t, "jsd", beta=1 - eps, reduction="none")
        assert bool((lo < 2 * eps * fkl).all()) and bool((hi < 2 * eps * rkl).all())
        errs_f.append(((lo / eps - fkl).abs() / fkl).max().item())
        errs_r.append(((hi / eps - rkl).abs() / rkl).max().item())
    for errs in (errs_f, errs_r):
        assert errs[0] > errs[1] > errs[2] and errs[2] < 1e-2, errs  # error is O(beta)


# ----------------------------------------------------------------------------- numerics
@pytest.mark.parametrize("kind", KINDS)
def test_underflow_in_both_distributions_is_finite(kind):
    g = torch.Generator().manual_seed(7)
    s, t = torch.randn(8, 300, generator=g), torch.randn(8, 300, generator=g)
    s[:, :100] -= 3e3  # p and q both exactly 0 in float32 on these columns
    t[:, :100] -= 3e3
    s[:, 100:110] = float("-inf")  # a vocab masked on both sides
    t[:, 100:110] = float("-inf")
    s.requires_grad_(True)
    loss = divergence(s, t, kind, temperature=2.0)
    loss.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(s.grad).all())
    ref = ref_loss(s.detach()[:, 110:], t[:, 110:], kind, temperature=2.0)
    assert_verbose_allclose(loss, ref, 1e-6, 1e-5, what="underflow")


@pytest.mark.parametrize("kind", KINDS)
def test_huge_logits_are_finite(kind):
    g = torch.Generator().manual_seed(8)
    s = (torch.randint(0, 2, (8, 200), generator=g) * 2 - 1).float() * 1e4
    t = (torch.randint(0, 2, (8, 200), generator=g) * 2 - 1).float() * 1e4
    s.requires_grad_(True)
    loss = divergence(s, t, kind, temperature=1.0)
    loss.backward()
    assert torch.isfinite(loss) and bool(torch.isfinite(s.grad).all())
    assert_verbose_allclose(loss, ref_loss(s.detach(), t, kind), 1e-3, 1e-5, what="+-1e4")


@pytest.mark.parametrize("garbage", [1e4, -1e4, float("inf"), float("nan")])
@pytest.mark.parametrize("kind", KINDS)
def test_fully_masked_batch_gives_zero_loss_and_grad(kind, garbage):
    s = torch.full((6, 50), garbage, requires_grad=True)
    t = torch.full((6, 50), -garbage)
    labels = torch.full((6,), -100)
    for kw in (dict(), dict(ce_weight=0.5), dict(weights=torch.ones(6))):
        loss = divergence(s, t, kind, labels=labels, temperature=2.0, **kw)
        loss.backward()
        assert loss.item() == 0.0 and bool((s.grad == 0).all()), (kw, loss, s.grad)
        s.grad = None


def test_ignored_rows_are_exact_zero():
    g = torch.Generator().manual_seed(9)
    s, t = torch.randn(10, 40, generator=g), torch.randn(10, 40, generator=g)
    labels = torch.randint(0, 40, (10,), generator=g)
    labels[::3] = -1
    s[::3] = float("inf")
    s.requires_grad_(True)
    per = divergence(s, t, "jsd", labels=labels, ignore_index=-1, ce_weight=0.2, reduction="none")
    per.sum().backward()
    assert bool((per[::3] == 0).all()) and bool((s.grad[::3] == 0).all()) and bool(torch.isfinite(s.grad).all())
    assert bool((per[1::3] > 0).all())


def test_argument_errors():
    s, t = torch.randn(3, 10), torch.randn(3, 10)
    with pytest.raises(ValueError, match="labels"):
        divergence(s, t, "fkl", ce_weight=0.1)
    with pytest.raises(ValueError, match="kind"):
        divergence(s, t, "kl")
    with pytest.raises(ValueError, match="vocab_size"):
        divergence(s, torch.randn(3, 12), "fkl")
    with pytest.raises(ValueError, match="normalizer"):
        divergence(s, t, "fkl", reduction="sum", normalizer=3)
    with pytest.raises(ValueError, match="temperature"):
        divergence(s, t, "fkl", temperature=0.0)
    with pytest.raises(ValueError, match="labels"):
        divergence(s, t, "fkl", ce_weight=0.1, labels=torch.tensor([1, 2, 10]), vocab_size=10)
    # a teacher whose vocab is padded differently is fine with vocab_size
    assert torch.isfinite(divergence(s, torch.randn(3, 12), "fkl", vocab_size=10))


# ----------------------------------------------------------------------------- normalisation
def _step_grad(h, labels, t, w_lm, micro, kind="fkl"):
    """Gradient of one optimizer step split into micro-batches of ``micro`` sequences,
    normalised by the global token count (DESIGN fact 4)."""
    w = w_lm.clone().requires_grad_(True)
    norm = count_tokens(labels)
    for i in range(0, h.shape[0], micro):
        logits = h[i:i + micro] @ w.T
        loss = divergence(logits, t[i:i + micro], kind, labels=labels[i:i + micro], ce_weight=0.3,
                          temperature=2.0, normalizer=norm)
        loss.backward()
    return w.grad


def test_grad_accumulation_with_global_normalizer_matches_full_batch():
    g = torch.Generator().manual_seed(10)
    B, L, H, V = 8, 6, 16, 37
    h = torch.randn(B, L, H, generator=g, dtype=torch.float64)
    t = torch.randn(B, L, V, generator=g, dtype=torch.float64)
    w_lm = torch.randn(V, H, generator=g, dtype=torch.float64) * 0.3
    labels = torch.randint(0, V, (B, L), generator=g)
    for b, n_pad in enumerate([0, 5, 1, 3, 0, 4, 2, 5]):  # uneven padding per sequence
        if n_pad:
            labels[b, -n_pad:] = -100
    full = _step_grad(h, labels, t, w_lm, micro=8)
    accum = _step_grad(h, labels, t, w_lm, micro=2)
    assert_verbose_allclose(accum, full, 1e-12, 1e-10, what="8x1 vs 2x4")
    # the per-micro-batch mean is what the normalizer prevents: it really differs here
    w = w_lm.clone().requires_grad_(True)
    for i in range(0, B, 2):
        (divergence(h[i:i + 2] @ w.T, t[i:i + 2], "fkl", labels=labels[i:i + 2], ce_weight=0.3,
                    temperature=2.0) / 4).backward()
    assert not torch.allclose(w.grad, full, rtol=1e-4, atol=0)


def test_count_tokens_local():
    labels = torch.tensor([[1, 2, -100], [-100, -100, 5]])
    assert count_tokens(labels).item() == 3.0
    w = torch.tensor([[0.5, 2.0, 9.0], [9.0, 9.0, 1.0]])
    assert count_tokens(labels, weights=w).item() == 3.5
    assert count_tokens(labels, ignore_index=5).item() == 5.0
    # mean == sum / count_tokens
    g = torch.Generator().manual_seed(11)
    s, t = torch.randn(2, 3, 20, generator=g), torch.randn(2, 3, 20, generator=g)
    mean = divergence(s, t, "rkl", labels=labels)
    total = divergence(s, t, "rkl", labels=labels, reduction="sum")
    assert math.isclose(mean.item(), total.item() / 3.0, rel_tol=1e-6)
    assert math.isclose(divergence(s, t, "rkl", labels=labels, normalizer=count_tokens(labels)).item(),
                        mean.item(), rel_tol=1e-6)
