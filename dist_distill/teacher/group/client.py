"""The student side of the group: receive each micro-batch's teacher signal from the leader."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path

import torch

from dist_distill.data.records import IGNORE_INDEX
from dist_distill.teacher.group.protocol import HEADER, MAGIC, unpack, wait_work
from dist_distill.teacher.group.roles import STARTUP_TIMEOUT_S, Roles, TeacherGroupError, bridge, startup_timeout_s
from dist_distill.teacher.signal import TeacherSignal


class GroupTeacher:
    """Student-side source: receives the teacher group's top-k signal for each micro-batch.

    Same contract as CacheTeacher: ``signal(indices, batch)`` gives TeacherSignal(topk=(ids int64
    [n, k], raw logits fp32 [n, k], lse fp32 [n]), log_tails fp32 [n, nT]) for the n target tokens
    of the batch (`temperatures`: the recipe's tail temperatures, which the teacher computes too).

    Every bridge message of a student goes through one thread, in step order: with data.prefetch the
    input pipeline's worker (data/pipeline.py) receives step s + 1's signals while step s trains, so
    the receive, its checks and the unpacking leave the training thread; without, the training thread.
    The bridge is gloo over CPU tensors (teacher.group): each payload lands in a host buffer (pinned on
    CUDA), moves to `device` in one non-blocking copy and is unpacked there.
    """

    def __init__(self, roles: Roles, bridge, top_k: int, device, step_fn, timeout_s: float,
                 log_path: str | Path | None = None, startup_s: float = STARTUP_TIMEOUT_S, temperatures=(1.0,)):
        self.roles, self.bridge, self.k, self.device, self.step_fn = roles, bridge, top_k, device, step_fn
        self.temperatures = tuple(temperatures)
        self.timeout_s, self.startup_s = timeout_s, max(startup_s, timeout_s)
        self.student = roles.rank - roles.num_teachers
        self.leader = roles.leader_of(self.student)
        self.started, self.at = False, (-1, -1)
        self.log = open(log_path, "a") if log_path else None

    def _recv(self, tensor: torch.Tensor, step: int, micro: int) -> None:
        try:
            self.bridge.recv([tensor], self.leader, 0).wait(timedelta(seconds=self.timeout_s))
        except RuntimeError as err:
            raise TeacherGroupError(
                f"teacher group: student rank {self.student} got no signal from teacher rank {self.leader} "
                f"(group {self.leader // self.roles.tp_size}) for step {step + 1}, micro-batch {micro} within "
                f"teacher_source.timeout_s={self.timeout_s:g}s: a teacher rank died or hangs; see the teacher "
                f"ranks' log. ({str(err).splitlines()[0][:200]})") from None

    def signal(self, indices: torch.Tensor, batch: dict, step: int | None = None) -> TeacherSignal:
        """The signal of micro-batch `indices` (int64 [micro_batch]) of optimizer step `step` (0-based;
        None: step_fn(), the trainer's current step), the micro-batches of a step taken in order."""
        step = self.step_fn() if step is None else step
        if not self.started:
            hello = torch.tensor([MAGIC, step], dtype=torch.int64)
            wait_work(self.bridge.send([hello], self.leader, 0), self.startup_s,
                  f"teacher group: student rank {self.student} could not reach teacher rank {self.leader}")
            self.started = True
        micro = self.at[1] + 1 if self.at[0] == step else 0
        self.at = (step, micro)
        t0 = time.perf_counter()
        header = torch.zeros(HEADER + len(indices), dtype=torch.int64)
        self._recv(header, step, micro)
        magic, h_step, h_micro, rows, k, mb = header[:HEADER].tolist()
        got = header[HEADER:HEADER + mb]
        same = magic == MAGIC and (h_step, h_micro) == (step, micro) and mb == len(indices)
        if not (same and torch.equal(got, indices.cpu())):
            raise TeacherGroupError(
                f"teacher group: student rank {self.student} expected step {step + 1}, micro-batch {micro}, samples "
                f"{indices.tolist()} but teacher rank {self.leader} sent step {h_step + 1}, micro-batch {h_micro}, "
                f"samples "
                f"{got.tolist()}: teacher and student disagree on the data order (same recipe, seed, data and "
                "launch shape on both roles?)")
        mask = batch["targets"].cpu() != IGNORE_INDEX
        if rows != int(mask.sum()) or k != self.k:
            raise TeacherGroupError(f"teacher group: got {rows} rows x top-{k} for a batch with {int(mask.sum())} "
                                    f"target tokens and teacher_source.top_k={self.k}")
        payload = torch.empty(rows, 2 * k + 1 + len(self.temperatures), dtype=torch.float32,
                              pin_memory=self.device.type == "cuda")
        self._recv(payload, step, micro)
        wait = time.perf_counter() - t0
        if self.log:
            self.log.write(json.dumps({"step": step + 1, "micro": micro, "wait_s": wait}) + "\n")
            self.log.flush()
        ids, logits, lse, log_tails = unpack(payload.to(self.device, non_blocking=True), k)
        return TeacherSignal(topk=(ids, logits, lse), log_tails=log_tails, tail_temperatures=self.temperatures,
                             source=f"teacher group (teacher rank {self.leader})")


def group_teacher(recipe, device, step_fn) -> GroupTeacher:
    """The student's GroupTeacher over the bridge that :func:`split_world` built."""
    roles, pg = bridge()
    out = Path(recipe.output.dir)
    out.mkdir(parents=True, exist_ok=True)
    student = roles.rank - roles.num_teachers
    from dist_distill.teacher.tails import tail_temperatures

    return GroupTeacher(roles, pg, recipe.teacher_source.top_k, device, step_fn, recipe.teacher_source.timeout_s,
                        out / f"teacher-wait-rank{student}.jsonl", startup_timeout_s(recipe), tail_temperatures(recipe))
