"""Host-side bookkeeping shared by every backend: argument checks, per-token coefficients,
the top-k teacher's log-probabilities, and the final reduction.

Conventions match ``dist_distill.losses`` (the pure-PyTorch reference):
``p = softmax(teacher / T)`` (teacher), ``q = softmax(student / T)`` (student), logits are
upcast to float32; per-token loss ``w * ((1 - ce_weight) * s_T * D + ce_weight * CE)`` with
``s_T = T^2`` when ``scale_by_t2`` and ``w`` the optional token weight; rows whose label is
``ignore_index`` or whose weight is 0 give exactly 0 loss and 0 gradient.

Every backend computes, per row, the raw divergence ``D``, the raw CE and the gradient of
``c_div * D(s) + c_ce * CE(z)`` with respect to the logits ``z`` (``s = z / T``), where the
coefficients ``c_div``, ``c_ce`` (``[N]`` float32) already hold weight, mixing, T^2 and the
reduction's denominator (see :func:`token_coefs`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

KINDS = ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd")
KIND_CODES = {name: i for i, name in enumerate(KINDS)}
TAILS = ("renorm", "bucket")
REDUCTIONS = ("none", "sum", "mean")
BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class DivSpec:
    """Static description of one loss: which divergence, temperature, tail, CE mixing.

    ``code`` is the kernel's KIND (jsd at beta 0 / 1 and skew at alpha 0 are mapped to
    fkl / rkl, TRL's exact endpoints); ``param`` is beta (jsd) or alpha (skew), with
    ``log_a = log(param)``, ``log_1ma = log(1 - param)`` (``-inf`` at the ends).
    """

    code: int
    param: float
    temperature: float
    scale_by_t2: bool
    ce_weight: float
    tail: str | None = None

    @property
    def inv_t(self) -> float:
        return 1.0 / self.temperature

    @property
    def div_scale(self) -> float:
        """Factor on the divergence in the loss: T^2 or 1."""
        return self.temperature**2 if self.scale_by_t2 else 1.0

    @property
    def log_a(self) -> float:
        return math.log(self.param) if self.param > 0 else float("-inf")

    @property
    def log_1ma(self) -> float:
        return math.log1p(-self.param) if self.param < 1 else float("-inf")

    @property
    def has_ce(self) -> bool:
        return self.ce_weight > 0


def make_spec(kind, *, beta, skew_alpha, temperature, scale_by_t2, ce_weight, tail=None) -> DivSpec:
    """Validate the loss arguments (errors name the argument) and build a :class:`DivSpec`."""
    if kind not in KIND_CODES:
        raise ValueError(f"unknown divergence kind {kind!r}; choose one of {KINDS}")
    for name, val in (("beta", beta), ("skew_alpha", skew_alpha), ("ce_weight", ce_weight)):
        if not 0.0 <= float(val) <= 1.0:
            raise ValueError(f"{name} must lie in [0, 1], got {val}")
    if not float(temperature) > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if tail is not None and tail not in TAILS:
        raise ValueError(f"tail must be one of {TAILS}, got {tail!r}")
    param = float(beta) if kind == "jsd" else float(skew_alpha)
    if (kind, param) in (("jsd", 0.0), ("skew_fkl", 0.0)):
        kind = "fkl"
    elif (kind, param) in (("jsd", 1.0), ("skew_rkl", 0.0)):
        kind = "rkl"
    return DivSpec(KIND_CODES[kind], param, float(temperature), bool(scale_by_t2), float(ce_weight), tail)


def resolve_backend(backend: str, x: torch.Tensor) -> str:
    """``auto`` -> ``triton`` for CUDA tensors, else ``torch``. Triton on CPU tensors runs only
    under the interpreter (``TRITON_INTERPRET=1``, set before the kernels are first used)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda else "torch"
    if backend == "triton" and not x.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("backend='triton' on CPU tensors needs TRITON_INTERPRET=1; use backend='torch' or 'auto'")
    return backend


@dataclass
class TokenCoefs:
    """Per-token bookkeeping, all ``[N]`` on the logits' device.

    ``valid`` bool; ``w`` float32 token weight (0 on ignored rows); ``labels`` int64 safe to
    index with (ignored rows -> 0); ``c_div``, ``c_ce`` float32 gradient coefficients (see
    module doc); ``denom`` 0-d float32 denominator of the reduction (1 for sum / none).
    """

    valid: torch.Tensor
    w: torch.Tensor
    labels: torch.Tensor
    c_div: torch.Tensor
    c_ce: torch.Tensor
    denom: torch.Tensor

    def rows(self, sl: slice) -> "TokenCoefs":
        """The same bookkeeping restricted to rows ``sl`` (denominator kept)."""
        return TokenCoefs(self.valid[sl], self.w[sl], self.labels[sl], self.c_div[sl], self.c_ce[sl], self.denom)


def token_coefs(labels, weights, *, n: int, vocab: int, device, spec: DivSpec, ignore_index: int,
                reduction: str, normalizer) -> TokenCoefs:
    """Build :class:`TokenCoefs` for ``n`` tokens; checks labels lie in ``[0, vocab)``."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if normalizer is not None and reduction != "mean":
        raise ValueError(f"normalizer= overrides the denominator of reduction='mean'; got reduction={reduction!r}")
    if spec.has_ce and labels is None:
        raise ValueError("ce_weight > 0 mixes in hard-label cross-entropy: pass labels=")
    valid = torch.ones(n, dtype=torch.bool, device=device)
    safe = torch.zeros(n, dtype=torch.long, device=device)
    if labels is not None:
        labels = _flat(labels, n, "labels", device).long()
        valid = labels != ignore_index
        safe = torch.where(valid, labels, safe)
        if spec.has_ce and bool(((safe < 0) | (safe >= vocab)).any()):
            raise ValueError(f"labels must lie in [0, {vocab}) (the real vocab) or equal ignore_index={ignore_index}")
    w = valid.float()
    if weights is not None:
        weights = _flat(weights, n, "weights", device).float()
        valid = valid & (weights != 0)
        w = torch.where(valid, weights, w.new_zeros(()))
    denom = _denominator(w, valid, weights is not None, reduction, normalizer)
    rw = w / denom
    c_div = rw * ((1.0 - spec.ce_weight) * spec.div_scale * spec.inv_t)
    c_ce = rw * spec.ce_weight
    return TokenCoefs(valid, w, safe, c_div, c_ce, denom)


def _flat(x: torch.Tensor, n: int, name: str, device) -> torch.Tensor:
    if x.numel() != n:
        raise ValueError(f"{name} must have one entry per token ({n}), got shape {tuple(x.shape)}")
    return x.reshape(n).to(device)


def _denominator(w, valid, weighted: bool, reduction: str, normalizer) -> torch.Tensor:
    """0-d float32: normalizer, else weight sum / valid count for mean; 1 otherwise. 0 -> 1."""
    if reduction != "mean":
        return w.new_ones(())
    if normalizer is not None:
        denom = torch.as_tensor(normalizer, device=w.device).float()
    else:
        denom = w.sum() if weighted else valid.sum().float()
    return torch.where(denom > 0, denom, torch.ones_like(denom))


def reduce_rows(div: torch.Tensor, ce: torch.Tensor | None, coefs: TokenCoefs, spec: DivSpec,
                reduction: str):
    """Assemble the loss and its detached parts from raw per-row ``div`` / ``ce`` ([N] float32).

    Returns ``(loss, {"div": s_T * D, "ce": CE})``, each reduced like the loss (weighted,
    ignored rows 0) so that ``loss = (1 - ce_weight) * div + ce_weight * ce``.
    """
    zero = div.new_zeros(())
    div_rows = torch.where(coefs.valid, coefs.w * (spec.div_scale * div), zero)
    ce_rows = zero.expand_as(div_rows) if ce is None else torch.where(coefs.valid, coefs.w * ce, zero)
    loss_rows = (1.0 - spec.ce_weight) * div_rows + spec.ce_weight * ce_rows
    if reduction == "none":
        return loss_rows, {"div": div_rows.detach(), "ce": ce_rows.detach()}

    def red(x):
        return x.sum() / coefs.denom

    return red(loss_rows), {"div": red(div_rows).detach(), "ce": red(ce_rows).detach()}


def topk_teacher_logprobs(topk_logits: torch.Tensor, teacher_lse, *, spec: DivSpec, vocab: int, log_tail=None):
    """Teacher log-probabilities over the top-k categories (+ the tail bucket).

    Args:
        topk_logits: ``[N, k]`` raw teacher logits at T=1.
        teacher_lse: ``[N]`` teacher full-vocab logsumexp at T=1 (bucket only).
        log_tail: ``[N]`` or None: log of the teacher's probability mass outside the top-k at
            ``spec.temperature`` (dist_distill.teacher.tails; the cache and the teacher group
            carry it). Given, the bucket is EXACT at every T: ``log p_T(top) = log_softmax(top / T)
            + log(1 - r_T)``, ``log p_T(tail) = log r_T`` (r_T floored at float32's smallest
            normal); ``teacher_lse`` is then unused. Without it, the estimate below.
    Returns:
        ``(logp_top [N, k], logp_tail [N], lo_top [N, k], lo_tail [N])`` float32: each
        log-probability is the double-float ``hi + lo`` (``hi`` = the float32 value, ``lo`` its
        float32 residual, 0 where ``hi`` is not finite), computed in float64 from the float32
        inputs (O(N k) work). A log-probability near -1e4 has a float32 spacing of ~1e-3; the
        reverse-KL gradient needs the DIFFERENCE of two such values exactly (see
        ``softmax_divergence``'s doc), which ``(hi_a - hi_b) + (lo_a - lo_b)`` gives.
        ``logp_tail`` is ``-inf`` for renorm and for k = V (empty bucket). Bucket tail (same as
        ``dist_distill.losses.topk``): ``r = 1 - sum_topk p`` via expm1, floored at float32's
        smallest normal; for T != 1 the V - k tail tokens share ``r`` uniformly:
        ``z_tail = lse + log(r / (V - k))``, ``lse_T = logsumexp(topk / T, log(V - k) + z_tail / T)``.
        A stored lse below the top-k's own logsumexp (float32 rounding when the tail is
        negligible: up to ~5e-4 at logits ~1e4) is raised to it at T=1, so that the teacher
        never sums above 1.
        Everything is taken relative to the row's top logit ``m`` (``top - m``, ``lse - m``)
        so that no logit of magnitude 1e4 is scaled or summed before the difference.
    """
    wide = torch.float32 if topk_logits.device.type == "mps" else torch.float64
    top = topk_logits.to(wide)
    n, k = top.shape
    m = top.max(dim=-1, keepdim=True).values
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    rel = top - m  # exact in float64 for float32 inputs
    if spec.tail == "renorm" or k == vocab:
        u = rel * spec.inv_t
        return _split(u - torch.logsumexp(u, dim=-1, keepdim=True), top.new_full((n,), float("-inf")))
    if log_tail is not None:
        return _split(*exact_bucket_logprobs(rel, log_tail.reshape(n, 1).to(wide), spec.inv_t))
    if teacher_lse is None:
        raise ValueError("tail='bucket' needs the teacher's full-vocab logsumexp (teacher_topk=(ids, logits, lse))")
    lse_rel = teacher_lse.reshape(n, 1).to(wide) - m  # lse - m, exact
    lse_top = torch.logsumexp(rel, dim=-1, keepdim=True)
    log_top_mass = (lse_top - lse_rel).clamp(max=0.0)
    log_r = torch.log(-torch.expm1(log_top_mass)).clamp(min=math.log(torch.finfo(torch.float32).tiny))
    if spec.temperature == 1.0:  # an lse rounded below the top-k's own: the top-k holds it all
        return _split(rel - torch.maximum(lse_rel, lse_top), log_r.squeeze(1))
    log_n = math.log(vocab - k)
    log_tail_t = log_n + (lse_rel + log_r - log_n) * spec.inv_t  # relative to m / T
    u = rel * spec.inv_t
    lse_t = torch.logaddexp(torch.logsumexp(u, dim=-1, keepdim=True), log_tail_t)
    return _split(u - lse_t, (log_tail_t - lse_t).squeeze(1))


def exact_bucket_logprobs(rel: torch.Tensor, log_tail: torch.Tensor, inv_t: float):
    """``(log p_T(top) [N, k], log p_T(tail) [N])`` from the top-k logits relative to their max, ``rel``
    [N, k], and the log tail mass at T, ``log_tail`` [N, 1] (same float dtype): the top-k share
    ``1 - r_T`` in the ratios of ``softmax(rel / T)``. ``r_T`` is floored at float32's smallest
    normal (an empty or negligible tail keeps ``KL(q || p)`` finite) and kept below 1."""
    tiny = math.log(torch.finfo(torch.float32).tiny)
    log_r = log_tail.clamp(min=tiny, max=-torch.finfo(torch.float32).tiny)
    u = rel * inv_t
    return u - torch.logsumexp(u, dim=-1, keepdim=True) + log1mexp(log_r), log_r.squeeze(1)


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - exp(x))`` for x <= 0, accurate everywhere (Maechler's switch at -log 2)."""
    return torch.where(x > -math.log(2.0), torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))


def _split(logp_top: torch.Tensor, logp_tail: torch.Tensor):
    """``(hi_top, hi_tail, lo_top, lo_tail)``: float32 value and float32 residual of each."""
    def hi_lo(x):
        hi = x.float()
        lo = torch.where(torch.isfinite(hi), x - hi.to(x.dtype), torch.zeros_like(x)).float()
        return hi.contiguous(), lo.contiguous()

    (hi_top, lo_top), (hi_tail, lo_tail) = hi_lo(logp_top), hi_lo(logp_tail)
    return hi_top, hi_tail, lo_top, lo_tail


def check_topk_ids(ids: torch.Tensor, valid: torch.Tensor, vocab: int) -> torch.Tensor:
    """``[N, k]`` int64 ids, ignored rows set to ``0..k-1`` (never read out of bounds);
    raises if a real row's id falls outside ``[0, vocab)``."""
    ids = ids.long()
    k = ids.shape[-1]
    if not 1 <= k <= vocab:
        raise ValueError(f"top-k size k={k} must lie in [1, vocab={vocab}]")
    ids = torch.where(valid[:, None], ids, torch.arange(k, device=ids.device))
    if bool(((ids < 0) | (ids >= vocab)).any()):
        raise ValueError(f"topk_ids must lie in [0, {vocab}) (vocab_size or the student's vocab)")
    return ids
