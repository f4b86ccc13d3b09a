/* Native encoder and decoder of dd-topk-v1 cache rows: the same results, bit for bit, as the numpy
 * reference codec in dist_distill/teacher/cache/codec.py (encode_rows / decode_rows, which document
 * the format), one pass per row instead of whole-batch array passes. Built by setup.py as an
 * optional extension (dist_distill.teacher.cache._codec_native); when it is missing the numpy
 * codec runs.
 *
 * decode: arguments are buffers (numpy arrays, C-contiguous); nothing is allocated.
 * encode: the comment block at the start of the encoder section lists the order of operations it
 * reproduces.
 *
 * Float arithmetic must equal numpy's operations exactly: every operation is a separate float32 or
 * float64 operation, in numpy's order (no contraction into FMA: setup.py compiles with
 * -ffp-contract=off; no -ffast-math, no extended-precision evaluation: checked below).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__FAST_MATH__) || (defined(FLT_EVAL_METHOD) && FLT_EVAL_METHOD != 0)
#error "the cache codec needs IEEE float32/float64 arithmetic as numpy does it (no -ffast-math, no x87 excess precision)"
#endif

#define BLOCK 8
#define FULL_WIDTH_CODE 15
#define HEADER_KL_BYTES 12 /* lse f32, m f32, scale f16, b-1 | e << 4 u8, h u8 */

/* Field of `width` bits at bit `bit` of buf[0, len); sets *bad instead of reading past the end. */
static inline uint32_t read_field(const uint8_t *buf, Py_ssize_t len, int64_t bit, int width, int *bad) {
    uint32_t word;
    if (bit < 0 || (bit >> 3) + 4 > len) { /* streams carry PAD zero bytes after their last field */
        *bad = 1;
        return 0;
    }
    memcpy(&word, buf + (bit >> 3), 4); /* little-endian host */
    return (word >> (bit & 7)) & (uint32_t)((1u << width) - 1u);
}

static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h >> 15) << 31, exp = (h >> 10) & 31, mant = h & 1023, bits;
    if (exp == 0) {
        if (mant == 0) {
            bits = sign;
        } else { /* subnormal half: normalise */
            exp = 127 - 15 + 1;
            while (!(mant & 1024)) { mant <<= 1; exp--; }
            bits = sign | (exp << 23) | ((mant & 1023) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7f800000u | (mant << 13);
    } else {
        bits = sign | ((exp + 127 - 15) << 23) | (mant << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static int check(Py_buffer *b, Py_ssize_t need, const char *what) {
    if (b->len < need) {
        PyErr_Format(PyExc_ValueError, "%s: buffer of %zd bytes, need %zd", what, b->len, need);
        return 0;
    }
    return 1;
}

/* decode(k, id_width, kl, header, widths, stream_a, off_a, stream_b, off_b0, seg, ids_out, vals_out)
 *   header   uint8 [n, 12] (mode kl) or ignored; widths uint8 [n, ceil(nb/2)] id width nibbles
 *   stream_a bytes; off_a int64 [n] byte offset of each row's id blocks (value blocks follow)
 *   stream_b bytes; off_b0 int64 [n]: offset of the row's segment's first refinement byte;
 *   seg int64 [n]: segment of each row (non-decreasing); ids_out int32 or int64 [n, k] (told apart
 *   by its size); vals_out f32 [n, k]
 *   (kl only; base m + lse minus the dequantised distance to the max).
 */
static PyObject *decode(PyObject *self, PyObject *args) {
    int k, id_full, kl;
    Py_buffer header, widths, sa, off_a, sb, off_b0, seg, ids_out, vals_out;
    if (!PyArg_ParseTuple(args, "iiiy*y*y*y*y*y*y*w*w*", &k, &id_full, &kl, &header, &widths, &sa, &off_a, &sb,
                          &off_b0, &seg, &ids_out, &vals_out))
        return NULL;
    PyObject *result = NULL;
    const int kp = (k + BLOCK - 1) / BLOCK * BLOCK, nb = kp / BLOCK, nb2 = (nb + 1) / 2;
    const Py_ssize_t n = off_a.len / 8;
    const int ids64 = ids_out.len >= n * k * 8 && n * k > 0;
    if (!check(&widths, n * nb2, "widths") || !check(&ids_out, n * k * 4, "ids_out") ||
        (kl && (!check(&header, n * HEADER_KL_BYTES, "header") || !check(&off_b0, n * 8, "off_b0") ||
                !check(&seg, n * 8, "seg") || !check(&vals_out, n * k * 4, "vals_out"))))
        goto done;
    if (k > 4096) {
        PyErr_SetString(PyExc_ValueError, "k > 4096");
        goto done;
    }
    {
        const uint8_t *wd = widths.buf, *a = sa.buf, *b = sb.buf, *hd = header.buf;
        const int64_t *oa = off_a.buf, *ob = off_b0.buf, *sg = seg.buf;
        int32_t *ids32 = ids_out.buf;
        int64_t *ids64_buf = ids_out.buf;
        float *vals = vals_out.buf;
        uint32_t coarse[4096];
        int64_t cur_b = 0, last_seg = -1;
        int bad = 0;
        for (Py_ssize_t i = 0; i < n; i++) {
            int64_t bit = oa[i] * 8;
            int32_t id = -1;
            int32_t *row_ids32 = ids32 + i * k;
            int64_t *row_ids64 = ids64_buf + i * k;
            for (int blk = 0; blk < nb; blk++) {
                int code = (wd[i * nb2 + blk / 2] >> ((blk & 1) * 4)) & 15;
                int w = code == FULL_WIDTH_CODE ? id_full : code;
                for (int j = 0; j < BLOCK; j++) {
                    int t = blk * BLOCK + j;
                    uint32_t gap = w ? read_field(a, sa.len, bit + (int64_t)j * w, w, &bad) : 0;
                    id += (int32_t)gap + 1;
                    if (t < k) {
                        if (ids64) row_ids64[t] = id;
                        else row_ids32[t] = id;
                    }
                }
                bit += BLOCK * w;
            }
            if (!kl) continue;
            const uint8_t *h = hd + i * HEADER_KL_BYTES;
            float lse, m;
            uint16_t scale16;
            memcpy(&lse, h, 4);
            memcpy(&m, h + 4, 4);
            memcpy(&scale16, h + 8, 2);
            int bw = (h[10] & 15) + 1, e = h[10] >> 4, hh = h[11];
            float d = half_to_float(scale16), base = m + lse;
            for (int t = 0; t < k; t++) coarse[t] = read_field(a, sa.len, bit + (int64_t)t * bw, bw, &bad);
            if (sg[i] != last_seg) {
                cur_b = ob[i];
                last_seg = sg[i];
            }
            float sub = 1.0f;
            for (int q = 0; q < e; q++) sub *= 0.5f; /* exp2(-e), exact */
            float *row_vals = vals + i * k;
            int64_t fbit = cur_b * 8;
            int nh = 0;
            for (int t = 0; t < k; t++) {
                float c = (float)coarse[t];
                float v = c * d;
                v = base - v;
                if (e > 0 && coarse[t] < (uint32_t)hh) {
                    float f = (float)read_field(b, sb.len, fbit + (int64_t)nh * e, e, &bad);
                    float adj = f * sub;
                    adj = adj - 0.5f;
                    adj = d * adj;
                    v = v - adj;
                    nh++;
                }
                row_vals[t] = v;
            }
            cur_b += (int64_t)((nh + BLOCK - 1) / BLOCK) * e;
        }
        if (bad) {
            PyErr_SetString(PyExc_ValueError, "cache rows point past the end of their stream (corrupt shard)");
            goto done;
        }
    }
    result = Py_None;
    Py_INCREF(result);
done:
    PyBuffer_Release(&header);
    PyBuffer_Release(&widths);
    PyBuffer_Release(&sa);
    PyBuffer_Release(&off_a);
    PyBuffer_Release(&sb);
    PyBuffer_Release(&off_b0);
    PyBuffer_Release(&seg);
    PyBuffer_Release(&ids_out);
    PyBuffer_Release(&vals_out);
    return result;
}

/* ============================================================================================== */
/* Encoder                                                                                         */
/* ============================================================================================== */
/*
 * encode(n, k, kl, id_full, vocab_size, max_kl, ids, z, lse,
 *        header_out, widths_out, len_a_out, len_b_out, kl_out, rkl_out, err_out, values_out)
 *     -> (stream_a: bytearray, stream_b: bytearray, all_bf16: bool)
 *
 *   ids int64 [n, k], z float32 [n, k] (raw logits, value order), lse float32 [n]; outputs:
 *   header_out uint8 [n, 12] (kl: lse f32, m f32, scale f16, (b-1) | e << 4, H) or [n, 4] (lossless:
 *   lse f32); widths_out uint8 [n, ceil(nb / 2)] (id width nibbles); len_a_out, len_b_out int64 [n];
 *   kl_out, rkl_out, err_out float64 [n] (forward KL, reverse KL, max error); values_out float32 [n, k] (lossless: z in id order; kl: unused).
 *   all_bf16: every value is a bf16 number (lossless; the caller then keeps the upper 16 bits).
 *
 * The numpy reference encoder (codec.encode_rows with native=False) works on whole batches, but
 * every step of it is per row; this encoder runs the same steps row by row, with the same float
 * operations in the same order. Per row:
 *
 *  ids (encode_ids)
 *   1. ids in [0, V) (else "ids outside [0, V)": numpy checks all rows' ids first, so this error
 *      comes before any other of any row).
 *   2. stable ascending sort of the row's ids (np.argsort kind="stable"); gaps g_0 = id_0,
 *      g_j = id_j - id_{j-1} - 1 (a negative gap: "duplicate ids in a top-k row"), padded with 0 to
 *      kp = 8 ceil(k / 8); per block of 8 the width code min(bitlen(max gap), 15); its width is
 *      id_full for code 15, else the code.
 *   3. z permuted into id order.
 *  mode lossless: z stored as it is.
 *  mode kl (encode_rows, encode_values_kl); float32 unless marked float64:
 *   4. lse finite, no NaN in z, the row's max zmax finite; else "non-finite teacher logsumexp or top
 *      logit", raised only after the ids of all rows were checked (numpy checks the ids first).
 *   5. logp_j = max(z_j - lse, (zmax - lse) - FLOOR): -inf logits become FLOOR nats below the max.
 *   6. m = max logp; r_j = (float64)(m - logp_j); rmax = max r.
 *   7. float64 (_log_softmax): x_j = logp_j - m; lp_j = x_j - log(0 + pairwise_sum(exp(x)));
 *      p_j = exp(lp_j).
 *   8. budget = max_kl; up to 6 attempts:
 *      a. (b, e, H) (_choose_params), float64. For b = 2..7 (L = 2^b - 1): D = scale_f16(rmax, L);
 *         c_j = min(rint(r_j / D), L); mass[c] = the p_j with c_j = c added in j order to 0.0
 *         (np.bincount); head_mass = sequential cumsum of mass; head_cnt[h] = #{j: c_j < h};
 *         d2 = D * D / 24; for e = 0..6:
 *           e = 0: ok = d2 <= budget, H = 0, extra = 0;
 *           e > 0: need = (1 - budget / d2) / (1 - 4^-e);
 *                  H = 1 + #{h in 1..L: head_mass[h-1] < need - 1e-12}; H = 0 if need <= 0;
 *                  ok = H <= L; H = min(H, L); extra = ceil(head_cnt[H] / 8) * 8 * e;
 *           bits = k b + extra if ok: strictly fewer bits than the best so far win (b, then e,
 *           ascending). No (b, e) fits: (8, 12, 255).
 *      b. quantise and reconstruct (quantise, dequantise): D = scale_f16(rmax, 2^b - 1);
 *         float64: c_j = min(rint(r_j / D), L); refined_j = c_j < H and e > 0;
 *         f_j = clip(rint((r_j / D - c_j) 2^e) + 2^e / 2, 0, 2^e - 1) (0 where not refined);
 *         float32: base = m + lse; v_j = base - c_j D; refined: v_j -= D (f_j 2^-e - 0.5);
 *         rec_j = v_j - lse.
 *      c. topk_kl_both, float64: y_j = rec_j - max rec; lq_j = y_j - log(0 + pairwise_sum(exp(y)));
 *         kl = max(0 + pairwise_sum(p_j (lp_j - lq_j)), 0) (forward);
 *         rkl = max(0 + pairwise_sum(exp(lq_j) (lq_j - lp_j)), 0) (reverse).
 *      d. kl > max_kl or rkl > max_kl: budget /= 4, next attempt; else done.
 *      After 6 attempts above the bound: (8, 12, 255), reconstructed and measured as in b, c.
 *   9. max_abs_err = max_j |rec_j - logp_j| (float64).
 *  10. stream a: the id blocks at their widths, then nb blocks of c at width b; stream b: the f_j of
 *      the refined values in id order, zero-padded to a multiple of 8, blocks of width e (kl).
 *      A block of 8 fields of w bits is w bytes, field j at bits [j w, (j + 1) w), little-endian
 *      (pack_blocks).
 *  scale_f16(rmax, L) (_scale_f16): d = max(rmax / L, 1e-6) rounded to float16 (nearest even);
 *  the next float16 up if d L < rmax (float64).
 *
 * Shortcuts that skip work without changing any result: the per-b tables of 8a do not depend on the
 * budget, so they are built once per row (b = 2, 3, 4 in one pass) and reused by the retries and by
 * 8b; the b loop stops once k b >= the best bits (no later (b, e) can have strictly fewer); the mass
 * of the top level L is never used and not kept; head_mass is non-decreasing, so the count of 8a is
 * a binary search; values that are not refined have one rec per level, so 8c takes exp (of y and of lq)
 * once per level.
 *
 * Exactness assumptions (tests/test_cache_codec.py compares this encoder with numpy's, bit for bit):
 * float64 exp and log are libm's (glibc) exp and log, which numpy also calls on x86-64 machines
 * without AVX512F; on AVX512F machines numpy uses its own SIMD float64 exp/log, whose last bits may
 * differ (the test would show it). x.sum(axis=-1) of a contiguous float64 row is numpy's pairwise
 * summation (8 accumulators up to 128 values, halving above) added to the identity 0.0; np.cumsum
 * and np.bincount(weights=) add sequentially; np.rint rounds half to even; float64 -> float16
 * casts round to nearest even directly (not through float32).
 * Not reproduced: the sign of m when a row's maximum is a zero present both as +0.0 and -0.0
 * (z = -0.0 beside z = +0.0 with lse = +0.0): numpy's SIMD max may return either (header bytes
 * only; decoded values are equal).
 */
#define FLOOR_NATS 100.0f /* codec.FLOOR */
#define ATTEMPTS 6
#define MAX_ID_WIDTH 25   /* codec.MAX_WIDTH */
#define PW_BLOCKSIZE 128  /* numpy's pairwise summation block */
#define RANK_SORT_MAX 128 /* rows up to this k are sorted by counting ranks (branch-free), longer ones by merging */
#define ENC_MAX_K 4096    /* as the decoder */
#define ENCODER_VERSION 2 /* codec.NATIVE_ENCODER_VERSION: 2 = the two-sided bound (forward and reverse KL) */

enum { ENC_OK = 0, ENC_NOMEM, ENC_ID_RANGE, ENC_DUPLICATE, ENC_NONFINITE };

/* numpy's float64 -> float16 cast (npy_double_to_half): round to nearest even, directly from double. */
static uint16_t double_to_half(double x) {
    uint64_t bits;
    memcpy(&bits, &x, 8);
    const uint16_t sign = (uint16_t)((bits >> 48) & 0x8000u);
    const int ex = (int)((bits >> 52) & 0x7ff);
    const uint64_t man = bits & 0xfffffffffffffULL;
    if (ex == 0x7ff) { /* inf, or NaN (kept a NaN) */
        uint16_t h = (uint16_t)(0x7c00u + (man >> 42));
        if (man && h == 0x7c00u) h++;
        return sign | h;
    }
    if (ex == 0) return sign; /* zero or a double subnormal: far below the smallest half */
    const int e = ex - 1023;
    if (e >= 16) return sign | 0x7c00u; /* overflow */
    const uint64_t sig = man | (1ULL << 52);
    const int shift = e >= -14 ? 42 : 28 - e; /* to units of the half's last place (2^-24 when subnormal) */
    if (shift > 62) return sign;
    uint64_t t = sig >> shift;
    const uint64_t rem = sig & ((1ULL << shift) - 1), half = 1ULL << (shift - 1);
    if (rem > half || (rem == half && (t & 1))) t++;
    /* normal: exponent field e + 15 and t in [1024, 2048] (2048: the carry moves into the exponent) */
    return sign | (uint16_t)(e >= -14 ? (uint64_t)(e + 14) * 1024 + t : t);
}

/* np.nextafter(h, +inf) for float16 bits */
static uint16_t half_next_up(uint16_t h) {
    if ((h & 0x7c00u) == 0x7c00u && (h & 0x3ffu)) return h; /* NaN */
    if (h == 0x7c00u) return h;                              /* +inf */
    if (h == 0x8000u || h == 0) return 1;                    /* +-0 -> smallest subnormal */
    return (h & 0x8000u) ? (uint16_t)(h - 1) : (uint16_t)(h + 1);
}

/* np.rint (round half to even, the default rounding mode) without a libm call; exact for all x */
static inline double rint_even(double x) {
    const double big = 4503599627370496.0; /* 2^52: above it every double is an integer */
    const double a = fabs(x), t = copysign((a + big) - big, x);
    return a < big ? t : x; /* large, inf or NaN: x itself (a select, so that loops vectorise) */
}

/* numpy's pairwise summation of a contiguous float64 run (pairwise_sum in umath/loops_utils.h) */
static double pairwise_sum(const double *a, Py_ssize_t n) {
    if (n < 8) {
        double res = -0.0;
        for (Py_ssize_t i = 0; i < n; i++) res += a[i];
        return res;
    }
    if (n <= PW_BLOCKSIZE) {
        double r[8];
        Py_ssize_t i;
        for (int j = 0; j < 8; j++) r[j] = a[j];
        for (i = 8; i < n - (n % 8); i += 8)
            for (int j = 0; j < 8; j++) r[j] += a[i + j];
        double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; i < n; i++) res += a[i];
        return res;
    }
    Py_ssize_t n2 = n / 2;
    n2 -= n2 % 8;
    return pairwise_sum(a, n2) + pairwise_sum(a + n2, n - n2);
}

/* x.sum(axis=-1) of one row: the reduction starts from add's identity 0.0 */
static inline double row_sum(const double *a, Py_ssize_t n) { return 0.0 + pairwise_sum(a, n); }

/* _scale_f16: the coarse step as the float16 it is stored in, never below rmax / levels */
static uint16_t scale_f16(double rmax, int levels) {
    double d = rmax / levels;
    if (d < 1e-6) d = 1e-6; /* np.maximum(., 1e-6) (a NaN stays NaN) */
    uint16_t h = double_to_half(d);
    if ((double)half_to_float(h) * levels < rmax) h = half_next_up(h);
    return h;
}

static inline int bitlen32(uint32_t x) { return x ? 32 - __builtin_clz(x) : 0; }

/* The per-b quantities of _choose_params for one row (they do not depend on the budget, so retries
 * with a smaller budget reuse them, and quantise reuses c). */
typedef struct {
    int ready;
    uint16_t scale16;
    double scale, d2;
    double head_mass[127]; /* [H - 1]: mass of the values with c < H, H = 1..L */
    uint8_t *c;            /* [k] coarse levels at this b */
} Level;

/* One row's working set in mode kl (arrays of k). */
typedef struct {
    int k;
    const float *logp; /* clipped log-probabilities, id order */
    const double *r;   /* (double)(m - logp) */
    const double *lp;  /* log_softmax(logp) */
    const double *p;   /* exp(lp) */
    double rmax;
    float m, lse;
    double *tmp;       /* scratch [k] */
    Level level[8];    /* b = 2..7 */
    /* set by reconstruct: */
    uint16_t scale16;
    const uint8_t *c;  /* coarse levels */
    int32_t *f;        /* sub-cells of the refined values (others: not set) */
    int32_t *refined;  /* [k]: indices of the refined values (c < H, e > 0), ascending */
    int n_refined;
    float *rec;        /* reconstructed log-probabilities */
    uint8_t *c8;       /* [k] storage for c at b = 8 */
} Row;

/* c_j = min(rint(r_j / D), L). r_j >= 0 and D > 0, so q = r_j / D >= 0, where rint(q) = (q + 2^52) - 2^52
 * below 2^52 (round half to even in the default rounding mode); from 2^52 up the result is >= 2^52 > L
 * (the operations are monotone), so the minimum is L either way. Branch-free, so that it vectorises. */
static void coarse_levels(const Row *w, double scale, int levels, uint8_t *c) {
    const double top = levels, big = 4503599627370496.0, *r = w->r;
    const int k = w->k;
    for (int j = 0; j < k; j++) {
        double cq = (r[j] / scale + big) - big;
        cq = cq > top ? top : cq;
        cq = cq > 0 ? cq : 0; /* (never below 0; keeps the level a valid index whatever the input) */
        c[j] = (uint8_t)(int)cq;
    }
}

/* Number of values with c < h (head_cnt[h]). */
static inline int count_below(const uint8_t *c, int k, int h) {
    int n = 0;
    for (int j = 0; j < k; j++) n += c[j] < h;
    return n;
}

/* Level tables of b = lo..hi (at most 3), the masses of all of them in one pass over the row, so that
 * their chains of additions run side by side. */
static void level_tables(Row *w, int lo, int hi) {
    const int k = w->k;
    const double *p = w->p;
    double mass[3][136];
    uint8_t *c[3];
    int top[3];
    for (int b = lo; b <= hi; b++) {
        Level *lv = &w->level[b];
        const int levels = (1 << b) - 1;
        lv->scale16 = scale_f16(w->rmax, levels);
        lv->scale = (double)half_to_float(lv->scale16);
        lv->d2 = lv->scale * lv->scale / 24.0;
        coarse_levels(w, lv->scale, levels, lv->c);
        c[b - lo] = lv->c;
        top[b - lo] = levels;
        for (int q = 0; q < levels; q++) mass[b - lo][q] = 0.0;
        for (int q = 128; q < 136; q++) mass[b - lo][q] = 0.0;
    }
    /* np.bincount: each level's mass added up in j order. The top level's mass is never used: it goes to
     * 8 dummy slots instead (no branch, no long chain of dependent additions). */
    if (hi - lo == 2) {
        for (int j = 0; j < k; j++) {
            const int c0 = c[0][j], c1 = c[1][j], c2 = c[2][j], d = 128 + (j & 7);
            mass[0][c0 < top[0] ? c0 : d] += p[j];
            mass[1][c1 < top[1] ? c1 : d] += p[j];
            mass[2][c2 < top[2] ? c2 : d] += p[j];
        }
    } else {
        for (int b = lo; b <= hi; b++)
            for (int j = 0; j < k; j++) {
                const int cj = c[b - lo][j];
                mass[b - lo][cj < top[b - lo] ? cj : 128 + (j & 7)] += p[j];
            }
    }
    for (int b = lo; b <= hi; b++) {
        Level *lv = &w->level[b];
        const double *ms = mass[b - lo];
        double cs = ms[0];
        lv->head_mass[0] = cs;
        for (int q = 1; q < top[b - lo]; q++) {
            cs = cs + ms[q];
            lv->head_mass[q] = cs;
        }
        lv->ready = 1;
    }
}

static const double ONE_MINUS_4_POW_MINUS_E[7] = {0.0, 0.75, 0.9375, 0.984375, 0.99609375, 0.9990234375,
                                                  0.999755859375}; /* 1 - 4^-e, exact */

/* _choose_params for one row: (b, e, H) with the fewest bits whose KL estimate meets the budget; 0 if none. */
static int choose_params(Row *w, double budget, int *ob, int *oe, int *oh) {
    const int k = w->k;
    double best_bits = INFINITY;
    int best_b = 0, best_e = 0, best_h = 0;
    for (int b = 2; b <= 7; b++) {
        if ((double)k * b >= best_bits) break; /* every later (b, e) costs >= k b bits: none is strictly better */
        const int levels = (1 << b) - 1;
        const Level *lv = &w->level[b];
        if (!lv->ready) level_tables(w, b, b <= 4 ? 4 : b); /* b = 2, 3, 4 are (nearly) always all needed */
        const double spare = 1.0 - budget / lv->d2;
        for (int e = 0; e <= 6; e++) {
            int h, ok;
            double extra;
            if (e == 0) {
                ok = lv->d2 <= budget;
                h = 0;
                extra = 0.0;
            } else {
                const double need = spare / ONE_MINUS_4_POW_MINUS_E[e];
                const double thr = need - 1e-12;
                /* #{head_mass < thr}: head_mass is non-decreasing (a running sum of masses >= 0), so the
                 * count is the first index not below thr: binary search */
                int below = 0;
                for (int step = 64; step; step >>= 1)
                    if (below + step <= levels && lv->head_mass[below + step - 1] < thr) below += step;
                h = below + 1;
                if (need <= 0) h = 0;
                ok = h <= levels;
                if (h > levels) h = levels;
                extra = ok ? (double)((count_below(lv->c, k, h) + BLOCK - 1) / BLOCK * BLOCK * e) : 0.0;
            }
            const double bits = ok ? (double)(k * b) + extra : INFINITY;
            if (bits < best_bits) {
                best_bits = bits;
                best_b = b;
                best_e = e;
                best_h = h;
            }
        }
    }
    *ob = best_b;
    *oe = best_e;
    *oh = best_h;
    return isfinite(best_bits);
}

/* quantise + dequantise for one row coded with (b, e, H): scale16, c, f and rec */
static void reconstruct(Row *w, int b, int e, int h) {
    const int k = w->k, levels = (1 << b) - 1;
    if (b <= 7) {
        if (!w->level[b].ready) level_tables(w, b, b);
        w->scale16 = w->level[b].scale16;
        w->c = w->level[b].c;
    } else {
        w->scale16 = scale_f16(w->rmax, levels);
        coarse_levels(w, (double)half_to_float(w->scale16), levels, w->c8);
        w->c = w->c8;
    }
    const float d = half_to_float(w->scale16), base = w->m + w->lse;
    const uint8_t *c = w->c;
    const float lse = w->lse;
    float *rec = w->rec;
    int32_t *refined = w->refined;
    for (int j = 0; j < k; j++) { /* coarse values */
        float v = (float)c[j] * d;
        v = base - v;
        rec[j] = v - lse;
    }
    const int hh = e > 0 ? h : 0; /* refined: c < hh */
    int nr = 0;
    for (int j = 0; j < k; j++) {
        refined[nr] = j;
        nr += c[j] < hh;
    }
    w->n_refined = nr;
    const float sub32 = 1.0f / (float)(1 << e);             /* np.exp2(-e) (float32, exact) */
    const double scale = (double)d, sub = (double)(1 << e); /* np.exp2(e) (exact) */
    for (int t = 0; t < nr; t++) { /* refined values */
        const int j = w->refined[t];
        double fv = rint_even((w->r[j] / scale - (double)c[j]) * sub) + sub / 2;
        if (fv < 0) fv = 0;
        if (fv > sub - 1) fv = sub - 1;
        const int f = (int)fv;
        float v = (float)c[j] * d;
        v = base - v;
        float adj = (float)f * sub32;
        adj = adj - 0.5f;
        adj = d * adj;
        v = v - adj;
        w->f[j] = f;
        w->rec[j] = v - w->lse;
    }
}

/* topk_kl_both(logp, rec) for one row coded with (b, e, H) (lp and p = exp(lp) precomputed; w->refined from
 * reconstruct): the forward KL returned, the reverse one in *rkl. The values that are not refined take one
 * of L + 1 values (rec depends on c only): their exp (of y, then of lq) is computed once per level present,
 * the same number; each refined value gets its own. */
static double row_kl(const Row *w, int b, double *rkl) {
    const int k = w->k, levels = (1 << b) - 1, nr = w->n_refined;
    const float *rec = w->rec;
    const uint8_t *c = w->c;
    const int32_t *refined = w->refined;
    double *tmp = w->tmp;
    double mx = (double)rec[0];
    for (int j = 1; j < k; j++) mx = (double)rec[j] > mx ? (double)rec[j] : mx;
    double level_exp[256];
    int32_t at[256]; /* [c]: a value at level c that is not refined, or -1 */
    for (int q = 0; q <= levels; q++) at[q] = -1;
    for (int j = 0; j < k; j++) at[c[j]] = j;
    for (int t = 0; t < nr; t++) at[c[refined[t]]] = -1; /* (levels below H hold refined values only) */
    for (int q = 0; q <= levels; q++) level_exp[q] = at[q] >= 0 ? exp((double)rec[at[q]] - mx) : 0.0;
    for (int j = 0; j < k; j++) tmp[j] = level_exp[c[j]];
    for (int t = 0; t < nr; t++) tmp[refined[t]] = exp((double)rec[refined[t]] - mx);
    const double lz = log(row_sum(tmp, k));
    for (int j = 0; j < k; j++) {
        const double lq = ((double)rec[j] - mx) - lz;
        tmp[j] = w->p[j] * (w->lp[j] - lq);
    }
    const double s = row_sum(tmp, k);
    /* reverse: exp(lq_j) (lq_j - lp_j); lq depends on rec only, so once per level for the unrefined values */
    for (int q = 0; q <= levels; q++) level_exp[q] = at[q] >= 0 ? exp(((double)rec[at[q]] - mx) - lz) : 0.0;
    for (int j = 0; j < k; j++) {
        const double lq = ((double)rec[j] - mx) - lz;
        const double qj = at[c[j]] >= 0 ? level_exp[c[j]] : exp(lq); /* (at[c] < 0: c holds refined values only) */
        tmp[j] = qj * (lq - w->lp[j]);
    }
    const double sr = row_sum(tmp, k);
    *rkl = isnan(sr) ? sr : (sr > 0.0 ? sr : 0.0);
    return isnan(s) ? s : (s > 0.0 ? s : 0.0); /* np.maximum(s, 0.0) */
}

/* encode_values_kl for one row: the final (b, e, H), its reconstruction in w, the achieved KL and max error */
static void encode_values_row(Row *w, double max_kl, int *ob, int *oe, int *oh, double *okl, double *orkl,
                              double *oerr) {
    double budget = max_kl, kl = 0.0, rkl = 0.0;
    int b = 8, e = 12, h = 255, met = 0;
    for (int q = 0; q < 8; q++) w->level[q].ready = 0;
    for (int attempt = 0; attempt < ATTEMPTS; attempt++) {
        if (!choose_params(w, budget, &b, &e, &h)) {
            b = 8;
            e = 12;
            h = 255;
        }
        reconstruct(w, b, e, h);
        kl = row_kl(w, b, &rkl);
        if (!(kl > max_kl) && !(rkl > max_kl)) { /* both directions (numpy: (kl > max_kl) | (rkl > max_kl)) */
            met = 1;
            break;
        }
        budget /= 4.0;
    }
    if (!met && !(b == 8 && e == 12 && h == 255)) { /* last resort: the finest code */
        b = 8;
        e = 12;
        h = 255;
        reconstruct(w, b, e, h);
        kl = row_kl(w, b, &rkl);
    }
    double err = 0.0;
    for (int j = 0; j < w->k; j++) {
        const double a = fabs((double)w->rec[j] - (double)w->logp[j]);
        if (a > err) err = a;
    }
    *ob = b;
    *oe = e;
    *oh = h;
    *okl = kl;
    *orkl = rkl;
    *oerr = err;
}

/* order[rank of key j] = j for k distinct keys: rank = the number of smaller keys (branch-free counting,
 * four keys at a time; the compiler vectorises the inner loop). */
#define RANK_ORDER_BODY                                                                                            \
    int j = 0;                                                                                                     \
    for (; j + 4 <= k; j += 4) {                                                                                   \
        const int32_t x0 = key[j], x1 = key[j + 1], x2 = key[j + 2], x3 = key[j + 3];                              \
        int r0 = 0, r1 = 0, r2 = 0, r3 = 0;                                                                        \
        for (int i = 0; i < k; i++) {                                                                              \
            const int32_t y = key[i];                                                                              \
            r0 += y < x0;                                                                                          \
            r1 += y < x1;                                                                                          \
            r2 += y < x2;                                                                                          \
            r3 += y < x3;                                                                                          \
        }                                                                                                          \
        order[r0] = j;                                                                                             \
        order[r1] = j + 1;                                                                                         \
        order[r2] = j + 2;                                                                                         \
        order[r3] = j + 3;                                                                                         \
    }                                                                                                              \
    for (; j < k; j++) {                                                                                           \
        const int32_t x = key[j];                                                                                  \
        int rank = 0;                                                                                              \
        for (int i = 0; i < k; i++) rank += key[i] < x;                                                            \
        order[rank] = j;                                                                                           \
    }

static void rank_order(const int32_t *key, int k, int32_t *order) { RANK_ORDER_BODY }

#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define HAVE_RANK_ORDER_AVX2 1
/* The same integer code for AVX2 machines (twice the lanes), chosen at run time. */
__attribute__((target("avx2"))) static void rank_order_avx2(const int32_t *key, int k, int32_t *order) {
    RANK_ORDER_BODY
}
#endif
#undef RANK_ORDER_BODY

/* Stable ascending order of a row's ids (ids in [0, 2^25)): order[t] = index of the t-th smallest.
 * Keys (id, index) are distinct, so the rank of a key is the number of smaller keys. */
static void sort_row_ids(const int32_t *id, int k, int32_t *order, uint64_t *keys, uint64_t *tmp) {
    if (k <= RANK_SORT_MAX) {
        /* key (id << 7 | index) fits 32 bits; biased by 2^31, signed comparisons order it as unsigned */
        int32_t *key = (int32_t *)tmp;
        for (int j = 0; j < k; j++) key[j] = (int32_t)(((uint32_t)id[j] << 7 | (uint32_t)j) ^ 0x80000000u);
#ifdef HAVE_RANK_ORDER_AVX2
        if (__builtin_cpu_supports("avx2")) {
            rank_order_avx2(key, k, order);
            return;
        }
#endif
        rank_order(key, k, order);
        return;
    }
    for (int j = 0; j < k; j++) keys[j] = (uint64_t)(uint32_t)id[j] << 32 | (uint32_t)j;
    uint64_t *src = keys, *dst = tmp;
    for (int width = 1; width < k; width *= 2) { /* bottom-up merge sort */
        for (int lo = 0; lo < k; lo += 2 * width) {
            const int mid = lo + width < k ? lo + width : k, hi = lo + 2 * width < k ? lo + 2 * width : k;
            int i = lo, j = mid, t = lo;
            while (i < mid && j < hi) dst[t++] = src[j] < src[i] ? src[j++] : src[i++];
            while (i < mid) dst[t++] = src[i++];
            while (j < hi) dst[t++] = src[j++];
        }
        uint64_t *s = src;
        src = dst;
        dst = s;
    }
    for (int t = 0; t < k; t++) order[t] = (int32_t)(src[t] & 0xffffffffu);
}

/* A block of 8 fields of w bits (masked to w), packed into 32 bytes at out; with w a constant (see put_block)
 * the words stay in registers. */
static inline __attribute__((always_inline)) void put_block_w(uint8_t *out, const uint32_t *v, const int w) {
    uint64_t word[4] = {0, 0, 0, 0}; /* 8 w <= 200 bits */
    for (int j = 0; j < BLOCK; j++) {
        const int bit = j * w, q = bit >> 6, s = bit & 63;
        const uint64_t x = v[j] & ((1ULL << w) - 1);
        word[q] |= x << s;
        if (s + w > 64) word[q + 1] |= x >> (64 - s);
    }
    memcpy(out, word, sizeof word); /* little-endian host */
}

/* A block of 8 fields of w <= 25 bits appended at out: w bytes, followed by zero bytes up to out + 32 (out
 * must have 32 writable; the next block overwrites them). */
static inline uint8_t *put_block(uint8_t *out, const uint32_t *v, int w) {
    switch (w) { /* one specialised copy per width */
#define PUT_W(n) \
    case n: put_block_w(out, v, n); break;
        PUT_W(1) PUT_W(2) PUT_W(3) PUT_W(4) PUT_W(5) PUT_W(6) PUT_W(7) PUT_W(8) PUT_W(9) PUT_W(10) PUT_W(11)
        PUT_W(12) PUT_W(13) PUT_W(14) PUT_W(15) PUT_W(16) PUT_W(17) PUT_W(18) PUT_W(19) PUT_W(20) PUT_W(21)
        PUT_W(22) PUT_W(23) PUT_W(24) PUT_W(25)
#undef PUT_W
    default: /* w = 0: no bytes */
        break;
    }
    return out + w;
}

typedef struct {
    uint8_t *buf;
    size_t len, cap;
} Bytes;

static int reserve(Bytes *s, size_t more) {
    if (s->len + more <= s->cap) return 1;
    size_t cap = s->cap ? s->cap : 4096;
    while (cap < s->len + more) cap *= 2;
    uint8_t *buf = realloc(s->buf, cap);
    if (!buf) return 0;
    s->buf = buf;
    s->cap = cap;
    return 1;
}

typedef struct {
    Py_ssize_t n;
    int k, kl, id_full;
    int64_t vocab;
    double max_kl;
    const int64_t *ids;
    const float *z, *lse;
    uint8_t *header, *widths;
    int64_t *len_a, *len_b;
    double *kl_out, *rkl_out, *err_out;
    float *values;
    Bytes a, b;
    int all_bf16;
} Job;

static int ids_in_range(const int64_t *ids, Py_ssize_t count, int64_t vocab) {
    uint64_t outside = 0;
    for (Py_ssize_t t = 0; t < count; t++) outside |= (uint64_t)ids[t] >= (uint64_t)vocab;
    return !outside;
}

/* The whole batch (no Python calls: runs without the GIL). Returns ENC_OK or an error code: ids out of
 * range (in any row) before duplicate ids (in any row) before non-finite values, as numpy raises them. */
static int encode_batch(Job *job) {
    const Py_ssize_t n = job->n;
    const int k = job->k, kp = (k + BLOCK - 1) / BLOCK * BLOCK, nb = kp / BLOCK, nb2 = (nb + 1) / 2;
    /* scratch: double r, lp, p, tmp [k]; uint64 keys, tmp [k]; int32 id, order, f [k]; float zs, logp, rec [k];
     * uint32 gaps, fields [kp]; uint8 c [7 k] (b = 2..8) */
    const size_t kk = (size_t)k, kpp = (size_t)kp;
    char *mem = malloc(kk * (8 * 4 + 8 * 2 + 4 * 4 + 4 * 3 + 7) + kpp * 4 * 2);
    if (!mem) return ENC_NOMEM;
    double *r = (double *)mem, *lp = r + kk, *p = lp + kk, *dtmp = p + kk;
    uint64_t *keys = (uint64_t *)(dtmp + kk), *ktmp = keys + kk;
    int32_t *id32 = (int32_t *)(ktmp + kk), *order = id32 + kk, *fbuf = order + kk, *refined = fbuf + kk;
    float *zs = (float *)(refined + kk), *logp = zs + kk, *rec = logp + kk;
    uint32_t *gaps = (uint32_t *)(rec + kk), *fields = gaps + kpp;
    uint8_t *cmem = (uint8_t *)(fields + kpp);
    Row w;
    memset(&w, 0, sizeof w);
    w.k = k;
    w.logp = logp;
    w.r = r;
    w.lp = lp;
    w.p = p;
    w.tmp = dtmp;
    w.f = fbuf;
    w.refined = refined;
    w.rec = rec;
    for (int b = 2; b <= 7; b++) w.level[b].c = cmem + (b - 2) * kk;
    w.c8 = cmem + 6 * kk;
    const size_t row_a = (size_t)nb * (job->id_full + 8) + 32, row_b = (size_t)nb * 12 + 32; /* + put_block slack */
    int status = ENC_OK, nonfinite = 0;
    uint8_t codes[ENC_MAX_K / BLOCK + 2];
    int idw[ENC_MAX_K / BLOCK + 2];
    job->all_bf16 = 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        const int64_t *row_ids = job->ids + i * k;
        const float *row_z = job->z + i * k;
        if (i + 1 < n) {
            for (int t = 0; t < k; t += 8) __builtin_prefetch(row_ids + k + t);
            for (int t = 0; t < k; t += 16) __builtin_prefetch(row_z + k + t);
        }
        uint64_t outside = 0;
        for (int j = 0; j < k; j++) {
            outside |= (uint64_t)row_ids[j] >= (uint64_t)job->vocab; /* (negative ids wrap to huge) */
            id32[j] = (int32_t)row_ids[j];
        }
        if (outside) { /* numpy checks the range of all rows' ids first: this error before any other */
            status = ENC_ID_RANGE;
            goto out;
        }
        sort_row_ids(id32, k, order, keys, ktmp);
        int64_t prev = -1;
        for (int t = 0; t < k; t++) {
            const int64_t cur = id32[order[t]], g = cur - prev - 1;
            if (g < 0) { /* a duplicate, unless a later row has an id out of range */
                status = ids_in_range(job->ids + (i + 1) * k, (n - i - 1) * k, job->vocab) ? ENC_DUPLICATE : ENC_ID_RANGE;
                goto out;
            }
            gaps[t] = (uint32_t)g;
            prev = cur;
            zs[t] = row_z[order[t]];
        }
        for (int t = k; t < kp; t++) gaps[t] = 0;
        int64_t id_bytes = 0;
        for (int blk = 0; blk < nb; blk++) {
            uint32_t mx = 0;
            for (int j = 0; j < BLOCK; j++)
                if (gaps[blk * BLOCK + j] > mx) mx = gaps[blk * BLOCK + j];
            const int bits = bitlen32(mx);
            codes[blk] = (uint8_t)(bits < FULL_WIDTH_CODE ? bits : FULL_WIDTH_CODE);
            idw[blk] = codes[blk] == FULL_WIDTH_CODE ? job->id_full : codes[blk];
            id_bytes += idw[blk];
        }
        codes[nb] = 0;
        for (int q = 0; q < nb2; q++) job->widths[i * nb2 + q] = (uint8_t)(codes[2 * q] | codes[2 * q + 1] << 4);
        const float lse = job->lse[i];
        if (!job->kl) {
            for (int t = 0; t < k; t++) {
                uint32_t u;
                memcpy(&u, &zs[t], 4);
                if (u & 0xffffu) job->all_bf16 = 0;
            }
            memcpy(job->values + i * k, zs, kk * 4);
            memcpy(job->header + i * 4, &lse, 4);
            if (!reserve(&job->a, row_a)) {
                status = ENC_NOMEM;
                goto out;
            }
            uint8_t *o = job->a.buf + job->a.len;
            for (int blk = 0; blk < nb; blk++) o = put_block(o, gaps + blk * BLOCK, idw[blk]);
            job->a.len = (size_t)(o - job->a.buf);
            job->len_a[i] = id_bytes;
            job->len_b[i] = 0;
            job->kl_out[i] = 0.0;
            job->rkl_out[i] = 0.0;
            job->err_out[i] = 0.0;
            continue;
        }
        if (nonfinite) continue; /* the batch fails; only the ids of the remaining rows still need checking */
        float zmax = zs[0];
        int bad = !isfinite(lse);
        for (int t = 0; t < k; t++) {
            bad |= isnan(zs[t]);
            if (zs[t] > zmax) zmax = zs[t];
        }
        if (bad || !isfinite(zmax)) {
            nonfinite = 1;
            continue;
        }
        const float floor = (zmax - lse) - FLOOR_NATS;
        for (int t = 0; t < k; t++) {
            const float a = zs[t] - lse;
            logp[t] = a >= floor ? a : floor;
        }
        float m = logp[0], low = logp[0];
        for (int t = 1; t < k; t++) {
            m = logp[t] > m ? logp[t] : m;
            low = logp[t] < low ? logp[t] : low;
        }
        for (int t = 0; t < k; t++) r[t] = (double)(m - logp[t]);
        const double rmax = (double)(m - low); /* = max r: rounding is monotone */
        const double md = (double)m;
        for (int t = 0; t < k; t++) dtmp[t] = exp((double)logp[t] - md);
        const double lz = log(row_sum(dtmp, k));
        for (int t = 0; t < k; t++) {
            lp[t] = ((double)logp[t] - md) - lz;
            p[t] = exp(lp[t]);
        }
        w.rmax = rmax;
        w.m = m;
        w.lse = lse;
        int b, e, h;
        encode_values_row(&w, job->max_kl, &b, &e, &h, &job->kl_out[i], &job->rkl_out[i], &job->err_out[i]);
        uint8_t *hd = job->header + i * HEADER_KL_BYTES;
        memcpy(hd, &lse, 4);
        memcpy(hd + 4, &m, 4);
        memcpy(hd + 8, &w.scale16, 2);
        hd[10] = (uint8_t)((b - 1) | e << 4);
        hd[11] = (uint8_t)h;
        if (!reserve(&job->a, row_a) || !reserve(&job->b, row_b)) {
            status = ENC_NOMEM;
            goto out;
        }
        uint8_t *o = job->a.buf + job->a.len;
        for (int blk = 0; blk < nb; blk++) o = put_block(o, gaps + blk * BLOCK, idw[blk]);
        for (int t = 0; t < kp; t++) fields[t] = t < k ? (uint32_t)w.c[t] : 0;
        for (int blk = 0; blk < nb; blk++) o = put_block(o, fields + blk * BLOCK, b);
        job->a.len = (size_t)(o - job->a.buf);
        job->len_a[i] = id_bytes + (int64_t)nb * b;
        const int nh = w.n_refined;
        for (int t = 0; t < nh; t++) fields[t] = (uint32_t)fbuf[refined[t]]; /* the refined sub-cells, id order */
        const int nblk = (nh + BLOCK - 1) / BLOCK;
        for (int t = nh; t < nblk * BLOCK; t++) fields[t] = 0;
        o = job->b.buf + job->b.len;
        for (int blk = 0; blk < nblk; blk++) o = put_block(o, fields + blk * BLOCK, e);
        job->b.len = (size_t)(o - job->b.buf);
        job->len_b[i] = (int64_t)nblk * e;
    }
    if (nonfinite) status = ENC_NONFINITE;
out:
    free(mem);
    return status;
}

static int check_aligned(Py_buffer *b, size_t align, const char *what) {
    if ((uintptr_t)b->buf % align) {
        PyErr_Format(PyExc_ValueError, "%s: buffer not aligned to %zu bytes", what, align);
        return 0;
    }
    return 1;
}

static PyObject *encode(PyObject *self, PyObject *args) {
    Py_ssize_t n;
    int k, kl, id_full;
    long long vocab;
    double max_kl;
    Py_buffer ids, z, lse, header, widths, len_a, len_b, kl_out, rkl_out, err_out, values;
    if (!PyArg_ParseTuple(args, "niiiLdy*y*y*w*w*w*w*w*w*w*w*", &n, &k, &kl, &id_full, &vocab, &max_kl, &ids, &z,
                          &lse, &header, &widths, &len_a, &len_b, &kl_out, &rkl_out, &err_out, &values))
        return NULL;
    PyObject *result = NULL;
    Job job = {0};
    if (n < 0 || k < 1 || k > ENC_MAX_K) {
        PyErr_Format(PyExc_ValueError, "encode: n = %zd rows of k = %d values (need n >= 0, 1 <= k <= %d)", n, k,
                     ENC_MAX_K);
        goto done;
    }
    if (id_full > MAX_ID_WIDTH || vocab < 1 || vocab > (1LL << MAX_ID_WIDTH) ||
        id_full < bitlen32((uint32_t)(vocab - 1))) {
        PyErr_Format(PyExc_ValueError,
                     "encode: id width %d, vocabulary %lld (need bitlen(V - 1) <= width <= %d bits, V <= 2^%d ids)",
                     id_full, vocab, MAX_ID_WIDTH, MAX_ID_WIDTH);
        goto done;
    }
    const int nb = (k + BLOCK - 1) / BLOCK, nb2 = (nb + 1) / 2;
    if (!check(&ids, n * k * 8, "ids") || !check(&z, n * k * 4, "z") || !check(&lse, n * 4, "lse") ||
        !check(&header, n * (kl ? HEADER_KL_BYTES : 4), "header_out") || !check(&widths, n * nb2, "widths_out") ||
        !check(&len_a, n * 8, "len_a_out") || !check(&len_b, n * 8, "len_b_out") || !check(&kl_out, n * 8, "kl_out") ||
        !check(&rkl_out, n * 8, "rkl_out") || !check(&err_out, n * 8, "err_out") ||
        (!kl && !check(&values, n * k * 4, "values_out")) ||
        !check_aligned(&ids, 8, "ids") || !check_aligned(&z, 4, "z") || !check_aligned(&lse, 4, "lse") ||
        !check_aligned(&len_a, 8, "len_a_out") || !check_aligned(&len_b, 8, "len_b_out") ||
        !check_aligned(&kl_out, 8, "kl_out") || !check_aligned(&rkl_out, 8, "rkl_out") ||
        !check_aligned(&err_out, 8, "err_out") || !check_aligned(&values, 4, "values_out"))
        goto done;
    job.n = n;
    job.k = k;
    job.kl = kl;
    job.id_full = id_full;
    job.vocab = vocab;
    job.max_kl = max_kl;
    job.ids = ids.buf;
    job.z = z.buf;
    job.lse = lse.buf;
    job.header = header.buf;
    job.widths = widths.buf;
    job.len_a = len_a.buf;
    job.len_b = len_b.buf;
    job.kl_out = kl_out.buf;
    job.rkl_out = rkl_out.buf;
    job.err_out = err_out.buf;
    job.values = values.buf;
    int status;
    Py_BEGIN_ALLOW_THREADS
    status = encode_batch(&job);
    Py_END_ALLOW_THREADS
    switch (status) {
    case ENC_OK: {
        PyObject *sa = PyByteArray_FromStringAndSize((const char *)job.a.buf, (Py_ssize_t)job.a.len);
        PyObject *sb = sa ? PyByteArray_FromStringAndSize((const char *)job.b.buf, (Py_ssize_t)job.b.len) : NULL;
        if (sa && sb) result = Py_BuildValue("(NNO)", sa, sb, job.all_bf16 ? Py_True : Py_False);
        else {
            Py_XDECREF(sa);
            Py_XDECREF(sb);
        }
        break;
    }
    case ENC_NOMEM:
        PyErr_NoMemory();
        break;
    case ENC_ID_RANGE:
        PyErr_Format(PyExc_ValueError, "ids outside [0, %lld)", vocab);
        break;
    case ENC_DUPLICATE:
        PyErr_SetString(PyExc_ValueError, "duplicate ids in a top-k row");
        break;
    default:
        PyErr_SetString(PyExc_ValueError, "non-finite teacher logsumexp or top logit");
    }
done:
    free(job.a.buf);
    free(job.b.buf);
    PyBuffer_Release(&ids);
    PyBuffer_Release(&z);
    PyBuffer_Release(&lse);
    PyBuffer_Release(&header);
    PyBuffer_Release(&widths);
    PyBuffer_Release(&len_a);
    PyBuffer_Release(&len_b);
    PyBuffer_Release(&kl_out);
    PyBuffer_Release(&rkl_out);
    PyBuffer_Release(&err_out);
    PyBuffer_Release(&values);
    return result;
}

static PyMethodDef methods[] = {
    {"decode", decode, METH_VARARGS, "Decode cache rows into ids int32 [n, k] and (mode kl) values f32 [n, k]."},
    {"encode", encode, METH_VARARGS,
     "Code rows (ids int64 [n, k], logits f32 [n, k], lse f32 [n]) into headers, id widths, row lengths and stats "
     "(written into the given arrays: forward and reverse KL, max error); returns (stream_a, stream_b, all_bf16)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_codec_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__codec_native(void) {
    PyObject *mod = PyModule_Create(&module);
    if (mod && PyModule_AddIntConstant(mod, "ENCODER_VERSION", ENCODER_VERSION) < 0) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
