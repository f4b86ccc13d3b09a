"""Loss-term weights, temperature and progressive stages as pure functions of the optimizer step.

``step`` (every function here) is the 0-based index of the optimizer step being computed,
i.e. the number of optimizer steps already taken: ``0 <= step < max_steps``, the trainer's
``self.step`` inside ``train_step``. Nothing here keeps state, so a run resumed at step
``s`` (even in the middle of a stage) needs only ``s``.

Progress through a run is ``step / (max_steps - 1)`` (0 at the first step, 1 at the last;
0 for a one-step run), so a ramp's ``start`` is used at the first step and its ``end`` at
the last one.

Seed recipes, for reference:

- seed 1, dynamic shift (intermediate terms early, output late)::

      TermWeights(output=Ramp(0.3, 0.9, "linear"), hidden=Ramp(0.7, 0.1, "linear"))

- seed 2, constant mix, output 0.7 / intermediate 0.3::

      TermWeights(output=Ramp(0.7), hidden=Ramp(0.3))

  and its progressive stages (20% / 50% / 100% of the data)::

      [Stage("output", 0.2, s1, {"output": 1.0}),
       Stage("align", 0.5, s2, {"output": 0.7, "hidden": 0.3}),
       Stage("all", 1.0, s3, {"output": 0.7, "hidden": 0.2, "attention": 0.1})]
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Sequence

from dist_distill.errors import UserError

SHAPES = ("constant", "linear", "cosine")
"""Interpolation shapes accepted by :func:`interpolate`."""
TERMS = ("output", "hidden", "attention")
"""Loss terms: output-level divergence, hidden-state alignment, attention transfer."""


def interpolate(start: float, end: float, progress: float, shape: str = "linear") -> float:
    """Value between ``start`` (``progress = 0``) and ``end`` (``progress = 1``).

    ``"constant"``: ``start`` (``end`` ignored); ``"linear"``: ``start + (end - start) * p``;
    ``"cosine"``: ``start + (end - start) * (1 - cos(pi * p)) / 2`` (flat at both ends).
    ``progress`` must lie in ``[0, 1]`` (``ValueError`` otherwise: a caller bug).
    """
    if shape not in SHAPES:
        raise UserError(f"schedule shape {shape!r}: choose one of {', '.join(SHAPES)}")
    p = float(progress)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"progress must lie in [0, 1], got {progress}")
    if shape == "constant":
        return float(start)
    if shape == "linear":
        return float(start) + (float(end) - float(start)) * p
    return float(start) + (float(end) - float(start)) * (1.0 - math.cos(math.pi * p)) / 2.0


def progress(step: int, max_steps: int) -> float:
    """``step / (max_steps - 1)`` in ``[0, 1]`` (0 when ``max_steps == 1``)."""
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}")
    if not 0 <= step < max_steps:
        raise ValueError(f"step {step} outside [0, max_steps={max_steps})")
    return 0.0 if max_steps == 1 else step / (max_steps - 1)


@dataclass
class Ramp:
    """A value that moves from ``start`` to ``end`` over the run (a weight or a temperature)."""

    start: float
    """Value at the first optimizer step."""
    end: float | None = None
    """Value at the last optimizer step (None: equal to ``start``)."""
    shape: str = "constant"
    """How it gets there: "constant", "linear" or "cosine" (see :func:`interpolate`)."""

    def check(self, key: str, *, positive: bool = False) -> "Ramp":
        """Raise UserError naming ``key`` for an unknown shape, a non-finite or negative value
        (``positive``: a value <= 0, e.g. a temperature), or a constant with ``end != start``."""
        if self.shape not in SHAPES:
            raise UserError(f"{key}.shape={self.shape!r}: choose one of {', '.join(SHAPES)}")
        for name in ("start", "end"):
            v = getattr(self, name)
            if v is None:
                continue
            if not math.isfinite(v) or (v <= 0 if positive else v < 0):
                raise UserError(f"{key}.{name}={v}: must be {'> 0' if positive else '>= 0'}")
        if self.shape == "constant" and self.end is not None and self.end != self.start:
            raise UserError(f"{key}: shape constant ignores end={self.end} (start={self.start}); "
                            f"set {key}.shape=linear or cosine, or drop {key}.end")
        return self

    def at(self, step: int, max_steps: int) -> float:
        """The value at optimizer ``step`` of a ``max_steps`` run."""
        end = self.start if self.end is None else self.end
        return interpolate(self.start, end, progress(step, max_steps), self.shape)


@dataclass
class TermWeights:
    """Weight of each loss term over the run; the total loss is ``sum_term weight * term``.

    Defaults: output-level divergence only (weight 1), no intermediate terms. Weights are
    used as given (not renormalised to sum to 1).
    """

    output: Ramp = field(default_factory=lambda: Ramp(1.0))
    """Weight of the output-level (logit) divergence."""
    hidden: Ramp = field(default_factory=lambda: Ramp(0.0))
    """Weight of the hidden-state alignment term (already averaged over mapped layers by the caller)."""
    attention: Ramp = field(default_factory=lambda: Ramp(0.0))
    """Weight of the attention-transfer term."""

    def check(self, key: str = "weights") -> "TermWeights":
        """Validate every ramp (``>= 0``), errors naming ``key.<term>``; returns self."""
        for term in TERMS:
            getattr(self, term).check(f"{key}.{term}")
        return self

    def weights_at(self, step: int, max_steps: int) -> dict[str, float]:
        """``{"output": w, "hidden": w, "attention": w}`` at optimizer ``step``."""
        return {term: getattr(self, term).at(step, max_steps) for term in TERMS}


@dataclass
class Stage:
    """One stage of progressive distillation (seed 2)."""

    name: str
    """Label for logs and metrics."""
    data_fraction: float
    """Fraction of the training set in (0, 1] this stage draws from (see :func:`stage_sample_limit`)."""
    steps: int
    """Optimizer steps in this stage (>= 1)."""
    terms: dict[str, float] = field(default_factory=lambda: {"output": 1.0})
    """Constant weight of each loss term in this stage; a term left out weighs 0."""
    buckets: dict[str, float] | None = None
    """Difficulty buckets this stage draws from and their weights, e.g. {easy: 1.0} or {easy: 0.3, medium: 0.7}
    (data/grading.py; a bucket left out weighs 0). None: every sample, whatever its grade."""

    def weights(self) -> dict[str, float]:
        """All of :data:`TERMS` with their weight in this stage (0 for terms left out)."""
        return {term: float(self.terms.get(term, 0.0)) for term in TERMS}


def check_stages(stages: Sequence[Stage], max_steps: int, key: str = "stages",
                 max_steps_key: str = "optim.max_steps") -> list[Stage]:
    """Validate progressive stages; UserError naming the key to change.

    Rules: at least one stage; each ``steps`` an integer >= 1; each ``data_fraction`` in
    ``(0, 1]``; term names among :data:`TERMS` with finite weights >= 0, at least one > 0;
    the stages' steps sum to ``max_steps``. Data fractions need NOT grow: a later stage with
    a smaller fraction trains on a prefix of the same fixed shuffled order, i.e. on a subset
    of what earlier stages saw.
    """
    if not stages:
        raise UserError(f"{key} is empty: give at least one stage, or turn progressive stages off")
    for i, st in enumerate(stages):
        where = f"{key}[{i}] ({st.name!r})"
        if isinstance(st.steps, bool) or not isinstance(st.steps, int) or st.steps < 1:
            raise UserError(f"{where}.steps={st.steps!r}: must be an integer >= 1 (optimizer steps)")
        if not 0.0 < float(st.data_fraction) <= 1.0:
            raise UserError(f"{where}.data_fraction={st.data_fraction}: must lie in (0, 1]")
        unknown = [t for t in st.terms if t not in TERMS]
        if unknown:
            raise UserError(f"{where}.terms: unknown term {unknown[0]!r}; allowed: {', '.join(TERMS)}")
        for t, w in st.terms.items():
            if not math.isfinite(float(w)) or float(w) < 0:
                raise UserError(f"{where}.terms.{t}={w}: must be a finite number >= 0")
        if not any(float(w) > 0 for w in st.terms.values()):
            raise UserError(f"{where}.terms: every weight is 0, so the stage would train nothing; "
                            "give one term a weight > 0")
        if st.buckets is not None:
            check_bucket_weights(st.buckets, f"{where}.buckets")
    total = sum(st.steps for st in stages)
    if total != max_steps:
        raise UserError(f"the steps of {key} sum to {total} but {max_steps_key}={max_steps}: "
                        f"make them equal (change a stage's steps or set {max_steps_key}={total})")
    return list(stages)


BUCKET_NAMES = ("hard", "medium", "easy")
"""Difficulty buckets (data/grading.py BUCKETS)."""


def check_bucket_weights(weights: dict, key: str) -> dict:
    """Bucket name -> weight: names among BUCKET_NAMES, finite weights >= 0, at least one > 0."""
    unknown = [b for b in weights if b not in BUCKET_NAMES]
    if unknown:
        raise UserError(f"{key}: unknown bucket {unknown[0]!r}; allowed: easy, medium, hard")
    for b, w in weights.items():
        if not math.isfinite(float(w)) or float(w) < 0:
            raise UserError(f"{key}.{b}={w}: must be a finite number >= 0")
    if not any(float(w) > 0 for w in weights.values()):
        raise UserError(f"{key}: every weight is 0, so no sample could be drawn; give one bucket a weight > 0")
    return weights


def stage_at(step: int, stages: Sequence[Stage]) -> tuple[int, Stage, int]:
    """``(stage_index, stage, step_in_stage)`` for optimizer ``step`` (0-based, as above).

    Stage ``i`` covers steps ``[sum(steps[:i]), sum(steps[:i+1]))``; ``step_in_stage`` is
    0-based. A pure function of ``step``: resuming mid-stage needs nothing else. Call
    :func:`check_stages` first; a step past the last stage raises ``ValueError``.
    """
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    first = 0
    for i, st in enumerate(stages):
        if step < first + st.steps:
            return i, st, step - first
        first += st.steps
    raise ValueError(f"step {step} is past the last stage (the stages cover {first} steps)")


def stage_sample_limit(stage: Stage, num_samples: int) -> int:
    """Samples this stage may draw from: ``ceil(data_fraction * num_samples)``, at least 1.

    The trainer fixes ONE shuffled order of the training set for the whole run (from the
    seed) and, during this stage, draws sample indices only from ``[0, limit)`` of that
    order, so stage data sets are nested prefixes and resuming needs only the step. The
    product is taken exactly on the decimal value of ``data_fraction`` (0.7 of 10 is 7, not 8).
    """
    if num_samples < 1:
        raise UserError("the training set is empty: progressive stages need at least one sample")
    exact = Fraction(repr(float(stage.data_fraction))) * int(num_samples)
    return max(1, min(int(num_samples), math.ceil(exact)))
