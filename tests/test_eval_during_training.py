"""Evaluation during training (training.periodic_eval): the right steps, the right numbers (== dd-evaluate
on the exported student), the best checkpoint marked and kept, a killed run resumed to the same records."""

from __future__ import annotations

import json
import math

import pytest

from conftest import module_cmd, torchrun, world_overrides
from dist_distill.evaluation.plots import read_scalars
from dist_distill.recipe import RecipeError, load_recipe

EVAL = ["--set", "teacher_source.kind=colocated", "--set", "optim.warmup_steps=1", "--set", "optim.micro_batch_size=4",
        "--set", "optim.max_steps=8", "--set", "output.save_every=3", "--set", "output.eval_every=2",
        "--set", "output.eval_samples=37", "--set", "output.keep_last=1", "--set", "deepspeed.timeout_s=20"]


def train(world, out, *extra, **kw):
    return torchrun(2, "dist_distill.train", "configs/tiny/distill.yaml", *world_overrides(world, out), *EVAL, *extra,
                    timeout=900, **kw)


def evals(run):
    return [json.loads(x) for x in (run / "eval.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def straight(tiny_world, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval_straight")
    train(tiny_world, out)
    return out


@pytest.mark.slow
def test_evaluations_at_the_right_steps_and_logged(straight):
    records = evals(straight)
    assert [r["step"] for r in records] == [2, 4, 6, 8]
    keys = {"eval/heldout_loss", "eval/heldout_ppl", "eval/kl_teacher", "eval/top1_agreement", "best"}
    assert all(set(r) == keys | {"step"} for r in records)
    for r in records:
        assert r["eval/heldout_ppl"] == pytest.approx(math.exp(r["eval/heldout_loss"]))
        assert r["eval/kl_teacher"] > 0 and 0 <= r["eval/top1_agreement"] <= 1
    scalars = read_scalars(straight)
    for tag in ("eval/heldout_loss", "eval/kl_teacher", "eval/top1_agreement"):
        assert scalars[tag][0] == [2, 4, 6, 8]
        assert scalars[tag][1] == pytest.approx([r[tag] for r in records], rel=1e-6)  # TensorBoard stores float32
    assert "loss/loss" in scalars and "optim/lr" in scalars


@pytest.mark.slow
def test_best_checkpoint_is_marked_and_kept(straight):
    records = evals(straight)
    best_step = min(records, key=lambda r: r["eval/heldout_loss"])["step"]
    best = json.loads((straight / "checkpoints/best.json").read_text())
    assert best["step"] == best_step and best["metric"] == "heldout_loss" and best["checkpoint"] == f"step-{best_step}"
    assert (straight / "checkpoints" / best["checkpoint"] / "COMMITTED").is_file()  # kept despite keep_last=1
    assert (straight / "checkpoints/step-8/COMMITTED").is_file()
    flags = [r["best"] for r in records]
    running = [r["eval/heldout_loss"] < min([x["eval/heldout_loss"] for x in records[:i]], default=math.inf)
               for i, r in enumerate(records)]
    assert flags == running


@pytest.mark.slow
def test_numbers_equal_dd_evaluate_on_the_exported_student(tiny_world, straight, tmp_path):
    """The last evaluation (step 8) scores the exported model: its held-out loss and KL to the colocated
    teacher are dd-evaluate's log-perplexity and KL on the same 37 held-out records."""
    module_cmd("dist_distill.evaluate", "--model", f"teacher={tiny_world}/teacher_init",
               "--model", f"student={straight}/model", "--data", f"{tiny_world}/data/heldout.jsonl",
               "--max-samples", "37", "--metrics", "perplexity,kl", "--teacher", "teacher", "--no-progress",
               "--out", str(tmp_path), timeout=600)
    student = json.loads((tmp_path / "results.json").read_text())["results"][1]
    last = evals(straight)[-1]
    assert last["eval/heldout_loss"] == pytest.approx(student["nll"], rel=1e-5)
    assert last["eval/kl_teacher"] == pytest.approx(student["kl_teacher"], rel=1e-4)
    assert last["eval/top1_agreement"] == pytest.approx(student["top1_agreement"], abs=1e-9)


@pytest.mark.slow
@pytest.mark.faults(1)
def test_killed_run_resumes_to_the_same_evaluations(tiny_world, straight, tmp_path):
    proc = train(tiny_world, tmp_path, check=False, DD_FAULT_KILL_AT_STEP="0:5")
    assert proc.returncode != 0 and [r["step"] for r in evals(tmp_path)] == [2, 4]
    train(tiny_world, tmp_path, "--resume")
    a, b = evals(straight), evals(tmp_path)
    assert [r["step"] for r in b] == [2, 4, 6, 8]
    assert a == b  # bit-exact: same weights, same batches
    assert json.loads((tmp_path / "checkpoints/best.json").read_text()) == \
        json.loads((straight / "checkpoints/best.json").read_text())
    assert read_scalars(tmp_path)["eval/heldout_loss"][0] == [2, 4, 6, 8]


@pytest.mark.slow
def test_cache_teacher_kl_on_training_samples_and_on_an_eval_cache(tiny_world, tmp_path):
    """kind=cache: without output.eval_teacher_cache the KL is on training samples (eval/train_*); with a
    cache built over data.eval (lossless: exact top-k logits) it is on held-out data, and (top-k + one tail
    bucket, k=8: a coarser partition of the vocabulary) never above the full-vocabulary KL dd-evaluate
    measures against the same teacher; the teacher's top-1 is in its top-k, so agreement is the same."""
    sets = world_overrides(tiny_world, tmp_path / "run") + ["--set", f"teacher_source.cache_dir={tmp_path}/cache"]
    module_cmd("dist_distill.cache", "build", "configs/tiny/distill.yaml", *sets, timeout=600)
    eval_sets = sets + ["--set", f"data.train={tiny_world}/data/heldout.jsonl",
                        "--set", f"teacher_source.cache_dir={tmp_path}/eval_cache"]
    module_cmd("dist_distill.cache", "build", "configs/tiny/distill.yaml", *eval_sets, "--mode", "lossless", timeout=600)
    base = ["--set", "optim.max_steps=4", "--set", "optim.warmup_steps=1", "--set", "output.eval_every=4", "--set", "output.eval_samples=37",
            "--set", "optim.micro_batch_size=8", "--set", "output.best_metric=kl_teacher"]
    module_cmd("dist_distill.train", "configs/tiny/distill.yaml", *sets, *base, "--set", "output.dir=" + str(tmp_path / "a"),
               timeout=600)
    (a,) = evals(tmp_path / "a")
    assert {"eval/train_kl_teacher", "eval/train_top1_agreement"} <= set(a) and "eval/kl_teacher" not in a
    module_cmd("dist_distill.train", "configs/tiny/distill.yaml", *sets, *base, "--set", "output.dir=" + str(tmp_path / "b"),
               "--set", f"output.eval_teacher_cache={tmp_path}/eval_cache", timeout=600)
    (b,) = evals(tmp_path / "b")
    assert b["eval/kl_teacher"] > 0 and json.loads((tmp_path / "b/checkpoints/best.json").read_text())["metric"] == "kl_teacher"
    module_cmd("dist_distill.evaluate", "--model", f"teacher={tiny_world}/teacher_init",
               "--model", f"student={tmp_path}/b/model", "--data", f"{tiny_world}/data/heldout.jsonl",
               "--max-samples", "37", "--metrics", "kl", "--teacher", "teacher", "--no-progress",
               "--out", str(tmp_path / "eval"), timeout=600)
    full = json.loads((tmp_path / "eval/results.json").read_text())["results"][1]
    assert b["eval/kl_teacher"] <= full["kl_teacher"] * (1 + 1e-4)
    assert b["eval/top1_agreement"] == pytest.approx(full["top1_agreement"], abs=1e-9)  # the top-1 is in the top-k


@pytest.mark.bad_inputs(3)
def test_eval_recipe_keys_are_checked(tiny_world, tmp_path):
    sets = [s for s in world_overrides(tiny_world, tmp_path) if not s.startswith("data.eval")]
    with pytest.raises(RecipeError, match="output.eval_every=5 needs held-out data: set data.eval"):
        load_recipe("configs/tiny/distill.yaml", [x for x in sets if x != "--set"] + ["output.eval_every=5", "data.eval=null"])
    with pytest.raises(RecipeError, match="output.best_metric=kl_teacher is not measured"):
        load_recipe("configs/tiny/distill.yaml", ["output.eval_every=5", "output.eval_metrics=[heldout_loss]",
                                                  "output.best_metric=kl_teacher"])
    with pytest.raises(RecipeError, match=r"output.eval_metrics\[0\]='loss': expected one of 'heldout_loss'"):
        load_recipe("configs/tiny/distill.yaml", ["output.eval_every=5", "output.eval_metrics=[loss]"])
