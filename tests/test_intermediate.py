"""Intermediate-layer and attention transfer vs brute-force float64 references, plus properties."""

from __future__ import annotations

import math

import pytest
import torch

from dist_distill.errors import UserError
from dist_distill.objective.intermediate import (ATTN_PROB_FLOOR, ConvGateProjection, attention_transfer_loss, check_attention_support, check_layer_map, hidden_state_loss, layer_attention, layer_hidden, make_projection, projection_l2, uniform_layer_map)

torch.set_num_threads(1)


def _mask(lengths, length):
    return torch.arange(length)[None, :] < torch.tensor(lengths)[:, None]


def _random_attention(b, h, length, mask=None, seed=0, zero_prob=0.0):
    """Causal softmax rows ``[b, h, L, L]`` with padded key columns exactly 0 (as eager returns)."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(b, h, length, length, generator=g, dtype=torch.float64)
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None, None].expand(b, h, -1, -1).clone()
    if mask is not None:
        allowed &= mask[:, None, None, :]
        allowed[..., 0] = True  # keep one column so no row is empty
    if zero_prob:
        drop = torch.rand(b, h, length, length, generator=g) < zero_prob
        drop[..., 0] = False
        allowed &= ~drop
    return torch.softmax(scores.masked_fill(~allowed, -math.inf), dim=-1)


# ----------------------------------------------------------------------------- layer maps
@pytest.mark.parametrize("nt,ns,expected", [
    (4, 2, [(0, 1), (1, 3)]),
    (12, 6, [(0, 1), (1, 3), (2, 5), (3, 7), (4, 9), (5, 11)]),
    (32, 16, [(i, 2 * i + 1) for i in range(16)]),
    (5, 5, [(i, i) for i in range(5)]),
    (10, 4, [(0, 2), (1, 4), (2, 7), (3, 9)]),  # 2.5, 5, 7.5, 10 -> halves round up
    (2, 4, [(0, 0), (1, 0), (2, 1), (3, 1)]),
])
def test_uniform_layer_map(nt, ns, expected):
    pairs = uniform_layer_map(nt, ns)
    assert pairs == expected
    assert pairs[-1] == (ns - 1, nt - 1)
    assert check_layer_map(pairs, nt, ns) == pairs


@pytest.mark.parametrize("pairs,match", [
    ([], "empty"),
    ([(0, 1), (2, 3)], "student layer 2 is out of range"),
    ([(0, 4)], "teacher layer 4 is out of range"),
    ([(0, -1)], "teacher layer -1 is out of range"),
    ([(0, 1), (0, 3)], r"student layer 0 already appears in layer_map\[0\]"),
    ([(0, 1, 2)], "pair of integers"),
    ([(0.5, 1)], "pair of integers"),
])
def test_check_layer_map_errors(pairs, match):
    with pytest.raises(UserError, match=match):
        check_layer_map(pairs, num_teacher_layers=4, num_student_layers=2)


def test_check_layer_map_accepts_yaml_lists_and_shared_teacher_layer():
    assert check_layer_map([[0, 3], [1, 3]], 4, 2) == [(0, 3), (1, 3)]


def test_layer_hidden_and_attention_indexing():
    hs = tuple(torch.full((1, 2, 3), float(i)) for i in range(3))  # embeddings + 2 blocks
    assert layer_hidden(hs, 0, "student").flatten()[0] == 1.0
    assert layer_hidden(hs, 1, "student").flatten()[0] == 2.0
    with pytest.raises(RuntimeError, match="output_hidden_states=True"):
        layer_hidden(hs, 2, "student")
    with pytest.raises(UserError, match="set teacher.attn_implementation=eager"):
        layer_attention((), 0, "teacher")  # what sdpa returns


# ----------------------------------------------------------------------------- projections
@pytest.mark.parametrize("kind", ["linear", "conv_gate"])
def test_projection_shapes_and_gradients(kind):
    torch.manual_seed(0)
    proj = make_projection(kind, 24, 16)
    h = torch.randn(3, 5, 24, requires_grad=True)
    out = proj(h, _mask([5, 3, 1], 5))
    assert out.shape == (3, 5, 16)
    out.square().sum().backward()
    assert h.grad is not None and h.grad.abs().sum() > 0
    for name, p in proj.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_linear_has_no_bias_by_default():
    assert make_projection("linear", 8, 4).linear.bias is None
    assert make_projection("linear", 8, 4, bias=True).linear.bias is not None


def test_conv_gate_matches_manual_computation():
    torch.manual_seed(1)
    proj = make_projection("conv_gate", 12, 32, reduction=16, bias=True)
    assert proj.fc1.out_features == 2
    with torch.no_grad():
        for p in proj.parameters():
            p.normal_()
    h = torch.randn(2, 6, 12)
    mask = _mask([6, 4], 6)
    out = proj(h, mask).double()
    w = proj.conv.weight.double()[:, :, 0]  # [Ht, Hs]
    for b in range(2):
        n = int(mask[b].sum())
        y = h[b].double() @ w.T + proj.conv.bias.double()  # [L, Ht]
        s = y[:n].mean(0)
        z = torch.relu(s @ proj.fc1.weight.double().T + proj.fc1.bias.double())
        g = torch.sigmoid(z @ proj.fc2.weight.double().T + proj.fc2.bias.double())
        torch.testing.assert_close(out[b], y * g, atol=1e-5, rtol=1e-5)


def test_conv_gate_bottleneck_at_least_one_channel_and_seed_shape():
    assert make_projection("conv_gate", 8, 4, reduction=16).fc1.out_features == 1
    seed = make_projection("conv_gate", 768, 512)
    assert isinstance(seed, ConvGateProjection) and seed.fc1.out_features == 32
    assert seed(torch.randn(1, 3, 768), None).shape == (1, 3, 512)
    with pytest.raises(UserError, match="reduction"):
        make_projection("conv_gate", 8, 4, reduction=0)


def test_conv_gate_ignores_padded_tokens():
    torch.manual_seed(2)
    proj = make_projection("conv_gate", 10, 8, reduction=2)
    h = torch.randn(2, 7, 10)
    mask = _mask([7, 4], 7)
    ref = proj(h, mask)
    h2 = h.clone()
    h2[1, 4:] = torch.randn(3, 10) * 100
    h2[1, 5] = float("nan")
    out = proj(h2, mask)
    torch.testing.assert_close(out[mask], ref[mask], atol=0, rtol=0)
    # without the mask the same change does move the valid outputs: the test has teeth
    h3 = h.clone()
    h3[1, 4:] = torch.randn(3, 10) * 100
    assert not torch.allclose(proj(h3, None)[1, :4], proj(h, None)[1, :4])


def test_identity_projection():
    proj = make_projection("identity", 16, 16)
    h = torch.randn(2, 3, 16)
    assert proj(h, None) is h
    assert list(proj.parameters()) == []
    with pytest.raises(UserError, match="projection=linear or projection=conv_gate"):
        make_projection("identity", 16, 8)
    with pytest.raises(UserError, match="choose one of"):
        make_projection("mlp", 16, 8)


def test_projection_l2():
    torch.manual_seed(3)
    lin = make_projection("linear", 6, 4, bias=True)
    gate = make_projection("conv_gate", 4, 8, reduction=4, bias=True)
    expected = (lin.linear.weight.double() ** 2).sum() + sum(
        (m.weight.double() ** 2).sum() for m in (gate.conv, gate.fc1, gate.fc2))
    got = projection_l2([lin, gate, make_projection("identity", 4, 4)])
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-6)
    got.backward()
    torch.testing.assert_close(lin.linear.weight.grad, 2 * lin.linear.weight.detach())
    assert lin.linear.bias.grad is None  # biases are not penalised
    assert projection_l2(make_projection("identity", 4, 4)).item() == 0.0


def test_projection_l2_refuses_zero3_placeholder():
    lin = make_projection("linear", 6, 4)
    lin.linear.weight.ds_numel = 24  # what a ZeRO-3 parameter carries
    lin.linear.weight.data = torch.empty(0)
    with pytest.raises(RuntimeError, match="ZeRO-3 partition placeholder"):
        projection_l2(lin)


# ----------------------------------------------------------------------------- hidden-state loss
def _hidden_reference(x, t, mask, kind):
    x, t = x.double(), t.double()
    total, n = 0.0, 0
    for b in range(x.shape[0]):
        for i in range(x.shape[1]):
            if not mask[b, i]:
                continue
            if kind == "mse":
                total += ((x[b, i] - t[b, i]) ** 2).mean().item()
            else:
                total += 1 - (x[b, i] @ t[b, i]).item() / (x[b, i].norm() * t[b, i].norm()).item()
            n += 1
    return total, n


@pytest.mark.parametrize("kind", ["mse", "cosine"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hidden_state_loss_vs_reference(kind, dtype):
    torch.manual_seed(4)
    proj = make_projection("linear", 12, 20)
    sh = torch.randn(3, 7, 12).to(dtype)
    th = torch.randn(3, 7, 20).to(dtype)
    mask = _mask([7, 5, 2], 7)
    proj = proj.to(dtype)
    total, count = hidden_state_loss(sh, th, proj, mask, kind=kind)
    assert total.dtype == torch.float32 and count.dtype == torch.int64 and count.item() == 14
    with torch.no_grad():
        x = proj(sh, mask)
    ref, n = _hidden_reference(x, th, mask, kind)
    assert n == 14
    assert math.isclose(total.item(), ref, rel_tol=1e-5, abs_tol=1e-5)


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_state_loss_zero_for_identity_and_equal_states(kind):
    h = torch.randn(2, 4, 8, requires_grad=True)
    total, count = hidden_state_loss(h, h.detach().clone(), make_projection("identity", 8, 8), None, kind=kind)
    assert abs(total.item()) < 1e-6 and count.item() == 8


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_hidden_state_loss_ignores_masked_tokens_and_detaches_teacher(kind):
    torch.manual_seed(5)
    proj = make_projection("linear", 6, 6)
    sh = torch.randn(2, 5, 6, requires_grad=True)
    th = torch.randn(2, 5, 6, requires_grad=True)
    mask = _mask([5, 2], 5)
    ref, _ = hidden_state_loss(sh, th, proj, mask, kind=kind)
    sh2, th2 = sh.detach().clone(), th.detach().clone()
    sh2[1, 2:] = float("nan")
    th2[1, 3:] = 1e6
    sh2.requires_grad_(True)
    total, count = hidden_state_loss(sh2, th2, proj, mask, kind=kind)
    assert total.item() == pytest.approx(ref.item(), rel=1e-6) and count.item() == 7
    total.backward()
    assert torch.isfinite(sh2.grad).all() and (sh2.grad[1, 2:] == 0).all()
    assert torch.isfinite(proj.linear.weight.grad).all() and proj.linear.weight.grad.abs().sum() > 0
    assert th2.grad is None
    ref.backward()
    assert th.grad is None  # teacher side detached


def test_hidden_state_loss_errors():
    proj = make_projection("linear", 4, 6)
    with pytest.raises(UserError, match="mse, cosine"):
        hidden_state_loss(torch.randn(1, 2, 4), torch.randn(1, 2, 6), proj, None, kind="l1")
    with pytest.raises(ValueError, match="projection output"):
        hidden_state_loss(torch.randn(1, 2, 4), torch.randn(1, 2, 5), proj, None)


# ----------------------------------------------------------------------------- attention transfer
def _kl_rows_reference(p, q, mask):
    """``[B, H, L]`` brute-force KL(p||q) per row over valid keys, float64 loops over the rows."""
    b, h, length, _ = p.shape
    out = torch.zeros(b, h, length, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(length):
                acc = 0.0
                for k in range(length):
                    pk, qk = p[bi, hi, i, k].item(), q[bi, hi, i, k].item()
                    if mask[bi, k] and pk > 0:
                        acc += pk * (math.log(pk) - math.log(max(qk, ATTN_PROB_FLOOR)))
                out[bi, hi, i] = acc
    return out


@pytest.mark.parametrize("heads,hs,ht", [("average", 3, 5), ("map", 2, 6), ("map", 4, 4)])
def test_attention_transfer_vs_reference(heads, hs, ht):
    mask = _mask([6, 4], 6)
    q = _random_attention(2, hs, 6, mask, seed=1)
    p = _random_attention(2, ht, 6, mask, seed=2)
    total, count = attention_transfer_loss(q.float(), p.float(), mask, heads=heads)
    if heads == "average":
        pr, qr = p.mean(1, keepdim=True), q.mean(1, keepdim=True)
    else:
        pr, qr = p.reshape(2, hs, ht // hs, 6, 6).mean(2), q
    rows = _kl_rows_reference(pr, qr, mask).mean(1)  # mean over heads -> [B, L]
    ref = rows[mask].sum().item()
    assert count.item() == 10 and total.dtype == torch.float32
    assert total.item() == pytest.approx(ref, rel=1e-5, abs=1e-6)
    # float64 in, float64 math
    total64, _ = attention_transfer_loss(q, p, mask, heads=heads)
    assert total64.dtype == torch.float64 and total64.item() == pytest.approx(ref, rel=1e-12)


def test_attention_map_grouping_is_contiguous():
    """Teacher heads (0,1) -> student head 0 and (2,3) -> student head 1."""
    mask = _mask([5], 5)
    t = _random_attention(1, 4, 5, seed=3)
    s = torch.stack([t[:, 0:2].mean(1), t[:, 2:4].mean(1)], dim=1)
    total, _ = attention_transfer_loss(s, t, mask, heads="map")
    assert abs(total.item()) < 1e-12
    swapped, _ = attention_transfer_loss(s.flip(1), t, mask, heads="map")
    assert swapped.item() > 1e-3


def test_attention_transfer_zero_for_equal_maps():
    mask = _mask([5, 3], 5)
    a = _random_attention(2, 4, 5, mask, seed=4).float()
    for heads in ("average", "map"):
        total, count = attention_transfer_loss(a, a.clone(), mask, heads=heads)
        assert abs(total.item()) < 1e-6 and count.item() == 8


def test_attention_transfer_zeros_give_no_nan_or_inf():
    mask = _mask([6, 3], 6)
    p = _random_attention(2, 2, 6, mask, seed=5, zero_prob=0.3).float()
    q = _random_attention(2, 2, 6, mask, seed=6, zero_prob=0.5).float()
    assert ((q == 0) & (p > 0)).any()  # student zeros under teacher mass: the floor matters
    q.requires_grad_(True)
    total, _ = attention_transfer_loss(q, p, mask, heads="map")
    assert torch.isfinite(total)
    total.backward()
    assert torch.isfinite(q.grad).all()
    rows = _kl_rows_reference(p.double(), q.detach().double(), mask).mean(1)
    assert total.item() == pytest.approx(rows[mask].sum().item(), rel=1e-5)
    # garbage (NaN) in padded query rows and key columns never reaches the loss
    q2, p2 = q.detach().clone(), p.clone()
    q2[1, :, 3:] = float("nan")
    q2[1, :, :, 3:] = float("nan")
    p2[1, :, 3:] = 0.5
    total2, _ = attention_transfer_loss(q2, p2, mask, heads="map")
    assert total2.item() == pytest.approx(total.item(), rel=1e-6)


def test_attention_transfer_errors():
    a, b = torch.rand(1, 3, 4, 4), torch.rand(1, 4, 4, 4)
    with pytest.raises(UserError, match="multiple of the student's"):
        attention_transfer_loss(a, b, None, heads="map")
    with pytest.raises(UserError, match="average, map"):
        attention_transfer_loss(a, b, None, heads="max")
    with pytest.raises(ValueError, match="same tokens"):
        attention_transfer_loss(a, torch.rand(1, 3, 5, 5), None)


def test_check_attention_support():
    check_attention_support("eager", "student")
    for impl in ("sdpa", "flash_attention_2", "auto", None):
        with pytest.raises(UserError, match="set teacher.attn_implementation=eager"):
            check_attention_support(impl, "teacher")


# ----------------------------------------------------------------------------- on a tiny Llama
def _tiny_llama(impl, layers=2, heads=4, hidden=32, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, vocab_size=40,
                      max_position_embeddings=64, attn_implementation=impl)
    return LlamaForCausalLM(cfg)


def test_tiny_llama_sdpa_returns_no_attentions():
    """The fact check_attention_support relies on (transformers 5.23): sdpa returns ``()``."""
    model = _tiny_llama("sdpa")
    out = model(torch.randint(0, 40, (1, 4)), output_attentions=True, output_hidden_states=True)
    assert not out.attentions
    assert len(out.hidden_states) == 3  # embeddings + 2 blocks


def test_tiny_llama_eager_attention_and_hidden_transfer():
    student = _tiny_llama("eager", layers=2, heads=2, hidden=16, seed=0)
    teacher = _tiny_llama("eager", layers=4, heads=4, hidden=32, seed=1)
    ids = torch.randint(0, 40, (2, 6))
    attention_mask = _mask([6, 4], 6)
    kw = dict(attention_mask=attention_mask.long(), output_attentions=True, output_hidden_states=True)
    s_out = student(ids, **kw)
    with torch.no_grad():
        t_out = teacher(ids, **kw)
    assert [a.shape for a in s_out.attentions] == [(2, 2, 6, 6)] * 2
    assert len(t_out.hidden_states) == 5
    proj = make_projection("conv_gate", 16, 32, reduction=4)
    att_sum, hid_sum, rows = 0.0, 0.0, 0
    for s_layer, t_layer in uniform_layer_map(4, 2):
        a, n = attention_transfer_loss(layer_attention(s_out.attentions, s_layer, "student"),
                                       layer_attention(t_out.attentions, t_layer, "teacher"),
                                       attention_mask, heads="map")
        h, _ = hidden_state_loss(layer_hidden(s_out.hidden_states, s_layer, "student"),
                                 layer_hidden(t_out.hidden_states, t_layer, "teacher"), proj, attention_mask)
        att_sum, hid_sum, rows = att_sum + a, hid_sum + h, rows + n
    assert rows.item() == 20
    assert torch.isfinite(att_sum) and att_sum.item() > 0
    (att_sum + hid_sum + 0.01 * projection_l2(proj)).backward()
    for layer in student.model.layers:
        for name in ("q_proj", "k_proj"):
            grad = getattr(layer.self_attn, name).weight.grad
            assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    assert all(p.grad is not None for p in proj.parameters())
    assert all(p.grad is None for p in teacher.parameters())
