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


@torch.no_grad()
def dense_teacher_topk(model, input_ids, attention_mask, k: int, vocab_size: int, temperatures=(1.0,)):
    """Brute-force reference of the teacher scorer: the whole [B, L, V] logits at once, then the
    full-vocabulary logsumexp and the top-k: (ids int32 [B, L, k], logits fp32 [B, L, k], lse fp32 [B, L],
    log tail masses float64 [B, L, nT]: log sum_{tail} softmax(z / T), see `dense_log_tails`)."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[..., :vocab_size].float()
    values, ids = logits.topk(k, dim=-1)
    return ids.to(torch.int32), values, torch.logsumexp(logits, dim=-1), dense_log_tails(logits, ids, temperatures)


def dense_log_tails(logits: torch.Tensor, ids: torch.Tensor, temperatures) -> torch.Tensor:
    """float64 [..., nT]: log of the probability mass of softmax(logits / T) outside `ids` [..., k], as
    ``logsumexp(tail / T) - logsumexp(all / T)`` in float64 (no 1 - sum)."""
    z = logits.double()
    tail = z.scatter(-1, ids.long(), float("-inf"))
    return torch.stack([(tail / t).logsumexp(-1) - (z / t).logsumexp(-1) for t in temperatures], -1)
