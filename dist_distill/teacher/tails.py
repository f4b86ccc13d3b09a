"""The teacher's tail mass outside its top-k, exact at each temperature a recipe trains at.

A top-k teacher row (ids, raw T=1 logits z, full-vocab logsumexp) says nothing about how the
probability outside the top-k is spread, and the tail bucket of ``loss.tail=bucket`` needs
exactly that at the training temperature T: ``r_T = sum_{v not in top-k} softmax(z / T)_v``.
Recovering it as ``1 - sum_topk exp(z - lse)`` from a float32 lse cancels (at V=151936, k=16
the decoded tail was off by up to 2200x, and <= 0 in 41 of 200 rows), and at T != 1 the
tail's shape is unknown. So the scorer computes ``log r_T`` directly, as a logsumexp over the
non-top-k logits (no subtraction, :func:`tail_logsumexp`), for every temperature of
:func:`tail_temperatures`, and the cache and the teacher group carry it per row:
``log_tails`` float32 ``[n, len(temperatures)]``, column j at ``temperatures[j]``
(``temperatures[0] == 1.0``).

A recipe whose temperature moves over the run (``loss.temperature_end``) with ``tail=bucket``
would need a tail at every step's temperature: it is refused (:func:`check_bucket_recipe`).
"""

from __future__ import annotations

import torch

from dist_distill.errors import UserError
from dist_distill.kernels._common import log1mexp

TEMPERATURE_DIGITS = 6
"""Temperatures are compared after rounding to this many decimals (values from YAML or --set)."""


def tail_temperatures(recipe) -> tuple[float, ...]:
    """The temperatures at which the teacher's tail mass is computed for `recipe`: 1.0 first, then the
    loss's temperature(s) and ``teacher_source.tail_temperatures`` (extra ones, so that one cache can
    serve several recipes), rounded, without repeats."""
    lo = recipe.loss
    wanted = [1.0, lo.temperature] + ([lo.temperature_end] if lo.temperature_end is not None else [])
    wanted += list(recipe.teacher_source.tail_temperatures)
    out: list[float] = []
    for t in wanted:
        t = round(float(t), TEMPERATURE_DIGITS)
        if t not in out:
            out.append(t)
    return tuple(out)


def check_bucket_recipe(recipe) -> None:
    """Refuse ``loss.tail=bucket`` with a temperature that changes over the run (a top-k teacher can
    carry the tail mass at a few temperatures, not at every step's)."""
    lo = recipe.loss
    if lo.tail == "bucket" and lo.temperature_end is not None and lo.temperature_end != lo.temperature:
        raise UserError(f"loss.tail=bucket with a scheduled temperature ({lo.temperature} -> {lo.temperature_end}): "
                        "the tail bucket needs the teacher's tail mass at each step's temperature, which a top-k "
                        "teacher carries only at fixed temperatures. Use loss.tail=renorm (exact at any T), or a "
                        "constant loss.temperature")


def column_of(temperatures, temperature: float, where: str) -> int:
    """Index of `temperature` in `temperatures`, or UserError naming both (`where`: who carries them)."""
    want = round(float(temperature), TEMPERATURE_DIGITS)
    temps = [round(float(t), TEMPERATURE_DIGITS) for t in temperatures]
    if want not in temps:
        raise UserError(f"loss.tail=bucket at temperature {want:g}: {where} carries the teacher's tail mass at "
                        f"temperature(s) {', '.join(f'{t:g}' for t in temps)} only. Rebuild the cache with this "
                        f"recipe (it stores the tail at the recipe's loss.temperature), add {want:g} to "
                        "teacher_source.tail_temperatures when building it, or use loss.tail=renorm")
    return temps.index(want)


def tail_logsumexp(logits: torch.Tensor, picked: torch.Tensor, temperatures) -> torch.Tensor:
    """``[n, len(temperatures)]``: logsumexp of ``logits / T`` over every column NOT in `picked`.

    logits [n, V'] (any float dtype, computed at its precision, at least float32); picked int64
    [n, k] column indices of `logits` (the top-k). A sum over the tail itself, never ``total -
    top-k``: exact however small the tail. Empty tail: -inf. Uses one [n, V'] temporary (the masked
    copy), and a second one transiently for each temperature other than 1 (``masked / T``)."""
    masked = logits.scatter(1, picked, float("-inf"))
    return torch.stack([torch.logsumexp(masked if t == 1.0 else masked / t, dim=-1) for t in temperatures], dim=-1)


def log_tail_mass(top: torch.Tensor, tail_lse: torch.Tensor, temperatures) -> torch.Tensor:
    """float64 ``[n, len(temperatures)]``: ``log r_T = tail_lse_T - logaddexp(tail_lse_T, logsumexp(top / T))``.

    top [n, k] raw T=1 top-k logits; tail_lse [n, nT] from :func:`tail_logsumexp` (or its merge over
    vocabulary slices). -inf where the tail is empty."""
    top, tail_lse = top.double(), tail_lse.double()
    top_lse = torch.stack([torch.logsumexp(top / t, dim=-1) for t in temperatures], dim=-1)
    out = tail_lse - torch.logaddexp(tail_lse, top_lse)
    return torch.where(torch.isneginf(tail_lse), tail_lse, out)


def drop_to_k(logits: torch.Tensor, log_tails: torch.Tensor, keep: torch.Tensor, temperatures) -> torch.Tensor:
    """Tail masses of a smaller top-k: the rows' entries not in `keep` move into the tail.

    logits [R, K] raw T=1 top-k logits; log_tails [R, nT] their tail at each temperature; keep
    [R, K] bool (k' True per row). At T: ``r'_T = r_T + (1 - r_T) * sum_dropped softmax_K(z / T)``,
    in log space (float64). Returns float32 [R, nT]."""
    z, lt = logits.double(), log_tails.double()
    cols = []
    for j, t in enumerate(temperatures):
        logp = torch.log_softmax(z / t, dim=-1) + log1mexp(lt[:, j:j + 1].clamp(max=-1e-300))
        dropped = torch.logsumexp(logp.masked_fill(keep, float("-inf")), dim=-1)
        cols.append(torch.logaddexp(lt[:, j], dropped))
    return torch.stack(cols, dim=-1).float()
