"""Teacher top-k logit cache: build it offline once (resumable, distributed), read it during training.

Format "dd-topk-v1":

  <cache_dir>/manifest.json        what was cached and from what; written last, atomically, by rank 0
                                   once every shard exists (fingerprints, codec, shard list + sha256)
  <cache_dir>/shard-00000.ddc      samples [start, stop) of the dataset (binary, see below)
  <cache_dir>/shard-00000.json     sidecar: the shard's range, size, sha256 and error stats; written
                                   after the shard file, it marks the shard complete

Per token the teacher runs over the FULL real vocabulary at T=1; the cache keeps its k largest
logits (ids in storage order, values in the same order), normalised as ``logp = z - lse`` with the
full-vocabulary logsumexp ``lse`` (take top-k after the full logsumexp), and ``lse``. Rows are
stored only where the student has a loss (``targets != IGNORE_INDEX``, the answer tokens);
each sample records which of its L positions have a row, and that layout is fingerprinted
(``dataset.targets_sha256``). Rows align with the student's tokens by (sample index, position):
same tokenizer, same packing, same sequence length.

Codec (dist_distill/cache_codec.py): ids sorted and gap-coded in bit-packed blocks of 8 -- as
token ids, or, when that is smaller, as ranks in the shard's own id frequency order (sections
``id_order_*``: the D distinct ids of the shard by frequency class, gap-coded; the header's
``id_space`` is D);
values either "lossless" (fp32, or bf16 when exact) or "kl" (default): per-row quantised with
the EXACT KL between the renormalised top-k distributions bounded by ``--max-kl`` (1e-3 nats).
Bytes per token (V=151936, measured by benchmarks/bench_cache.py, docs/benchmarks.md):
see the "Teacher cache" section there; ids dominate at large k.

Shard file ``.ddc``: b"DDTOPK\\x01\\x00", u64 length of a JSON header, the header (sections:
name -> [offset, nbytes, dtype, shape]), then 64-byte aligned sections: ``row_mask`` (packed
bits [n, ceil(L/8)]), ``row_start``/``a_start``/``b_start`` (int64 [n+1]: first row and byte
offsets of each sample), ``header`` (per-row struct), ``widths`` (id width nibbles),
``stream_a`` (ids and coarse values), ``stream_b`` (refinements), ``values`` (lossless),
``id_order_sizes``/``id_order_widths``/``id_order_blocks`` (optional, see above).

Building: each shard is written to a temporary name, fsynced and renamed; the sidecar follows
the same way. A re-run skips shards whose sidecar and file (of the recorded size) exist and
redoes the others. Work splits by rank (torchrun / deepspeed) and by ``--shard-index /
--num-shards`` (SLURM array): shard s belongs to worker ``s % (num_shards * world)`` only, so two
writers never write the same shard. Outputs are deterministic: a resumed or a multi-rank build
is byte-identical to an uninterrupted single-process build.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import torch

from . import cache_codec as codec
from .checkpoint import write_atomic
from .errors import UserError, run_cli

FORMAT = "dd-topk-v1"
MANIFEST = "manifest.json"
MAGIC = b"DDTOPK\x01\x00"
SHARD_SUFFIX = ".ddc"
ALIGN = 64


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def _sidecar(cache_dir: Path, index: int) -> Path:
    return cache_dir / f"{shard_name(index)}.json"


def _shard_file(cache_dir: Path, index: int) -> Path:
    return cache_dir / f"{shard_name(index)}{SHARD_SUFFIX}"


def _lock_file(cache_dir: Path, index: int) -> Path:
    return cache_dir / f".{shard_name(index)}.lock"


@contextlib.contextmanager
def shard_lock(cache_dir: Path, index: int):
    """Exclusive, non-blocking lock on shard `index` (``flock`` on a hidden lock file; the kernel
    releases it when its process dies, so a killed writer leaves no stale lock). Yields whether
    this process holds it: two writers never write the same shard (e.g. a requeued array task
    whose first run still lives). The lock file is removed before the lock is released; a writer
    must re-check `shard_done` once it holds the lock."""
    path = _lock_file(cache_dir, index)
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


def shard_done(cache_dir: Path, index: int) -> bool:
    """A shard is complete when its sidecar exists and its file has the size the sidecar records."""
    side, file = _sidecar(cache_dir, index), _shard_file(cache_dir, index)
    if not (side.is_file() and file.is_file()):
        return False
    try:
        return json.loads(side.read_text())["bytes"] == file.stat().st_size
    except (ValueError, KeyError):
        return False


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
    base = _data_start(len(head))
    parts = [MAGIC, struct.pack("<Q", len(head)), head, b"\0" * (base - len(MAGIC) - 8 - len(head))]
    for arr in arrays:
        data = arr.tobytes()
        parts += [data, b"\0" * (-(-len(data) // ALIGN) * ALIGN - len(data))]
    return parts, header


def _data_start(head_len: int) -> int:
    return -(-(len(MAGIC) + 8 + head_len) // ALIGN) * ALIGN


# ---------------------------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------------------------

@torch.no_grad()
def teacher_topk(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, k: int, vocab_size: int):
    """Teacher top-k over the real vocabulary: (ids int32 [B, L, k], logits fp32 [B, L, k], lse fp32 [B, L]).

    The logsumexp runs over the whole real vocabulary before the top-k is taken, so
    ``logits - lse`` are the teacher's full-vocabulary log-probabilities.
    """
    logits = model(input_ids=input_ids.to(model.device),
                   attention_mask=attention_mask.to(model.device)).logits[..., :vocab_size].float()
    lse = torch.logsumexp(logits, dim=-1)
    values, ids = logits.topk(k, dim=-1)
    return ids.to(torch.int32).cpu(), values.cpu(), lse.cpu()


def build_shard(model, data, start: int, stop: int, k: int, vocab_size: int, batch_size: int, mode: str,
                max_kl: float, bar=None) -> tuple[list, dict, dict]:
    """Run the teacher over samples [start, stop), code the target rows; (file buffers, header, stats)."""
    from .data import IGNORE_INDEX

    ids, vals, lse = [], [], []
    for i in range(start, stop, batch_size):
        j = min(i + batch_size, stop)
        mask = data.targets[i:j] != IGNORE_INDEX
        t_ids, t_vals, t_lse = teacher_topk(model, data.input_ids[i:j], data.attention_mask[i:j], k, vocab_size)
        ids.append(t_ids[mask].numpy())
        vals.append(t_vals[mask].numpy())
        lse.append(t_lse[mask].numpy())
        if bar is not None:
            bar.update(int(data.attention_mask[i:j].sum()))
    mask = (data.targets[start:stop] != IGNORE_INDEX).numpy()
    ids, vals, lse = np.concatenate(ids), np.concatenate(vals), np.concatenate(lse)
    return encode_shard(ids, vals, lse, mask, vocab_size, mode, max_kl, start, stop)


def encode_shard(ids, vals, lse, mask, vocab_size: int, mode: str, max_kl: float, start: int = 0,
                 stop: int | None = None) -> tuple[list, dict, dict]:
    """Code rows (ids [R, k], raw logits [R, k], lse [R]) of samples whose row positions are `mask` [n, L]."""
    n, seq_len = mask.shape
    k = ids.shape[1]
    table, ranks, id_space = frequency_ranks(np.asarray(ids), vocab_size)
    enc = codec.encode_rows(ranks, vals, lse, id_space, mode, max_kl)
    rows_per_sample = mask.sum(axis=1)
    row_start = np.concatenate([[0], np.cumsum(rows_per_sample)]).astype(np.int64)
    sample_of_row = np.repeat(np.arange(n), rows_per_sample)
    a_bytes = np.bincount(sample_of_row, weights=enc["len_a"], minlength=n).astype(np.int64)
    b_bytes = np.bincount(sample_of_row, weights=enc["len_b"], minlength=n).astype(np.int64)
    sections = {
        "row_mask": np.packbits(mask, axis=1, bitorder="little"),
        "row_start": row_start,
        "a_start": np.concatenate([[0], np.cumsum(a_bytes)]).astype(np.int64),
        "b_start": np.concatenate([[0], np.cumsum(b_bytes)]).astype(np.int64),
        "header": enc["header"].view(np.uint8).reshape(len(ids), enc["header"].dtype.itemsize),
        "widths": enc["widths"],
        "stream_a": np.concatenate([enc["stream_a"], np.zeros(codec.PAD, np.uint8)]),
        "stream_b": np.concatenate([enc["stream_b"], np.zeros(codec.PAD, np.uint8)]),
    }
    if mode == "lossless":
        sections["values"] = enc["values"]
    sections.update(table or {})
    meta = {"k": k, "mode": mode, "value_dtype": enc["value_dtype"], "num_samples": n, "seq_len": seq_len,
            "rows": int(len(ids)), "start": start, "stop": start + n if stop is None else stop,
            "vocab_size": vocab_size, "id_space": id_space}
    parts, header = serialise_shard(sections, meta)
    kl, err = enc["stats"]["kl"], enc["stats"]["max_abs_err"]
    stats = {"rows": int(len(ids)), "max_kl": float(kl.max()) if len(kl) else 0.0,
             "mean_kl": float(kl.mean()) if len(kl) else 0.0,
             "max_abs_logp_err": float(err.max()) if len(err) else 0.0,
             "mean_max_abs_logp_err": float(err.mean()) if len(err) else 0.0}
    return parts, header, stats


def frequency_ranks(ids: np.ndarray, vocab_size: int):
    """How a shard codes its ids: ``(table, codes, id_space)``.

    When coding each id as its rank in the shard's frequency order (`codec.frequency_order`) is
    smaller, table included, than coding the raw ids: the table's sections (``id_order_sizes``,
    ``id_order_widths``, ``id_order_blocks``), the ranks [R, k] and the number D of distinct
    ids. Otherwise ``(None, ids, vocab_size)``.
    """
    if len(ids) == 0:
        return None, ids, vocab_size
    order, sizes = codec.frequency_order(ids, vocab_size)
    rank_of = np.zeros(vocab_size, dtype=np.int64)
    rank_of[order] = np.arange(len(order))
    ranks = rank_of[ids]
    widths, blocks = codec.pack_order(order, sizes)
    table = {"id_order_sizes": sizes, "id_order_widths": widths, "id_order_blocks": blocks}
    if codec.id_code_bytes(ranks, len(order)) + sum(t.nbytes for t in table.values()) < codec.id_code_bytes(ids, vocab_size):
        return table, ranks, len(order)
    return None, ids, vocab_size


SIDECAR_RESERVE = 64 * 1024  # bytes kept free for the shard's sidecar and the manifest


def write_shard(cache_dir: Path, index: int, start: int, stop: int, parts: list, stats: dict) -> None:
    """Publish a shard: the file first, then the sidecar that marks it complete.

    A shard that does not fit the free space is refused before anything is written; one whose
    writing fails anyway (quota, a concurrent writer) leaves no file behind. Either way the
    error says that the complete shards are intact and that re-running the build resumes.
    """
    digest = hashlib.sha256()
    for p in parts:
        digest.update(p)
    size = sum(len(p) for p in parts)
    file = _shard_file(cache_dir, index)
    free = shutil.disk_usage(cache_dir).free
    if free < size + SIDECAR_RESERVE:
        raise UserError(_write_failure(cache_dir, file, size, f"only {free:,} bytes are free (with "
                                                   f"{SIDECAR_RESERVE:,} kept for the sidecar and manifest)"))
    sidecar = {"index": index, "file": file.name, "start": start, "stop": stop,
               "bytes": size, "sha256": digest.hexdigest(), **stats}
    try:
        write_atomic(file, parts)
        write_atomic(_sidecar(cache_dir, index), json.dumps(sidecar, sort_keys=True).encode())
    except OSError as err:
        file.unlink(missing_ok=True)
        raise UserError(_write_failure(cache_dir, file, size, f"writing failed: {err}")) from None


def _write_failure(cache_dir: Path, file: Path, size: int, why: str) -> str:
    done = sorted(p.name for p in cache_dir.glob("shard-*.json"))
    return (f"cannot write teacher cache shard {file} ({size:,} bytes): {why}. Nothing of this shard was "
            f"kept; the {len(done)} complete shard(s) in {cache_dir} are intact. Free disk space (or raise the quota) "
            "and re-run the same dd-cache build command: it skips the complete shards and resumes here")


def expected_manifest(recipe, tokenizer, data, vocab_size: int) -> dict:
    """The fingerprint fields a cache for this recipe must have (what `check_matches` compares)."""
    from .models import model_fingerprint, tokenizer_fingerprint

    return {
        "format": FORMAT, "k": recipe.teacher_source.top_k, "seq_len": recipe.data.max_seq_len,
        "vocab_size": vocab_size, "num_samples": len(data),
        "teacher": model_fingerprint(recipe.teacher),
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "dataset": {"source": data.source, "split": recipe.data.split, "max_samples": recipe.data.max_samples,
                    "token_ids_sha256": data.fingerprint,
                    "targets_sha256": data.targets_fingerprint},
    }


def _load_teacher(recipe, quantize: str):
    """The teacher model (optionally bitsandbytes 8/4-bit), eval mode, on this rank's CUDA device or the CPU."""
    from .models import load_model
    from .teacher import bnb_kwargs

    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if torch.cuda.is_available() else torch.device("cpu")
    if quantize == "none":
        return load_model(recipe.teacher, "teacher").to(device).eval()
    return load_model(recipe.teacher, "teacher", **bnb_kwargs(quantize, device, f"--quantize {quantize}")).eval()


def build_cache(recipe, *, shard_index: int = 0, num_shards: int = 1, samples_per_shard: int = 4096,
                rank: int = 0, world_size: int = 1, progress: bool = True, mode: str = "kl",
                max_kl: float = 1e-3, quantize: str = "none") -> dict:
    """Run the teacher over the recipe's training data and write this worker's missing shards.

    Returns the manifest without its shard list; `finalize_cache` completes it.
    """
    from tqdm import tqdm

    from .data import load_tokenized
    from .models import load_tokenizer, tokenizer_fingerprint

    if recipe.teacher_source.cache_dir is None:
        raise UserError("teacher_source.cache_dir is not set: where should the cache go?")
    if mode not in codec.MODES:
        raise UserError(f"--mode {mode}: expected one of {', '.join(codec.MODES)}")
    if not 0 < max_kl < 1:
        raise UserError(f"--max-kl {max_kl}: must lie in (0, 1) nats")
    cache_dir = Path(recipe.teacher_source.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(recipe.teacher, "teacher")
    student_tok = load_tokenizer(recipe.student, "student")
    if tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(student_tok):
        raise UserError(f"teacher {recipe.teacher.name_or_path} and student {recipe.student.name_or_path} use "
                        "different tokenizers: token-level logit distillation compares logits of the same "
                        "token ids and is invalid across vocabularies. Use a student with the teacher's "
                        "tokenizer, or a cross-tokenizer strategy (sequence-level KD on teacher text)")
    data = load_tokenized(recipe.data.train, tokenizer, recipe.data, recipe.data.max_samples)
    vocab_size = len(tokenizer)
    k = recipe.teacher_source.top_k
    if k > vocab_size:
        raise UserError(f"teacher_source.top_k={k} is larger than the vocabulary ({vocab_size} tokens)")
    manifest = expected_manifest(recipe, tokenizer, data, vocab_size)
    manifest["teacher"]["quantization"] = quantize
    manifest.update(samples_per_shard=samples_per_shard,
                    codec={"mode": mode, "max_kl": max_kl if mode == "kl" else 0.0, "block": codec.BLOCK,
                           "ids": "ascending (token ids, or per-shard frequency ranks when smaller), gap-coded, "
                                  "bit-packed in blocks of 8 at the block's width",
                           "values": ("per-row coarse b-bit levels + e-bit refinement of the head, exact "
                                      "top-k KL <= max_kl" if mode == "kl" else "raw logits fp32 (bf16 when exact)"),
                           "rows": "positions with targets != -100"})
    num_total = (len(data) + samples_per_shard - 1) // samples_per_shard
    workers, worker = num_shards * world_size, shard_index * world_size + rank
    mine = [s for s in range(num_total) if s % workers == worker and not shard_done(cache_dir, s)]
    if not mine:
        return manifest
    model = _load_teacher(recipe, quantize)
    if model.config.vocab_size < vocab_size:
        raise UserError(f"teacher vocab_size={model.config.vocab_size} is smaller than its tokenizer's {vocab_size}")
    spans = [(s, s * samples_per_shard, min((s + 1) * samples_per_shard, len(data))) for s in mine]
    tokens = int(sum(int(data.attention_mask[a:b].sum()) for _, a, b in spans))
    started, written, rows, worst = time.time(), 0, 0, 0.0
    bar = tqdm(total=tokens, unit="tok", unit_scale=True, desc=f"cache[{worker}/{workers}]", disable=not progress,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} tokens [{elapsed}<{remaining}, {rate_fmt}]")
    for s, start, stop in spans:
        with shard_lock(cache_dir, s) as held:
            if not held:
                print(f"cache worker {worker}/{workers}: shard {s} is being written by another process (it holds "
                      f"{_lock_file(cache_dir, s).name}): skipped", flush=True)
                continue
            if shard_done(cache_dir, s):  # finished by another writer meanwhile
                continue
            for stale in cache_dir.glob(f".{shard_name(s)}.*.tmp*"):  # a killed writer's leftovers, never read
                stale.unlink(missing_ok=True)
            parts, _, stats = build_shard(model, data, start, stop, k, vocab_size, recipe.teacher_source.batch_size,
                                          mode, max_kl, bar)
            write_shard(cache_dir, s, start, stop, parts, stats)
        written += sum(len(p) for p in parts)
        rows += stats["rows"]
        worst = max(worst, stats["max_kl"])
    bar.close()
    took = time.time() - started
    if progress or rank == 0:
        print(f"cache worker {worker}/{workers}: {len(spans)} shards, {tokens} tokens in {took:.1f}s "
              f"({tokens / max(took, 1e-9):.0f} tok/s), {rows} target rows, {written / max(rows, 1):.1f} bytes/row, "
              f"max top-k KL {worst:.2e} nats", flush=True)
    return manifest


def finalize_cache(cache_dir: str | Path, manifest: dict) -> bool:
    """Write manifest.json (every shard's range, size and sha256; error totals) once all shards exist; True if written."""
    cache_dir = Path(cache_dir)
    per_shard = manifest["samples_per_shard"]
    num_total = (manifest["num_samples"] + per_shard - 1) // per_shard
    if not all(shard_done(cache_dir, s) for s in range(num_total)):
        return False
    sides = [json.loads(_sidecar(cache_dir, s).read_text()) for s in range(num_total)]
    rows = sum(x["rows"] for x in sides)
    manifest = dict(manifest, rows=rows, shards=[
        {key: x[key] for key in ("file", "start", "stop", "bytes", "sha256", "rows")} for x in sides])
    manifest["error"] = {
        "max_topk_kl": max((x["max_kl"] for x in sides), default=0.0),
        "mean_topk_kl": sum(x["mean_kl"] * x["rows"] for x in sides) / max(rows, 1),
        "max_abs_logp_err": max((x["max_abs_logp_err"] for x in sides), default=0.0),
        "mean_max_abs_logp_err": sum(x["mean_max_abs_logp_err"] * x["rows"] for x in sides) / max(rows, 1)}
    try:
        write_atomic(cache_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
    except OSError as err:
        raise UserError(f"cannot write {cache_dir / MANIFEST}: {err}. All {num_total} shards are complete and "
                        "intact; free disk space and re-run dd-cache build, which then only writes the manifest") from None
    return True


# ---------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------

class _Shard:
    """One memory-mapped shard file, its sections checked against its header and the manifest."""

    def __init__(self, path: Path, entry: dict, manifest: dict):
        self.path = path
        if not path.is_file():
            raise UserError(f"teacher cache shard {path} is missing (listed in the manifest): re-run dd-cache build "
                            "with the same recipe to rebuild it")
        size = path.stat().st_size
        if size != entry["bytes"]:
            raise UserError(f"teacher cache shard {path} fails its size check: {size} bytes, the manifest records "
                            f"{entry['bytes']} (truncated or replaced); delete it and its .json and re-run dd-cache build")
        mm = np.memmap(path, dtype=np.uint8, mode="r")
        if bytes(mm[:len(MAGIC)]) != MAGIC:
            raise UserError(f"teacher cache shard {path} fails its magic-number check: not a {FORMAT} shard")
        (head_len,) = struct.unpack("<Q", bytes(mm[len(MAGIC):len(MAGIC) + 8]))
        try:
            self.header = json.loads(bytes(mm[len(MAGIC) + 8:len(MAGIC) + 8 + head_len]))
        except ValueError:
            raise UserError(f"teacher cache shard {path} fails its header check: the JSON header is unreadable") from None
        h = self.header
        for key in ("k", "seq_len", "vocab_size"):
            if h[key] != manifest[key]:
                raise UserError(f"teacher cache shard {path} fails its header check: {key}={h[key]}, the manifest "
                                f"says {manifest[key]}")
        if (h["start"], h["stop"]) != (entry["start"], entry["stop"]):
            raise UserError(f"teacher cache shard {path} fails its range check: samples [{h['start']}, {h['stop']}), "
                            f"the manifest says [{entry['start']}, {entry['stop']})")
        header_dtype = codec.HEADER_KL if h["mode"] == "kl" else codec.HEADER_LOSSLESS
        self.s = {}
        base = _data_start(head_len)
        for name, (off, nbytes, dtype, shape) in h["sections"].items():
            if base + off + nbytes > size:
                raise UserError(f"teacher cache shard {path} fails its section check: {name} ends past the file")
            self.s[name] = mm[base + off:base + off + nbytes].view(np.dtype(dtype)).reshape(shape)
        self.s["header"] = self.s["header"].view(header_dtype).reshape(-1)
        self.k, self.mode, self.value_dtype = h["k"], h["mode"], h["value_dtype"]
        self.seq_len, self.vocab_size, self.start = h["seq_len"], h["vocab_size"], h["start"]
        self.id_space = h.get("id_space", self.vocab_size)  # ids coded as frequency ranks in [0, id_space)
        self.id_order = None
        if "id_order_sizes" in self.s:
            sizes = np.asarray(self.s["id_order_sizes"])
            order = codec.unpack_order(self.s["id_order_widths"], self.s["id_order_blocks"], sizes) \
                if sizes.sum() == self.id_space else None
            if order is None or (len(order) and (order.min() < 0 or order.max() >= self.vocab_size)):
                raise UserError(f"teacher cache shard {path} fails its id table check: the table does not hold "
                                f"{self.id_space} ids of a {self.vocab_size}-token vocabulary")
            self.id_order = order.astype(np.int64)
        self.nb2 = self.s["widths"].shape[1] if self.s["widths"].ndim == 2 else 0

    def decode(self, local: np.ndarray, ids_dtype=np.int32):
        """Rows of samples `local` (shard-relative): ids [R, k] (`ids_dtype`), values fp32 [R, k], lse [R], positions mask [n, L].

        The samples' byte ranges of both streams are copied out of the memory map into one
        compact buffer each (the only reads of the shard), then decoded with local offsets.
        """
        s = self.s
        first, last = s["row_start"][local], s["row_start"][local + 1]
        counts = (last - first).astype(np.int64)
        rows = np.repeat(first - _excl(counts), counts) + np.arange(int(counts.sum()))
        seg = np.repeat(np.arange(len(local)), counts)
        header = s["header"][rows]
        widths = s["widths"][rows]
        nb = codec._kpad(self.k) // codec.BLOCK
        id_w = codec.id_widths_from_codes(codec.unpack_nibbles(widths, nb), self.id_space)
        len_a = id_w.sum(axis=1)
        if self.mode == "kl":
            len_a += nb * ((header["be"] & 15).astype(np.int64) + 1)
        buf_a, start_a = _gather_ranges(s["stream_a"], s["a_start"][local], s["a_start"][local + 1])
        buf_b, start_b = _gather_ranges(s["stream_b"], s["b_start"][local], s["b_start"][local + 1])
        csum = _excl(len_a)
        first_row = np.minimum(_excl(counts), max(len(csum) - 1, 0))
        off_a = np.repeat(start_a, counts) + csum - (np.repeat(csum[first_row], counts) if len(csum) else 0)
        values = s["values"][rows] if self.mode == "lossless" else None
        ids, vals, lse = codec.decode_rows(self.k, self.id_space, self.mode, self.value_dtype, header, widths,
                                           buf_a, off_a, values, buf_b, np.repeat(start_b, counts), seg,
                                           ids_dtype=ids_dtype)
        if self.id_order is not None:  # frequency ranks -> token ids
            ids = np.take(self.id_order, ids, mode="clip").astype(ids_dtype, copy=False)
        mask = np.unpackbits(s["row_mask"][local], axis=1, count=self.seq_len, bitorder="little").astype(bool)
        return ids, vals, lse, mask


def _gather_ranges(stream: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Bytes [lo_i, hi_i) of `stream` for each i, concatenated and padded; and where each range starts."""
    lengths = (hi - lo).astype(np.int64)
    starts = _excl(lengths)
    if len(lo) > 1 and np.all(lo[1:] == hi[:-1]):  # consecutive samples: one slice
        return np.concatenate([stream[lo[0]:hi[-1]], np.zeros(codec.PAD, np.uint8)]), starts
    return np.concatenate([stream[a:b] for a, b in zip(lo, hi)] + [np.zeros(codec.PAD, np.uint8)]), starts


def _excl(x: np.ndarray) -> np.ndarray:
    return np.cumsum(x) - x


class TeacherCache:
    """Random access to a built cache by sample index; shards are memory-mapped on first use.

    Safe to use from DataLoader workers: the memory maps are opened lazily in each process and
    are not pickled.
    """

    def __init__(self, cache_dir: str | Path):
        self.dir = Path(cache_dir)
        path = self.dir / MANIFEST
        if not path.is_file():
            raise UserError(f"teacher cache {self.dir}: no {MANIFEST} (the cache is missing or its build did not "
                            "finish; run dd-cache with this recipe)")
        try:
            self.manifest = json.loads(path.read_text())
        except ValueError as err:
            raise UserError(f"teacher cache manifest {path} fails its JSON check: {err}") from None
        if self.manifest.get("format") != FORMAT:
            raise UserError(f"teacher cache manifest {path} fails its format check: format "
                            f"{self.manifest.get('format')!r}, this reader needs {FORMAT!r}; rebuild the cache")
        self._shards: dict[int, _Shard] = {}
        self._starts = [s["start"] for s in self.manifest["shards"]]

    def __getstate__(self):
        return {"dir": self.dir, "manifest": self.manifest, "_starts": self._starts, "_shards": {}}

    def check_matches(self, expected: dict) -> None:
        """Refuse a cache built for another tokenizer, sequence length, vocabulary, dataset or a smaller k."""
        m = self.manifest
        where = self.dir / MANIFEST
        checks = [
            ("tokenizer", m["tokenizer_sha256"], expected["tokenizer_sha256"]),
            ("sequence length (data.max_seq_len)", m["seq_len"], expected["seq_len"]),
            ("vocabulary size", m["vocab_size"], expected["vocab_size"]),
            ("dataset token ids", m["dataset"]["token_ids_sha256"], expected["dataset"]["token_ids_sha256"]),
        ]
        if "targets_sha256" in expected.get("dataset", {}):
            checks.append(("target positions (prompt/answer split)", m["dataset"]["targets_sha256"],
                           expected["dataset"]["targets_sha256"]))
        if "num_samples" in expected:
            checks.append(("number of samples", m["num_samples"], expected["num_samples"]))
        for what, have, want in checks:
            if have != want:
                raise UserError(f"teacher cache {self.dir} was built for another {what}: the cache has {have!r}, "
                                f"this recipe needs {want!r} ({where} fails the {what} check). Rebuild the cache "
                                "with dd-cache for this recipe, or point teacher_source.cache_dir at the matching cache")
        if m["k"] < expected["k"]:
            raise UserError(f"teacher cache {self.dir} keeps k={m['k']} logits per token, the recipe asks "
                            f"teacher_source.top_k={expected['k']} ({where} fails the k check)")

    def shard(self, index: int) -> _Shard:
        if index not in self._shards:
            entry = self.manifest["shards"][index]
            self._shards[index] = _Shard(self.dir / entry["file"], entry, self.manifest)
        return self._shards[index]

    def rows(self, indices, ids_dtype=np.int32) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Stored rows of samples `indices`, in order: ids [R, K] (`ids_dtype`, int32 or int64), raw
        logits fp32 [R, K], lse [R], and the positions that hold them, bool [B, L] (row-major order
        of the True entries)."""
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(idx) and (idx.min() < 0 or idx.max() >= self.manifest["num_samples"]):
            raise IndexError(f"sample index out of range [0, {self.manifest['num_samples']})")
        shard_of = np.searchsorted(np.asarray(self._starts), idx, side="right") - 1
        parts, masks = [], np.zeros((len(idx), self.manifest["seq_len"]), dtype=bool)
        # consecutive runs of the same shard keep the output in request order
        cut = np.flatnonzero(np.diff(shard_of)) + 1
        for run in np.split(np.arange(len(idx)), cut):
            if len(run) == 0:
                continue
            sh = self.shard(int(shard_of[run[0]]))
            ids, vals, lse, mask = sh.decode(idx[run] - sh.start, ids_dtype)
            parts.append((ids, vals, lse))
            masks[run] = mask
        if len(parts) == 1:
            return (*parts[0], masks)
        return (*(np.concatenate([p[i] for p in parts]) for i in range(3)), masks)

    def fetch(self, indices: torch.Tensor, k: int | None = None):
        """Teacher signal for samples `indices` (int64 [B]): ids int64 [B, L, k], logits fp32 [B, L, k], lse fp32 [B, L].

        ``logits - lse[..., None]`` are the teacher's full-vocabulary log-probabilities (T=1). The k
        entries of a row are in storage order (ascending id, or ascending frequency rank in shards
        that code ids as ranks; not value order). Positions without a stored
        row (``targets == IGNORE_INDEX``) hold zeros. With ``k`` below the cache's k, each row keeps
        its k most probable entries.
        """
        kk = self.manifest["k"] if k is None else k
        if kk > self.manifest["k"]:
            raise UserError(f"teacher cache {self.dir} keeps k={self.manifest['k']} logits per token, asked for {kk}")
        ids, vals, lse, mask = self.rows(indices.cpu().numpy() if torch.is_tensor(indices) else indices, np.int64)
        ids, vals = torch.from_numpy(ids), torch.from_numpy(vals)
        if kk < ids.shape[1]:
            vals, pick = vals.topk(kk, dim=1, sorted=False)
            ids = ids.gather(1, pick)
        b, length = mask.shape
        lse = torch.from_numpy(lse)
        if mask.all():  # every position holds a row: the rows are the [B, L] grid already
            return ids.view(b, length, kk), vals.view(b, length, kk), lse.view(b, length)
        where = torch.from_numpy(np.flatnonzero(mask.reshape(-1)))
        out_ids = torch.zeros(b * length, kk, dtype=torch.int64).index_copy_(0, where, ids)
        out_vals = torch.zeros(b * length, kk, dtype=torch.float32).index_copy_(0, where, vals)
        out_lse = torch.zeros(b * length, dtype=torch.float32).index_copy_(0, where, lse)
        return out_ids.view(b, length, kk), out_vals.view(b, length, kk), out_lse.view(b, length)

    def row_mask(self, indices) -> torch.Tensor:
        """bool [B, L]: the positions of samples `indices` that hold a teacher row."""
        idx = np.asarray(indices.cpu().numpy() if torch.is_tensor(indices) else indices, dtype=np.int64)
        shard_of = np.searchsorted(np.asarray(self._starts), idx, side="right") - 1
        out = np.zeros((len(idx), self.manifest["seq_len"]), dtype=bool)
        for i, (s, j) in enumerate(zip(shard_of, idx)):
            sh = self.shard(int(s))
            out[i] = np.unpackbits(sh.s["row_mask"][j - sh.start], count=sh.seq_len, bitorder="little").astype(bool)
        return torch.from_numpy(out)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def _cmd_build(args) -> int:
    from .distributed import init_from_env
    from .recipe import load_recipe

    recipe = load_recipe(args.recipe, args.set)
    rank, world = init_from_env(backend="gloo")
    started = time.time()
    manifest = build_cache(recipe, shard_index=args.shard_index, num_shards=args.num_shards,
                           samples_per_shard=args.samples_per_shard, rank=rank, world_size=world,
                           progress=rank == 0 and not args.quiet, mode=args.mode, max_kl=args.max_kl,
                           quantize=args.quantize)
    if world > 1:
        torch.distributed.barrier()
    if rank == 0:
        where = recipe.teacher_source.cache_dir
        if finalize_cache(where, manifest):
            print(f"teacher cache complete: {where} ({time.time() - started:.1f}s)\n" + info_text(where))
        else:
            print(f"this worker's shards are written to {where}; the manifest is written when all shards exist "
                  "(re-run any task, or the last one to finish writes it)")
    return 0


def info_text(cache_dir: str | Path) -> str:
    """Summary of a cache: k, samples, tokens with a row, bytes per token, compression vs dense bf16 and raw top-k."""
    cache = TeacherCache(cache_dir)
    m = cache.manifest
    rows = max(m["rows"], 1)
    size = sum(s["bytes"] for s in m["shards"])
    dense = 2 * m["vocab_size"]
    raw = m["k"] * (2 + 4) + 4  # bf16 values + int32 ids + fp32 lse
    err = m.get("error", {})
    codec_line = m["codec"]["mode"] + (f" (max top-k KL bound {m['codec']['max_kl']:g} nats)" if m["codec"]["mode"] == "kl" else "")
    return (f"format {m['format']}  k={m['k']}  samples={m['num_samples']}  tokens with a row={m['rows']}  "
            f"vocab={m['vocab_size']}  seq_len={m['seq_len']}\n"
            f"codec {codec_line}\n"
            f"bytes/token={size / rows:.1f}  (all files: {size} bytes)\n"
            f"vs dense bf16 logits ({dense} bytes/token): {dense * rows / size:.1f}x smaller\n"
            f"vs raw top-k bf16 values + int32 ids + fp32 lse ({raw} bytes/token): {raw * rows / size:.2f}x smaller\n"
            f"measured error: max top-k KL {err.get('max_topk_kl', 0):.3g} nats (mean {err.get('mean_topk_kl', 0):.3g}), "
            f"max |log-prob error| {err.get('max_abs_logp_err', 0):.3g}")


def _cmd_info(args) -> int:
    print(info_text(args.cache_dir))
    return 0


def verify_cache(cache_dir: str | Path) -> int:
    """Check the manifest and every shard (presence, size, sha256, header); returns the number of shards."""
    cache = TeacherCache(cache_dir)
    m = cache.manifest
    for key in ("k", "seq_len", "vocab_size", "num_samples", "tokenizer_sha256", "dataset", "teacher", "codec", "shards"):
        if key not in m:
            raise UserError(f"teacher cache manifest {cache.dir / MANIFEST} fails its field check: no {key!r}")
    expect = 0
    for i, shard in enumerate(m["shards"]):
        path = cache.dir / shard["file"]
        if shard["start"] != expect:
            raise UserError(f"teacher cache manifest {cache.dir / MANIFEST} fails its coverage check: {shard['file']} "
                            f"starts at sample {shard['start']}, expected {expect}")
        expect = shard["stop"]
        cache.shard(i)  # presence, size, magic, header, ranges
        if sha256_file(path) != shard["sha256"]:
            raise UserError(f"teacher cache shard {path} fails its sha256 check (corrupted); delete it and its "
                            ".json and re-run dd-cache build")
    if expect != m["num_samples"]:
        raise UserError(f"teacher cache manifest {cache.dir / MANIFEST} fails its coverage check: shards end at "
                        f"sample {expect}, the dataset has {m['num_samples']}")
    return len(m["shards"])


def _cmd_verify(args) -> int:
    n = verify_cache(args.cache_dir)
    print(f"ok: manifest and {n} shards verified in {args.cache_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dd-cache", description="Build, inspect and verify a teacher top-k logit cache.")
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="run the teacher over the recipe's training data and write the cache")
    build.add_argument("recipe", help="YAML recipe (teacher, data, teacher_source.cache_dir/top_k/batch_size)")
    build.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a recipe field, e.g. --set teacher_source.top_k=32 (repeatable)")
    build.add_argument("--shard-index", type=int, default=0, help="this task's index in a SLURM array (0-based)")
    build.add_argument("--num-shards", type=int, default=1, help="number of tasks sharing the work")
    build.add_argument("--samples-per-shard", type=int, default=4096, help="samples per cache shard file")
    build.add_argument("--mode", choices=codec.MODES, default="kl",
                       help="value coding: kl (lossy, top-k KL per token <= --max-kl) or lossless (default kl)")
    build.add_argument("--max-kl", type=float, default=1e-3,
                       help="mode kl: bound on KL(exact || stored) of each token's top-k distribution, nats (default 1e-3)")
    build.add_argument("--quantize", choices=("none", "8bit", "4bit"), default="none",
                       help="load the teacher with bitsandbytes 8-bit or 4-bit (NF4) weights, on CUDA or the CPU (default none)")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    build.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    build.set_defaults(func=_cmd_build)
    info = sub.add_parser("info", help="print k, tokens, bytes per token and compression of a cache")
    info.add_argument("cache_dir", help="cache directory")
    info.set_defaults(func=_cmd_info)
    verify = sub.add_parser("verify", help="check the manifest and every shard (size, header, sha256)")
    verify.add_argument("cache_dir", help="cache directory")
    verify.set_defaults(func=_cmd_verify)
    args = parser.parse_args(argv)
    if getattr(args, "num_shards", 1) < 1 or not 0 <= getattr(args, "shard_index", 0) < getattr(args, "num_shards", 1):
        raise UserError(f"--shard-index must lie in [0, --num-shards); got {args.shard_index} of {args.num_shards}")
    return args.func(args)


def cli() -> None:
    """Console-script entry point: bad input exits 2 with a one-paragraph message."""
    raise SystemExit(run_cli(main, "dd-cache"))


if __name__ == "__main__":
    cli()
