"""Fault injection for the reliability tests, driven by environment variables (off unless set).

DD_FAULT_NAN_LOSS="RANK:STEP[,STEP...]"  that rank's loss becomes NaN at those optimizer steps (1-based)
DD_FAULT_KILL_IN_SAVE="STEP"            rank 0 is SIGKILLed inside the checkpoint save of that step,
                                        after the files are written and before the commit marker
DD_FAULT_KILL_AT_STEP="RANK:STEP"       that rank is SIGKILLed at the start of that optimizer step
"""

from __future__ import annotations

import os
import signal


def _rank_steps(name: str) -> tuple[int, set[int]] | None:
    value = os.environ.get(name)
    if not value:
        return None
    rank, steps = value.split(":", 1)
    return int(rank), {int(s) for s in steps.split(",") if s}


def nan_loss(rank: int, step: int) -> bool:
    """Whether to poison this rank's loss at optimizer step `step` (1-based)."""
    spec = _rank_steps("DD_FAULT_NAN_LOSS")
    return spec is not None and spec[0] == rank and step in spec[1]


def maybe_kill_at_step(rank: int, step: int) -> None:
    spec = _rank_steps("DD_FAULT_KILL_AT_STEP")
    if spec is not None and spec[0] == rank and step in spec[1]:
        os.kill(os.getpid(), signal.SIGKILL)


def maybe_kill_in_save(rank: int, step: int) -> None:
    value = os.environ.get("DD_FAULT_KILL_IN_SAVE")
    if value and rank == 0 and int(value) == step:
        os.kill(os.getpid(), signal.SIGKILL)
