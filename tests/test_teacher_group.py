"""Online teacher group (teacher_source.kind=group): tensor-parallel teacher ranks beside ZeRO-3 students.

Multi-process on CPU with gloo: 2 teacher TP ranks + 2 student ranks (torchrun, 4 processes).
Run as a script under torchrun, this file is the helper of `test_tp_topk_equals_one_process`.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
import sys
import time

import pytest
import torch

from conftest import run_cmd, torchrun, world_overrides
from dist_distill.training.distributed import free_port

BASE = ["--set", "optim.max_steps=6", "--set", "optim.warmup_steps=1", "--set", "optim.micro_batch_size=4",
        "--set", "optim.grad_accum=2", "--set", "output.export=false", "--set", "teacher_source.top_k=8"]
GROUP = ["--set", "teacher_source.kind=group", "--set", "teacher_source.tp_size=2",
         "--set", "teacher_source.num_groups=1"]


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# ---- units -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("nodes", [1, 2, 8])
def test_bridge_address_comes_from_the_launcher_not_the_hostname(nodes, monkeypatch):
    """Multi-node SLURM jobs: the address a role's rank 0 publishes is the interface that routes to
    MASTER_ADDR, never gethostbyname(gethostname()) (127.0.1.1 on common images); one node: MASTER_ADDR."""
    import socket

    from dist_distill.teacher.group.roles import host_address

    monkeypatch.setattr(socket, "gethostbyname", lambda name: "127.0.1.1")
    env = {"SLURM_NNODES": str(nodes), "SLURM_JOB_NODELIST": f"gpu[01-{nodes:02d}]", "MASTER_ADDR": "10.20.0.1",
           "MASTER_PORT": "29500", "WORLD_SIZE": str(8 * nodes), "LOCAL_WORLD_SIZE": "8"}
    routes = []
    got = host_address(env, route=lambda master, port: routes.append((master, port)) or "10.20.0.7")
    if nodes == 1:
        assert got == "10.20.0.1" and routes == []
    else:
        assert got == "10.20.0.7" and routes == [("10.20.0.1", 29500)]
    with pytest.raises(Exception, match="loopback address 127.0.1.1"):
        host_address(dict(env, WORLD_SIZE="16"), route=lambda master, port: "127.0.1.1")


def test_roles_split_and_serve_map():
    from dist_distill.teacher.group.roles import Roles

    roles = [Roles(r, 7, tp_size=2, num_groups=2) for r in range(7)]
    assert [x.is_teacher for x in roles] == [True] * 4 + [False] * 3
    assert [roles[0].leader_of(s) for s in range(3)] == [0, 2, 0]
    assert roles[0].students_of(0) == [0, 2] and roles[0].students_of(1) == [1]
    from dist_distill.errors import UserError

    with pytest.raises(UserError, match="at least 6 processes"):
        Roles(0, 5, tp_size=2, num_groups=2).check()


def test_message_round_trip_keeps_ids_exact():
    from dist_distill.teacher.group.protocol import pack, unpack

    ids = torch.tensor([[0, 151935, 7], [2**31 - 1, 1, 3]])
    logits, lse, tails = torch.randn(2, 3), torch.randn(2), -torch.rand(2, 2)
    header, payload = pack(5, 1, torch.tensor([9, 4]), ids, logits, lse, tails)
    assert header.tolist()[1:] == [5, 1, 2, 3, 2, 9, 4]
    got = unpack(payload.clone(), 3)
    assert torch.equal(got[0], ids) and torch.equal(got[1], logits) and torch.equal(got[2], lse)
    assert torch.equal(got[3], tails)


class FakeBridge:
    """Bridge stand-in: sends complete at once; recv copies the next queued tensor."""

    def __init__(self, messages):
        self.messages = list(messages)

    def send(self, tensors, dst, tag):
        return self

    def recv(self, tensors, src, tag):
        tensors[0].copy_(self.messages.pop(0))
        return self

    def wait(self, timeout=None):
        return True


def test_group_teacher_checks_the_samples_it_is_sent():
    from dist_distill.teacher.group.client import GroupTeacher
    from dist_distill.teacher.group.roles import Roles, TeacherGroupError
    from dist_distill.teacher.group.protocol import pack

    ids, logits, lse, tails = torch.tensor([[3, 1], [0, 2]]), torch.randn(2, 2), torch.randn(2), -torch.rand(2, 1)
    targets = torch.tensor([[-100, 5, 6], [-100, -100, -100]])  # 2 target tokens
    header, payload = pack(0, 0, torch.tensor([4, 9]), ids, logits, lse, tails)
    roles = Roles(rank=2, world=4, tp_size=2, num_groups=1)
    teacher = GroupTeacher(roles, FakeBridge([header, payload]), 2, torch.device("cpu"), lambda: 0, 5.0)
    signal = teacher.signal(torch.tensor([4, 9]), {"targets": targets})
    assert torch.equal(signal.topk[0], ids) and torch.equal(signal.topk[1], logits)
    assert torch.equal(signal.log_tails, tails) and signal.tail_temperatures == (1.0,)
    # the input pipeline's worker asks for the step it prepares (the trainer is still one step behind)
    header, payload = pack(3, 0, torch.tensor([4, 9]), ids, logits, lse, tails)
    teacher = GroupTeacher(roles, FakeBridge([header, payload]), 2, torch.device("cpu"), lambda: 2, 5.0)
    signal = teacher.signal(torch.tensor([4, 9]), {"targets": targets}, step=3)
    assert torch.equal(signal.topk[0], ids) and torch.equal(signal.topk[2], lse)
    header, payload = pack(1, 0, torch.tensor([4, 7]), ids, logits, lse, tails)
    teacher = GroupTeacher(roles, FakeBridge([header, payload]), 2, torch.device("cpu"), lambda: 1, 5.0)
    with pytest.raises(TeacherGroupError, match=r"expected step 2, micro-batch 0, samples \[4, 9\] but teacher rank 0 "
                       r"sent step 2, micro-batch 0, samples \[4, 7\]"):
        teacher.signal(torch.tensor([4, 9]), {"targets": targets})


def test_vocab_parallel_topk_single_rank_ignores_padding():
    """One shard holds everything: padded columns (>= vocab) never enter the top-k or the lse."""
    from dist_distill.teacher.scorer import vocab_parallel_topk

    logits = torch.randn(5, 12)
    logits[:, 10:] = 100.0  # padding columns with huge logits
    ids, vals, lse, _ = vocab_parallel_topk(logits, 0, 10, 4, None)
    ref_vals, ref_ids = logits[:, :10].topk(4)
    assert torch.equal(ids, ref_ids) and torch.equal(vals, ref_vals)
    torch.testing.assert_close(lse, logits[:, :10].logsumexp(-1))


def test_colocated_8bit_teacher(tiny_world):
    """teacher_source.load_in_8bit: LLM.int8 linear layers (on the CPU too), the lm_head kept in full
    precision for the fused loss, logits near the full-precision teacher's."""
    import bitsandbytes as bnb

    from dist_distill.recipe import ModelSpec
    from dist_distill.teacher.colocated import load_colocated_teacher

    spec = ModelSpec(name_or_path=str(tiny_world / "teacher_init"))
    full = load_colocated_teacher(spec, torch.device("cpu"))
    quant = load_colocated_teacher(spec, torch.device("cpu"), load_in_8bit=True)
    linears = {n: m for n, m in quant.named_modules() if isinstance(m, torch.nn.Linear)}
    assert not isinstance(linears.pop("lm_head"), bnb.nn.Linear8bitLt)
    assert linears and all(isinstance(m, bnb.nn.Linear8bitLt) for m in linears.values())
    assert quant.get_memory_footprint() < 0.6 * full.get_memory_footprint()
    ids = torch.randint(0, 15, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = full(ids).logits, quant(ids).logits.float()
    err = (got - ref).abs().max()
    assert 0 < err < 0.05 * ref.abs().max(), (err, ref.abs().max())


# ---- multi-process (slow) ----------------------------------------------------------------------------
def _tp_helper(world: str, out: str, bits: str = "none") -> None:
    """torchrun --nproc_per_node 2 tests/test_teacher_group.py WORLD OUT [8bit]: TP teacher (its projections
    in LLM.int8 with 8bit) vs the one-process full-precision teacher."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from asserts import dense_teacher_topk
    from dist_distill.data.records import load_tokenized
    from dist_distill.models.loading import load_model, load_tokenizer
    from dist_distill.recipe import DataSpec, ModelSpec
    from dist_distill.teacher.tensor_parallel import load_teacher_shards
    from dist_distill.teacher.scorer import TeacherScorer

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    spec = ModelSpec(name_or_path=f"{world}/teacher_init")
    tok = load_tokenizer(spec, "teacher")
    data = load_tokenized(f"{world}/data/student_train.jsonl", tok, DataSpec(max_seq_len=16), 12)
    reference = load_model(spec, "teacher").eval()
    mesh = init_device_mesh("cpu", (2,))
    sharded = ModelSpec(name_or_path=f"{out}.model")  # the teacher saved as several safetensors files + index
    if dist.get_rank() == 0:
        reference.save_pretrained(sharded.name_or_path, max_shard_size="1MB")
    dist.barrier()
    model, offset = load_teacher_shards(sharded, mesh, torch.device("cpu"), load_in_8bit=bits == "8bit")
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    k, vocab = 8, len(tok)
    scorer = TeacherScorer(model, vocab, k, tp_group=mesh.get_group(), vocab_offset=offset)
    ids, vals, lse, _ = scorer.score(data.input_ids[:], data.attention_mask[:], data.targets[:])
    ref_ids, ref_vals, ref_lse, _ = dense_teacher_topk(reference, data.input_ids[:], data.attention_mask[:], k, vocab)
    mask = data.targets[:] != -100
    if dist.get_rank() == 0:
        torch.save({"ids": ids, "vals": vals, "lse": lse, "ref_ids": ref_ids[mask].long(), "ref_vals": ref_vals[mask],
                    "ref_lse": ref_lse[mask], "offset": offset, "local_vocab":
                    model.lm_head.weight.to_local().shape[0], "local_elements": local,
                    "int8_modules": sum(type(m).__name__ == "Linear8bitLt" for m in model.modules()),
                    "total_elements": sum(p.numel() for p in reference.parameters())}, out)
    dist.destroy_process_group()


@pytest.mark.slow
def test_tp_topk_equals_one_process(tiny_world, tmp_path):
    """2 TP ranks (gloo): vocab-parallel top-k ids, logits and logsumexp == the unsharded teacher's.
    The tiny teacher's vocab is padded to 32 for 15 tokens: rank 1's slice [16, 32) is all padding."""
    out = tmp_path / "tp.pt"
    run_cmd([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
             str(free_port()), "tests/test_teacher_group.py", str(tiny_world), str(out)], timeout=900)
    r = torch.load(out)
    assert len(list(tmp_path.glob("tp.pt.model/model-*-of-*.safetensors"))) > 1  # loaded through the index
    assert r["local_vocab"] == 16 and r["ids"].shape[1] == 8 and r["ids"].shape[0] > 20
    assert r["local_elements"] < 0.6 * r["total_elements"], r  # sharded on load: about half, plus norms/embeddings
    assert int(r["ids"].max()) < 15
    assert torch.equal(r["ids"], r["ref_ids"])
    torch.testing.assert_close(r["vals"], r["ref_vals"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(r["lse"], r["ref_lse"], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_tp_8bit_teacher_tracks_full_precision(tiny_world, tmp_path):
    """teacher_source.load_in_8bit with 2 TP ranks: every sharded projection becomes an LLM.int8 linear of
    its slice, and the vocab-parallel top-k stays close to the full-precision one-process teacher."""
    out = tmp_path / "tp8.pt"
    run_cmd([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
             str(free_port()), "tests/test_teacher_group.py", str(tiny_world), str(out), "8bit"], timeout=900)
    r = torch.load(out)
    layers = json.loads((tiny_world / "teacher_init/config.json").read_text())["num_hidden_layers"]
    assert r["int8_modules"] == 7 * layers  # q, k, v, o, gate, up, down of every layer
    scale = r["ref_vals"].abs().max()
    assert 0 < (r["vals"] - r["ref_vals"]).abs().max() < 0.05 * scale  # quantised, but close
    torch.testing.assert_close(r["lse"], r["ref_lse"], atol=0.05 * scale, rtol=0)
    same = (r["ids"].sort(-1).values == r["ref_ids"].sort(-1).values).float().mean()
    assert same > 0.9, same


@pytest.mark.slow
def test_group_training_equals_cache_training(tiny_world, tmp_path):
    """dd-train with 2 TP teacher ranks + 2 ZeRO-3 students == dd-train on 2 ranks from a cache built by the
    same teacher with the same top_k (lossless values): same losses and gradient norms step by step."""
    cache_run, group_run = tmp_path / "cache", tmp_path / "group"
    cache = ["--set", f"teacher_source.cache_dir={tmp_path}/tcache"]
    torchrun(1, "dist_distill.cache", "build", "configs/tiny/distill.yaml", *world_overrides(tiny_world, cache_run),
             *BASE, *cache, "--mode", "lossless", timeout=900)  # bit-exact values: the comparison is tight
    torchrun(2, "dist_distill.train", "configs/tiny/distill.yaml", *world_overrides(tiny_world, cache_run), *BASE,
             *cache, timeout=900)
    # the group run in the device test mode (training/device_check.py, issue 12 item 3): the start step
    # broadcast, the vocab_offset all_gather, the scorer's id range and the students' signals
    proc = torchrun(4, "dist_distill.train", "configs/tiny/distill.yaml", *world_overrides(tiny_world, group_run),
                    *BASE, *GROUP, timeout=900, DD_CHECK_DEVICES="1")
    assert "device test mode (DD_CHECK_DEVICES=1)" in proc.stderr
    a, b = metrics(cache_run), metrics(group_run)
    assert [r["step"] for r in b] == list(range(1, 7))
    for x, y in zip(a, b):
        assert x["target_tokens"] == y["target_tokens"]
        for key in ("loss", "divergence", "ce", "grad_norm"):
            assert y[key] == pytest.approx(x[key], rel=1e-4, abs=1e-6), (key, x, y)
    teacher_log = [json.loads(line) for line in (group_run / "teacher-group0.jsonl").read_text().splitlines()]
    assert [r["step"] for r in teacher_log] == list(range(1, 7)) and all(r["busy_s"] > 0 for r in teacher_log)
    assert json.loads((group_run / "partition-rank0.json").read_text())["world_size"] == 2  # ZeRO-3 on students only
    shards = [json.loads((group_run / f"teacher-shard-rank{r}.json").read_text()) for r in range(2)]
    assert all(s["local_elements"] < 0.6 * s["total_elements"] for s in shards), shards  # read as TP shards


@pytest.mark.slow
def test_colocated_8bit_training_tracks_full_precision(tiny_world, tmp_path):
    """2 ZeRO-3 ranks with an 8-bit colocated teacher: the run completes and its losses follow the
    full-precision teacher's run closely (the teacher's quantisation error is small)."""
    runs = {}
    for name, bits in (("full", "false"), ("q8", "true")):
        runs[name] = tmp_path / name
        torchrun(2, "dist_distill.train", "configs/tiny/distill.yaml", *world_overrides(tiny_world, runs[name]), *BASE,
                 "--set", "optim.max_steps=3", "--set", "teacher_source.kind=colocated",
                 "--set", f"teacher_source.load_in_8bit={bits}")
    full, q8 = metrics(runs["full"]), metrics(runs["q8"])
    assert len(full) == len(q8) == 3
    for a, b in zip(full, q8):
        assert a["loss"] != b["loss"] and b["loss"] == pytest.approx(a["loss"], rel=0.05), (a, b)


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["hang", "exit"])
def test_dead_or_hung_teacher_stops_students(tiny_world, tmp_path, fault):
    """A teacher rank (the non-leader TP rank) hangs or exits at step 3: the students stop with the group's
    clear error within teacher_source.timeout_s + margin, and the job exits non-zero (no hang)."""
    timeout = 8
    started = time.time()
    # a monitor interval far above the students' 8 s keeps torchrun from noticing the dead peer first: its
    # SIGTERM would reach the students as a preemption (a checkpoint and exit 75, which a shorter interval
    # made of this test once in a while on a loaded box)
    proc = run_cmd([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port",
                    str(free_port()), "--monitor-interval", "300" if fault == "exit" else "0.5",
                    "-m", "dist_distill.train", "configs/tiny/distill.yaml",
                    *world_overrides(tiny_world, tmp_path), *BASE, *GROUP, "--set", "optim.max_steps=20",
                    "--set", f"teacher_source.timeout_s={timeout}"], timeout=850, check=False,
                   **{f"DD_FAULT_TEACHER_{fault.upper()}_AT_STEP": "3", "DD_FAULT_TEACHER_RANK": "1"})
    elapsed = time.time() - started
    assert proc.returncode != 0
    assert f"DD_FAULT_TEACHER_{fault.upper()}_AT_STEP=3" in proc.stderr
    stderr = " ".join(proc.stderr.split())  # messages are wrapped at 100 columns
    assert "got no signal from teacher rank 0 (group 0) for step 3" in stderr, proc.stderr[-6000:]
    assert "a teacher rank died or hangs" in stderr
    steps = metrics(tmp_path)
    assert len(steps) <= 3
    # start-up (~30-60 s on 2 idle cores, several times that on a loaded box) + timeout + teardown (up to the
    # 300 s monitor interval for exit); a hang would run to the 850 s limit
    assert elapsed < 800, elapsed


@pytest.mark.slow
@pytest.mark.faults(1)
def test_hung_leader_ends_its_peers_within_the_step_timeout(tiny_world, tmp_path):
    """Issue 13 case 6: the LEADER of a TP-2 teacher group hangs at step 3. Its peer used to sit in the
    next collective for 2 x the start-up timeout (an hour by default); now it waits for its leader's
    word with deepspeed.timeout_s once the first step is done, and stops the job with its own message
    long before the students' teacher_source.timeout_s (600 s here) would."""
    started = time.time()
    proc = run_cmd([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "4", "--master_port",
                    str(free_port()), "--monitor-interval", "0.5", "-m", "dist_distill.train", "configs/tiny/distill.yaml",
                    *world_overrides(tiny_world, tmp_path), *BASE, *GROUP, "--set", "optim.max_steps=20",
                    "--set", "deepspeed.timeout_s=10", "--set", "teacher_source.timeout_s=600"], timeout=850,
                   check=False, DD_FAULT_TEACHER_HANG_AT_STEP="3", DD_FAULT_TEACHER_RANK="0")
    elapsed = time.time() - started
    assert proc.returncode != 0
    stderr = " ".join(proc.stderr.split())
    assert "teacher rank 0: DD_FAULT_TEACHER_HANG_AT_STEP=3: hanging" in stderr
    assert "teacher rank 1: its leader, teacher rank 0 (group 0), sent nothing for 10s before step 3" in stderr, \
        proc.stderr[-6000:]
    # start-up (~30-90 s on 2 idle cores, several times that on a loaded box) + 10 s; the students alone: > 600 s
    assert elapsed < 500, elapsed


if __name__ == "__main__":
    _tp_helper(*sys.argv[1:])


class _Work:
    def __init__(self, log, key):
        self.log, self.key = log, key

    def wait(self, timeout=None):
        self.log.append(("received", self.key))


class _FakeBridge:
    """Records sends; a send's wait() stands for 'the student has taken it'."""

    def __init__(self, log):
        self.log, self.n = log, 0

    def send(self, tensors, dst, tag):
        self.n += 1
        if self.n % 2 == 0:  # header + payload: one event per message
            self.log.append(("sent", self.n // 2 - 1))
            return _Work(self.log, self.n // 2 - 1)
        return _Work([], None)


@pytest.mark.parametrize("window", [1, 3])
def test_teacher_sends_each_micro_batch_as_soon_as_it_is_scored(window):
    """grad_accum 4: message i is sent right after micro-batch i is scored (not after the whole step), and
    the teacher waits for message i - window only, so it runs `window` micro-batches ahead."""
    from types import SimpleNamespace

    from dist_distill.teacher.group.roles import Roles
    from dist_distill.teacher.group.server import TeacherData, TeacherServer

    log = []

    class Scorer:
        device = torch.device("cpu")

        def score(self, tokens, mask, targets):
            log.append(("scored", sum(1 for e in log if e[0] == "scored")))
            return torch.zeros(3, 2, dtype=torch.long), torch.zeros(3, 2), torch.zeros(3), torch.zeros(3, 1)

    recipe = SimpleNamespace(optim=SimpleNamespace(micro_batch_size=2, grad_accum=4, max_steps=2), seed=1, stages=[],
                             teacher_source=SimpleNamespace(prefetch_micro_batches=window, timeout_s=5.0),
                             deepspeed=SimpleNamespace(startup_timeout_s=5.0, timeout_s=5.0), output=SimpleNamespace(dir="/tmp/x"))
    roles = Roles(0, 2, tp_size=1, num_groups=1)
    data = TeacherData(torch.zeros(40, 4, dtype=torch.long), torch.ones(40, 4, dtype=torch.long),
                       torch.zeros(40, 4, dtype=torch.long))
    server = TeacherServer(recipe, roles, _FakeBridge(log), Scorer(), None, data)
    server.start_step = lambda: 0
    server.r.output.dir = str(Path(tempfile.mkdtemp()))
    server.run()
    where = {e: i for i, e in enumerate(log)}
    n = 8  # 2 steps x 4 micro-batches
    for i in range(n):
        assert where[("sent", i)] < where.get(("scored", i + 1), len(log)), log  # sent before the next is scored
        if i + window < n:  # message i taken before item i + window is scored, and not earlier than needed
            assert where[("received", i)] < where[("scored", i + window)], log
            if i + window - 1 >= 0:
                assert where[("received", i)] > where[("scored", i + window - 1)], log
