"""Comparison helpers shared by the numeric tests."""

import torch


def assert_verbose_allclose(actual, expected, atol, rtol, max_print=12, what=""):
    """``torch.allclose`` that prints the mismatching elements (as Liger's test utility does);
    a NaN where the other side has none is a mismatch."""
    actual = torch.as_tensor(actual).detach().double().cpu()
    expected = torch.as_tensor(expected).detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    diff = (actual - expected).abs()
    bad = ~(diff <= atol + rtol * expected.abs())
    bad |= actual.isnan() != expected.isnan()
    if bool(bad.any()):
        idx = bad.nonzero()
        lines = [f"{what}: {len(idx)} / {actual.numel()} elements mismatch (atol={atol}, rtol={rtol})"]
        for i in idx[:max_print].tolist():
            i = tuple(i)
            lines.append(f"  at {i}: actual={actual[i].item():.10g} expected={expected[i].item():.10g} "
                         f"diff={diff[i].item():.3g}")
        raise AssertionError("\n".join(lines))


def assert_close(name, got, want, atol, rtol):
    """`assert_verbose_allclose` with the name first (the kernel tests' argument order)."""
    assert_verbose_allclose(got, want, atol, rtol, what=name)
