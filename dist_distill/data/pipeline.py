"""The input pipeline: the next optimizer step's inputs prepared in a background thread while this one runs.

`produce(step)` builds everything a step needs that does not touch the engine or a collective: the store
reads and padding of each micro-batch, the local token counts and, for a cache teacher, the decoded cache
rows (numpy / torch CPU work that releases the GIL for most of its time). `get(step)` returns step's inputs
and starts step + 1's, so at steady state the training thread waits only when producing takes longer than
a step. With the pipeline off, `get` produces in the calling thread (the same values: `produce` is a pure
function of the step). `wait_s` is the time `get` spent waiting, the input-bound part of the step.

One worker, one step ahead: memory is one extra step of inputs (at 8 x 4096 tokens x 4 micro-batches,
about 3 MiB of ids plus the teacher rows: 4 x 32768 rows x (2k + 1 + nT) fp32, 18 MiB at k=16, on
the device). A teacher group's signals are received here too (its bridge is a process group of its
own, so the worker's receives do not interleave with the students' collectives); `stop` keeps the
worker from starting a step the teacher will never serve. A colocated teacher runs a model on the
engine's device and stays in the training thread.
"""

from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable


class InputPipeline:
    def __init__(self, produce: Callable[[int], Any], background: bool, stop: int | None = None):
        """`stop`: the first step never produced ahead (optim.max_steps); None: no bound."""
        self.produce, self.background, self.stop = produce, background, stop
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="dd-input") if background else None
        self.pending: tuple[int, Future] | None = None
        self.wait_s = 0.0

    def get(self, step: int) -> Any:
        """produce(step), from the background when it was started ahead; then starts step + 1."""
        t0 = time.perf_counter()
        if self.pool is None:
            out = self.produce(step)
        else:
            if self.pending is None or self.pending[0] != step:  # first call, or a jump (resume)
                self.cancel()
                self.pending = (step, self.pool.submit(self.produce, step))
            out = self.pending[1].result()  # re-raises the worker's exception here
            ahead = self.stop is None or step + 1 < self.stop
            self.pending = (step + 1, self.pool.submit(self.produce, step + 1)) if ahead else None
        self.wait_s += time.perf_counter() - t0
        return out

    def cancel(self) -> None:
        if self.pending is not None:
            self.pending[1].cancel()
            try:
                self.pending[1].result()
            except Exception:  # noqa: BLE001 - a step past the end may fail to produce; nobody reads it
                pass
            self.pending = None

    def close(self) -> None:
        self.cancel()
        if self.pool is not None:
            self.pool.shutdown(wait=True)
