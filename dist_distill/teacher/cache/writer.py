"""Building a teacher cache: score the data with the teacher, code the rows, publish shards, write the manifest."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from dist_distill.data.grading import sample_confidence
from dist_distill.errors import UserError
from dist_distill.training.checkpoint import write_atomic
from dist_distill.teacher.cache import codec
from dist_distill.teacher.signal import pack_rows, unpack_rows_numpy
from dist_distill.teacher.cache.format import (FORMAT, MANIFEST, lock_path, sample_checksums, serialise_shard,
                                               shard_done, shard_lock, shard_name, shard_path, sidecar_path)



def encode_shard(ids, vals, lse, log_tails, mask, vocab_size: int, mode: str, max_kl: float, start: int = 0,
                 stop: int | None = None, tail_temperatures=(1.0,)) -> tuple[list, dict, dict]:
    """Code rows (ids [R, k], raw logits [R, k], lse [R], log tail masses [R, nT] at `tail_temperatures`,
    stored exactly as float32) of samples whose row positions are `mask` [n, L]."""
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
    log_tails = np.asarray(log_tails, dtype=np.float32).reshape(len(ids), len(tail_temperatures))
    sections["log_tail"] = log_tails
    sections["sample_crc"] = sample_checksums(sections, row_start, sections["a_start"], sections["b_start"])
    sections.update(table or {})
    meta = {"k": k, "mode": mode, "value_dtype": enc["value_dtype"], "num_samples": n, "seq_len": seq_len,
            "rows": int(len(ids)), "start": start, "stop": start + n if stop is None else stop,
            "vocab_size": vocab_size, "id_space": id_space, "tail_temperatures": [float(t) for t in tail_temperatures]}
    parts, header = serialise_shard(sections, meta)
    kl, err = enc["stats"]["kl"], enc["stats"]["max_abs_err"]
    rkl = enc["stats"].get("rkl", np.zeros(0))
    stats = {"rows": int(len(ids)), "max_kl": float(kl.max()) if len(kl) else 0.0,
             "mean_kl": float(kl.mean()) if len(kl) else 0.0,
             "max_rkl": float(rkl.max()) if len(rkl) else 0.0,
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


def write_shard(cache_dir: Path, index: int, start: int, stop: int, parts: list, stats: dict,
                build: tuple[dict, str] | None = None) -> None:
    """Publish a shard: the file first, then the sidecar that marks it complete.

    A shard that does not fit the free space is refused before anything is written; one whose
    writing fails anyway (quota, a concurrent writer) leaves no file behind. Either way the
    error says that the complete shards are intact and that re-running the build resumes.
    """
    digest = hashlib.sha256()
    for p in parts:
        digest.update(p)
    size = sum(len(p) for p in parts)
    file = shard_path(cache_dir, index)
    free = shutil.disk_usage(cache_dir).free
    if free < size + SIDECAR_RESERVE:
        raise UserError(_write_failure(cache_dir, file, size, f"only {free:,} bytes are free (with "
                                                   f"{SIDECAR_RESERVE:,} kept for the sidecar and manifest)"))
    sidecar = {"index": index, "file": file.name, "start": start, "stop": stop,
               "bytes": size, "sha256": digest.hexdigest(), **stats}
    if build is not None:  # (identity, sha256) of the build: binds the shard to its teacher, data and settings
        sidecar.update(build_identity=build[0], build_sha256=build[1])
    try:
        write_atomic(file, parts)
        write_atomic(sidecar_path(cache_dir, index), json.dumps(sidecar, sort_keys=True).encode())
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
    from dist_distill.models.loading import model_fingerprint, tokenizer_fingerprint
    from dist_distill.teacher.tails import tail_temperatures

    return {
        "format": FORMAT, "k": recipe.teacher_source.top_k, "seq_len": recipe.data.max_seq_len,
        "vocab_size": vocab_size, "num_samples": len(data), "tail_temperatures": list(tail_temperatures(recipe)),
        "teacher": model_fingerprint(recipe.teacher, tokenizer),
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "dataset": {"source": data.source, "split": recipe.data.split, "max_samples": recipe.data.max_samples,
                    "token_ids_sha256": data.fingerprint,
                    "targets_sha256": data.targets_fingerprint},
    }


IDENTITY = [("teacher config", ("teacher", "config_sha256")), ("teacher weights", ("teacher", "weights_sha256")),
            ("teacher quantization", ("teacher", "quantization")), ("tokenizer", ("tokenizer_sha256",)),
            ("dataset token ids", ("dataset", "token_ids_sha256")),
            ("target positions (prompt/answer split)", ("dataset", "targets_sha256")),
            ("number of samples", ("num_samples",)), ("sequence length", ("seq_len",)), ("vocabulary size", ("vocab_size",)),
            ("top-k (teacher_source.top_k)", ("k",)), ("samples per shard", ("samples_per_shard",)),
            ("codec", ("codec", "mode")), ("KL bound (--max-kl)", ("codec", "max_kl")),
            ("tail temperatures (loss.temperature, teacher_source.tail_temperatures)", ("tail_temperatures",)),
            ("format", ("format",))]
"""What binds a cache directory to one build: (what, path in the manifest)."""


def build_identity(manifest: dict) -> tuple[dict, str]:
    """The identity fields of a build's manifest and their sha256 (what every sidecar records)."""
    def get(d, path):
        for key in path:
            d = d.get(key) if isinstance(d, dict) else None
        return d

    identity = {what: get(manifest, path) for what, path in IDENTITY}
    return identity, hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()


def bind_cache_dir(cache_dir: Path, manifest: dict, start_over: bool) -> str:
    """Check that `cache_dir` holds nothing of another build and return this build's sha256.

    Every shard's sidecar records the identity of the build that wrote it (teacher by content,
    tokenizer, data, targets, settings), and so does a finished cache's manifest. A directory with
    shards or a manifest of another build -- or of unknown origin -- is refused naming what differs,
    so that no old shard is ever relabelled or mixed in. With `start_over` it is moved aside to
    ``<dir>.old-<time>`` first, never deleted. Call on one rank of a task (start over only with a
    single task running).
    """
    identity, sha = build_identity(manifest)
    records = [json.loads(p.read_text()) for p in sorted(cache_dir.glob("shard-*.json"))]
    if (cache_dir / MANIFEST).is_file():
        records.append({"build_identity": build_identity(json.loads((cache_dir / MANIFEST).read_text()))[0]})
    whys = []
    for record in records:
        theirs = record.get("build_identity")
        if theirs is None:
            whys.append(f"{record.get('file', MANIFEST)} records no build (an older or unknown build)")
            break
        differs = [f"{what} (the cache has {theirs.get(what)!r}, this build {identity[what]!r})"
                   for what in identity if theirs.get(what) != identity[what]]
        if differs:
            whys.append("; ".join(differs))
            break
    if whys:
        if not start_over:
            raise UserError(f"teacher cache {cache_dir} was made by another build: {whys[0]}. Nothing was changed. "
                            "Point teacher_source.cache_dir at a new directory, or pass --start-over to move this one "
                            "aside and build anew")
        aside = cache_dir.with_name(f"{cache_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(cache_dir, aside)
        cache_dir.mkdir(parents=True)
        print(f"teacher cache {cache_dir}: the previous contents ({whys[0]}) were moved to {aside}", flush=True)
    return sha


@dataclass(frozen=True)
class BuildLayout:
    """How the ranks of one ``dd-cache build`` share the work.

    A task (one torchrun / deepspeed launch; several tasks form a SLURM array) has `world` ranks
    in TP groups of `tp_size` consecutive ranks (keep a group inside a node); the DP groups split
    every shard of the task by teacher batches, so all ranks work whatever the shard count.
    Array tasks split whole shards: shard s belongs to task ``s % num_tasks``. Shard s is coded
    and written by the leader (TP rank 0) of DP group ``s % dp_size``, which gathers the other
    groups' rows. At 64 GPUs with a 70B teacher at tp_size=8: 8 DP groups each score 1/8 of
    every shard's batches; 8 leaders take turns coding shards while the others score on.
    """

    rank: int
    world: int
    tp_size: int
    task: int
    num_tasks: int

    @property
    def dp_size(self) -> int:
        return self.world // self.tp_size

    @property
    def dp_rank(self) -> int:
        return self.rank // self.tp_size

    @property
    def leader(self) -> bool:
        return self.rank % self.tp_size == 0

    def writer_of(self, shard: int) -> int:
        """Global rank that codes and writes `shard`."""
        return (shard % self.dp_size) * self.tp_size

    def my_batches(self, start: int, stop: int, batch_size: int) -> list[tuple[int, int]]:
        """This DP group's teacher batches of samples [start, stop): a contiguous run of the shard's
        batches, which start at multiples of batch_size from `start` (the same batches as a
        one-process build, so the rows are bit-identical whoever computes them)."""
        bounds = list(range(start, stop, batch_size))
        lo = len(bounds) * self.dp_rank // self.dp_size
        hi = len(bounds) * (self.dp_rank + 1) // self.dp_size
        return [(b, min(b + batch_size, stop)) for b in bounds[lo:hi]]


def load_cache_teacher(recipe, layout: BuildLayout, quantize: str, device: torch.device, vocab_size: int):
    """The teacher scorer of a cache build: the whole teacher on this rank's device (optionally
    bitsandbytes 8/4-bit), or with teacher_source.tp_size > 1 this rank's TP shards only, read
    from the safetensors files (the 8-bit option then quantises the shards)."""
    from dist_distill.teacher.scorer import TeacherScorer
    from dist_distill.teacher.tails import tail_temperatures

    k = recipe.teacher_source.top_k
    if layout.tp_size == 1:
        from dist_distill.models.loading import load_model
        from dist_distill.teacher.colocated import bnb_kwargs

        if quantize == "none":
            model = load_model(recipe.teacher, "teacher").to(device).eval()
        else:
            model = load_model(recipe.teacher, "teacher", **bnb_kwargs(quantize, device, f"--quantize {quantize}")).eval()
        scorer = TeacherScorer(model, vocab_size, k, temperatures=tail_temperatures(recipe))
    else:
        from torch.distributed.device_mesh import init_device_mesh

        from dist_distill.teacher.tensor_parallel import load_teacher_shards

        if quantize == "4bit":
            raise UserError("--quantize 4bit with teacher_source.tp_size > 1 is not supported (bitsandbytes NF4 of "
                            "TP shards); use --quantize 8bit or none")
        mesh = init_device_mesh(device.type, (layout.dp_size, layout.tp_size), mesh_dim_names=("dp", "tp"))
        model, offset = load_teacher_shards(recipe.teacher, mesh["tp"], device, quantize == "8bit")
        scorer = TeacherScorer(model, vocab_size, k, tp_group=mesh["tp"].get_group(), vocab_offset=offset,
                               temperatures=tail_temperatures(recipe))
    if scorer.model.config.vocab_size < vocab_size:
        raise UserError(f"teacher vocab_size={scorer.model.config.vocab_size} is smaller than its tokenizer's {vocab_size}")
    return scorer


def score_rows(scorer, data, batches: list[tuple[int, int]], bar=None, bar_scale: int = 1) -> tuple[torch.Tensor, int]:
    """The scorer's rows for the samples of `batches`, in order, as one CPU float32 [R, 2k + 1 + nT + 1]
    (signal.pack_rows: raw logits | ids as int32 bits | lse | log tail masses; then log p(target), what
    difficulty grading averages per sample, data/grading.py), and the tokens scored."""
    parts, tokens = [], 0
    for i, j in batches:
        *signal, target_lp = scorer.score_with_targets(data.input_ids[i:j], data.attention_mask[i:j], data.targets[i:j])
        parts.append(torch.cat([pack_rows(*signal), target_lp.float()[:, None]], 1).cpu())
        n = int(data.attention_mask[i:j].sum())
        tokens += n
        if bar is not None:
            bar.update(n * bar_scale)
    return (torch.cat(parts) if parts else torch.zeros(0, 2 * scorer.k + 2 + len(scorer.temperatures))), tokens


def _plan(cache_dir: Path, layout: BuildLayout, num_total: int, stack: contextlib.ExitStack, build_sha: str) -> list[int]:
    """The shards this task builds, agreed by all its ranks: of this task, not complete (an existing
    shard counts only if its sidecar records this build and the file's sha256 matches it; each
    writer checks its own), and locked by their writer (a shard held by another live writer is
    skipped with a message). Locks stay held in `stack`."""
    mine = [s for s in range(num_total) if s % layout.num_tasks == layout.task]
    claimed = []
    for s in mine:
        if layout.writer_of(s) != layout.rank or shard_done(cache_dir, s, build_sha, check_sha=True):
            continue
        if not stack.enter_context(shard_lock(cache_dir, s)):
            print(f"cache task {layout.task}/{layout.num_tasks}: shard {s} is being written by another process (it "
                  f"holds {lock_path(cache_dir, s).name}): skipped", flush=True)
            continue
        if not shard_done(cache_dir, s, build_sha, check_sha=True):  # else finished by another writer meanwhile
            if shard_path(cache_dir, s).exists():
                print(f"cache task {layout.task}/{layout.num_tasks}: shard {s} exists but does not match its sidecar "
                      "or this build: rebuilding it", flush=True)
            claimed.append(s)
    if layout.world == 1:
        return claimed
    everyone = [None] * layout.world
    torch.distributed.all_gather_object(everyone, claimed, group=_cpu_group())
    return sorted(s for part in everyone for s in part)


def _bind_on_rank0(cache_dir: Path, manifest: dict, start_over: bool, layout: BuildLayout) -> str:
    """`bind_cache_dir` on rank 0; every rank gets its answer, or raises its refusal."""
    result = [None, None]
    if layout.rank == 0:
        try:
            result = [bind_cache_dir(cache_dir, manifest, start_over), None]
        except UserError as err:
            result = [None, str(err)]
    if layout.world > 1:
        torch.distributed.broadcast_object_list(result, src=0, group=_cpu_group())
    if result[1] is not None:
        raise UserError(result[1])
    return result[0]


def _cpu_group():
    """A gloo group over the world for CPU tensors and objects (the default group when it is gloo)."""
    backend = str(torch.distributed.get_backend())
    if backend == "gloo" or "cpu:gloo" in backend:
        return None
    global _CPU_GROUP
    if _CPU_GROUP is None:
        _CPU_GROUP = torch.distributed.new_group(backend="gloo")
    return _CPU_GROUP


_CPU_GROUP = None


def build_cache(recipe, *, shard_index: int = 0, num_shards: int = 1, samples_per_shard: int = 4096,
                rank: int = 0, world_size: int = 1, progress: bool = True, mode: str = "kl",
                max_kl: float = 1e-3, quantize: str = "none", start_over: bool = False) -> dict:
    """Run the teacher over the recipe's training data and write this task's missing shards.

    The directory is bound to this build first (:func:`bind_cache_dir`; `start_over` moves a
    directory of another build aside instead of refusing it).

    Every rank of the task calls it (`rank`, `world_size`: its place in the launched world, whose
    process group must exist when world_size > 1); see :class:`BuildLayout` for who does what.
    Returns the manifest without its shard list; `finalize_cache` completes it.
    """
    from tqdm import tqdm

    from dist_distill.data.records import IGNORE_INDEX, load_tokenized
    from dist_distill.models.loading import load_tokenizer
    from dist_distill.teacher.sources import same_tokenizer_or_refuse
    from dist_distill.training.distributed import local_device

    ts = recipe.teacher_source
    if ts.cache_dir is None:
        raise UserError("teacher_source.cache_dir is not set: where should the cache go?")
    if mode not in codec.MODES:
        raise UserError(f"--mode {mode}: expected one of {', '.join(codec.MODES)}")
    if not 0 < max_kl < 1:
        raise UserError(f"--max-kl {max_kl}: must lie in (0, 1) nats")
    if world_size % ts.tp_size:
        raise UserError(f"teacher_source.tp_size={ts.tp_size} must divide the number of ranks ({world_size})")
    layout = BuildLayout(rank, world_size, ts.tp_size, shard_index, num_shards)
    cache_dir = Path(ts.cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = load_tokenizer(recipe.teacher, "teacher")
    same_tokenizer_or_refuse(recipe, load_tokenizer(recipe.student, "student"), tokenizer)
    data = load_tokenized(recipe.data.train, tokenizer, recipe.data, recipe.data.max_samples)
    vocab_size = len(tokenizer)
    k = ts.top_k
    if k > vocab_size:
        raise UserError(f"teacher_source.top_k={k} is larger than the vocabulary ({vocab_size} tokens)")
    manifest = expected_manifest(recipe, tokenizer, data, vocab_size)
    manifest["teacher"]["quantization"] = quantize
    manifest.update(samples_per_shard=samples_per_shard,
                    codec={"mode": mode, "max_kl": max_kl if mode == "kl" else 0.0, "block": codec.BLOCK,
                           "ids": "ascending (token ids, or per-shard frequency ranks when smaller), gap-coded, "
                                  "bit-packed in blocks of 8 at the block's width",
                           "values": ("per-row coarse b-bit levels + e-bit refinement of the head, exact top-k KL "
                                      "in both directions: max(KL(p || p~), KL(p~ || p)) <= max_kl (p exact, p~ stored)"
                                      if mode == "kl" else "raw logits fp32 (bf16 when exact)"),
                           "rows": "positions with targets != -100"})
    # not part of the build's identity: where the grades file finds the store's record ids, its bucket edges
    manifest.update(grading_edges=list(recipe.grading.edges), data_store=str(data.store.path) if data.store else None)
    num_total = (len(data) + samples_per_shard - 1) // samples_per_shard
    manifest["build_sha256"] = _bind_on_rank0(cache_dir, manifest, start_over, layout)
    build = (build_identity(manifest)[0], manifest["build_sha256"])  # recorded in every sidecar
    with contextlib.ExitStack() as locks:
        shards = _plan(cache_dir, layout, num_total, locks, manifest["build_sha256"])
        if not shards:
            return manifest
        scorer = load_cache_teacher(recipe, layout, quantize, local_device(), vocab_size)
        spans = [(s, s * samples_per_shard, min((s + 1) * samples_per_shard, len(data))) for s in shards]
        tokens = int(sum(int(data.attention_mask[a:b].sum()) for _, a, b in spans))
        started, written, rows, worst, pending, scored = time.time(), 0, 0, 0.0, [], 0
        bar = tqdm(total=tokens, unit="tok", unit_scale=True, desc=f"cache[task {shard_index}/{num_shards}]",
                   disable=not progress, bar_format="{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} tokens "
                                                    "[{elapsed}<{remaining}, {rate_fmt}]")
        for s, start, stop in spans:
            piece, n_scored = score_rows(scorer, data, layout.my_batches(start, stop, ts.batch_size), bar, layout.dp_size)
            scored += n_scored
            writer = layout.writer_of(s)
            if not layout.leader:
                continue
            if layout.rank != writer:  # hand the rows to the shard's writer; keep the tensor alive until sent
                pending.append((torch.distributed.isend(piece, writer, group=_cpu_group(), tag=s), piece))
                continue
            pieces = _gather_pieces(piece, data, layout, s, start, stop, ts.batch_size, piece.shape[1])
            rows_all = torch.cat(pieces).numpy()
            ids, vals, lse, log_tails = unpack_rows_numpy(rows_all[:, :-1], k)
            mask = (data.targets[start:stop] != IGNORE_INDEX).numpy()
            parts, _, stats = encode_shard(ids, vals, lse, log_tails, mask, vocab_size, mode, max_kl, start, stop,
                                           manifest["tail_temperatures"])
            # difficulty grading for free: the samples' teacher confidence, kept in the sidecar (float32 log p)
            stats["confidence"] = sample_confidence(rows_all[:, -1], mask.sum(1)).tolist()
            for stale in cache_dir.glob(f".{shard_name(s)}.*.tmp*"):  # a killed writer's leftovers, never read
                stale.unlink(missing_ok=True)
            write_shard(cache_dir, s, start, stop, parts, stats, build)
            written += sum(len(p) for p in parts)
            rows += stats["rows"]
            worst = max(worst, stats["max_kl"])
        for work, _ in pending:
            work.wait()
        bar.close()
    took = time.time() - started
    print(f"cache task {shard_index}/{num_shards}, rank {rank}/{world_size}: scored {scored} tokens; the task's "
          f"{len(spans)} shards ({tokens} tokens) took {took:.1f}s ({tokens / max(took, 1e-9):.0f} tok/s over "
          f"{layout.dp_size} teacher replica(s) x tp {layout.tp_size}); this rank wrote {rows} target rows, "
          f"{written / max(rows, 1):.1f} bytes/row, max top-k KL {worst:.2e} nats", flush=True)
    return manifest


def _gather_pieces(own: torch.Tensor, data, layout: BuildLayout, shard: int, start: int, stop: int, batch_size: int,
                   width: int) -> list[torch.Tensor]:
    """The writer's rows of `shard` from every DP group, in sample order (each group's row count is
    known from the data's targets, so no sizes travel)."""
    from dist_distill.data.records import IGNORE_INDEX

    pieces = []
    for g in range(layout.dp_size):
        if g == layout.dp_rank:
            pieces.append(own)
            continue
        other = BuildLayout(g * layout.tp_size, layout.world, layout.tp_size, layout.task, layout.num_tasks)
        count = sum(int((data.targets[i:j] != IGNORE_INDEX).sum()) for i, j in other.my_batches(start, stop, batch_size))
        buf = torch.empty(count, width, dtype=torch.float32)
        torch.distributed.recv(buf, g * layout.tp_size, group=_cpu_group(), tag=shard)
        pieces.append(buf)
    return pieces


def finalize_cache(cache_dir: str | Path, manifest: dict) -> bool:
    """Write manifest.json (every shard's range, size and sha256; error totals) once all shards exist; True if written."""
    cache_dir = Path(cache_dir)
    per_shard = manifest["samples_per_shard"]
    num_total = (manifest["num_samples"] + per_shard - 1) // per_shard
    if not all(shard_done(cache_dir, s, manifest.get("build_sha256")) for s in range(num_total)):
        return False
    sides = [json.loads(sidecar_path(cache_dir, s).read_text()) for s in range(num_total)]
    rows = sum(x["rows"] for x in sides)
    manifest = dict(manifest, rows=rows, shards=[
        {key: x[key] for key in ("file", "start", "stop", "bytes", "sha256", "rows")} for x in sides])
    manifest["error"] = {
        "max_topk_kl": max((x["max_kl"] for x in sides), default=0.0),
        "max_topk_reverse_kl": max((x.get("max_rkl", 0.0) for x in sides), default=0.0),
        "mean_topk_kl": sum(x["mean_kl"] * x["rows"] for x in sides) / max(rows, 1),
        "max_abs_logp_err": max((x["max_abs_logp_err"] for x in sides), default=0.0),
        "mean_max_abs_logp_err": sum(x["mean_max_abs_logp_err"] * x["rows"] for x in sides) / max(rows, 1)}
    if all("confidence" in x for x in sides):  # shards of an older build have none: no grades then
        write_cache_grades(cache_dir, sides, manifest)
    try:
        write_atomic(cache_dir / MANIFEST, json.dumps(manifest, indent=2, sort_keys=True).encode())
    except OSError as err:
        raise UserError(f"cannot write {cache_dir / MANIFEST}: {err}. All {num_total} shards are complete and "
                        "intact; free disk space and re-run dd-cache build, which then only writes the manifest") from None
    return True



GRADES = "grades.npz"


def write_cache_grades(cache_dir: Path, sides: list[dict], manifest: dict) -> None:
    """<cache_dir>/grades.npz from the shards' sidecars (written before the manifest, so a complete cache
    built by this code has its grades). Buckets under the build's grading.edges (manifest["grading_edges"])."""
    import numpy as np

    from dist_distill.data.grading import DEFAULT_EDGES, write_grades

    confidence = np.concatenate([np.asarray(x["confidence"], np.float64) for x in sides])
    records = None
    store = manifest.get("data_store")
    if store and (Path(store) / "records.npy").is_file():
        records = np.load(Path(store) / "records.npy")
    meta = {"token_ids_sha256": manifest["dataset"]["token_ids_sha256"],
            "targets_sha256": manifest["dataset"]["targets_sha256"], "source": manifest["dataset"]["source"],
            "teacher": manifest.get("teacher"), "made_by": "dd-cache build"}
    write_grades(cache_dir / GRADES, confidence, records, manifest.get("grading_edges", DEFAULT_EDGES), meta)
