"""Messages from a teacher leader to a student over the bridge (see dist_distill.teacher.group)."""

from __future__ import annotations

from datetime import timedelta

import torch

from dist_distill.teacher.group.roles import TeacherGroupError
from dist_distill.teacher.signal import pack_rows, unpack_rows

MAGIC = 0x7EAC4E5
HEADER = 6


def pack(step: int, micro: int, indices: torch.Tensor, ids, logits, lse, log_tails) -> tuple[torch.Tensor, torch.Tensor]:
    """(header int64, payload fp32 [rows, 2k+1+nT]) of one message (signal.pack_rows); ids travel as int32
    bit patterns, the log tail masses at the recipe's nT tail temperatures (teacher.tails) after lse."""
    header = torch.tensor([MAGIC, step, micro, ids.shape[0], ids.shape[1], len(indices)] + indices.tolist(),
                          dtype=torch.int64)
    # the bridge is gloo over CPU tensors on every machine: move the (small) top-k signal off the device
    return header, pack_rows(ids, logits, lse, log_tails).cpu().contiguous()


def unpack(payload: torch.Tensor, k: int):
    """(ids int64 [rows, k], logits fp32 [rows, k], lse fp32 [rows], log_tails fp32 [rows, nT]) of a payload."""
    return unpack_rows(payload, k)


def wait_work(work, timeout_s: float, what: str) -> None:
    try:
        work.wait(timedelta(seconds=timeout_s))
    except RuntimeError as err:
        raise TeacherGroupError(f"{what}: {str(err).splitlines()[0][:300]}") from None

