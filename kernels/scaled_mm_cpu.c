/* Passes around the int8 GEMMs of the 9-16 bit CPU route, called through ctypes.
 *
 * split128_i16: m = 128 h + l with h = floor((m + 64) / 128), so |l| <= 64; for |m| <= 8191,
 *   |h| <= 64 and |h + l| <= 127. Writes h, l and s = h + l as int8 (the three Karatsuba
 *   operands) in one pass; returns 1 (and leaves the outputs undefined) if some |m| > 8191.
 * split256_i16: m = 256 h + l + 128 with h = m >> 8, l = (m & 255) - 128, both int8.
 * split256_sums_i16: the same for m viewed as [rows, cols] (a channels-last map: positions x
 *   channels), also writing the exact sums the digit products' offset terms need: rowsum[r] =
 *   sum over the row, and fold[(r mod period), c] = sum of m[r, c] over the rows r of one
 *   residue (period = positions per image: sums over the batch; period = 1: column sums).
 *   Either output may be NULL; fold needs nthreads * period * cols int64 of scratch.
 * combine_i32: the exact integer product from 1, 3 or 4 int32 accumulators ([rows, cols],
 *   contiguous), formed in int64, converted to float once (round to nearest even), scaled by a
 *   power of two (exact) and added to an optional per-column float bias:
 *     parts 1: v = a0
 *     parts 3: v = 16384 a0 + 128 (a1 - a0 - a2) + a2              (Karatsuba, split128)
 *     parts 4: v = 65536 a0 + 256 (a1 + a2) + a3 + rc[r] + cc[c]   (split256; rc, cc int64)
 *   A reduction longer than one int32 chunk runs chunk by chunk: stage 1 stores the first
 *   chunk's v in the int64 `carry`, stage 2 adds a later one, stage 3 adds the last one and
 *   writes the output; stage 0 is a single chunk.
 */
#include <omp.h>
#include <stdint.h>

/* Small inputs get a team of one through num_threads rather than an if clause: GCC's if(false)
 * path ran these loops unvectorised, 9x slower on 32768 elements. */
#define PAR_MIN 32768

int split128_i16(const int16_t *m, int64_t n, int8_t *h, int8_t *l, int8_t *s, int nthreads) {
    int bad = 0;
#pragma omp parallel for simd reduction(| : bad) num_threads(n > PAR_MIN ? nthreads : 1) schedule(static)
    for (int64_t i = 0; i < n; ++i) {
        int32_t v = m[i];
        int32_t hi = (v + 64) >> 7;  /* arithmetic shift: floor division by 128 */
        int32_t lo = v - 128 * hi;
        bad |= (v > 8191) | (v < -8191);
        h[i] = (int8_t)hi;
        l[i] = (int8_t)lo;
        s[i] = (int8_t)(hi + lo);
    }
    return bad;
}

void split256_i16(const int16_t *m, int64_t n, int8_t *h, int8_t *l, int nthreads) {
#pragma omp parallel for simd num_threads(n > PAR_MIN ? nthreads : 1) schedule(static)
    for (int64_t i = 0; i < n; ++i) {
        int32_t v = m[i];
        h[i] = (int8_t)(v >> 8);
        l[i] = (int8_t)((v & 255) - 128);
    }
}

void split256_sums_i16(const int16_t *m, int64_t rows, int64_t cols, int64_t period, int8_t *h, int8_t *l,
                       int64_t *rowsum, int64_t *fold, int64_t *scratch, int nthreads) {
    int team = rows * cols > PAR_MIN ? nthreads : 1;
    int64_t size = period * cols;
#pragma omp parallel num_threads(team)
    {
        int64_t *part = fold ? scratch + (int64_t)omp_get_thread_num() * size : 0;
        if (part)
            for (int64_t i = 0; i < size; ++i) part[i] = 0;
#pragma omp for schedule(static)
        for (int64_t r = 0; r < rows; ++r) {
            const int16_t *src = m + r * cols;
            int8_t *hr = h + r * cols, *lr = l + r * cols;
            int64_t *f = part ? part + (r % period) * cols : 0;
            int32_t total = 0;  /* |sum| <= 32768 cols: the callers keep cols below 65536 */
#pragma omp simd reduction(+ : total)
            for (int64_t c = 0; c < cols; ++c) {
                int32_t v = src[c];
                hr[c] = (int8_t)(v >> 8);
                lr[c] = (int8_t)((v & 255) - 128);
                total += v;
            }
            if (rowsum) rowsum[r] = total;
            if (f) {
#pragma omp simd
                for (int64_t c = 0; c < cols; ++c) f[c] += src[c];
            }
        }
        if (part) {
#pragma omp barrier
#pragma omp for schedule(static)
            for (int64_t i = 0; i < size; ++i) {
                int64_t t = 0;
                for (int k = 0; k < omp_get_num_threads(); ++k) t += scratch[(int64_t)k * size + i];
                fold[i] = t;
            }
        }
    }
}

#define V1(i) ((int64_t)a0[i])
#define V3(i) (16384 * (int64_t)a0[i] + 128 * ((int64_t)a1[i] - a0[i] - a2[i]) + a2[i])
#define V4(i) (65536 * (int64_t)a0[i] + 256 * ((int64_t)a1[i] + a2[i]) + a3[i])

/* One row: the branches sit outside the vectorised loops. */
#define COMBINE_ROW(V)                                                                     \
    if (stage == 1) {                                                                      \
        _Pragma("omp simd") for (int64_t c = 0; c < cols; ++c) carry[o + c] = V(o + c);   \
    } else if (stage == 2) {                                                               \
        _Pragma("omp simd") for (int64_t c = 0; c < cols; ++c) carry[o + c] += V(o + c);  \
    } else {                                                                               \
        float *dst = out + o;                                                              \
        const int64_t row = rc ? rc[r] : 0;                                                \
        if (stage == 3 || cc) {                                                            \
            _Pragma("omp simd") for (int64_t c = 0; c < cols; ++c) {                       \
                int64_t v = V(o + c) + row + (cc ? cc[c] : 0) + (stage == 3 ? carry[o + c] : 0); \
                dst[c] = (float)v * scale + (bias ? bias[c] : 0.0f);                       \
            }                                                                              \
        } else if (bias) {                                                                 \
            _Pragma("omp simd") for (int64_t c = 0; c < cols; ++c)                         \
                dst[c] = (float)V(o + c) * scale + bias[c];                                \
        } else {                                                                           \
            _Pragma("omp simd") for (int64_t c = 0; c < cols; ++c)                         \
                dst[c] = (float)V(o + c) * scale;                                          \
        }                                                                                  \
    }

void combine_i32(int parts, const int32_t *a0, const int32_t *a1, const int32_t *a2,
                 const int32_t *a3, const int64_t *rc, const int64_t *cc, int64_t rows,
                 int64_t cols, int64_t *carry, int stage, float scale, const float *bias,
                 float *out, int nthreads) {
#pragma omp parallel for num_threads(rows * cols > PAR_MIN ? nthreads : 1) schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t o = r * cols;
        if (parts == 1) {
            COMBINE_ROW(V1)
        } else if (parts == 3) {
            COMBINE_ROW(V3)
        } else {
            COMBINE_ROW(V4)
        }
    }
}
