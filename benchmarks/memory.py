"""Process memory as the CPU benchmarks measure it (each cell runs in its own process)."""

from __future__ import annotations

MMAP_THRESHOLD = 1 << 20
"""glibc's mmap threshold the CPU workers run with (MALLOC_MMAP_THRESHOLD_): every buffer of 1 MiB or
more is mapped on allocation and unmapped on free, so RSS follows the live tensors."""


def rss_mib(field: str) -> float:
    """A /proc/self/status memory field in MiB: "VmRSS" (now) or "VmHWM" (the peak so far)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field}")
