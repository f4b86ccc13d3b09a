"""Vectorised codec for teacher top-k rows: bit-packed sorted ids and KL-bounded quantised values.

One row = one token's teacher signal: k ids (any order), their log-probabilities normalised over
the FULL vocabulary (``logp = z - lse``) and ``lse``. Rows are coded independently, in numpy,
without a per-token Python loop; a batch of rows decodes with a few dozen array operations.

Ids: sorted, gap-coded, packed in blocks of 8
    The loss does not need the k ids in value order, so a row stores them ascending and its
    values in the same (id) order; a permutation back to value order (log2(128!) = 716 bits
    at k=128) is never stored. Gaps ``g_0 = id_0``, ``g_j = id_j - id_{j-1} - 1`` are cut into
    blocks of 8 (k padded to a multiple of 8 with zero gaps); each block is bit-packed at the
    width of its largest gap, so a block of 8 gaps at width w is exactly w bytes. The widths
    are 4-bit codes in the row header (code 15 = the full id width ``bitlen(V - 1)``). Blocks
    adapt to the density of ids: frequent tokens (low ids in BPE vocabularies, which are
    roughly in merge/frequency order) give small gaps, rare ones large gaps.
    Measured (benchmarks/bench_cache.py, V=151936, k=128): 192 B/row of ids for uniformly
    random ids (a random 128-subset of 151936 ids carries 186 B of information), 133 B when
    the top-k ids follow a Zipf(1.0) popularity over the id order, 103 B at Zipf(1.2).

Values, mode "kl" (lossy, default): coarse levels plus refinement of the head
    Per row: ``m = max logp`` (fp32) and ``r_j = m - logp_j >= 0``. Coarse: ``c_j = round(r_j / D)``
    on ``b`` bits (``D = max r / (2^b - 1)``, fp16). Refinement: values with ``c_j < H`` (the
    most probable ones; their errors weigh most in the KL) get ``e`` more bits choosing a point
    of a finer grid inside their coarse cell: ``r~ = D * (c + f / 2^e - 1/2)``, f in [0, 2^e).
    The grids contain ``r = 0``, so the top value is exact (to float32 rounding).
    The encoder picks (b, e, H) per row to minimise bits under a quadratic estimate of the KL,
    then reconstructs exactly as the decoder does and computes BOTH directions EXACTLY:
    ``KL(p_topk || p~_topk)`` and ``KL(p~_topk || p_topk)`` of the renormalised top-k
    distributions (p exact, p~ stored). The bound is two-sided,
    ``max(KL(p || p~), KL(p~ || p)) <= max_kl`` per row, for forward-KL, reverse-KL and JSD
    students alike (the quadratic estimate is the same for both directions to second order;
    where the third-order terms differ, improbable tokens off by nats, the exact check
    catches it: with the forward check alone the reverse KL reached ~1.1e-3 at max_kl=1e-3 on
    the benchmark's synthetic rows and 1.6e-3 on a teacher whose logits span 20-40 nats). Rows above the bound in
    either direction are re-coded with a tighter estimate (and finally at b=8, e=12). So every
    row meets the bound by construction; the achieved forward KL (``stats["kl"]``), reverse KL
    (``stats["rkl"]``) and max |logp error| are reported.
    Coarse levels use the same 8-per-block packing (width b), refinement bits a second
    stream (blocks of 8 of width e; the decoder learns their count from the coarse levels).
    Header per row: lse f32, m f32, D f16, b|e (one byte), H (one byte) + id width nibbles.
    Measured at k=128 (synthetic Zipf-shaped logits, a in [1, 2.5]): ~4.0 coarse + ~0.7
    refinement bits per value, ~75 B/row of values; max top-k KL 1e-3 (the bound) in both
    directions, mean ~7e-4; max |logp error| ~0.9 nats, on improbable tokens only. Totals per row at k=128:
    287 B (uniform ids), 228 B (Zipf 1.0), 198 B (Zipf 1.2); DistillKit: ~330 B.

Values, mode "lossless"
    The raw fp32 logits ``z`` in id order (stored as bf16 when every value of the shard is
    exactly a bf16 number, as the logits of a bf16 teacher are), lse fp32. Bit-exact.

Decoding is gathers and shifts over whole batches: ids with one unaligned 32-bit read per
field from a contiguous "word at every byte" expansion of the batch's bytes; coarse values
grouped by width from a dense byte matrix with per-column constant shifts. ~0.4-0.7M rows/s
per single-threaded process at k=64 in mode kl (numpy; docs/benchmarks.md), ~1.1M lossless.

Native codec: `_codec_native.c` (an optional C extension built by setup.py) encodes and decodes
the same bytes as the numpy code here, bit for bit (the encoder's KL / error stats included);
`encode_rows` and `decode_rows` use it when it is built (``native=False``: numpy). The numpy
encoder is the reference: the C one repeats its float operations in its order, row by row
(the C file lists them), ~0.2M rows/s per process at k=64 in mode kl against ~15k in numpy.
An extension whose ``ENCODER_VERSION`` is not ``NATIVE_ENCODER_VERSION`` (one built before the
two-sided bound) is not used for encoding: rebuild it (``pip install -e .``).

All multi-byte numbers are little-endian.
"""

from __future__ import annotations


import numpy as np

try:  # optional C encoder and decoder (setup.py builds them); same results, bit for bit, as the numpy codec below
    from . import _codec_native
except ImportError:
    _codec_native = None

BLOCK = 8  # values per packed block: a block of 8 fields of w bits is exactly w bytes
PAD = 32  # zero bytes after every stream: reads a few bytes past a field never run off its end
MODES = ("kl", "lossless")
FULL_WIDTH_CODE = 15
MAX_WIDTH = 25  # widest field: one unaligned 32-bit read holds it (ids: vocabularies up to 2^25)
FLOOR = 100.0  # mode kl: log-probabilities are kept within FLOOR nats of the row's maximum
NATIVE_MAX_K = 4096  # the C codec's largest k (rows of more values: the numpy encoder)
NATIVE_ENCODER_VERSION = 2  # the C encoder's ENCODER_VERSION that codes as this module does (2: both KL directions)

HEADER_KL = np.dtype([("lse", "<f4"), ("m", "<f4"), ("scale", "<f2"), ("be", "u1"), ("h", "u1")])
HEADER_LOSSLESS = np.dtype([("lse", "<f4")])


def id_width(vocab_size: int) -> int:
    """Bits of the largest id gap: ``bitlen(V - 1)`` (at least 15, the largest plain nibble code)."""
    if vocab_size > 1 << MAX_WIDTH:
        raise ValueError(f"vocabulary of {vocab_size} ids: the cache codec handles up to 2^{MAX_WIDTH}")
    return max(FULL_WIDTH_CODE, int(vocab_size - 1).bit_length())


# ---------------------------------------------------------------------------------------------
# Bit packing of blocks of 8 fields (vectorised, grouped by width)
# ---------------------------------------------------------------------------------------------

def _words(w: int) -> int:
    return (BLOCK * w + 63) // 64


def pack_blocks(fields: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Pack blocks (fields uint [n, 8], widths int [n], 0..32) into one byte string, block after block.

    Block i takes exactly ``widths[i]`` bytes; field j of a block occupies its bits
    ``[j*w, (j+1)*w)`` (little-endian bit order). Fields must fit their block's width.
    """
    widths = widths.astype(np.int64)
    offsets = np.concatenate([[0], np.cumsum(widths)])
    out = np.zeros(int(offsets[-1]) + PAD, dtype=np.uint8)
    fields = fields.astype(np.uint64)
    for w in np.unique(widths):
        w = int(w)
        if w == 0:
            continue
        sel = np.flatnonzero(widths == w)
        v = fields[sel]
        words = np.zeros((len(sel), _words(w) + 1), dtype=np.uint64)
        for j in range(BLOCK):
            q, s = divmod(j * w, 64)
            words[:, q] |= v[:, j] << np.uint64(s)
            if s + w > 64:
                words[:, q + 1] |= v[:, j] >> np.uint64(64 - s)
        raw = words.view(np.uint8).reshape(len(sel), -1)[:, :w]
        out[offsets[sel][:, None] + np.arange(w)] = raw
    return out[:int(offsets[-1])]


def expand32(buf: np.ndarray) -> np.ndarray:
    """Contiguous uint32 array whose element i is the little-endian word in bytes [i, i+4) of `buf`.

    4 bytes per byte of `buf`, built once per decoded batch: gathers from a contiguous array are
    several times faster than from an overlapping (stride-1) view, and `np.take` would copy
    such a view on every call.
    """
    buf = np.ascontiguousarray(buf, dtype=np.uint8)
    view = np.ndarray(shape=(max(len(buf) - 3, 0),), dtype="<u4", buffer=buf, offset=0, strides=(1,))
    return np.ascontiguousarray(view)


_J = np.arange(BLOCK, dtype=np.int64)


def unpack_blocks(words: np.ndarray, offsets: np.ndarray, widths: np.ndarray) -> np.ndarray:
    """Inverse of `pack_blocks` at arbitrary byte offsets: fields uint32 [n, 8].

    `words` = `expand32(buf)` of a buffer that extends at least `PAD` bytes past the last block.
    Field j of a block of width w at byte o starts at bit ``8 o + j w``; as w <= MAX_WIDTH = 25
    it lies within the 4 bytes from that bit's byte: one gather, a shift and a mask per field,
    blocks of any mix of widths at once (broadcast arithmetic, no per-width tables: gathers
    from small tables cost more than the arithmetic).
    """
    small = len(words) < 2**27  # bit positions fit int32: half the memory traffic
    dt = np.int32 if small else np.int64
    w = np.asarray(widths).astype(dt)
    pos = (np.asarray(offsets).astype(dt) * dt(8))[:, None] + w[:, None] * _J.astype(dt)
    v = np.take(words, pos >> 3, mode="clip")  # clip: no bounds checks
    v >>= (pos & 7).astype(np.uint32)
    v &= ((np.uint32(1) << w.astype(np.uint32)) - np.uint32(1))[:, None]
    return v


def unpack_rows(buf: np.ndarray, offsets: np.ndarray, width: np.ndarray, count: int) -> np.ndarray:
    """Rows of `count` (a multiple of 8) fields packed back to back at the row's width (<= 9 bits)
    from byte `offsets[i]` of the byte buffer `buf`: uint32 [n, count].

    Rows are grouped by width; a group's rows are copied out as a dense byte matrix (one
    row-slice copy each, no per-field index), then field j is read from the 16-bit window of
    its first byte with a shift and a mask that are constants of the column.
    """
    n = len(offsets)
    out = np.empty((n, count), dtype=np.uint32)
    j = np.arange(count, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64)
    for w in np.unique(width):
        w = int(w)
        assert w <= 9 and (count * w) % 8 == 0
        sel = slice(None) if n and (width == w).all() else np.flatnonzero(width == w)
        dense = np.lib.stride_tricks.sliding_window_view(buf, count * w // 8 + 1)[offsets[sel]].astype(np.uint16)
        first = (j * w) >> 3
        v = dense[:, first] | (dense[:, first + 1] << np.uint16(8))
        v >>= ((j * w) & 7).astype(np.uint16)
        v &= np.uint16((1 << w) - 1)
        out[sel] = v
    return out


def _excl_cumsum(x: np.ndarray, axis: int = -1) -> np.ndarray:
    c = np.cumsum(x, axis=axis)
    return c - x


# ---------------------------------------------------------------------------------------------
# Ids
# ---------------------------------------------------------------------------------------------

def _kpad(k: int) -> int:
    return -(-k // BLOCK) * BLOCK


def encode_ids(ids: np.ndarray, vocab_size: int):
    """Sorted ids -> (order [n, k] that sorts each row, width codes uint8 [n, nb], block fields [n, nb, 8], widths [n, nb])."""
    n, k = ids.shape
    order = np.argsort(ids, axis=1, kind="stable")
    sorted_ids = np.take_along_axis(ids, order, axis=1).astype(np.int64)
    if n and (sorted_ids[:, 0].min() < 0 or sorted_ids[:, -1].max() >= vocab_size):
        raise ValueError(f"ids outside [0, {vocab_size})")
    gaps = np.diff(sorted_ids, axis=1, prepend=-1) - 1
    if n and gaps.min() < 0:
        raise ValueError("duplicate ids in a top-k row")
    kp = _kpad(k)
    gaps = np.pad(gaps, ((0, 0), (0, kp - k))).reshape(n, kp // BLOCK, BLOCK)
    bits = _bitlen(gaps.max(axis=2))
    codes = np.minimum(bits, FULL_WIDTH_CODE).astype(np.uint8)
    widths = np.where(codes == FULL_WIDTH_CODE, id_width(vocab_size), codes.astype(np.int64))
    return order, codes, gaps, widths


def _bitlen(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.int64)
    out = np.zeros(x.shape, dtype=np.int64)
    nz = x > 0
    out[nz] = np.floor(np.log2(x[nz].astype(np.float64))).astype(np.int64) + 1
    # float log2 can be off by one next to powers of two: fix exactly
    out[nz] += (x[nz] >> out[nz]) > 0
    out[nz] -= (x[nz] >> np.maximum(out[nz] - 1, 0)) == 0
    return out


def frequency_order(ids: np.ndarray, vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The ids that occur in `ids` (any shape), most frequent first, and the size of each frequency class.

    Ids are ranked by frequency class ``floor(log2(count))``, highest first, and by id inside a
    class: ``(order int32 [D], class_sizes int64 [C])``. A shard may code each id as its rank in
    this order: a teacher's top-k candidates are the frequent tokens of its domain whatever the
    tokenizer's id order, so ranks are small and dense where raw ids spread over the vocabulary,
    and the gap code gets shorter. Ordering by class rather than by exact count keeps ranks
    almost as small and makes the table itself cheap: ascending ids per class, gap-coded
    (`pack_order`).
    """
    counts = np.bincount(np.asarray(ids).reshape(-1), minlength=vocab_size)
    present = np.flatnonzero(counts)
    cls = _bitlen(counts[present])
    order = present[np.lexsort((present, -cls))].astype(np.int32)
    sizes = np.bincount(cls.max() - cls, minlength=int(cls.max() - cls.min()) + 1) if len(cls) else np.zeros(0, np.int64)
    return order, sizes[sizes > 0].astype(np.int64)


def pack_order(order: np.ndarray, class_sizes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Ids ascending within each class -> (block widths uint8 [ceil(D/8)], packed gap blocks uint8).

    Gaps restart at each class (``g = id - previous id - 1``, previous = -1 at a class start),
    blocks of 8 at their own width, as the row ids are coded.
    """
    order = np.asarray(order, dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(class_sizes)[:-1]]).astype(np.int64)
    prev = np.concatenate([[-1], order[:-1]])
    prev[starts] = -1
    gaps = order - prev - 1
    d = len(gaps)
    gaps = np.pad(gaps, (0, _kpad(d) - d)).reshape(-1, BLOCK)
    widths = _bitlen(gaps.max(axis=1)) if len(gaps) else np.zeros(0, np.int64)
    return widths.astype(np.uint8), pack_blocks(gaps, widths)


def unpack_order(widths: np.ndarray, packed: np.ndarray, class_sizes: np.ndarray) -> np.ndarray:
    """Inverse of `pack_order`: the order int32 [D]."""
    d = int(np.sum(class_sizes))
    w = np.asarray(widths, dtype=np.int64)
    buf = np.concatenate([np.asarray(packed, dtype=np.uint8), np.zeros(PAD, np.uint8)])
    gaps = unpack_blocks(expand32(buf), np.cumsum(w) - w, w).reshape(-1)[:d].astype(np.int64)
    run = np.cumsum(gaps + 1)
    starts = np.concatenate([[0], np.cumsum(class_sizes)[:-1]]).astype(np.int64)
    base = np.repeat(np.concatenate([[0], run])[starts], class_sizes)
    return (run - base - 1).astype(np.int32)


def id_code_bytes(ids: np.ndarray, vocab_size: int) -> int:
    """Bytes of the packed id blocks of rows `ids` [n, k] (what `encode_rows` writes for them)."""
    return int(encode_ids(ids, vocab_size)[3].sum()) if len(ids) else 0


def id_widths_from_codes(codes: np.ndarray, vocab_size: int) -> np.ndarray:
    codes = codes.astype(np.int64)
    return np.where(codes == FULL_WIDTH_CODE, id_width(vocab_size), codes)


def pack_nibbles(codes: np.ndarray) -> np.ndarray:
    """uint8 [n, nb] values < 16 -> uint8 [n, ceil(nb/2)] (low nibble first)."""
    n, nb = codes.shape
    if nb % 2:
        codes = np.pad(codes, ((0, 0), (0, 1)))
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


def unpack_nibbles(packed: np.ndarray, nb: int) -> np.ndarray:
    out = np.empty((packed.shape[0], packed.shape[1] * 2), dtype=np.uint8)
    out[:, 0::2] = packed & 15
    out[:, 1::2] = packed >> 4
    return out[:, :nb]


# ---------------------------------------------------------------------------------------------
# Values (mode "kl")
# ---------------------------------------------------------------------------------------------

def topk_kl(logp: np.ndarray, logq: np.ndarray) -> np.ndarray:
    """KL(p || q) in nats per row between the top-k distributions renormalised over the k ids (float64)."""
    return topk_kl_both(logp, logq)[0]


def topk_kl_both(logp: np.ndarray, logq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(KL(p || q), KL(q || p)) per row, top-k distributions renormalised over the k ids (float64).

    The forward direction weighs the errors of the probable values, the reverse one those of the
    values that q (the stored row) makes probable; mode kl bounds the larger of the two.
    """
    lp = _log_softmax(logp.astype(np.float64))
    lq = _log_softmax(logq.astype(np.float64))
    fwd = np.maximum((np.exp(lp) * (lp - lq)).sum(axis=1), 0.0)
    rev = np.maximum((np.exp(lq) * (lq - lp)).sum(axis=1), 0.0)
    return fwd, rev


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


B_CHOICES = range(2, 8)  # coarse bits per value
E_CHOICES = range(0, 7)  # refinement bits of the head values


def _choose_params(r: np.ndarray, p: np.ndarray, budget: np.ndarray):
    """Per row (b, e, H) minimising coded bits under a quadratic KL estimate <= budget; and whether one fits.

    Estimate: a value quantised with step s has error ~ U(-s/2, s/2) and
    ``KL ~ 1/2 Var_p(err) <= 1/2 sum_j p_j s_j^2 / 12``: coarse values weigh ``D^2/24`` times
    their mass, refined ones ``(D / 2^e)^2 / 24``. With P_H the mass of the values with c < H,
    ``est = D^2/24 (1 - P_H (1 - 4^-e))`` falls and the bits rise with H, so for each (b, e)
    the best H is the smallest that meets the budget (a count over the sorted cumulative mass).
    """
    n, k = r.shape
    rmax = r.max(axis=1)
    best_bits = np.full(n, np.inf)
    best = np.zeros((n, 3), dtype=np.int64)
    rows = np.arange(n)
    for b in B_CHOICES:
        levels = (1 << b) - 1
        scale = _scale_f16(rmax, levels)
        c = np.minimum(np.rint(r / scale[:, None]), levels).astype(np.int64)
        flat = (rows[:, None] * (levels + 1) + c).reshape(-1)
        mass = np.bincount(flat, weights=p.reshape(-1), minlength=n * (levels + 1)).reshape(n, levels + 1)
        cnt = np.bincount(flat, minlength=n * (levels + 1)).reshape(n, levels + 1)
        head_mass = np.cumsum(mass, axis=1)[:, :-1]  # [:, H-1] = mass of c < H, H = 1..levels
        head_cnt = np.concatenate([np.zeros((n, 1), np.int64), np.cumsum(cnt, axis=1)[:, :-1]], axis=1)
        d2 = scale ** 2 / 24.0
        for e in E_CHOICES:
            if e == 0:
                ok, h, extra = d2 <= budget, np.zeros(n, np.int64), 0
            else:
                need = (1.0 - budget / d2) / (1.0 - 4.0 ** -e)  # P_H must reach this
                h = (head_mass < need[:, None] - 1e-12).sum(axis=1) + 1
                h = np.where(need <= 0, 0, h)
                ok = h <= levels
                h = np.minimum(h, levels)
                extra = np.ceil(head_cnt[rows, h] / BLOCK) * BLOCK * e
            bits = np.where(ok, k * b + extra, np.inf)
            better = bits < best_bits
            best_bits = np.where(better, bits, best_bits)
            best[better] = np.stack([np.full(n, b), np.full(n, e), h], axis=1)[better]
    return best[:, 0], best[:, 1], best[:, 2], np.isfinite(best_bits)


def _scale_f16(rmax: np.ndarray, levels: int) -> np.ndarray:
    """Coarse step D as the float16 it is stored in, never below the max r / levels (no clipping)."""
    d = np.maximum(rmax / levels, 1e-6).astype(np.float16)
    low = d.astype(np.float64) * levels < rmax
    d[low] = np.nextafter(d[low], np.float16(np.inf))
    return d.astype(np.float64)


def quantise(logp: np.ndarray, b, e, h):
    """Coarse levels, refinement mask and sub-cells, scale and m for given per-row (b, e, H)."""
    m = logp.max(axis=1).astype(np.float32)
    r = (m[:, None] - logp).astype(np.float64)
    levels = (1 << b) - 1
    scale = np.empty(len(r))
    for bb in np.unique(b):
        sel = b == bb
        scale[sel] = _scale_f16(r[sel].max(axis=1), (1 << int(bb)) - 1)
    c = np.minimum(np.rint(r / scale[:, None]), levels[:, None]).astype(np.int64)
    refined = (c < h[:, None]) & (e[:, None] > 0)
    sub = np.exp2(e.astype(np.float64))[:, None]
    f = np.clip(np.rint((r / scale[:, None] - c) * sub) + sub / 2, 0, sub - 1).astype(np.int64)
    f = np.where(refined, f, 0)
    return m, scale.astype(np.float16), c, refined, f


def _reconstruct(logp, lse, b, e, h):
    """The decoder's log-probabilities for rows coded with (b, e, H), and the quantised fields."""
    m, scale, c, refined, f = quantise(logp, b, e, h)
    rows, cols = np.nonzero(refined)
    base = m.astype(np.float32) + lse.astype(np.float32)
    values = dequantise(base, scale, c, rows, cols, f[rows, cols], e)
    return values - lse.astype(np.float32)[:, None], (m, scale, c, refined, f)


def encode_values_kl(logp: np.ndarray, lse: np.ndarray, max_kl: float):
    """Choose (b, e, H) per row under the exact bound max(KL(p || p~), KL(p~ || p)) <= max_kl; returns the
    quantised fields and the achieved KLs (forward "kl", reverse "rkl") and max error."""
    n, k = logp.shape
    logp = logp.astype(np.float32)
    m = logp.max(axis=1)
    r = (m[:, None] - logp).astype(np.float64)
    p = np.exp(_log_softmax(logp.astype(np.float64)))
    b = np.full(n, 8)
    e = np.full(n, 12)
    h = np.full(n, 255)
    todo = np.arange(n)
    budget = np.full(n, max_kl)
    kl = np.zeros(n)
    for attempt in range(6):
        if len(todo) == 0:
            break
        bb, ee, hh, ok = _choose_params(r[todo], p[todo], budget[todo])
        bb, ee, hh = np.where(ok, bb, 8), np.where(ok, ee, 12), np.where(ok, hh, 255)
        b[todo], e[todo], h[todo] = bb, ee, hh
        rec = _reconstruct(logp[todo], lse[todo], bb, ee, hh)[0]
        kl_t, rkl_t = topk_kl_both(logp[todo], rec)
        kl[todo] = kl_t
        bad = (kl_t > max_kl) | (rkl_t > max_kl)  # both directions
        budget[todo[bad]] /= 4.0
        todo = todo[bad]
    if len(todo):  # last resort: the finest code (b=8, e=12); its error is far below any sane bound
        b[todo], e[todo], h[todo] = 8, 12, 255
    rec, (m, scale, c, refined, f) = _reconstruct(logp, lse, b, e, h)
    kl, rkl = topk_kl_both(logp, rec)
    err = np.abs(rec.astype(np.float64) - logp.astype(np.float64)).max(axis=1) if k else np.zeros(n)
    return {"m": m, "scale": scale, "b": b, "e": e, "h": h, "coarse": c, "refined": refined, "fine": f,
            "kl": kl, "rkl": rkl, "max_abs_err": err}


# ---------------------------------------------------------------------------------------------
# Rows -> streams, streams -> rows
# ---------------------------------------------------------------------------------------------

def encode_rows(ids: np.ndarray, values: np.ndarray, lse: np.ndarray, vocab_size: int, mode: str,
                max_kl: float = 1e-3, native: bool = True) -> dict:
    """Code rows (ids int [n, k], raw logits z fp32 [n, k], lse fp32 [n]).

    Returns numpy arrays: ``header`` (structured [n]), ``widths`` (nibble-packed id widths [n, nb/2]),
    ``stream_a`` (ids blocks + value blocks per row), ``stream_b`` (refinement blocks, mode kl),
    ``len_a`` / ``len_b`` (bytes per row), plus ``stats`` (error measures) and ``value_dtype``.
    `native`: use the C encoder when it is built (the same outputs, bit for bit, stats included;
    ~10x faster in mode kl); False, or no C encoder: the numpy reference below.
    """
    if native and _native_encoder_takes(ids, values, lse, vocab_size, mode):
        return _encode_native(ids, values, lse, vocab_size, mode, max_kl)
    n, k = ids.shape
    kp, nb = _kpad(k), _kpad(k) // BLOCK
    order, codes, gaps, id_w = encode_ids(ids, vocab_size)
    z = np.take_along_axis(values.astype(np.float32), order, axis=1)
    lse = lse.astype(np.float32)
    out = {"widths": pack_nibbles(codes)}
    fields = [gaps.reshape(n * nb, BLOCK)]
    widths = [id_w]
    if mode == "lossless":
        bf16 = bool((z.view(np.uint32) & 0xFFFF == 0).all())
        out["value_dtype"] = "bf16" if bf16 else "f32"
        out["values"] = (z.view(np.uint32) >> 16).astype(np.uint16) if bf16 else z
        header = np.zeros(n, HEADER_LOSSLESS)
        header["lse"] = lse
        out.update(header=header, stream_a=pack_blocks(gaps.reshape(n * nb, BLOCK), id_w.reshape(-1)),
                   len_a=id_w.sum(axis=1), stream_b=np.zeros(0, np.uint8), len_b=np.zeros(n, np.int64),
                   stats={"kl": np.zeros(n), "rkl": np.zeros(n), "max_abs_err": np.zeros(n)})
        return out
    if mode != "kl":
        raise ValueError(f"unknown cache mode {mode!r}; expected one of {MODES}")
    if not np.isfinite(lse).all() or np.isnan(z).any() or (n and not np.isfinite(z.max(axis=1)).all()):
        raise ValueError("non-finite teacher logsumexp or top logit")
    # -inf logits (masked tokens) become FLOOR nats below the row's max: probability e^-100 ~ 0
    logp = np.maximum(z - lse[:, None], (z.max(axis=1) - lse)[:, None] - FLOOR) if n else z
    q = encode_values_kl(logp, lse, max_kl)
    header = np.zeros(n, HEADER_KL)
    header["lse"], header["m"], header["scale"] = lse, q["m"], q["scale"]
    header["be"] = ((q["b"] - 1) | (q["e"] << 4)).astype(np.uint8)
    header["h"] = q["h"].astype(np.uint8)
    coarse = np.pad(q["coarse"], ((0, 0), (0, kp - k))).reshape(n * nb, BLOCK)
    fields.append(coarse)
    widths.append(np.repeat(q["b"][:, None], nb, axis=1))
    # per row: [id blocks][value blocks]; blocks listed row by row
    all_fields = np.concatenate([f.reshape(n, nb, BLOCK) for f in fields], axis=1).reshape(-1, BLOCK)
    all_widths = np.concatenate(widths, axis=1).reshape(-1)
    stream_a = pack_blocks(all_fields, all_widths)
    len_a = np.concatenate(widths, axis=1).sum(axis=1)
    # refinement: the sub-cells of the refined values, row by row, in id order, 8 per block
    nh = q["refined"].sum(axis=1)
    nblk = -(-nh // BLOCK)
    fine_vals = q["fine"][q["refined"]]
    slot = _ragged_slots(nh, nblk * BLOCK)
    padded = np.zeros(int(nblk.sum()) * BLOCK, dtype=np.int64)
    padded[slot] = fine_vals
    stream_b = pack_blocks(padded.reshape(-1, BLOCK), np.repeat(q["e"], nblk))
    out.update(header=header, stream_a=stream_a, len_a=len_a, stream_b=stream_b, len_b=nblk * q["e"],
               value_dtype="kl", stats={"kl": q["kl"], "rkl": q["rkl"], "max_abs_err": q["max_abs_err"]})
    return out


def _native_encoder_takes(ids, values, lse, vocab_size, mode) -> bool:
    """Whether the C encoder codes these rows (else the numpy reference runs, and raises what it raises)."""
    if (_codec_native is None or not hasattr(_codec_native, "encode") or mode not in MODES
            or getattr(_codec_native, "ENCODER_VERSION", 1) != NATIVE_ENCODER_VERSION):
        return False  # (an extension built before the encoder existed has only `decode`; one built before
        # the two-sided bound, ENCODER_VERSION 2, bounds the forward KL only: the numpy encoder runs)
    if not all(isinstance(a, np.ndarray) for a in (ids, values, lse)) or ids.ndim != 2:
        return False
    n, k = ids.shape
    return (ids.dtype.kind in "iu" and values.shape == ids.shape and lse.shape == (n,) and 1 <= k <= NATIVE_MAX_K
            and 1 <= vocab_size <= 1 << MAX_WIDTH)


def _encode_native(ids, values, lse, vocab_size, mode, max_kl) -> dict:
    """`encode_rows` through the C encoder (_codec_native.c documents its order of operations)."""
    n, k = ids.shape
    nb = _kpad(k) // BLOCK
    kl = mode == "kl"
    lse = np.ascontiguousarray(lse, dtype=np.float32)
    header = np.zeros(n, HEADER_KL if kl else HEADER_LOSSLESS)
    widths = np.zeros((n, (nb + 1) // 2), dtype=np.uint8)
    len_a, len_b = np.zeros(n, dtype=np.int64), np.zeros(n, dtype=np.int64)
    kl_out, rkl_out, err = np.zeros(n), np.zeros(n), np.zeros(n)
    z = np.zeros((0 if kl else n, k), dtype=np.float32)
    sa, sb, bf16 = _codec_native.encode(
        n, k, int(kl), id_width(vocab_size), int(vocab_size), float(max_kl),
        np.ascontiguousarray(ids, dtype=np.int64), np.ascontiguousarray(values, dtype=np.float32), lse,
        header.view(np.uint8), widths, len_a, len_b, kl_out, rkl_out, err, z)
    out = {"widths": widths}  # the keys in the order of the numpy encoder's
    if not kl:
        out["value_dtype"] = "bf16" if bf16 else "f32"
        out["values"] = (z.view(np.uint32) >> 16).astype(np.uint16) if bf16 else z
    out.update(header=header, stream_a=np.frombuffer(sa, dtype=np.uint8), len_a=len_a,
               stream_b=np.frombuffer(sb, dtype=np.uint8), len_b=len_b)
    if kl:
        out["value_dtype"] = "kl"
    out["stats"] = {"kl": kl_out, "rkl": rkl_out, "max_abs_err": err}
    return out


def _ragged_slots(count: np.ndarray, capacity: np.ndarray) -> np.ndarray:
    """Flat positions of the first count[i] slots of segment i in segments of size capacity[i]."""
    starts = _excl_cumsum(capacity)
    within = np.arange(int(count.sum())) - np.repeat(_excl_cumsum(count), count)
    return np.repeat(starts, count) + within


def dequantise(base: np.ndarray, scale: np.ndarray, coarse: np.ndarray, rows: np.ndarray, cols: np.ndarray,
               fine: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Values fp32 ``base - r~`` (base = m + lse per row), the same float32 operations in encoder and decoder.

    Coarse values: ``r~ = D c``; refined ones (at rows, cols): ``r~ = D (c + f 2^-e - 1/2)``, a grid
    of step D / 2^e that contains D c, so the most probable value (r = 0) is always exact.
    """
    d = scale.astype(np.float32)
    out = coarse.astype(np.float32)
    out *= d[:, None]
    np.subtract(base.astype(np.float32)[:, None], out, out=out)
    if len(rows):
        sub = np.exp2(-e[rows].astype(np.float32))
        adj = d[rows] * (fine.astype(np.float32) * sub - np.float32(0.5))
        out[rows, cols] -= adj
    return out


def decode_rows(k: int, vocab_size: int, mode: str, value_dtype: str, header: np.ndarray, widths: np.ndarray,
                stream_a: np.ndarray, off_a: np.ndarray, values: np.ndarray | None = None,
                stream_b: np.ndarray | None = None, off_b0: np.ndarray | None = None, seg_b: np.ndarray | None = None,
                native: bool = True, ids_dtype=np.int32):
    """Decode n rows: ids [n, k] (ascending, `ids_dtype`), values fp32 [n, k] (raw logits z = logp + lse), lse fp32 [n].

    `off_a`: byte offset of each row in `stream_a` (a uint8 buffer padded by `PAD` bytes). For mode lossless,
    `values` are the rows of the dense value section. For mode kl, refinement offsets are
    computed here: `off_b0[i]` is the byte offset in `stream_b` of the first row of the
    segment `seg_b[i]` that row i belongs to (segments: runs of consecutive rows, `seg_b`
    non-decreasing). `native`: use the C decoder when it is built (else, or with False, numpy).
    `ids_dtype`: np.int32 or np.int64 (what torch indexing wants; the C decoder writes it directly).
    """
    n = len(off_a)
    kp, nb = _kpad(k), _kpad(k) // BLOCK
    off_a = np.asarray(off_a, dtype=np.int64)
    if native and _codec_native is not None:
        return _decode_native(k, vocab_size, mode, value_dtype, header, widths, stream_a, off_a, values,
                              stream_b, off_b0, seg_b, ids_dtype)
    bytes_a, stream_a = stream_a, expand32(stream_a)
    id_w = id_widths_from_codes(unpack_nibbles(widths, nb), vocab_size)
    blk_w = np.cumsum(id_w, axis=1)
    blk_off = off_a[:, None] + (blk_w - id_w)
    gaps = unpack_blocks(stream_a, blk_off.reshape(-1), id_w.reshape(-1)).reshape(n, kp)
    ids = gaps.view(np.int32)
    ids += 1
    ids = np.cumsum(ids, axis=1, dtype=np.dtype(ids_dtype))[:, :k]
    ids -= 1
    lse = header["lse"].astype(np.float32)
    if mode == "lossless":  # `values`: the rows' stored values [n, k] (uint16 bf16 bits or float32)
        return ids, _lossless_values(values, value_dtype), lse
    be = header["be"]
    b = (be & 15).astype(np.int64) + 1
    e = (be >> 4).astype(np.int64)
    coarse = unpack_rows(bytes_a, off_a + blk_w[:, -1], b, kp)[:, :k]
    refined = coarse < header["h"][:, None]
    refined &= (e > 0)[:, None]
    flat = np.flatnonzero(refined)
    rows, cols = flat // k, flat % k
    fine = np.zeros(0, dtype=np.uint32)
    if len(rows):
        nh = np.bincount(rows, minlength=n)
        nblk = -(-nh // BLOCK)
        lens = nblk * e
        # each row's refinement blocks: its segment's start + the bytes of earlier rows of the segment
        csum = _excl_cumsum(lens)
        seg_first = np.searchsorted(seg_b, seg_b, side="left")
        row_off = off_b0 + csum - csum[seg_first]
        ew = np.repeat(e, nblk)
        boff = np.repeat(row_off, nblk) + (np.arange(int(nblk.sum())) - np.repeat(_excl_cumsum(nblk), nblk)) * ew
        fine = unpack_blocks(expand32(stream_b), boff, ew).reshape(-1)[_ragged_slots(nh, nblk * BLOCK)]
    base = header["m"].astype(np.float32) + lse
    return ids, dequantise(base, header["scale"], coarse, rows, cols, fine, e), lse


def _lossless_values(values: np.ndarray, value_dtype: str) -> np.ndarray:
    """Stored lossless values [n, k] (uint16 bf16 bits or float32) as float32 logits."""
    return (values.astype(np.uint32) << 16).view(np.float32) if value_dtype == "bf16" else values.astype(np.float32)


def _decode_native(k, vocab_size, mode, value_dtype, header, widths, stream_a, off_a, values, stream_b, off_b0, seg_b,
                   ids_dtype):
    """`decode_rows` through the C decoder (dist_distill/_codec_native.c)."""
    n = len(off_a)
    kl = mode == "kl"
    ids = np.empty((n, k), dtype=np.dtype(ids_dtype))
    vals = np.empty((n, k) if kl else (0,), dtype=np.float32)
    none64 = np.zeros(0, dtype=np.int64)
    _codec_native.decode(
        k, id_width(vocab_size), int(kl),
        np.ascontiguousarray(header).view(np.uint8) if kl else np.zeros(0, np.uint8),
        np.ascontiguousarray(widths, dtype=np.uint8), np.ascontiguousarray(stream_a, dtype=np.uint8), off_a,
        np.ascontiguousarray(stream_b, dtype=np.uint8) if kl else np.zeros(0, np.uint8),
        np.ascontiguousarray(off_b0, dtype=np.int64) if kl else none64,
        np.ascontiguousarray(seg_b, dtype=np.int64) if kl else none64, ids, vals)
    lse = header["lse"].astype(np.float32)
    return ids, (vals if kl else _lossless_values(values, value_dtype)), lse
