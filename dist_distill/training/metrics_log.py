"""Where a run's step metrics go: metrics.jsonl (every step) and TensorBoard scalars (every log_every)."""

from __future__ import annotations

import json
from pathlib import Path

from dist_distill.training.checkpoint import truncate_jsonl

SCALARS = {"loss/": ("loss", "divergence", "ce", "hidden", "attention"),
           "schedule/": ("weight_output", "weight_hidden", "weight_attention", "temperature"),
           "optim/": ("lr", "grad_norm"), "throughput/": ("tokens_per_s",),
           "replay/": ("replay_ce", "replay_samples", "replay_tokens", "replay_samples_total")}


class MetricsLog:
    """Rank 0's metrics writer for output.dir (append mode: a resumed run continues the same files)."""

    def __init__(self, out: Path, log_every: int, last_step: int):
        from torch.utils.tensorboard import SummaryWriter

        self.path, self.log_every, self.last_step = out / "metrics.jsonl", log_every, last_step
        self.writer = SummaryWriter(str(out / "tensorboard"))
        self.file = open(self.path, "a")

    def write(self, record: dict) -> None:
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        step = record["step"]
        if step % self.log_every == 0 or step == self.last_step:
            for prefix, keys in SCALARS.items():
                for key in keys:
                    if key in record:
                        self.writer.add_scalar(prefix + key, record[key], step)

    def truncate(self, step: int) -> None:
        """Forget records past `step` (a resumed run rewrites them)."""
        self.file.close()
        truncate_jsonl(self.path, step)
        self.file = open(self.path, "a")

    def close(self) -> None:
        self.writer.close()
        self.file.close()
