"""softmax_divergence (Triton kernels under the interpreter, and the PyTorch twin) against a
float64 brute-force reference owned by this file, and against ``dist_distill.losses``."""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():  # read when the kernels are defined: set before importing them
    os.environ.setdefault("TRITON_INTERPRET", "1")

from dist_distill import losses  # noqa: E402
from dist_distill.kernels import softmax_divergence  # noqa: E402
from asserts import assert_close  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch", "triton"]
KINDS = ["fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd"]
# Gradient tolerances per input dtype: the gradient is returned in the input dtype.
TOL = {torch.float32: (2e-6, 1e-5), torch.bfloat16: (2e-3, 1.6e-2), torch.float16: (2e-4, 2e-3)}
N, V, BLOCK = 41, 1271, 512  # BLOCK does not divide V


# ---------------------------------------------------------------- float64 brute force
def _kl(la, lb):
    a = la.exp()
    return torch.where(a > 0, a * (la - lb), torch.zeros_like(a)).sum(-1)


def ref_div(logp, logq, kind, beta=0.5, alpha=0.1):
    """Per-row divergence from float64 log-probs, straight from the definitions."""
    p, q = logp.exp(), logq.exp()
    if kind == "fkl" or (kind == "jsd" and beta == 0):
        return _kl(logp, logq)
    if kind == "rkl" or (kind == "jsd" and beta == 1):
        return _kl(logq, logp)
    if kind == "jsd":
        lm = (beta * p + (1 - beta) * q).log()
        return beta * _kl(logp, lm) + (1 - beta) * _kl(logq, lm)
    if kind == "skew_fkl":
        return _kl(logp, (alpha * p + (1 - alpha) * q).log())
    if kind == "skew_rkl":
        return _kl(logq, (alpha * q + (1 - alpha) * p).log())
    return 0.5 * (p - q).abs().sum(-1)


def ref_loss(s, logp_fn, kind, *, T, labels=None, ce_weight=0.0, weights=None, reduction="sum",
             normalizer=None, beta=0.5, vocab=None):
    """s: [N, V] float64 student logits (requires grad); logp_fn(logq_full_T) -> (logp, logq)."""
    s = s[:, :vocab] if vocab else s
    valid = torch.ones(s.shape[0], dtype=torch.bool) if labels is None else labels != -100
    logp, logq = logp_fn(s)
    div = ref_div(logp, logq, kind, beta) * T * T
    loss = div
    if ce_weight:
        ce = torch.logsumexp(s, -1) - s.gather(1, labels.clamp(min=0)[:, None]).squeeze(1)
        loss = (1 - ce_weight) * div + ce_weight * ce
    w = valid.double() if weights is None else valid.double() * weights.double()
    loss = torch.where(valid, loss * w, torch.zeros_like(loss))
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    denom = normalizer if normalizer is not None else (w.sum() if weights is not None else valid.sum())
    return loss.sum() / denom


def dense_fn(t, T):
    return lambda s: (torch.log_softmax(t.double() / T, -1), torch.log_softmax(s / T, -1))


def topk_fn(ids, top, lse, T, tail):
    def fn(s):
        v, k = s.shape[-1], ids.shape[-1]
        if tail == "renorm":
            return torch.log_softmax(top.double() / T, -1), torch.log_softmax(s.gather(1, ids) / T, -1)
        logq = torch.log_softmax(s / T, -1)
        in_top = torch.zeros_like(s, dtype=torch.bool).scatter(1, ids, True)
        q_tail = torch.where(in_top, torch.zeros_like(s), logq.exp()).sum(-1, keepdim=True)
        r = 1 - (top.double() - lse.double()[:, None]).exp().sum(-1, keepdim=True)
        z_tail = lse.double()[:, None] + torch.log(r / (v - k))
        lse_t = torch.logsumexp(torch.cat([top.double() / T, math.log(v - k) + z_tail / T], -1), -1, keepdim=True)
        logp = torch.cat([top.double() / T - lse_t, math.log(v - k) + z_tail / T - lse_t], -1)
        return logp, torch.cat([logq.gather(1, ids), q_tail.log()], -1)
    return fn


# ---------------------------------------------------------------- helpers


def make_inputs(n=N, v=V, scale=3.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g, dtype=torch.float64) * scale
    t = s + torch.randn(n, v, generator=g, dtype=torch.float64) * scale  # correlated teacher
    labels = torch.randint(0, v, (n,), generator=g)
    labels[[i for i in (0, 7, 19) if i < n]] = -100
    return s, t, labels


def run_ours(s, dtype, backend, grad_output=0.7, **kw):
    x = s.to(dtype).to(DEVICE).requires_grad_()
    loss = softmax_divergence(x, backend=backend, block_v=BLOCK, **kw)
    (loss * grad_output).sum().backward()
    return loss, x.grad


def run_ref(s, dtype, logp_fn, kind, grad_output=0.7, **kw):
    x = s.to(dtype).double().requires_grad_()  # the reference sees the same (rounded) inputs
    loss = ref_loss(x, logp_fn, kind, **kw)
    (loss * grad_output).sum().backward()
    return loss, x.grad


# ---------------------------------------------------------------- dense teacher
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1.0, 2.0])
@pytest.mark.parametrize("kind", KINDS)
def test_dense_matches_reference(kind, T, backend):
    s, t, labels = make_inputs(n=N if kind in ("fkl", "jsd") else 23)  # the interpreter is slow
    kw = dict(kind=kind, temperature=T, labels=labels.to(DEVICE), ce_weight=0.3, reduction="sum")
    loss, grad = run_ours(s, torch.float32, backend, teacher_logits=t.float().to(DEVICE), **kw)
    ref, ref_grad = run_ref(s, torch.float32, dense_fn(t.float(), T), kind, T=T, labels=labels, ce_weight=0.3)
    assert_close("loss", loss, ref, 1e-5, 1e-5)
    assert_close("grad", grad, ref_grad, *TOL[torch.float32])
    assert (grad[[0, 7, 19]] == 0).all(), "ignored rows must get an exact 0 gradient"
    theirs = losses.divergence(s.float(), t.float(), kind, temperature=T, labels=labels, ce_weight=0.3, reduction="sum")
    assert_close("vs dist_distill.losses", loss, theirs, 1e-5, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", ["fkl", "jsd"])
def test_dense_low_precision_inputs(kind, dtype, backend):
    s, t, labels = make_inputs()
    kw = dict(kind=kind, temperature=2.0, labels=labels.to(DEVICE), ce_weight=0.5, reduction="sum")
    loss, grad = run_ours(s, dtype, backend, teacher_logits=t.to(dtype).to(DEVICE), **kw)
    ref, ref_grad = run_ref(s, dtype, dense_fn(t.to(dtype), 2.0), kind, T=2.0, labels=labels, ce_weight=0.5)
    assert grad.dtype == dtype
    assert_close("loss", loss, ref, 1e-4, 1e-5)
    assert_close("grad", grad, ref_grad, *TOL[dtype])


@pytest.mark.parametrize("backend", BACKENDS)
def test_reductions_weights_normalizer(backend):
    s, t, labels = make_inputs(n=13, v=300)
    w = torch.rand(13, dtype=torch.float64) + 0.5
    teacher = t.float().to(DEVICE)
    go = torch.randn(13, dtype=torch.float64)
    common = dict(kind="jsd", temperature=1.5, labels=labels, ce_weight=0.2)
    loss, grad = run_ours(s, torch.float32, backend, grad_output=go.float().to(DEVICE), teacher_logits=teacher,
                          weights=w.float().to(DEVICE), reduction="none", **{**common, "labels": labels.to(DEVICE)})
    ref, ref_grad = run_ref(s, torch.float32, dense_fn(t.float(), 1.5), "jsd", grad_output=go, T=1.5,
                            labels=labels, ce_weight=0.2, weights=w, reduction="none")
    assert loss.shape == (13,)
    assert_close("none loss", loss, ref, 1e-5, 1e-5)
    assert_close("none grad (vector grad_output)", grad, ref_grad, *TOL[torch.float32])
    for red, norm in (("mean", None), ("mean", 1000.0)):
        loss, grad = run_ours(s, torch.float32, backend, teacher_logits=teacher, reduction=red, normalizer=norm,
                              **{**common, "labels": labels.to(DEVICE)})
        ref, ref_grad = run_ref(s, torch.float32, dense_fn(t.float(), 1.5), "jsd", T=1.5, labels=labels,
                                ce_weight=0.2, reduction=red, normalizer=norm)
        assert_close(f"{red}/{norm} loss", loss, ref, 1e-6, 1e-5)
        assert_close(f"{red}/{norm} grad", grad, ref_grad, 1e-8, 1e-4)
        theirs = losses.divergence(s.float(), t.float(), "jsd", temperature=1.5, labels=labels, ce_weight=0.2,
                                   reduction=red, normalizer=norm)
        assert_close("vs dist_distill.losses", loss, theirs, 1e-6, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_vocab_and_parts(backend):
    s, t, labels = make_inputs(n=9, v=300)
    s[:, 290:] = 1e4  # padded columns: must be ignored, their gradient exactly 0
    x = s.float().to(DEVICE).requires_grad_()
    loss, parts = softmax_divergence(x, t[:, :295].float().to(DEVICE), vocab_size=290, kind="fkl", temperature=2.0,
                                     labels=labels.clamp(max=289).to(DEVICE), ce_weight=0.4, backend=backend,
                                     block_v=64, return_parts=True)
    loss.backward()
    assert (x.grad[:, 290:] == 0).all()
    ref, ref_grad = run_ref(s, torch.float32, dense_fn(t[:, :290].float(), 2.0), "fkl", grad_output=1.0, T=2.0,
                            labels=labels.clamp(max=289), ce_weight=0.4, reduction="mean", vocab=290)
    assert_close("loss", loss, ref, 1e-6, 1e-5)
    assert_close("grad", x.grad, ref_grad, 1e-8, 1e-4)
    assert_close("parts", 0.6 * parts["div"] + 0.4 * parts["ce"], loss, 1e-6, 1e-6)


# ---------------------------------------------------------------- sparse top-k teacher
def topk_of(t, k):
    top, ids = t.topk(k, -1)
    return ids, top.float(), t.logsumexp(-1).float()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["fkl", "rkl", "jsd", "tvd"])
@pytest.mark.parametrize("tail", ["renorm", "bucket"])
def test_topk_matches_reference(tail, kind, backend):
    s, t, labels = make_inputs()
    ids, top, lse = topk_of(t, 20)
    labels[3], labels[4] = ids[3, 0], ids[4, 19]  # labels inside the top-k as well as in the tail
    kw = dict(kind=kind, temperature=2.0, tail=tail, labels=labels.to(DEVICE), ce_weight=0.3, reduction="sum")
    loss, grad = run_ours(s, torch.float32, backend, teacher_topk=tuple(u.to(DEVICE) for u in (ids, top, lse)), **kw)
    ref, ref_grad = run_ref(s, torch.float32, topk_fn(ids, top, lse, 2.0, tail), kind, T=2.0, labels=labels,
                            ce_weight=0.3)
    assert_close("loss", loss, ref, 1e-4, 1e-5)
    assert_close("grad", grad, ref_grad, 2e-6, 5e-5)
    theirs = losses.topk_divergence(s.float(), ids, top, lse, kind, temperature=2.0, tail=tail, labels=labels,
                                    ce_weight=0.3, reduction="sum")
    assert_close("vs dist_distill.losses", loss, theirs, 1e-4, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("tail", ["renorm", "bucket"])
def test_topk_bf16_and_k_equal_v_is_dense(tail, backend):
    s, t, labels = make_inputs(n=11, v=200)
    ids, top, lse = topk_of(t, 200)
    kw = dict(kind="jsd", temperature=2.0, labels=labels.to(DEVICE), ce_weight=0.3, reduction="sum")
    loss, grad = run_ours(s, torch.bfloat16, backend, tail=tail,
                          teacher_topk=tuple(u.to(DEVICE) for u in (ids, top, lse)), **kw)
    dense, dense_grad = run_ours(s, torch.bfloat16, backend, teacher_logits=t.float().to(DEVICE), **kw)
    assert_close("loss k=V vs dense", loss, dense, 1e-5, 1e-5)
    assert_close("grad k=V vs dense", grad, dense_grad, *TOL[torch.bfloat16])


@pytest.mark.parametrize("backend", BACKENDS)
def test_bucket_tiny_student_tail_is_exact(backend):
    # The student puts ~1e-13 on the tail: 1 - sum(q_topk) is 0 in float32, the kernel's
    # masked logsumexp is not. The float64 reference is the judge.
    s, t, labels = make_inputs(n=5, v=500, scale=1.0)
    ids, top, lse = topk_of(t, 8)
    s.scatter_(1, ids, 40.0)
    kw = dict(kind="rkl", temperature=1.0, tail="bucket", reduction="sum")
    loss, grad = run_ours(s, torch.float32, backend, teacher_topk=tuple(u.to(DEVICE) for u in (ids, top, lse)), **kw)
    ref, ref_grad = run_ref(s, torch.float32, topk_fn(ids, top, lse, 1.0, "bucket"), "rkl", T=1.0)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert_close("loss", loss, ref, 1e-4, 1e-4)
    assert_close("grad", grad, ref_grad, 1e-6, 1e-4)


# ---------------------------------------------------------------- peer traps and properties
@pytest.mark.parametrize("backend", BACKENDS)
def test_bf16_logits_use_fp32_softmax_not_bf16(backend):
    # Liger bug class: softmax / temperature division done in bf16. Our bf16 path must match the
    # float32 math on the bf16 inputs, and that must differ from the bf16 math by > 1 %.
    s, t, _ = make_inputs(n=8, v=512, scale=8.0)
    sb, tb = s.bfloat16(), t.bfloat16()
    loss, grad = run_ours(s, torch.bfloat16, backend, grad_output=1.0, teacher_logits=tb.to(DEVICE), kind="fkl",
                          temperature=3.0, reduction="sum")
    exact, exact_grad = run_ref(s, torch.bfloat16, dense_fn(tb, 3.0), "fkl", grad_output=1.0, T=3.0)
    xr = sb.clone().requires_grad_()  # everything in bf16
    rounded = (torch.log_softmax(tb / 3.0, -1).exp() * (torch.log_softmax(tb / 3.0, -1)
               - torch.log_softmax(xr / 3.0, -1))).sum() * 9.0
    rounded.backward()
    rel = ((xr.grad.double() - exact_grad).norm() / exact_grad.norm()).item()
    assert rel > 0.01, f"test case too easy: bf16 math differs only by {rel:.2%}"
    assert_close("loss", loss, exact, 1e-4, 1e-5)
    assert_close("grad", grad, exact_grad, *TOL[torch.bfloat16])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", KINDS)
def test_no_nan_when_probabilities_underflow_in_both(kind, backend):
    # Columns where p and q are both exp(-huge) = 0 (even in float64) contribute exactly 0:
    # the expected result is the loss on the other columns, with a 0 gradient on these.
    s, t, labels = make_inputs(n=6, v=300)
    labels = labels.clamp(min=100)
    s[:, :100] = -1e4
    t[:, :100] = -1e4
    kw = dict(kind=kind, temperature=1.0, labels=labels.to(DEVICE), ce_weight=0.1, reduction="sum")
    loss, grad = run_ours(s, torch.float32, backend, teacher_logits=t.float().to(DEVICE), **kw)
    assert torch.isfinite(loss) and torch.isfinite(grad).all()
    assert (grad[:, :100] == 0).all()
    ref, ref_grad = run_ref(s[:, 100:], torch.float32, dense_fn(t[:, 100:].float(), 1.0), kind, T=1.0,
                            labels=labels - 100, ce_weight=0.1)
    assert_close("loss", loss, ref, 1e-5, 1e-5)
    assert_close("grad", grad[:, 100:], ref_grad, *TOL[torch.float32])
    theirs = losses.divergence(s.float(), t.float(), kind, labels=labels, ce_weight=0.1, reduction="sum")
    assert_close("vs dist_distill.losses", loss, theirs, 1e-5, 1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_properties(backend):
    s, t, _ = make_inputs(n=5, v=100)
    sf, tf = s.float().to(DEVICE), t.float().to(DEVICE)
    for kind in KINDS:  # identical logits: zero loss, zero gradient
        x = sf.clone().requires_grad_()
        loss = softmax_divergence(x, sf, kind=kind, temperature=2.0, backend=backend, block_v=32)
        loss.backward()
        assert abs(loss.item()) < 1e-6, kind
        if kind != "tvd":  # |p - q| has no gradient at p = q (any subgradient is right)
            assert x.grad.abs().max() < 1e-7, kind

    def f(a, b, **kw):
        return softmax_divergence(a, b, backend=backend, block_v=32, temperature=2.0, **kw).item()

    assert f(sf, tf, kind="jsd", beta=0.0) == pytest.approx(f(sf, tf, kind="fkl"), rel=1e-6)
    assert f(sf, tf, kind="jsd", beta=1.0) == pytest.approx(f(sf, tf, kind="rkl"), rel=1e-6)
    assert f(sf, tf, kind="jsd", beta=0.5) == pytest.approx(f(tf, sf, kind="jsd", beta=0.5), rel=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tail", [None, "renorm", "bucket"])
def test_gpu_large_vocab_bf16(tail):
    s, t, labels = make_inputs(n=256, v=32003, seed=1)
    kw = dict(kind="jsd", temperature=2.0, labels=labels.cuda(), ce_weight=0.5, reduction="sum")
    teacher = {"teacher_logits": t.bfloat16().cuda()} if tail is None else {
        "tail": tail, "teacher_topk": tuple(u.cuda() for u in topk_of(t.bfloat16().double(), 64))}
    x = s.bfloat16().cuda().requires_grad_()
    loss = softmax_divergence(x, backend="triton", **kw, **teacher)
    loss.backward()
    y = s.bfloat16().cuda().requires_grad_()
    ref = softmax_divergence(y, backend="torch", **kw, **teacher)
    ref.backward()
    assert_close("loss", loss, ref, 1e-3, 1e-5)
    assert_close("grad", x.grad, y.grad, *TOL[torch.bfloat16])
