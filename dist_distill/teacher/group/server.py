"""The teacher side of the group: shard the teacher over its TP ranks, score each step, send ahead."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

from dist_distill.errors import UserError
from dist_distill.teacher.group.protocol import MAGIC, pack, wait_work
from dist_distill.teacher.group.roles import Roles, TeacherGroupError, startup_timeout_s
from dist_distill.teacher.scorer import TeacherScorer
from dist_distill.teacher.tensor_parallel import load_teacher_shards
from dist_distill.training.faults import teacher_fault


class PeerControl:
    """The leader's word to its TP peers: "go" before each micro-batch, "alive" while it waits for students.

    Without it a peer runs ahead into the next micro-batch's collectives while its leader waits for
    a student (up to the start-up timeout: a student may be writing a checkpoint), so those
    collectives needed that long a timeout and a hung leader held its peers for an hour. Now a peer
    enters a micro-batch only after the leader's GO for it, over a gloo group of the TP ranks
    (point-to-point, int64 [kind, step, item]); while the leader waits for students a thread sends
    BEAT every ``beat_s``. A peer that hears nothing for ``timeout_s`` (deepspeed.timeout_s once the
    first step is done) knows its leader is hung or dead and stops; the TP collectives themselves
    then run on the step timeout too, since every rank of the group enters them together.
    At 64 GPUs: one 24-byte message per micro-batch per peer (tp_size - 1 of them), off the GPU.
    """

    GO, BEAT = 1, 2

    def __init__(self, roles: Roles, group, timeout_s: float, beat_s: float):
        self.roles, self.group, self.timeout_s, self.beat_s = roles, group, timeout_s, beat_s
        self.leader_rank = roles.group * roles.tp_size  # global rank = rank in the teacher world
        self.peers = [self.leader_rank + i for i in range(1, roles.tp_size)]
        self.error: Exception | None = None

    def _send(self, kind: int, step: int, item: int) -> None:
        msg = torch.tensor([kind, step, item], dtype=torch.int64)
        for peer in self.peers:
            wait_work(dist.isend(msg, peer, group=self.group), self.timeout_s,
                      f"teacher rank {self.roles.rank}: its TP peer, teacher rank {peer}, did not take the leader's "
                      f"message (dead, or hung for {self.timeout_s:g}s)")

    def go(self, step: int, item: int) -> None:
        """Leader: let the peers into micro-batch `item` of `step`."""
        if self.error is not None:
            raise self.error
        self._send(self.GO, step, item)

    @contextlib.contextmanager
    def beating(self):
        """Leader: send BEAT every beat_s from a thread while the body waits (for students)."""
        if not self.peers:
            yield
            return
        stop = threading.Event()

        def beat():
            while not stop.wait(self.beat_s):
                try:
                    self._send(self.BEAT, -1, -1)
                except Exception as err:  # noqa: BLE001 (reported by the next go())
                    self.error = err
                    return

        thread = threading.Thread(target=beat, name="dd-teacher-heartbeat", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join()

    def await_go(self, step: int, item: int) -> None:
        """Peer: wait for the leader's GO for (step, item), taking BEATs; at most timeout_s between messages."""
        msg = torch.zeros(3, dtype=torch.int64)
        while True:
            wait_work(dist.irecv(msg, self.leader_rank, group=self.group), self.timeout_s,
                      f"teacher rank {self.roles.rank}: its leader, teacher rank {self.leader_rank} (group "
                      f"{self.roles.group}), sent nothing for {self.timeout_s:g}s before step {step + 1}, micro-batch "
                      f"item {item}: the leader is hung or dead (deepspeed.timeout_s after the first step)")
            kind, got_step, got_item = msg.tolist()
            if kind == self.BEAT:
                continue
            if (kind, got_step, got_item) != (self.GO, step, item):
                raise TeacherGroupError(f"teacher rank {self.roles.rank}: its leader sent {msg.tolist()}, expected GO "
                                        f"for step {step + 1}, item {item}")
            return


class TeacherServer:
    """The loop of one teacher rank: score every micro-batch of the group's students in the order they
    consume them, and send each as soon as it is computed, running up to a window ahead.

    The window is ``teacher_source.prefetch_micro_batches`` messages per student served: before
    scoring item i the leader waits until item i - window (a gloo send completes once the
    student has posted its receive, i.e. started that micro-batch). So the teacher stays up to
    `window` micro-batches ahead and a student never waits for a teacher that is faster than it,
    at any grad_accum; a slower teacher sets the pace. TP peers (tp_rank > 0) score with the leader
    (their collectives pace them) and send nothing.
    """

    def __init__(self, recipe, roles: Roles, bridge, scorer: TeacherScorer, tp_group, data, control=None):
        from dist_distill.data.sampler import StepSampler

        self.r, self.roles, self.bridge, self.scorer, self.tp_group = recipe, roles, bridge, scorer, tp_group
        self.data = data
        op = recipe.optim
        self.students = roles.students_of(roles.group)
        self.samplers = {s: StepSampler(len(data.tokens), op.micro_batch_size, op.grad_accum, roles.num_students, s,
                                        recipe.seed, recipe.stages) for s in self.students}
        self.leader = roles.tp_rank == 0
        self.student_wait = startup_timeout_s(recipe)
        self.window = recipe.teacher_source.prefetch_micro_batches * len(self.students)
        self.pending: deque = deque()  # (step, micro, student, [works], [tensors kept alive until sent])
        self.control: PeerControl | None = control  # None: no TP peers

    def start_step(self) -> int:
        """The step every student of the group starts at (their resumed step), shared over the TP group."""
        start = torch.zeros(1, dtype=torch.int64, device=self.scorer.device)  # on the TP group's device (NCCL)
        if self.leader:
            steps = []
            for s in self.students:
                msg = torch.zeros(2, dtype=torch.int64)
                wait_work(self.bridge.recv([msg], self.roles.num_teachers + s, 0), self.student_wait,
                          f"teacher rank {self.roles.rank}: student rank {s} never asked for signals")
                steps.append(int(msg[1]))
            if len(set(steps)) != 1 or int(msg[0]) != MAGIC:
                raise TeacherGroupError(f"teacher group {self.roles.group}: its students start at different "
                                        f"steps {steps}")
            start[0] = steps[0]
        if self.roles.tp_size > 1:
            dist.broadcast(start, group_src=0, group=self.tp_group)
        return int(start[0])

    def items(self, step: int):
        """(student, micro, sample indices) of step `step` in the order the students consume them."""
        micro = {s: self.samplers[s].step_indices(step) for s in self.students}
        return [(s, m, micro[s][m]) for m in range(self.r.optim.grad_accum) for s in self.students]

    def send(self, step: int, student: int, micro: int, indices: torch.Tensor, signal) -> None:
        """Send one micro-batch's signal now (isend: returns at once; completes when the student receives)."""
        header, payload = pack(step, micro, indices, *signal)
        dst = self.roles.num_teachers + student
        works = [self.bridge.send([header], dst, 0), self.bridge.send([payload], dst, 0)]
        self.pending.append((step, micro, student, works, [header, payload]))

    def wait_until(self, in_flight: int) -> float:
        """Wait until at most `in_flight` sent messages are not yet received; returns the seconds waited."""
        t0 = time.perf_counter()
        while len(self.pending) > in_flight:
            step, micro, student, works, _ = self.pending.popleft()
            for w in works:
                wait_work(w, self.student_wait, f"teacher rank {self.roles.rank}: student rank {student} stopped "
                          f"receiving at step {step + 1}, micro-batch {micro} (dead, or hung for "
                          f"{self.student_wait:.0f}s)")
        return time.perf_counter() - t0

    def run(self) -> None:
        r = self.r
        log = None
        if self.leader:
            Path(r.output.dir).mkdir(parents=True, exist_ok=True)
            log = open(Path(r.output.dir) / f"teacher-group{self.roles.group}.jsonl", "a")
        t0 = time.perf_counter()
        first = self.start_step()
        idle = time.perf_counter() - t0
        try:
            self._serve_steps(first, log, idle)
        except (RuntimeError, TeacherGroupError):
            if self.leader:  # a TP peer died: still deliver what was scored, so the students get as far as possible
                self.deliver_pending(timedelta(seconds=r.teacher_source.timeout_s))
            raise
        if self.leader:
            self.wait_until(0)
            log.close()

    def deliver_pending(self, timeout: timedelta) -> None:
        """After a failure: wait (each message up to `timeout`) until the students took the messages
        already sent; stop at the first that does not go through."""
        for *_, works, _ in self.pending:
            for w in works:
                try:
                    w.wait(timeout)
                except RuntimeError:
                    return

    def _serve_steps(self, first: int, log, idle: float) -> None:
        r, d = self.r, self.data
        for step in range(first, r.optim.max_steps):
            teacher_fault(self.roles.rank, self.roles.num_teachers, step + 1)  # 1-based, as in metrics.jsonl
            busy, rows = 0.0, 0
            for item, (s, m, idx) in enumerate(self.items(step)):
                if self.leader:
                    with self.control.beating() if self.control else contextlib.nullcontext():
                        idle += self.wait_until(self.window - 1)
                    if self.control:
                        self.control.go(step, item)
                elif self.control:
                    self.control.await_go(step, item)
                t1 = time.perf_counter()
                signal = self.scorer.score(d.tokens[idx], d.mask[idx], d.targets[idx])
                if self.leader:
                    self.send(step, s, m, idx, signal)
                busy += time.perf_counter() - t1
                rows += signal[0].shape[0]
            if log:
                log.write(json.dumps({"step": step + 1, "busy_s": busy, "idle_s": idle, "rows": rows}) + "\n")
                log.flush()
            idle = 0.0
            if step == first:
                self._tighten_timeout()

    def _tighten_timeout(self) -> None:
        """After the first step: every collective of this teacher rank (its TP group and the teacher world)
        and the peers' wait for their leader use deepspeed.timeout_s instead of the start-up timeout."""
        from torch.distributed.distributed_c10d import _set_pg_timeout

        timeout = timedelta(seconds=self.r.deepspeed.timeout_s)
        if dist.is_initialized():
            _set_pg_timeout(timeout)
            if self.tp_group is not None:
                _set_pg_timeout(timeout, self.tp_group)
        if self.control is not None:
            self.control.timeout_s = self.r.deepspeed.timeout_s
            self.control.beat_s = beat_interval(self.r.deepspeed.timeout_s)


@dataclass
class TeacherData:
    """The training data a teacher rank scores, int64 [S, L] each, kept on the CPU (batches move to the device)."""

    tokens: torch.Tensor
    mask: torch.Tensor
    targets: torch.Tensor


def serve(recipe, roles: Roles, bridge) -> None:
    """Teacher rank: join the teacher world, shard the teacher over its TP group, serve until max_steps."""
    from torch.distributed.device_mesh import init_device_mesh

    from dist_distill.data.records import load_tokenized
    from dist_distill.training.distributed import default_backend
    from dist_distill.models.loading import load_tokenizer
    from dist_distill.teacher.sources import same_tokenizer_or_refuse
    from dist_distill.teacher.tails import tail_temperatures
    from dist_distill.training.distributed import get_accelerator_device

    ts = recipe.teacher_source
    backend = default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # TP peers of a leader that waits (up to the start-up timeout) for a slow student block in a collective
    dist.init_process_group(backend, timeout=timedelta(seconds=2 * startup_timeout_s(recipe)))
    try:
        tokenizer = load_tokenizer(recipe.teacher, "teacher")
        same_tokenizer_or_refuse(recipe, load_tokenizer(recipe.student, "student"), tokenizer)
        data = load_tokenized(recipe.data.train, tokenizer, recipe.data, recipe.data.max_samples)
        vocab = len(tokenizer)
        if ts.top_k > vocab:
            raise UserError(f"teacher_source.top_k={ts.top_k} exceeds the vocabulary ({vocab} tokens)")
        mesh = init_device_mesh(get_accelerator_device().split(":")[0], (ts.num_groups, ts.tp_size),
                                mesh_dim_names=("group", "tp"))
        device = torch.device(get_accelerator_device())
        model, offset = load_teacher_shards(recipe.teacher, mesh["tp"], device, ts.load_in_8bit)
        if model.config.vocab_size < vocab:
            raise UserError(f"teacher vocab_size={model.config.vocab_size} is smaller than its tokenizer's {vocab}")
        _write_shard_report(recipe, roles, model)
        tp_group = mesh["tp"].get_group()
        scorer = TeacherScorer(model, vocab, ts.top_k, tp_group=tp_group if ts.tp_size > 1 else None, vocab_offset=offset,
                               temperatures=tail_temperatures(recipe))
        TeacherServer(recipe, roles, bridge, scorer, tp_group, TeacherData(data.input_ids, data.attention_mask,
                                                                           data.targets),
                      peer_control(recipe, roles)).run()
    except RuntimeError as err:
        if isinstance(err, TeacherGroupError) or not _is_comm_error(err):
            raise
        raise TeacherGroupError(f"teacher rank {roles.rank} (group {roles.group}): a collective with the other "
                                "teacher ranks failed: another teacher rank died or hangs. "
                                f"({str(err).splitlines()[0][:200]})") from None
    finally:
        dist.destroy_process_group()


def beat_interval(timeout_s: float) -> float:
    """Seconds between a waiting leader's BEATs: a quarter of the peers' timeout, at most 30 s."""
    return min(timeout_s / 4.0, 30.0)


def peer_control(recipe, roles: Roles) -> PeerControl | None:
    """The PeerControl of this teacher rank over a gloo group of each TP group (every teacher rank
    creates every group, in order); None without TP peers. Start-up timeout until the first step."""
    if roles.tp_size == 1:
        return None
    mine = None
    for g in range(roles.num_groups):
        group = dist.new_group(list(range(g * roles.tp_size, (g + 1) * roles.tp_size)), backend="gloo",
                               timeout=timedelta(seconds=2 * startup_timeout_s(recipe)))
        if g == roles.group:
            mine = group
    return PeerControl(roles, mine, startup_timeout_s(recipe), beat_interval(recipe.deepspeed.timeout_s))


def _write_shard_report(recipe, roles: Roles, model) -> None:
    """output.dir/teacher-shard-rank{rank}.json: parameter elements this teacher rank holds vs the model's."""
    from torch.distributed.tensor import DTensor

    local = sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in model.parameters())
    total = sum(p.numel() for p in model.parameters())
    out = Path(recipe.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"teacher-shard-rank{roles.rank}.json").write_text(json.dumps(
        {"rank": roles.rank, "group": roles.group, "local_elements": local, "total_elements": total}) + "\n")


def _is_comm_error(err: BaseException) -> bool:
    """A failed or timed-out collective (gloo/NCCL report these as RuntimeError or DistBackendError)."""
    text = str(err)
    return isinstance(err, dist.DistBackendError) or any(
        s in text for s in ("gloo", "NCCL", "Connection closed", "Connection reset", "Timed out"))

