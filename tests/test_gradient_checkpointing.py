"""Gradient checkpointing and ZeRO offload: the same losses and gradients, less activation memory."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import torchrun, world_overrides


def _module_grads(world, checkpointing: bool):
    """Loss and parameter gradients of one fused-loss forward/backward of the tiny student (fp32, plain torch)."""
    from dist_distill.data.records import load_tokenized
    from dist_distill.models.loading import enable_activation_checkpointing, load_model, load_tokenizer
    from dist_distill.objective.module import DistillationModule, StepSettings
    from dist_distill.recipe import DataSpec, LossSpec, ModelSpec
    from dist_distill.teacher.signal import TeacherSignal

    spec = ModelSpec(name_or_path=f"{world}/student_init", dtype="float32", attn_implementation="sdpa")
    tok = load_tokenizer(spec, "student")
    data = load_tokenized(f"{world}/data/student_train.jsonl", tok, DataSpec(max_seq_len=24), 8)
    model = load_model(spec, "student")
    model.train()
    if checkpointing:
        enable_activation_checkpointing(model)
    assert model.is_gradient_checkpointing == checkpointing
    module = DistillationModule(model, LossSpec(kind="rkl", temperature=2.0, ce_weight=0.3, chunk_mib=0.001),
                                len(tok))
    rows = int((data.targets[:] != -100).sum())
    gen = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(len(tok), generator=gen)[:4] for _ in range(rows)])
    teacher = TeacherSignal(topk=(ids, torch.randn(rows, 4, generator=gen) * 3, torch.full((rows,), 2.0)))
    loss, _ = module(data.input_ids[:], data.attention_mask[:], data.targets[:], teacher=teacher,
                     step=StepSettings(temperature=2.0))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


def test_checkpointing_gives_the_same_loss_and_gradients(tiny_world):
    loss, grads = _module_grads(tiny_world, False)
    loss_gc, grads_gc = _module_grads(tiny_world, True)
    torch.testing.assert_close(loss_gc, loss, rtol=1e-5, atol=1e-5)
    assert grads.keys() == grads_gc.keys() and len(grads) > 10
    for name in grads:
        torch.testing.assert_close(grads_gc[name], grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_offload_keys_reach_the_deepspeed_config():
    from dist_distill.recipe import load_recipe
    from dist_distill.training.deepspeed_config import deepspeed_config

    recipe = load_recipe("configs/tiny/distill.yaml", ["deepspeed.offload_optimizer=cpu", "deepspeed.offload_params=cpu"])
    zero = deepspeed_config(recipe, 2)["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert "offload_param" not in deepspeed_config(load_recipe("configs/tiny/distill.yaml"), 2)["zero_optimization"]


@pytest.mark.bad_inputs(1)
def test_parameter_offload_needs_zero3():
    from dist_distill.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match="deepspeed.offload_params=cpu needs deepspeed.zero_stage=3"):
        load_recipe("configs/tiny/distill.yaml", ["deepspeed.offload_params=cpu", "deepspeed.zero_stage=2"])


@pytest.mark.slow
def test_zero3_with_checkpointing_and_offload_matches_plain(tiny_world, tmp_path):
    """2 ZeRO-3 ranks, colocated teacher with the hidden-state term and the fused head: gradient
    checkpointing plus CPU offload of optimizer states and parameters give the plain run's losses."""
    base = ["--set", "optim.max_steps=4", "--set", "optim.warmup_steps=1", "--set", "optim.micro_batch_size=4",
            "--set", "stages=[{name: all, data_fraction: 1.0, steps: 4, terms: {output: 0.7, hidden: 0.3}}]"]
    runs = {}
    for name, extra in (("plain", []), ("gc", ["--set", "optim.gradient_checkpointing=true", "--set",
                                              "deepspeed.offload_optimizer=cpu", "--set", "deepspeed.offload_params=cpu"])):
        out = tmp_path / name
        torchrun(2, "dist_distill.train", "configs/tiny/seed2_progressive.yaml", *world_overrides(tiny_world, out),
                 *base, *extra, timeout=900)
        runs[name] = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(runs["plain"]) == 4 and all(r["hidden"] > 0 for r in runs["gc"])
    for a, b in zip(runs["plain"], runs["gc"]):
        for key in ("loss", "divergence", "hidden", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-6), (key, a, b)
