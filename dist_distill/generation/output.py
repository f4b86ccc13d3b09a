"""The files of one generation: chunks published atomically, the build identity, the merged dataset.

Layout of ``generate.output_dir``:

    build.json                   the identity of this generation (teacher by content, prompt set, sampling,
                                 batching, backend) and its sha256; a directory of another build is refused
    chunks/chunk-NNNNNN.jsonl    the output records of prompts [N*C, (N+1)*C) (C = generate.chunk_prompts),
                                 prompt-major, samples in order
    chunks/chunk-NNNNNN.json     its sidecar: records, skipped prompts by kind, sha256 of the .jsonl, the
                                 build's sha256. Written after the .jsonl: a chunk is complete iff its sidecar
                                 exists, names this build and the file's sha256 matches
    generated.jsonl              all chunks concatenated in prompt order: what data.train reads
    manifest.json                written last: teacher, sampling parameters, prompt set, counts, per-chunk
                                 sha256 and the sha256 of generated.jsonl

Every file is written to a temporary name, fsynced and renamed (training.checkpoint.write_atomic), so a
kill leaves complete files or none. At 1M prompts and C=256: 3907 chunks; the merge is one sequential
copy (64 KiB buffers), never the whole dataset in memory.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import time
from pathlib import Path

from dist_distill.errors import UserError
from dist_distill.training.checkpoint import write_atomic

FORMAT = "dd-generated-v1"
MERGED, MANIFEST, BUILD = "generated.jsonl", "manifest.json", "build.json"
STALE_S = 60.0
"""A temporary chunk file older than this is a killed writer's and is removed by the next writer of that chunk."""


def chunk_path(out: Path, index: int) -> Path:
    return out / "chunks" / f"chunk-{index:06d}.jsonl"


def sidecar_path(out: Path, index: int) -> Path:
    return out / "chunks" / f"chunk-{index:06d}.json"


def identity_sha(identity: dict) -> str:
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(a) | set(b)):
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{key}.")
        elif x != y:
            out.append(f"{prefix}{key} (the directory has {x!r}, this run {y!r})")
    return out


def bind_output(out: Path, identity: dict) -> str:
    """Record `identity` in out/build.json, or check that it is the one there; returns its sha256.

    Array tasks and ranks starting together all write the same bytes (the rename is atomic, the last
    one wins with the same content). A directory of another build is refused naming what differs."""
    sha = identity_sha(identity)
    (out / "chunks").mkdir(parents=True, exist_ok=True)
    path = out / BUILD
    if path.is_file():
        theirs = json.loads(path.read_text())
        if theirs.get("sha256") != sha:
            why = "; ".join(_differences(theirs.get("identity", {}), identity)[:3]) or "unknown build"
            raise UserError(f"generate.output_dir={out} holds another generation: {why}. Nothing was changed; "
                            "point generate.output_dir at a new directory (or delete this one)")
        return sha
    write_atomic(path, json.dumps({"identity": identity, "sha256": sha}, indent=1, sort_keys=True))
    return sha


def chunk_done(out: Path, index: int, build_sha: str, check_sha: bool = False) -> bool:
    """Whether chunk `index` is complete for this build (check_sha: also re-hash its file)."""
    side = sidecar_path(out, index)
    if not side.is_file():
        return False
    meta = json.loads(side.read_text())
    if meta.get("build_sha256") != build_sha or not chunk_path(out, index).is_file():
        return False
    return not check_sha or _file_sha(chunk_path(out, index)) == meta["sha256"]


def _file_sha(path: Path) -> str:
    from dist_distill.teacher.cache.format import sha256_file

    return sha256_file(path)


def write_chunk(out: Path, index: int, lines: list[bytes], meta: dict, build_sha: str, fault=None) -> None:
    """Publish chunk `index`: its records (one JSON line each) then the sidecar that marks it complete.
    `fault(tmp_file)`: the fault-injection seam (training.faults.generate_fault), called half-way."""
    data = b"".join(lines)
    path = chunk_path(out, index)
    for stale in path.parent.glob(f".{path.with_suffix('').name}.json*.tmp*"):  # a killed attempt's leftovers
        if time.time() - stale.stat().st_mtime > STALE_S:  # (a live writer's exists for milliseconds)
            stale.unlink(missing_ok=True)
    if fault is not None:
        tmp = path.with_name(f".{path.name}.tmp{socket.gethostname()}.{os.getpid()}")
        with open(tmp, "wb") as f:
            f.write(data[:len(data) // 2])
            f.flush()
            fault(tmp)
    write_atomic(path, data)
    side = dict(meta, index=index, file=path.name, bytes=len(data), sha256=hashlib.sha256(data).hexdigest(),
                build_sha256=build_sha)
    write_atomic(sidecar_path(out, index), json.dumps(side, sort_keys=True))


def merge(out: Path, num_chunks: int, build_sha: str, manifest: dict) -> bool:
    """Concatenate every chunk into out/generated.jsonl and write out/manifest.json, if all chunks are
    complete (each hashed while copied and checked against its sidecar); True when done. Idempotent: two workers that finish
    at once write the same bytes."""
    if not all(chunk_done(out, c, build_sha) for c in range(num_chunks)):
        return False
    if (out / MANIFEST).is_file() and (out / MERGED).is_file() \
            and json.loads((out / MANIFEST).read_text()).get("build_sha256") == build_sha:
        return True  # merged before (chunks are only ever published complete, so nothing can have changed)
    sides = [json.loads(sidecar_path(out, c).read_text()) for c in range(num_chunks)]
    final = out / MERGED
    tmp = final.with_name(f".{final.name}.tmp{socket.gethostname()}.{os.getpid()}")
    digest = hashlib.sha256()
    try:
        with open(tmp, "wb") as dst:
            for c, side in enumerate(sides):
                piece = hashlib.sha256()
                with open(chunk_path(out, c), "rb") as src:
                    for block in iter(lambda: src.read(1 << 16), b""):
                        piece.update(block)
                        digest.update(block)
                        dst.write(block)
                if piece.hexdigest() != side["sha256"]:
                    raise UserError(f"{chunk_path(out, c)} does not match its sidecar's sha256 (changed on disk?); "
                                    f"delete it and {sidecar_path(out, c).name} and re-run the same command to "
                                    "regenerate that chunk")
            dst.flush()
            os.fsync(dst.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, final)
    skipped: dict[str, int] = {}
    for side in sides:
        for kind, n in side["skipped"].items():
            skipped[kind] = skipped.get(kind, 0) + n
    manifest = dict(manifest, build_sha256=build_sha, file=MERGED, sha256=digest.hexdigest(), bytes=final.stat().st_size,
                    records=sum(s["records"] for s in sides), prompts_used=sum(s["prompts"] for s in sides),
                    skipped=skipped, finish={k: sum(s["finish"].get(k, 0) for s in sides) for k in ("stop", "length")},
                    answer_tokens=sum(s["answer_tokens"] for s in sides),
                    empty_answers=sum(s["empty_answers"] for s in sides),
                    chunks=[{k: s[k] for k in ("file", "records", "bytes", "sha256")} for s in sides])
    write_atomic(out / MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
    return True
