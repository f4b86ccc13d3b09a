"""Fault injection for the reliability tests, driven by environment variables (off unless set).

DD_FAULT_NAN_LOSS="RANK:STEP[,STEP...]"  that rank's loss becomes NaN at those optimizer steps (1-based)
DD_FAULT_KILL_IN_SAVE="STEP"            rank 0 is SIGKILLed inside the checkpoint save of that step,
                                        after the files are written and before the commit marker
DD_FAULT_KILL_AT_STEP="RANK:STEP"       that rank is SIGKILLed at the start of that optimizer step
DD_FAULT_TEACHER_EXIT_AT_STEP="STEP"    teacher rank DD_FAULT_TEACHER_RANK (global; default the last teacher
DD_FAULT_TEACHER_HANG_AT_STEP="STEP"    rank) exits / hangs when about to compute that step (kind=group)
DD_FAULT_GENERATE_KILL_IN_CHUNK="N"     dd-generate: the process is SIGKILLed while writing the N-th chunk it
                                        writes (1-based), half of that chunk's temporary file on disk

Every hook is one call at a fixed place of the training or teacher loop; nothing else in the
package reads these variables.
"""

from __future__ import annotations

import os
import signal
import sys
import time


def _rank_steps(name: str) -> tuple[int, set[int]] | None:
    value = os.environ.get(name)
    if not value:
        return None
    rank, steps = value.split(":", 1)
    return int(rank), {int(s) for s in steps.split(",") if s}


def teacher_fault(rank: int, num_teachers: int, step: int) -> None:
    """Teacher group: exit or hang teacher rank DD_FAULT_TEACHER_RANK when it is about to compute `step` (1-based)."""
    victim = int(os.environ.get("DD_FAULT_TEACHER_RANK", num_teachers - 1))
    if rank != victim:
        return
    if os.environ.get("DD_FAULT_TEACHER_EXIT_AT_STEP") == str(step):
        print(f"teacher rank {rank}: DD_FAULT_TEACHER_EXIT_AT_STEP={step}: exiting", file=sys.stderr, flush=True)
        os._exit(17)
    if os.environ.get("DD_FAULT_TEACHER_HANG_AT_STEP") == str(step):
        print(f"teacher rank {rank}: DD_FAULT_TEACHER_HANG_AT_STEP={step}: hanging", file=sys.stderr, flush=True)
        while True:
            time.sleep(3600)


def generate_fault():
    """dd-generate's seam: None without DD_FAULT_GENERATE_KILL_IN_CHUNK, else ``hook(n, tmp_file)`` that
    SIGKILLs this process when n (chunks this process has started writing, 1-based) is the planned one."""
    value = os.environ.get("DD_FAULT_GENERATE_KILL_IN_CHUNK")
    if not value:
        return None

    def hook(n: int, tmp_file) -> None:
        if n == int(value):
            print(f"DD_FAULT_GENERATE_KILL_IN_CHUNK={value}: killed while writing {tmp_file}", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGKILL)

    return hook


class FaultPlan:
    """The training loop's one fault-injection seam: the DD_FAULT_* variables of one rank, read once.

    The trainer calls ``at_step_start``, ``poison_loss`` and ``in_save`` at fixed points; with
    no variable set every call does nothing.
    """

    def __init__(self, rank: int, nan_steps: set[int], kill_steps: set[int], kill_in_save: int | None):
        self.rank, self.nan_steps, self.kill_steps, self.kill_in_save = rank, nan_steps, kill_steps, kill_in_save

    @classmethod
    def from_env(cls, rank: int) -> "FaultPlan":
        nan, kill = _rank_steps("DD_FAULT_NAN_LOSS"), _rank_steps("DD_FAULT_KILL_AT_STEP")
        save = os.environ.get("DD_FAULT_KILL_IN_SAVE")
        return cls(rank, nan[1] if nan and nan[0] == rank else set(), kill[1] if kill and kill[0] == rank else set(),
                   int(save) if save and rank == 0 else None)

    def at_step_start(self, step: int) -> None:
        """SIGKILL this rank at the start of optimizer step `step` (1-based) if planned."""
        if step in self.kill_steps:
            os.kill(os.getpid(), signal.SIGKILL)

    def poison_loss(self, step: int, loss):
        """The loss, or NaN where planned for this rank at `step`."""
        return loss * float("nan") if step in self.nan_steps else loss

    def in_save(self, step: int) -> None:
        """Rank 0: SIGKILL after the checkpoint files of `step` are written, before the commit marker."""
        if self.kill_in_save == step:
            os.kill(os.getpid(), signal.SIGKILL)
