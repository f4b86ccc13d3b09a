"""Replay against forgetting (data/replay.py): the rate is exact and resumable; replay rows are CE only."""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F

from dist_distill.data.replay import ReplaySchedule, replay_rate
from dist_distill.recipe import RecipeError, load_recipe


def test_rate_exact_layout_and_resume():
    world, mb, n = 3, 4, 37
    sched = [ReplaySchedule(n, Fraction(100, 1000), world, r, mb, seed=2) for r in range(world)]
    counts = [sched[0].count(s) for s in range(3000)]
    assert sum(counts) == 300 and set(counts) == {0, 1}
    # exactly 100 in EVERY window of 1000 consecutive steps, one every tenth step
    assert all(sum(counts[a:a + 1000]) == 100 for a in range(0, 2001, 7))
    assert all(counts[s] == counts[s + 10] for s in range(2990))
    assert sched[0].due(1234) == sum(counts[:1234])
    # another seed moves the phase, not the rate
    other = ReplaySchedule(n, Fraction(100, 1000), world, 0, mb, seed=3)
    assert sum(other.count(s) for s in range(1000)) == 100

    # a higher rate: every rank runs the same number of replay micro-batches; the ranks' rows are the
    # step's global slots, and every replay sample is read once per epoch of replay
    fast = [ReplaySchedule(n, Fraction(50, 3), world, r, mb, seed=2) for r in range(world)]
    slots = []
    for step in range(12):
        parts = [f.step_indices(step) for f in fast]
        assert {len(p) for p in parts} == {fast[0].num_micro_batches(step)}
        assert all(len(m) <= mb for p in parts for m in p)
        got = sorted(int(i) for p in parts for m in p for i in m)
        first = fast[0].due(step)
        want = sorted(fast[0].sample(first + j) for j in range(fast[0].count(step)))
        assert got == want
        slots += [fast[0].sample(g) for g in range(first, first + fast[0].count(step))]
    assert len(slots) == fast[0].due(12) == 200
    for e in range(len(slots) // n):
        assert sorted(slots[e * n:(e + 1) * n]) == list(range(n))
    # resumable: a fresh schedule (a restarted process) gives the same rows at any step
    again = ReplaySchedule(n, Fraction(50, 3), world, 1, mb, seed=2)
    for step in (11, 3, 7):
        assert [t.tolist() for t in again.step_indices(step)] == [t.tolist() for t in fast[1].step_indices(step)]

    # 5 samples over 4 ranks at micro_batch 1: two micro-batches everywhere, ranks 1-3 have an empty second one
    odd = [ReplaySchedule(n, Fraction(5), 4, r, 1, seed=0) for r in range(4)]
    assert [[len(m) for m in o.step_indices(0)] for o in odd] == [[1, 1], [1, 0], [1, 0], [1, 0]]

    class Spec:
        fraction, samples, every_steps = 0.25, None, None
    assert replay_rate(Spec, world=4, grad_accum=2, micro_batch=3) == 6  # 0.25 x 24 main samples per step


@pytest.mark.bad_inputs(5)
def test_replay_recipe_is_validated(tmp_path):
    base = ["student.name_or_path=x", "data.train=t.jsonl", "teacher_source.kind=none", "loss.ce_weight=1.0"]
    cases = {"data.replay={path: r.jsonl}": "either samples and every_steps",
             "data.replay={path: r.jsonl, samples: 100, every_steps: 1000, fraction: 0.1}": "not both",
             "data.replay={path: r.jsonl, samples: 100}": "go together",
             "data.replay={samples: 1, every_steps: 10}": "data.replay.path is empty",
             "data.replay={path: r.jsonl, fraction: 0.1, weight: 0}": "data.replay.weight=0.0"}
    for bad, text in cases.items():
        with pytest.raises(RecipeError, match=text):
            load_recipe(None, base + [bad])
    ok = load_recipe(None, base + ["data.replay={path: r.jsonl, samples: 100, every_steps: 1000}"])
    assert ok.data.replay.samples == 100 and ok.data.replay.weight == 1.0


class _Engine:
    """The DeepSpeed engine's surface train_step uses, over a plain module: gradients accumulate in .grad."""

    def __init__(self, module):
        self.module, self.teachers, self.boundaries, self.optimizer_steps, self.skipped_steps = module, [], [], 0, 0

    def __call__(self, teacher=None, **kw):
        self.teachers.append(teacher)
        return self.module(teacher=teacher, **kw)

    def set_gradient_accumulation_boundary(self, last):
        self.boundaries.append(last)

    def backward(self, loss, scale_wrt_gas):
        loss.backward()

    def step(self):
        self.optimizer_steps += self.boundaries[-1]

    def get_global_grad_norm(self):
        return 0.0

    def get_lr(self):
        return [1e-3]


class _Teacher:
    """A top-k teacher signal that is a fixed function of the sample ids; records who asked."""

    def __init__(self, vocab):
        self.vocab, self.asked = vocab, []

    def signal(self, indices, batch):
        from dist_distill.teacher.signal import TeacherSignal

        self.asked.append(indices.tolist())
        n = int((batch["targets"] != -100).sum())
        g = torch.Generator().manual_seed(int(indices.sum()))
        ids = torch.stack([torch.randperm(self.vocab, generator=g)[:4] for _ in range(n)])
        logits = torch.randn(n, 4, generator=g) * 3
        return TeacherSignal(topk=(ids, logits, torch.logsumexp(logits, 1) + 0.5))


def test_replay_rows_are_ce_only_and_counted(tiny_world, tmp_path, monkeypatch):
    """One real Trainer.train_step (single process, gloo) with a stand-in engine: the teacher is asked for
    the main micro-batches only; the step's gradient is d[(main loss sum + w * replay CE sum) / N_main]
    with the replay CE computed by hand from full logits; a filler row adds nothing; the counters."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from dist_distill.data.pipeline import InputPipeline
    from dist_distill.data.records import load_tokenized
    from dist_distill.data.sampler import StepSampler
    from dist_distill.models.loading import load_tokenizer
    from dist_distill.objective.module import DistillationModule
    from dist_distill.recipe import load_recipe
    from dist_distill.training.distributed import free_port
    from dist_distill.training.faults import FaultPlan
    from dist_distill.training.nonfinite import SkipGuard
    from dist_distill.training.trainer import Trainer

    w = tiny_world
    recipe = load_recipe("configs/tiny/seed2_progressive.yaml", [
        f"student.name_or_path={w}/student_init", f"teacher.name_or_path={w}/teacher_init",
        f"data.train={w}/data/student_train.jsonl", "teacher_source.kind=cache", f"teacher_source.cache_dir={tmp_path}",
        "intermediate.projection=identity", "stages=[]", "loss.backend=torch", "optim.micro_batch_size=3",
        "optim.grad_accum=2", f"data.replay={{path: {w}/data/heldout.jsonl, samples: 3, every_steps: 1, weight: 0.5}}"])
    tr = Trainer(recipe)
    tr.rank, tr.world, tr.device = 0, 1, torch.device("cpu")
    tr.tokenizer = load_tokenizer(recipe.student, "student")
    tr.data = load_tokenized(recipe.data.train, tr.tokenizer, recipe.data)
    tr.replay_data = load_tokenized(recipe.data.replay.path, tr.tokenizer, recipe.data)
    tr.sampler = StepSampler(len(tr.data), 3, 2, 1, 0, recipe.seed)
    # this process plays rank 1 of 2 in the replay layout: 3 slots -> rows [slot 1] and an empty (filler) micro-batch
    tr.replay = ReplaySchedule(len(tr.replay_data), Fraction(3), 2, 1, 1, recipe.seed)
    tr.teacher, tr._input_teacher, tr.faults = _Teacher(len(tr.tokenizer)), None, FaultPlan.from_env(0)
    student = AutoModelForCausalLM.from_pretrained(f"{w}/student_init", torch_dtype=torch.float32)
    module = DistillationModule(student, recipe.loss, len(tr.tokenizer))
    tr.engine = _Engine(module)
    tr.skips = SkipGuard(tr.engine, 5, 0)
    tr.inputs = InputPipeline(tr._step_inputs, background=False)

    monkeypatch.setenv("TORCH_DISTRIBUTED_DEBUG", "OFF")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        record = tr.train_step()
    finally:
        dist.destroy_process_group()
    got = {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}

    micro = tr.sampler.step_indices(0)
    replay_ids = tr.replay.step_indices(0)
    assert [len(i) for i in replay_ids] == [1, 0]
    assert tr.engine.boundaries == [False, False, False, True] and tr.engine.optimizer_steps == 1
    assert tr.teacher.asked == [m.tolist() for m in micro]  # never asked for replay rows
    assert tr.engine.teachers[2:] == [None, None]

    # the reference, by hand: main micro-batches through the module, replay CE from materialised logits
    module.zero_grad()
    n_main = sum(int((tr.data.targets[m] != -100).sum()) for m in micro)
    settings = tr.step_settings(n_main)
    main_sum = div_sum = 0.0
    total = 0.0
    for m in micro:
        batch = {"input_ids": tr.data.input_ids[m], "attention_mask": tr.data.attention_mask[m],
                 "targets": tr.data.targets[m]}
        loss, parts = module(**batch, teacher=_Teacher(len(tr.tokenizer)).signal(m, batch), step=settings)
        total = total + loss
        main_sum, div_sum = main_sum + loss.item(), div_sum + parts["div"].item()
    rows = replay_ids[0]
    logits = student(input_ids=tr.replay_data.input_ids[rows], attention_mask=tr.replay_data.attention_mask[rows]).logits
    logits = logits[..., :len(tr.tokenizer)]  # the real vocabulary (the model's is padded, DESIGN fact 7)
    targets = tr.replay_data.targets[rows]
    ce = F.cross_entropy(logits[targets != -100].float(), targets[targets != -100], reduction="sum")
    (total / n_main + 0.5 * ce / n_main).backward()
    want = {n: p.grad for n, p in module.named_parameters() if p.grad is not None}
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-6, msg=lambda m: f"{name}: {m}")

    n_replay = int((targets != -100).sum())
    assert record["loss"] == pytest.approx(main_sum / n_main, rel=1e-6)  # main objective only
    assert record["divergence"] == pytest.approx(div_sum / n_main, rel=1e-6) and record["target_tokens"] == n_main
    assert record["replay_ce"] == pytest.approx(ce.item() / n_replay, rel=1e-5)
    assert record["replay_samples"] == 1 and record["replay_tokens"] == n_replay
    assert record["replay_samples_total"] == 3  # all ranks' replay samples so far
