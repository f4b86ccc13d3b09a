"""Loss-term weights, temperature and progressive stages: pure functions of the optimizer step."""

from __future__ import annotations

import math

import pytest
import torch

from dist_distill.errors import UserError
from dist_distill.objective.schedules import (TERMS, Ramp, Stage, TermWeights, check_stages, interpolate, progress, stage_at, stage_sample_limit)

torch.set_num_threads(1)


# ----------------------------------------------------------------------------- interpolate
@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_interpolate_endpoints_and_midpoint(shape):
    assert interpolate(0.3, 0.9, 0.0, shape) == pytest.approx(0.3)
    assert interpolate(0.3, 0.9, 1.0, shape) == pytest.approx(0.9)
    assert interpolate(0.3, 0.9, 0.5, shape) == pytest.approx(0.6)


def test_interpolate_shapes():
    assert interpolate(2.0, 5.0, 0.7, "constant") == 2.0
    assert interpolate(0.0, 1.0, 0.25, "linear") == pytest.approx(0.25)
    assert interpolate(0.0, 1.0, 0.25, "cosine") == pytest.approx((1 - math.cos(math.pi / 4)) / 2)
    assert interpolate(1.0, 0.0, 0.25, "cosine") == pytest.approx(1 - (1 - math.cos(math.pi / 4)) / 2)
    with pytest.raises(UserError, match="constant, linear, cosine"):
        interpolate(0.0, 1.0, 0.5, "step")
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        interpolate(0.0, 1.0, 1.5, "linear")


def test_progress():
    assert progress(0, 10) == 0.0 and progress(9, 10) == 1.0
    assert progress(0, 1) == 0.0
    for bad in (-1, 10):
        with pytest.raises(ValueError):
            progress(bad, 10)


# ----------------------------------------------------------------------------- term weights
def test_seed2_constant_weights():
    w = TermWeights(output=Ramp(0.7), hidden=Ramp(0.3)).check()
    for step in (0, 17, 99):
        assert w.weights_at(step, 100) == pytest.approx({"output": 0.7, "hidden": 0.3, "attention": 0.0})


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_seed1_dynamic_shift_is_monotone(shape):
    w = TermWeights(output=Ramp(0.3, 0.9, shape), hidden=Ramp(0.7, 0.1, shape)).check()
    series = [w.weights_at(s, 50) for s in range(50)]
    outs, hids = [x["output"] for x in series], [x["hidden"] for x in series]
    assert outs[0] == pytest.approx(0.3) and outs[-1] == pytest.approx(0.9)
    assert hids[0] == pytest.approx(0.7) and hids[-1] == pytest.approx(0.1)
    assert all(a <= b for a, b in zip(outs, outs[1:]))
    assert all(a >= b for a, b in zip(hids, hids[1:]))
    assert hids[0] > outs[0] and outs[-1] > hids[-1]  # intermediate early, output late
    assert set(series[0]) == set(TERMS)


def test_weights_are_pure_functions_of_step():
    w = TermWeights(output=Ramp(0.3, 0.9, "cosine"), hidden=Ramp(0.7, 0.1, "linear"))
    forward = [w.weights_at(s, 40) for s in range(40)]
    assert [w.weights_at(s, 40) for s in reversed(range(40))][::-1] == forward


def test_temperature_ramp():
    t = Ramp(4.0, 1.0, "linear").check("loss.temperature", positive=True)
    assert t.at(0, 11) == 4.0 and t.at(10, 11) == 1.0 and t.at(5, 11) == pytest.approx(2.5)
    assert Ramp(2.0).at(7, 11) == 2.0
    with pytest.raises(UserError, match=r"loss.temperature.end=0.0: must be > 0"):
        Ramp(2.0, 0.0, "linear").check("loss.temperature", positive=True)


def test_ramp_and_weights_validation():
    with pytest.raises(UserError, match=r"weights.hidden.start=-0.1: must be >= 0"):
        TermWeights(hidden=Ramp(-0.1)).check()
    with pytest.raises(UserError, match=r"weights.output.shape='exp'"):
        TermWeights(output=Ramp(1.0, 0.5, "exp")).check()
    with pytest.raises(UserError, match="shape constant ignores end"):
        TermWeights(output=Ramp(1.0, 0.5)).check()
    with pytest.raises(UserError, match="must be >= 0"):
        Ramp(float("nan")).check("x")


# ----------------------------------------------------------------------------- stages
def seed2_stages(s1=2, s2=3, s3=5):
    return [Stage("output", 0.2, s1, {"output": 1.0}),
            Stage("align", 0.5, s2, {"output": 0.7, "hidden": 0.3}),
            Stage("all", 1.0, s3, {"output": 0.7, "hidden": 0.2, "attention": 0.1})]


def test_stage_at_boundaries():
    stages = check_stages(seed2_stages(), max_steps=10)
    expected = [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (2, 0), (2, 1), (2, 2), (2, 3), (2, 4)]
    got = [(i, k) for i, _, k in (stage_at(s, stages) for s in range(10))]
    assert got == expected
    assert stage_at(1, stages)[1].name == "output"  # last step of stage 0
    assert stage_at(2, stages)[1].name == "align"   # first step of stage 1
    assert stage_at(9, stages)[1].name == "all"
    with pytest.raises(ValueError, match="past the last stage"):
        stage_at(10, stages)
    with pytest.raises(ValueError):
        stage_at(-1, stages)


def test_stage_at_resume_property():
    """A run resumed at any step sees exactly what the uninterrupted run saw there."""
    stages = seed2_stages(3, 4, 6)
    straight = [stage_at(s, stages) for s in range(13)]
    for resume in range(13):
        assert [stage_at(s, list(stages)) for s in range(resume, 13)] == straight[resume:]


def test_stage_weights_fill_missing_terms():
    st = seed2_stages()[0]
    assert st.weights() == {"output": 1.0, "hidden": 0.0, "attention": 0.0}


@pytest.mark.parametrize("mutate,match", [
    (lambda s: s.clear(), "stages is empty"),
    (lambda s: setattr(s[1], "steps", 0), r"stages\[1\] \('align'\).steps=0"),
    (lambda s: setattr(s[1], "steps", 2.5), "must be an integer"),
    (lambda s: setattr(s[0], "data_fraction", 0.0), r"data_fraction=0.0: must lie in \(0, 1\]"),
    (lambda s: setattr(s[0], "data_fraction", 1.5), r"data_fraction=1.5"),
    (lambda s: s[2].terms.update(logits=1.0), "unknown term 'logits'"),
    (lambda s: s[2].terms.update(hidden=-1.0), "terms.hidden=-1.0"),
    (lambda s: setattr(s[0], "terms", {"output": 0.0}), "every weight is 0"),
    (lambda s: setattr(s[2], "steps", 6), "sum to 11 but optim.max_steps=10"),
])
def test_check_stages_errors(mutate, match):
    stages = seed2_stages()
    mutate(stages)
    with pytest.raises(UserError, match=match):
        check_stages(stages, max_steps=10)


def test_decreasing_data_fractions_are_allowed():
    stages = [Stage("wide", 1.0, 2), Stage("narrow", 0.3, 2)]
    assert check_stages(stages, 4) == stages


def test_stage_sample_limit():
    stages = seed2_stages()
    assert [stage_sample_limit(s, 1000) for s in stages] == [200, 500, 1000]
    assert stage_sample_limit(Stage("x", 0.2, 1), 11) == 3          # ceil(2.2)
    assert stage_sample_limit(Stage("x", 0.07, 1), 100) == 7        # not ceil(7.000000000000001)
    assert stage_sample_limit(Stage("x", 0.001, 1), 10) == 1        # at least one sample
    assert stage_sample_limit(Stage("x", 1.0, 1), 7) == 7
    with pytest.raises(UserError, match="empty"):
        stage_sample_limit(Stage("x", 0.5, 1), 0)
