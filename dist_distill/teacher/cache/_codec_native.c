/* Native decoder of dd-topk-v1 cache rows: the same result, bit for bit, as the numpy decoder in
 * cache_codec.decode_rows (which documents the format), one pass per row instead of whole-batch
 * array passes. Built by setup.py as an optional extension (dist_distill._codec_native); when it
 * is missing the numpy decoder runs.
 *
 * Arguments are buffers (numpy arrays, C-contiguous); nothing is allocated here.
 *
 * Float arithmetic must equal numpy's float32 operations exactly: every operation is a separate
 * float32 operation (no contraction into FMA: setup.py compiles with -ffp-contract=off).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

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

static PyMethodDef methods[] = {
    {"decode", decode, METH_VARARGS, "Decode cache rows into ids int32 [n, k] and (mode kl) values f32 [n, k]."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_codec_native", NULL, -1, methods};

PyMODINIT_FUNC PyInit__codec_native(void) { return PyModule_Create(&module); }
