"""Reading a teacher cache: memory-mapped shards decoded by sample index, checks, info and verify."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import torch

from dist_distill.data.records import IGNORE_INDEX
from dist_distill.errors import UserError
from dist_distill.teacher.cache import codec
from dist_distill.teacher.cache.format import FORMAT, MAGIC, MANIFEST, ROWWISE, data_start, sha256_file
from dist_distill.teacher.signal import TeacherSignal


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
        for key in ("k", "seq_len", "vocab_size", "tail_temperatures"):
            if h.get(key) != manifest.get(key):
                raise UserError(f"teacher cache shard {path} fails its header check: {key}={h.get(key)}, the manifest "
                                f"says {manifest[key]}")
        if (h["start"], h["stop"]) != (entry["start"], entry["stop"]):
            raise UserError(f"teacher cache shard {path} fails its range check: samples [{h['start']}, {h['stop']}), "
                            f"the manifest says [{entry['start']}, {entry['stop']})")
        header_dtype = codec.HEADER_KL if h["mode"] == "kl" else codec.HEADER_LOSSLESS
        self.s, self.raw = {}, {}
        base = data_start(head_len)
        for name, (off, nbytes, dtype, shape) in h["sections"].items():
            if base + off + nbytes > size:
                raise UserError(f"teacher cache shard {path} fails its section check: {name} ends past the file")
            self.raw[name] = mm[base + off:base + off + nbytes]
            self.s[name] = self.raw[name].view(np.dtype(dtype)).reshape(shape)
        if "sample_crc" not in self.s or "log_tail" not in self.s:
            raise UserError(f"teacher cache shard {path} fails its checksum check: it has no per-sample checksums "
                            f"(section sample_crc); rebuild the cache with dd-cache build")
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

    def check_samples(self, local: np.ndarray) -> None:
        """Recompute the CRC32 of each sample's bytes (format.sample_checksums) and refuse a damaged one,
        naming the shard and the sample: every read is verified, at the cost measured in bench_cache."""
        import zlib

        s = self.s
        rowwise = [self.raw[k].reshape(len(s[k]), -1) if len(s[k]) else None for k in ROWWISE if k in s]
        for i in np.asarray(local).reshape(-1).tolist():
            r0, r1 = int(s["row_start"][i]), int(s["row_start"][i + 1])
            crc = zlib.crc32(s["row_mask"][i])
            for rows in rowwise:
                if rows is not None:
                    crc = zlib.crc32(rows[r0:r1], crc)
            crc = zlib.crc32(s["stream_a"][int(s["a_start"][i]):int(s["a_start"][i + 1])], crc)
            crc = zlib.crc32(s["stream_b"][int(s["b_start"][i]):int(s["b_start"][i + 1])], crc)
            if crc != int(s["sample_crc"][i]):
                raise UserError(f"teacher cache shard {self.path} fails its checksum check at sample {self.start + i} "
                                f"(block {i} of the shard): its bytes changed after they were written (disk or "
                                "filesystem damage). Delete the shard and its .json and re-run dd-cache build "
                                "(it rebuilds only that shard); dd-cache verify checks the others")

    def decode(self, local: np.ndarray, ids_dtype=np.int32):
        """Rows of samples `local` (shard-relative): ids [R, k] (`ids_dtype`), values fp32 [R, k], lse [R],
        log tail masses fp32 [R, nT] (at the manifest's tail_temperatures), positions mask [n, L].

        The samples' byte ranges of both streams are copied out of the memory map into one
        compact buffer each (the only reads of the shard), then decoded with local offsets.
        """
        s = self.s
        self.check_samples(local)
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
        return ids, vals, lse, np.asarray(s["log_tail"][rows], dtype=np.float32), mask


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
        if "teacher" in expected:
            from dist_distill.models.loading import FINGERPRINT_KEYS

            for key in FINGERPRINT_KEYS:
                have, want = m.get("teacher", {}).get(key), expected["teacher"].get(key)
                if want is not None and have != want:
                    raise UserError(f"teacher cache {self.dir} was built from another teacher: its {key} is {have!r}, "
                                    f"the recipe's teacher {expected['teacher'].get('name_or_path')} has {want!r} "
                                    f"({where} fails the teacher check). Rebuild the cache from this teacher, or point "
                                    "teacher.name_or_path at the one the cache was built from")
        if m["k"] < expected["k"]:
            raise UserError(f"teacher cache {self.dir} keeps k={m['k']} logits per token, the recipe asks "
                            f"teacher_source.top_k={expected['k']} ({where} fails the k check)")

    def shard(self, index: int) -> _Shard:
        if index not in self._shards:
            entry = self.manifest["shards"][index]
            self._shards[index] = _Shard(self.dir / entry["file"], entry, self.manifest)
        return self._shards[index]

    @property
    def tail_temperatures(self) -> tuple[float, ...]:
        """The temperatures at which every row carries the teacher's log tail mass (teacher.tails)."""
        return tuple(self.manifest["tail_temperatures"])

    def rows(self, indices, ids_dtype=np.int32):
        """Stored rows of samples `indices`, in order: ids [R, K] (`ids_dtype`, int32 or int64), raw
        logits fp32 [R, K], lse [R], log tail masses fp32 [R, nT], and the positions that hold them,
        bool [B, L] (row-major order of the True entries)."""
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
            *rows, mask = sh.decode(idx[run] - sh.start, ids_dtype)
            parts.append(rows)
            masks[run] = mask
        if len(parts) == 1:
            return (*parts[0], masks)
        if not parts:
            k, nt = self.manifest["k"], len(self.tail_temperatures)
            return (np.zeros((0, k), ids_dtype), np.zeros((0, k), np.float32), np.zeros(0, np.float32),
                    np.zeros((0, nt), np.float32), masks)
        return (*(np.concatenate([p[i] for p in parts]) for i in range(4)), masks)

    def fetch(self, indices: torch.Tensor, k: int | None = None):
        """Teacher signal for samples `indices` (int64 [B]): ids int64 [B, L, k], logits fp32 [B, L, k],
        lse fp32 [B, L], log tail masses fp32 [B, L, nT] (at `tail_temperatures`).

        ``logits - lse[..., None]`` are the teacher's full-vocabulary log-probabilities (T=1). The k
        entries of a row are in storage order (ascending id, or ascending frequency rank in shards
        that code ids as ranks; not value order). Positions without a stored
        row (``targets == IGNORE_INDEX``) hold zeros. With ``k`` below the cache's k, each row keeps
        its k most probable entries and the others move into its tail (teacher.tails.drop_to_k).
        """
        kk = self.manifest["k"] if k is None else k
        if kk > self.manifest["k"]:
            raise UserError(f"teacher cache {self.dir} keeps k={self.manifest['k']} logits per token, asked for {kk}")
        ids, vals, lse, tails, mask = self.compact_rows(indices, kk)
        b, length = mask.shape
        nt = tails.shape[1]
        if mask.all():  # every position holds a row: the rows are the [B, L] grid already
            return ids.view(b, length, kk), vals.view(b, length, kk), lse.view(b, length), tails.view(b, length, nt)
        where = torch.from_numpy(np.flatnonzero(mask.reshape(-1)))
        out_ids = torch.zeros(b * length, kk, dtype=torch.int64).index_copy_(0, where, ids)
        out_vals = torch.zeros(b * length, kk, dtype=torch.float32).index_copy_(0, where, vals)
        out_lse = torch.zeros(b * length, dtype=torch.float32).index_copy_(0, where, lse)
        out_tails = torch.zeros(b * length, nt, dtype=torch.float32).index_copy_(0, where, tails)
        return (out_ids.view(b, length, kk), out_vals.view(b, length, kk), out_lse.view(b, length),
                out_tails.view(b, length, nt))

    def compact_rows(self, indices, k: int):
        """Rows of samples `indices` (int64 [B]) in their stored order, cut to the `k` most probable entries as
        `fetch` does: ids int64 [R, k], logits fp32 [R, k], lse fp32 [R], log tails fp32 [R, nT], and the
        positions holding them, numpy bool [B, L] (row-major order of the True entries)."""
        ids, vals, lse, tails, mask = self.rows(indices.cpu().numpy() if torch.is_tensor(indices) else indices, np.int64)
        ids, vals, tails = torch.from_numpy(ids), torch.from_numpy(vals), torch.from_numpy(tails)
        if k < ids.shape[1]:
            from dist_distill.teacher.tails import drop_to_k

            top, pick = vals.topk(k, dim=1, sorted=False)
            keep = torch.zeros_like(vals, dtype=torch.bool).scatter_(1, pick, True)
            tails = drop_to_k(vals, tails, keep, self.tail_temperatures)
            vals, ids = top, ids.gather(1, pick)
        return ids, vals, torch.from_numpy(lse), tails, mask

    def row_mask(self, indices) -> torch.Tensor:
        """bool [B, L]: the positions of samples `indices` that hold a teacher row."""
        idx = np.asarray(indices.cpu().numpy() if torch.is_tensor(indices) else indices, dtype=np.int64)
        shard_of = np.searchsorted(np.asarray(self._starts), idx, side="right") - 1
        out = np.zeros((len(idx), self.manifest["seq_len"]), dtype=bool)
        for i, (s, j) in enumerate(zip(shard_of, idx)):
            sh = self.shard(int(s))
            out[i] = np.unpackbits(sh.s["row_mask"][j - sh.start], count=sh.seq_len, bitorder="little").astype(bool)
        return torch.from_numpy(out)



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
            f"codec {codec_line}; exact tail mass outside the top-k at T = "
            f"{', '.join(f'{t:g}' for t in m['tail_temperatures'])}\n"
            f"bytes/token={size / rows:.1f}  (all files: {size} bytes)\n"
            f"vs dense bf16 logits ({dense} bytes/token): {dense * rows / size:.1f}x smaller\n"
            f"vs raw top-k bf16 values + int32 ids + fp32 lse ({raw} bytes/token): {raw * rows / size:.2f}x smaller\n"
            f"measured error: max top-k KL {err.get('max_topk_kl', 0):.3g} nats (mean {err.get('mean_topk_kl', 0):.3g}; "
            f"reverse direction max {err.get('max_topk_reverse_kl', 0):.3g}), "
            f"max |log-prob error| {err.get('max_abs_logp_err', 0):.3g}")



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


class CacheTeacher:
    """Reads a teacher top-k cache by sample index.

    With `align` (a teacher.cross_tokenizer.RecordAlignment; loss.cross_tokenizer) the cache holds the
    teacher's rows over ITS tokenization of the same records: each student sample is mapped to the teacher
    sample of its record, and the signal carries the teacher rows paired with the student's response tokens
    (``TeacherSignal.aligned_rows``)."""

    def __init__(self, cache, top_k: int, device: torch.device, align=None):
        self.cache, self.top_k, self.device, self.align = cache, top_k, device, align

    def for_thread(self) -> "CacheTeacher":
        """The same source over its own shard handles (a reader for the background input pipeline)."""
        import copy

        return CacheTeacher(copy.copy(self.cache), self.top_k, self.device, self.align)

    def signal(self, indices: torch.Tensor, batch: dict) -> TeacherSignal:
        if self.align is not None:
            return self._aligned_signal(indices, batch)
        ids, logits, lse, tails = self.cache.fetch(indices, self.top_k)
        mask = batch["targets"].cpu() != IGNORE_INDEX
        if mask.shape[1] < ids.shape[1]:  # a length-grouped batch is cut to its longest sample
            ids, logits, lse, tails = (t[:, :mask.shape[1]] for t in (ids, logits, lse, tails))
        return TeacherSignal(topk=(ids[mask].to(self.device), logits[mask].to(self.device), lse[mask].to(self.device)),
                             log_tails=tails[mask].to(self.device), tail_temperatures=self.cache.tail_temperatures,
                             source=f"teacher cache {self.cache.dir}")

    def _aligned_signal(self, indices: torch.Tensor, batch: dict) -> TeacherSignal:
        from dist_distill.teacher.cross_tokenizer import align_rows

        t_idx, found = self.align.teacher_samples(indices)
        s_counts = (batch["targets"].cpu() != IGNORE_INDEX).sum(1)
        t_counts = torch.zeros_like(s_counts)
        nt = len(self.cache.tail_temperatures)
        if found.any():
            ids, logits, lse, tails = self.cache.fetch(t_idx[found], self.top_k)
            t_mask = self.cache.row_mask(t_idx[found])
            t_counts[torch.from_numpy(found)] = t_mask.sum(1)
            ids, logits, lse, tails = ids[t_mask], logits[t_mask], lse[t_mask], tails[t_mask]
        else:
            ids, logits = torch.zeros(0, self.top_k, dtype=torch.int64), torch.zeros(0, self.top_k)
            lse, tails = torch.zeros(0), torch.zeros(0, nt)
        s_rows, t_rows = align_rows(s_counts, t_counts)
        dev = self.device
        return TeacherSignal(topk=(ids[t_rows].to(dev), logits[t_rows].to(dev), lse[t_rows].to(dev)),
                             log_tails=tails[t_rows].to(dev), tail_temperatures=self.cache.tail_temperatures,
                             aligned_rows=s_rows.to(dev),
                             source=f"teacher cache {self.cache.dir} (the teacher's tokenization)")

    def packed_signal(self, packed) -> TeacherSignal:
        """The signal of a packed batch (data.packing.PackedBatch): for each of its target tokens, row-major, the
        cache row of its (sample, position) -- the row the same token has in an unpacked batch, so one cache
        serves packed and unpacked runs. Decodes the packed samples' rows once (compact, no [n, L, k] grid)."""
        assert self.align is None, "packing with loss.cross_tokenizer is refused by the recipe"
        ids, logits, lse, tails, mask = self.cache.compact_rows(packed.samples, self.top_k)
        row_of = np.full(mask.shape, -1, dtype=np.int64)
        row_of[mask] = np.arange(int(mask.sum()))
        where = (packed.targets != IGNORE_INDEX).numpy()
        doc, pos = packed.doc.numpy()[where], packed.source[..., 1].numpy()[where]
        rows = row_of[doc, pos]
        if (rows < 0).any():
            j = int(np.flatnonzero(rows < 0)[0])
            raise UserError(f"teacher cache {self.cache.dir} has no row at sample {int(packed.samples[doc[j]])}, "
                            f"position {int(pos[j])}, a target token of the packed batch: the cache and the token store "
                            "disagree on the target positions; rebuild the cache with dd-cache for this recipe")
        rows = torch.from_numpy(rows)
        return TeacherSignal(topk=(ids[rows].to(self.device), logits[rows].to(self.device), lse[rows].to(self.device)),
                             log_tails=tails[rows].to(self.device), tail_temperatures=self.cache.tail_temperatures,
                             source=f"teacher cache {self.cache.dir}")
