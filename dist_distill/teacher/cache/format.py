"""The dd-topk shard and manifest layout on disk: names, locks, completion markers, serialisation.

See :mod:`dist_distill.teacher.cache` for the format as a whole.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import struct
from pathlib import Path

import numpy as np

FORMAT = "dd-topk-v3"
"""v3: the exact log tail mass outside the top-k per row at each of the manifest's ``tail_temperatures``
(section ``log_tail``, float32 [rows, nT]: teacher.tails). v2: per-sample CRC32 checksums (section
``sample_crc``), and every shard bound to one build (its identity in every sidecar and the manifest).
Older caches are refused with a message to rebuild."""
MANIFEST = "manifest.json"
MAGIC = b"DDTOPK\x03\x00"
SHARD_SUFFIX = ".ddc"
ALIGN = 64


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def sidecar_path(cache_dir: Path, index: int) -> Path:
    return cache_dir / f"{shard_name(index)}.json"


def shard_path(cache_dir: Path, index: int) -> Path:
    return cache_dir / f"{shard_name(index)}{SHARD_SUFFIX}"


def lock_path(cache_dir: Path, index: int) -> Path:
    return cache_dir / f".{shard_name(index)}.lock"


@contextlib.contextmanager
def shard_lock(cache_dir: Path, index: int):
    """Exclusive, non-blocking lock on shard `index` (``flock`` on a hidden lock file; the kernel
    releases it when its process dies, so a killed writer leaves no stale lock). Yields whether
    this process holds it: two writers never write the same shard (e.g. a requeued array task
    whose first run still lives). The lock file is removed before the lock is released; a writer
    must re-check `shard_done` once it holds the lock."""
    path = lock_path(cache_dir, index)
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            path.unlink(missing_ok=True)
    finally:
        os.close(fd)


def shard_done(cache_dir: Path, index: int, build_sha: str | None = None, check_sha: bool = False) -> bool:
    """A shard is complete when its sidecar exists and its file has the size the sidecar records; with
    `build_sha`, the sidecar must also record that build (teacher, tokenizer, data, settings:
    writer.build_identity), and with `check_sha` the file's sha256 must be the sidecar's (reads the file)."""
    side, file = sidecar_path(cache_dir, index), shard_path(cache_dir, index)
    if not (side.is_file() and file.is_file()):
        return False
    try:
        record = json.loads(side.read_text())
        if record["bytes"] != file.stat().st_size:
            return False
        if build_sha is not None and record.get("build_sha256") != build_sha:
            return False
        return not check_sha or sha256_file(file) == record["sha256"]
    except (ValueError, KeyError):
        return False


ROWWISE = ("header", "widths", "values", "log_tail")
"""Sections with one entry per row, covered by the per-sample checksums."""


def sample_checksums(sections: dict, row_start: np.ndarray, a_start: np.ndarray, b_start: np.ndarray) -> np.ndarray:
    """uint32 [n]: CRC32 of each sample's bytes in every per-row section (its header, width, lossless
    value and tail rows, row-mask row, and its ranges of both streams) -- what a read of that sample
    decodes, checked on every read (``_Shard.decode``)."""
    import zlib

    n = len(row_start) - 1
    out = np.empty(n, dtype=np.uint32)
    rowwise = [np.ascontiguousarray(sections[k]).view(np.uint8).reshape(len(sections[k]), -1)
               for k in ROWWISE if k in sections and len(sections[k])]
    mask = np.ascontiguousarray(sections["row_mask"])
    sa, sb = sections["stream_a"], sections["stream_b"]
    for i in range(n):
        r0, r1 = int(row_start[i]), int(row_start[i + 1])
        crc = zlib.crc32(mask[i].tobytes())
        for rows in rowwise:
            crc = zlib.crc32(rows[r0:r1].tobytes(), crc)
        crc = zlib.crc32(sa[int(a_start[i]):int(a_start[i + 1])].tobytes(), crc)
        out[i] = zlib.crc32(sb[int(b_start[i]):int(b_start[i + 1])].tobytes(), crc)
    return out


def serialise_shard(sections: dict, meta: dict) -> tuple[list, dict]:
    """Shard bytes (list of buffers) for named numpy arrays, and its header.

    Section offsets in the header count from the start of the data area, the first multiple of
    `ALIGN` after the header, so the header does not depend on its own length.
    """
    layout, offset, arrays = {}, 0, []
    for name, arr in sections.items():
        arr = np.ascontiguousarray(arr)
        layout[name] = [offset, arr.nbytes, arr.dtype.str, list(arr.shape)]
        offset += -(-arr.nbytes // ALIGN) * ALIGN
        arrays.append(arr)
    header = dict(meta, sections=layout)
    head = json.dumps(header, sort_keys=True).encode()
    base = data_start(len(head))
    parts = [MAGIC, struct.pack("<Q", len(head)), head, b"\0" * (base - len(MAGIC) - 8 - len(head))]
    for arr in arrays:
        data = arr.tobytes()
        parts += [data, b"\0" * (-(-len(data) // ALIGN) * ALIGN - len(data))]
    return parts, header


def data_start(head_len: int) -> int:
    return -(-(len(MAGIC) + 8 + head_len) // ALIGN) * ALIGN

