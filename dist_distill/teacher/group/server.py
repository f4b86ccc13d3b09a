"""The teacher side of the group: shard the teacher over its TP ranks, score each step, send ahead."""

from __future__ import annotations

import json
import os
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


class TeacherServer:
    """The loop of one teacher rank: compute each step's signals for the group's students, send ahead."""

    def __init__(self, recipe, roles: Roles, bridge, scorer: TeacherScorer, tp_group, data):
        from dist_distill.data.sampler import StepSampler

        self.r, self.roles, self.bridge, self.scorer, self.tp_group = recipe, roles, bridge, scorer, tp_group
        self.data = data
        op = recipe.optim
        self.students = roles.students_of(roles.group)
        self.samplers = {s: StepSampler(len(data.tokens), op.micro_batch_size, op.grad_accum, roles.num_students, s,
                                        recipe.seed, recipe.stages) for s in self.students}
        self.leader = roles.tp_rank == 0
        self.student_wait = startup_timeout_s(recipe)
        self.pending: deque = deque()  # (step, [works], [tensors kept alive until sent])

    def start_step(self) -> int:
        """The step every student of the group starts at (their resumed step), shared over the TP group."""
        start = torch.zeros(1, dtype=torch.int64)
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

    def compute(self, step: int) -> list[tuple[int, int, torch.Tensor, tuple]]:
        """[(student, micro, indices, (ids, logits, lse))] of step `step` for every student served."""
        items = [(s, m, idx) for s in self.students for m, idx in enumerate(self.samplers[s].step_indices(step))]
        d = self.data
        return [(s, m, idx, self.scorer.score(d.tokens[idx], d.mask[idx], d.targets[idx])) for s, m, idx in items]

    def send(self, step: int, results) -> None:
        works, keep = [], []
        for s, m, idx, (ids, logits, lse) in results:
            header, payload = pack(step, m, idx, ids, logits, lse)
            dst = self.roles.num_teachers + s
            works += [self.bridge.send([header], dst, 0), self.bridge.send([payload], dst, 0)]
            keep += [header, payload]
        self.pending.append((step, works, keep))

    def drain(self, upto: int) -> None:
        """Wait until the students received every message of steps <= upto."""
        while self.pending and self.pending[0][0] <= upto:
            step, works, _ = self.pending.popleft()
            for w in works:
                wait_work(w, self.student_wait, f"teacher rank {self.roles.rank}: a student stopped receiving at step "
                      f"{step + 1} (dead, or hung for {self.student_wait:.0f}s)")

    def run(self) -> None:
        r = self.r
        log = None
        if self.leader:
            Path(r.output.dir).mkdir(parents=True, exist_ok=True)
            log = open(Path(r.output.dir) / f"teacher-group{self.roles.group}.jsonl", "a")
        t0 = time.perf_counter()
        step = self.start_step()
        idle = time.perf_counter() - t0
        for step in range(step, r.optim.max_steps):
            teacher_fault(self.roles.rank, self.roles.num_teachers, step + 1)  # 1-based, as in metrics.jsonl
            t0 = time.perf_counter()
            if self.leader:
                self.drain(step - r.teacher_source.prefetch_steps)
            t1 = time.perf_counter()
            results = self.compute(step)
            if self.leader:
                self.send(step, results)
            t2 = time.perf_counter()
            idle += t1 - t0
            if log:
                log.write(json.dumps({"step": step + 1, "busy_s": t2 - t1, "idle_s": idle,
                                      "rows": sum(x[3][0].shape[0] for x in results)}) + "\n")
                log.flush()
            idle = 0.0
        if self.leader:
            self.drain(r.optim.max_steps)
            log.close()


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
    from dist_distill.models.loading import load_tokenizer, tokenizer_fingerprint
    from dist_distill.training.distributed import get_accelerator_device

    ts = recipe.teacher_source
    backend = default_backend()
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    # TP peers of a leader that waits (up to the start-up timeout) for a slow student block in a collective
    dist.init_process_group(backend, timeout=timedelta(seconds=2 * startup_timeout_s(recipe)))
    try:
        tokenizer = load_tokenizer(recipe.teacher, "teacher")
        if tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(load_tokenizer(recipe.student, "student")):
            raise UserError(f"teacher {recipe.teacher.name_or_path} and student {recipe.student.name_or_path} use "
                            "different tokenizers: token-level logit distillation is invalid across vocabularies")
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
        scorer = TeacherScorer(model, vocab, ts.top_k, tp_group=tp_group if ts.tp_size > 1 else None, vocab_offset=offset)
        TeacherServer(recipe, roles, bridge, scorer, tp_group, TeacherData(data.input_ids, data.attention_mask,
                                                                           data.targets)).run()
    except RuntimeError as err:
        if isinstance(err, TeacherGroupError) or not _is_comm_error(err):
            raise
        raise TeacherGroupError(f"teacher rank {roles.rank} (group {roles.group}): a collective with the other "
                                "teacher ranks failed: another teacher rank died or hangs. "
                                f"({str(err).splitlines()[0][:200]})") from None
    finally:
        dist.destroy_process_group()


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

