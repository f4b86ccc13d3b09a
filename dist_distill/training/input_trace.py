"""What the loss was given, token by token, for tests that compare runs (off unless DD_INPUT_TRACE is set).

DD_INPUT_TRACE=DIR   every rank writes DIR/step-<S>-rank<R>-micro<M>.npz per micro-batch: for each target token
                     (row-major, the order of the teacher rows): `sample` and `position` (its key in the token
                     store and the teacher cache), and, for a top-k teacher, its rows `ids`, `logits`, `lse`;
                     `slots` (token slots of the micro-batch) and `real` (non-padding tokens).

One call per micro-batch in the trainer; nothing else reads the variable. It copies the rows to the host, so it
is a test seam, not a production log.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from dist_distill.data.records import IGNORE_INDEX


class InputTrace:
    def __init__(self, rank: int):
        value = os.environ.get("DD_INPUT_TRACE")
        self.dir, self.rank = (Path(value) if value else None), rank
        if self.dir is not None:
            self.dir.mkdir(parents=True, exist_ok=True)

    def record(self, step: int, micro: int, plan, cpu_batch: dict, teacher) -> None:
        """`plan`: the micro-batch's sample ids int64 [B] or its PackedBatch; `cpu_batch` its CPU tensors."""
        if self.dir is None:
            return
        targets = cpu_batch["targets"]
        where = targets != IGNORE_INDEX
        if hasattr(plan, "source"):  # packed
            sample, position = plan.source[..., 0][where], plan.source[..., 1][where]
            real = int((plan.doc >= 0).sum())
        else:
            sample = plan[:, None].expand_as(targets)[where]
            position = torch.arange(targets.shape[1]).expand_as(targets)[where]
            real = int(cpu_batch["attention_mask"].sum())
        out = {"sample": sample.numpy(), "position": position.numpy(), "slots": np.int64(targets.numel()),
               "real": np.int64(real)}
        if teacher is not None and teacher.topk is not None:
            ids, logits, lse = (t.detach().cpu().numpy() for t in teacher.topk)
            out.update(ids=ids, logits=logits, lse=lse)
        np.savez(self.dir / f"step-{step}-rank{self.rank}-micro{micro}.npz", **out)
