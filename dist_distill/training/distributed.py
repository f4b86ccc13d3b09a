"""torch.distributed set-up that works the same under torchrun, the deepspeed launcher and plain python."""

from __future__ import annotations

import os
import socket
from datetime import timedelta

import torch
import torch.distributed as dist


def free_port() -> int:
    """An unused TCP port on localhost (for single-process runs and tests)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_device() -> torch.device:
    """This process's device: cuda:LOCAL_RANK (made current) with CUDA, else the CPU.

    Call before anything is placed: DeepSpeed's init_distributed does not set the CUDA device,
    so without it every rank of a node would allocate on cuda:0.
    """
    if torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    from dist_distill.training import device_check

    return device_check.ACCELERATOR if device_check.enabled() else torch.device("cpu")


def get_accelerator_device() -> str:
    """This rank's device as a string: cuda:<current device> with CUDA, else cpu."""
    if torch.cuda.is_available():
        return f"cuda:{torch.cuda.current_device()}"
    from dist_distill.training import device_check

    return str(device_check.ACCELERATOR) if device_check.enabled() else "cpu"


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def mixed_backend() -> str:
    """gloo for CPU tensors and NCCL for CUDA tensors in one group ("cpu:gloo,cuda:nccl", torch's
    per-device backends) with CUDA, else gloo: CPU bookkeeping stays legal next to NCCL collectives.
    (In the device test mode, training.device_check, the CUDA string: the mode runs it as gloo.)"""
    from dist_distill.training import device_check

    return "cpu:gloo,cuda:nccl" if torch.cuda.is_available() or device_check.enabled() else "gloo"


def init_from_env(backend: str | None = None, timeout_s: float = 600.0) -> tuple[int, int]:
    """Join the process group that the launcher describes (RANK, WORLD_SIZE, MASTER_ADDR/PORT).

    Without a launcher (no WORLD_SIZE), run as a single process and create no group.
    Returns (rank, world_size).
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1 or dist.is_initialized():
        return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    backend = backend or default_backend()
    if "nccl" in backend and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    return dist.get_rank(), dist.get_world_size()


def ensure_single_process_env() -> None:
    """Give a launcher-less run the env DeepSpeed expects (world of 1 on a free local port)."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
