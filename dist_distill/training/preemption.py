"""Stopping cleanly before SLURM stops the job: a signal flag, a step-boundary agreement, a wall-clock budget.

SLURM warns a job before it ends (``--signal=USR1@<seconds>``) and sends SIGTERM when it preempts
or cancels it. The handler here only sets a flag (nothing else is safe inside a signal handler:
the main thread may be inside a collective). At every optimizer-step boundary all ranks all-reduce
one small tensor -- [signal seen, wall-clock budget spent] -- so that either every rank stops after
the same step or none does; the trainer then commits a checkpoint and the process exits with
:data:`REQUEUE_EXIT_CODE`, which the launchers and slurm/train.sbatch turn into ``scontrol requeue``.
The resumed job starts from that checkpoint: the data, stage and cache positions are functions of
the step, so it continues with the same samples.

The agreement costs one all-reduce of two float32 per optimizer step (at 64 GPUs: one 8-byte
collective next to a step of tens of seconds).
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import torch

REQUEUE_EXIT_CODE = 75
"""Exit status of a rank that stopped for preemption after committing a checkpoint (EX_TEMPFAIL of
sysexits.h: "try again later"); distinct from 0 (done), 1 (error) and 2 (bad input)."""
SIGNALS = (signal.SIGUSR1, signal.SIGTERM)
"""Signals taken as "save and stop": SLURM's --signal=USR1@grace warning, and SIGTERM (preemption, scancel)."""
REQUEUE_FILE_ENV = "DD_REQUEUE_FILE"
"""When set, every rank that stops for preemption writes this JSON file ({"step", "reason"}) after the
commit: torchrun reports any non-zero exit of a worker as 1, so the per-node launcher reads the file
to know the stop was a preemption (launch/slurm_node.sh)."""


class Preempted(Exception):
    """Raised by the trainer after the preemption checkpoint of `step` is committed."""

    def __init__(self, step: int, reason: str):
        super().__init__(f"stopped at step {step} for {reason}; checkpoint committed, resume with --resume")
        self.step, self.reason = step, reason


class PreemptionGuard:
    """Installs the signal handlers and answers, at each step boundary, whether all ranks stop now.

    Args:
        budget_s: wall-clock seconds this process may train (``--exit-duration-mins`` x 60); None: no
            budget. A stop is agreed once the time used plus the longest step seen so far would pass it,
            so the checkpoint is written before the budget ends, not after.
    """

    def __init__(self, budget_s: float | None = None):
        self.budget_s = budget_s
        self.started = time.monotonic()
        self.signal_name: str | None = None
        self.longest_step_s = 0.0
        self._last = self.started
        self._previous = {}
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._on_signal)

    def _on_signal(self, signum, frame) -> None:  # only a flag: the main thread may be inside a collective
        self.signal_name = signal.Signals(signum).name

    def should_stop(self, device: torch.device) -> str | None:
        """Called by every rank after each optimizer step: the reason all ranks stop now, or None."""
        now = time.monotonic()
        self.longest_step_s = max(self.longest_step_s, now - self._last)
        self._last = now
        over = self.budget_s is not None and (now - self.started) + self.longest_step_s > self.budget_s
        flags = torch.tensor([float(self.signal_name is not None), float(over)], device=device)
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(flags)  # SUM: any rank's signal or budget stops every rank
        if flags[0].item() > 0:
            return f"a signal ({self.signal_name or 'seen on another rank'})"
        if flags[1].item() > 0:
            return f"the wall-clock budget ({self.budget_s:.0f} s)"
        return None

    def restore(self) -> None:
        """Put back the signal handlers that were there before."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def write_requeue_file(step: int, reason: str) -> None:
    """Write $DD_REQUEUE_FILE (atomically) when the launcher asked for it."""
    path = os.environ.get(REQUEUE_FILE_ENV)
    if not path:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"step": step, "reason": reason}) + "\n")
    tmp.replace(path)
