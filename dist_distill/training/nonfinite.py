"""Counting the optimizer steps DeepSpeed skipped for a non-finite loss or gradient norm."""

from __future__ import annotations

from dist_distill.errors import UserError


class SkipGuard:
    """Skipped-step counters of a run; stops it after `limit` skips in a row (optim.max_consecutive_skips).

    The engine skipped a step iff its own ``skipped_steps`` counter moved. bf16 ZeRO-3 in older
    DeepSpeed versions applied non-finite steps: a non-finite loss that was not skipped is an error.
    """

    def __init__(self, engine, limit: int, rank: int):
        self.engine, self.limit, self.rank = engine, limit, rank
        self.total = self.in_a_row = 0
        self.seen = engine.skipped_steps

    def state(self) -> dict:
        return {"skipped_steps": self.total, "consecutive_skips": self.in_a_row}

    def restore(self, state: dict) -> None:
        self.total, self.in_a_row = state["skipped_steps"], state["consecutive_skips"]
        self.seen = self.engine.skipped_steps

    def account(self, nonfinite_loss: bool, step: int) -> bool:
        """After optimizer step `step` (1-based): whether the engine skipped it; raises after `limit` in a row."""
        skipped = self.engine.skipped_steps > self.seen
        self.seen = self.engine.skipped_steps
        if nonfinite_loss and not skipped:
            raise RuntimeError("a non-finite loss reached the optimizer step but DeepSpeed applied it: this DeepSpeed "
                               "version does not skip non-finite steps; upgrade deepspeed (>= 0.19 checks the norm)")
        if not skipped:
            self.in_a_row = 0
            return False
        self.total += 1
        self.in_a_row += 1
        print(f"[rank {self.rank}] step {step} skipped: non-finite loss or gradient norm "
              f"({self.in_a_row} in a row, {self.total} in total)", flush=True)
        if self.in_a_row >= self.limit:
            raise UserError(f"{self.limit} optimizer steps in a row had a non-finite loss or gradient norm (last: step "
                            f"{step}); stopping. Lower optim.lr, check the data, or resume from the last "
                            "checkpoint with --resume")
        return True
