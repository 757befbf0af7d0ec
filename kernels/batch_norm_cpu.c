/* Training-mode batch-norm backward from the input's b-bit mantissas, called through ctypes.
 *
 * x = m * scale (scale a power of two), xc = x - mean, R = elements per channel:
 *   sum_g[c]   = sum of g over the channel           (the bias gradient)
 *   sum_gxc[c] = sum of g * xc over the channel      (times invstd: the weight gradient)
 *   gx = w * invstd * (g - sum_g / R - xc * invstd^2 * sum_gxc / R)
 * Reading one byte (int8) or two (int16) per input instead of a dequantised float32 copy, and
 * no separate dequantisation pass, is where the time goes (the passes are bound by memory).
 * Each product g * xc is rounded to float32 as in ATen; sums run in float over short runs
 * (RUN rows, or 16 lanes of RUN values) and in double across them, so their error grows with
 * the square root of the channel's size, as a float32 reduction's does at best.
 *
 * Layout: outer x C x inner, C at stride `inner` (channels-last 4-d: outer = N*H*W, inner = 1;
 * contiguous: outer = N, inner = H*W). gx may be NULL (no input gradient); w may be NULL (1).
 */
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>

#define PAR_MIN 32768 /* below this, a team of one (see relu_cpu.c) */
#define RUN 32        /* channels-last rows summed in float before the double sums */

/* `wide` is a literal at every call (inside the typed functions' parallel regions), so each
 * inlined copy is specialised to one mantissa width and vectorised. */
#define INLINE static inline __attribute__((always_inline))

INLINE float load(const void *m, int64_t i, int wide) {
    return wide ? (float)((const int16_t *)m)[i] : (float)((const int8_t *)m)[i];
}

/* Channels innermost: rows [r0, r1) added into the double sums pg, px (float over RUN rows). */
INLINE void rows_sums(const float *g, const void *m, int wide, int64_t r0, int64_t r1, int64_t C, float scale,
                      const float *mean, float *fg, float *fx, double *pg, double *px) {
    for (int64_t q = r0; q < r1; q += RUN) {
        int64_t q1 = q + RUN < r1 ? q + RUN : r1;
        for (int64_t c = 0; c < C; ++c) fg[c] = fx[c] = 0.0f;
        for (int64_t r = q; r < q1; ++r) {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                float gv = g[r * C + c];
                fg[c] += gv;
                fx[c] += gv * (load(m, r * C + c, wide) * scale - mean[c]);
            }
        }
        for (int64_t c = 0; c < C; ++c) {
            pg[c] += fg[c];
            px[c] += fx[c];
        }
    }
}

/* One channel's sums over `outer` runs of `inner` contiguous values (float over pieces of 16 RUN). */
INLINE void channel_sums(const float *g, const void *m, int wide, int64_t outer, int64_t C, int64_t inner,
                         int64_t c, float scale, float mc, double *sum_g, double *sum_gxc) {
    double a = 0.0, b = 0.0;
    for (int64_t o = 0; o < outer; ++o) {
        for (int64_t i0 = (o * C + c) * inner, end = i0 + inner; i0 < end; i0 += 16 * RUN) {
            int64_t i1 = i0 + 16 * RUN < end ? i0 + 16 * RUN : end;
            float fa = 0.0f, fb = 0.0f; /* 16 lanes of at most RUN terms each */
#pragma omp simd reduction(+ : fa, fb)
            for (int64_t i = i0; i < i1; ++i) {
                fa += g[i];
                fb += g[i] * (load(m, i, wide) * scale - mc);
            }
            a += fa;
            b += fb;
        }
    }
    sum_g[c] = a;
    sum_gxc[c] = b;
}

/* gx over [i0, i1) for channel c(i) = (i / inner) % C, with the per-channel factors k. */
INLINE void grad_range(const float *g, const void *m, int wide, int64_t i0, int64_t i1, int64_t C, int64_t inner,
                       float scale, const float *mean, const float *k, const float *k_g, const float *k_x,
                       float *gx) {
    if (inner == 1) {
        for (int64_t r = i0 / C; r < i1 / C; ++r) {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                int64_t i = r * C + c;
                gx[i] = k[c] * (g[i] - k_g[c] - (load(m, i, wide) * scale - mean[c]) * k_x[c]);
            }
        }
        return;
    }
    for (int64_t oc = i0 / inner; oc < i1 / inner; ++oc) {
        int64_t c = oc % C, base = oc * inner;
        float kc = k[c], kg = k_g[c], kx = k_x[c], mc = mean[c];
#pragma omp simd
        for (int64_t i = base; i < base + inner; ++i)
            gx[i] = kc * (g[i] - kg - (load(m, i, wide) * scale - mc) * kx);
    }
}

/* Per-channel factors of gx from the sums (in double). */
static void factors(int64_t C, double R, const float *invstd, const float *w, const double *sum_g,
                    const double *sum_gxc, float *k, float *k_g, float *k_x) {
    for (int64_t c = 0; c < C; ++c) {
        double is = invstd[c], wc = w ? w[c] : 1.0;
        k[c] = (float)(wc * is);
        k_g[c] = (float)(sum_g[c] / R);
        k_x[c] = (float)(sum_gxc[c] / R * is * is);
    }
}

#define BN_BACKWARD(NAME, MTYPE, WIDE)                                                                         \
    void NAME(const float *g, const MTYPE *m, int64_t outer, int64_t C, int64_t inner, float scale,          \
              const float *mean, const float *invstd, const float *w, float *gx, double *sum_g,              \
              double *sum_gxc, int nthreads) {                                                                \
        int64_t n = outer * C * inner;                                                                        \
        int nt = n > PAR_MIN ? nthreads : 1;                                                                  \
        if (inner == 1) {                                                                                     \
            double *part = calloc((size_t)nt * 2 * C, sizeof(double));                                       \
            _Pragma("omp parallel num_threads(nt)") {                                                         \
                int t = omp_get_thread_num(), T = omp_get_num_threads();                                      \
                float *f = malloc((size_t)2 * C * sizeof(float));                                             \
                rows_sums(g, m, WIDE, outer * t / T, outer * (t + 1) / T, C, scale, mean, f, f + C,           \
                          part + (size_t)t * 2 * C, part + (size_t)t * 2 * C + C);                            \
                free(f);                                                                                      \
            }                                                                                                 \
            for (int64_t c = 0; c < C; ++c) {                                                                 \
                sum_g[c] = sum_gxc[c] = 0.0;                                                                  \
                for (int t = 0; t < nt; ++t) {                                                                \
                    sum_g[c] += part[(size_t)t * 2 * C + c];                                                  \
                    sum_gxc[c] += part[(size_t)t * 2 * C + C + c];                                            \
                }                                                                                             \
            }                                                                                                 \
            free(part);                                                                                       \
        } else {                                                                                              \
            _Pragma("omp parallel for num_threads(nt) schedule(static)")                                      \
            for (int64_t c = 0; c < C; ++c)                                                                   \
                channel_sums(g, m, WIDE, outer, C, inner, c, scale, mean[c], sum_g, sum_gxc);                 \
        }                                                                                                     \
        if (!gx)                                                                                              \
            return;                                                                                           \
        float *k = malloc((size_t)3 * C * sizeof(float));                                                     \
        factors(C, (double)outer * (double)inner, invstd, w, sum_g, sum_gxc, k, k + C, k + 2 * C);           \
        int64_t units = inner == 1 ? outer : outer * C; /* rows, or channel runs */                          \
        int64_t unit = n / units;                                                                             \
        _Pragma("omp parallel num_threads(nt)") {                                                             \
            int t = omp_get_thread_num(), T = omp_get_num_threads();                                          \
            grad_range(g, m, WIDE, units * t / T * unit, units * (t + 1) / T * unit, C, inner, scale, mean,   \
                       k, k + C, k + 2 * C, gx);                                                              \
        }                                                                                                     \
        free(k);                                                                                              \
    }

BN_BACKWARD(bn_backward_i8, int8_t, 0)
BN_BACKWARD(bn_backward_i16, int16_t, 1)
