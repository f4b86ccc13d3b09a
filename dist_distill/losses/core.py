"""Per-kind divergence math on log-probabilities, shared by the dense and top-k losses.

Both :func:`dist_distill.losses.divergence` and :func:`dist_distill.losses.topk_divergence`
reduce their inputs to a pair of log-distributions over the same C categories
(C = V for dense, k or k+1 for top-k) and call :func:`divergence_from_logprobs`, so each
formula below is written once.

Conventions: ``p`` is the TEACHER distribution, ``q`` the STUDENT distribution.
All math is in log space: a term ``a * (log a - log b)`` is taken as 0 where ``a == 0``
(``0 log 0 = 0``), mixtures are built with ``logsumexp`` and never as ``log(sum of probs)``.
Reverse KL (and jsd at beta=1, skew_rkl at alpha=0, which equal it) is pivoted on the
student's largest category so that its gradient does not cancel at large logits (see
:func:`_rkl`); the log-probabilities should be computed with the max kept apart from the
log-normaliser (``log_softmax`` of ``(x - max) / T``), as the callers here do.
"""

from __future__ import annotations

import math

import torch

KINDS = ("fkl", "rkl", "jsd", "skew_fkl", "skew_rkl", "tvd")
"""Supported divergence kinds, see :func:`divergence_from_logprobs`."""

_NEG_INF = float("-inf")


def check_kind_args(kind: str, beta: float, skew_alpha: float, temperature: float) -> None:
    """Raise ``ValueError`` with the offending argument's name for invalid settings."""
    if kind not in KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; choose one of {KINDS}")
    if not 0.0 <= float(beta) <= 1.0:
        raise ValueError(f"beta must lie in [0, 1] (weight of the teacher in the JSD mixture), got {beta}")
    if not 0.0 <= float(skew_alpha) <= 1.0:
        raise ValueError(f"skew_alpha must lie in [0, 1], got {skew_alpha}")
    if not float(temperature) > 0.0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def _kl(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``KL(a || b) = sum_c a_c (log a_c - log b_c)`` over the last dim, with ``0 log 0 = 0``.

    Args:
        log_a, log_b: ``[..., C]`` log-probabilities (may contain ``-inf``).
    Returns:
        ``[...]``. Where ``a_c == 0`` the term is exactly 0 and its gradient is 0 (not NaN):
        both the inputs and the output of the product go through ``torch.where``, so the
        ``0 * inf`` of the discarded branch never reaches autograd.
    """
    zero = log_a.new_zeros(())
    a_is_zero = log_a == _NEG_INF
    safe_a = torch.where(a_is_zero, zero, log_a)
    safe_b = torch.where(a_is_zero, zero, log_b)
    term = torch.where(a_is_zero, zero, safe_a.exp() * (safe_a - safe_b))
    return term.sum(-1)


def _rkl(logq: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """``KL(q || p)`` for a NORMALISED ``q``, pivoted on q's largest category ``c*``:
    ``r* + sum_c q_c ((log q_c - log q_c*) - (log p_c - log p_c*))`` with ``r = log q - log p``.

    Equal to :func:`_kl` when ``sum q = 1``, but well conditioned at large logits: where the
    teacher is ~1e4 below the student's mode, ``r`` and the KL are ~1e4, and the plain
    form's gradient through ``log_softmax`` (``q_j (r_j + 1) - q_j sum_c q_c (r_c + 1)``)
    cancels to the float32 spacing of 1e4 (~1e-3). Here every bracket is a difference of two
    nearby log-probabilities (exact in floating point), small wherever ``q_c`` is not. The
    pivot values are constants (detached); its gradient differs from :func:`_kl`'s only by a
    multiple of ``q``, which ``log_softmax``'s backward removes. A pivot with ``p = 0`` falls
    back to 0 (the KL is then infinite either way).
    """
    zero = logq.new_zeros(())
    idx = logq.detach().argmax(-1, keepdim=True)
    a_q, a_p = logq.detach().gather(-1, idx), logp.detach().gather(-1, idx)
    ok = (a_q != _NEG_INF) & (a_p != _NEG_INF)
    a_q, a_p = torch.where(ok, a_q, zero), torch.where(ok, a_p, zero)
    q_zero = logq == _NEG_INF
    safe_q = torch.where(q_zero, zero, logq)
    safe_p = torch.where(q_zero, zero, logp)
    term = torch.where(q_zero, zero, safe_q.exp() * ((safe_q - a_q) - (safe_p - a_p)))
    return term.sum(-1) + (a_q - a_p).squeeze(-1)


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """``log(w * a + (1 - w) * b)`` elementwise, via logsumexp; exact at ``w in {0, 1}``."""
    if w == 0.0:
        return log_b
    if w == 1.0:
        return log_a
    stacked = torch.stack((log_a + math.log(w), log_b + math.log1p(-w)))
    return torch.logsumexp(stacked, dim=0)


def _jsd(logp: torch.Tensor, logq: torch.Tensor, beta: float) -> torch.Tensor:
    """Generalized JSD, TRL convention: ``m = beta p + (1-beta) q``,
    ``beta KL(p||m) + (1-beta) KL(q||m)``; ``beta = 0`` -> fkl, ``beta = 1`` -> rkl exactly."""
    if beta == 0.0:
        return _kl(logp, logq)
    if beta == 1.0:
        return _kl(logq, logp)
    logm = _log_mix(logp, logq, beta)
    return beta * _kl(logp, logm) + (1.0 - beta) * _kl(logq, logm)


def divergence_from_logprobs(
    logp: torch.Tensor,
    logq: torch.Tensor,
    kind: str,
    *,
    beta: float = 0.5,
    skew_alpha: float = 0.1,
) -> torch.Tensor:
    """Divergence between teacher ``p`` and student ``q`` given as log-probabilities.

    Args:
        logp: ``[N, C]`` teacher log-probabilities (float32/float64; rows sum to 1 in prob space).
        logq: ``[N, C]`` student log-probabilities, same shape and dtype (rows sum to 1 too:
            the reverse-KL form relies on it, see :func:`_rkl`).
        kind: one of :data:`KINDS`:
            - ``fkl``: ``KL(p || q)``
            - ``rkl``: ``KL(q || p)``
            - ``jsd``: ``m = beta p + (1-beta) q``; ``beta KL(p||m) + (1-beta) KL(q||m)``
              (``beta`` weighs the teacher; ``beta=0`` -> fkl and ``beta=1`` -> rkl exactly,
              as in TRL's generalized JSD). The unscaled JSD tends to 0 at both ends:
              ``JSD / beta -> fkl`` as ``beta -> 0`` and ``JSD / (1-beta) -> rkl`` as
              ``beta -> 1``. Symmetric in (p, q) at ``beta = 0.5``.
            - ``skew_fkl``: ``KL(p || a p + (1-a) q)``, ``a = skew_alpha`` (DistiLLM)
            - ``skew_rkl``: ``KL(q || a q + (1-a) p)``
            - ``tvd``: ``0.5 sum |p - q|``
    Returns:
        ``[N]`` per-row divergence in the dtype of the inputs (no temperature scaling here).

    Categories where both ``p`` and ``q`` are exactly 0 (``-inf`` on both sides, e.g. an
    empty top-k tail bucket) contribute 0 with a 0 gradient for every kind.
    """
    if kind == "rkl" or (kind, float(beta)) == ("jsd", 1.0) or (kind, float(skew_alpha)) == ("skew_rkl", 0.0):
        # exactly KL(q || p); q = 0 terms (empty categories included) are 0 in _rkl, and it
        # needs the real q (sum q = 1), not the both-zero stand-in below
        return _rkl(logq, logp)
    both_zero = (logp == _NEG_INF) & (logq == _NEG_INF)
    zero = logp.new_zeros(())
    # p = q = 1 in an empty category gives a 0 term in every formula below, without inf - inf.
    logp = torch.where(both_zero, zero, logp)
    logq = torch.where(both_zero, zero, logq)
    if kind == "fkl":
        return _kl(logp, logq)
    if kind == "jsd":
        return _jsd(logp, logq, float(beta))
    if kind == "skew_fkl":
        return _kl(logp, _log_mix(logp, logq, float(skew_alpha)))
    if kind == "skew_rkl":
        return _kl(logq, _log_mix(logq, logp, float(skew_alpha)))
    if kind == "tvd":
        return 0.5 * (logp.exp() - logq.exp()).abs().sum(-1)
    raise ValueError(f"unknown divergence kind {kind!r}; choose one of {KINDS}")
