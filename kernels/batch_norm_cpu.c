/* Training-mode batch norm from the input's b-bit mantissas, called through ctypes. Backward:
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
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#define PAR_MIN 32768 /* below this, a team of one (see relu_cpu.c) */
#define WIDTH 64      /* channels-last rows grouped to at least this many lanes */
#define RUN 32        /* channels-last rows summed in float before the double sums */

/* `wide` is a literal at every call (inside the typed functions' parallel regions), so each
 * inlined copy is specialised to one mantissa width and vectorised. */
#define INLINE static inline __attribute__((always_inline))

/* Channels-last rows of C channels taken k at a time, so that k * C >= WIDTH lanes. */
INLINE int64_t rows_per_group(int64_t C) { return C < WIDTH ? (WIDTH + C - 1) / C : 1; }

INLINE float load(const void *m, int64_t i, int wide) {
    return wide ? (float)((const int16_t *)m)[i] : (float)((const int8_t *)m)[i];
}

/* The incoming gradient, through a fused ReLU's mask where there is one (what
 * relu_mask_backward computes: mask ? g : +0). `masked` is a literal at every call (through
 * WITH_MASK), so each inlined copy vectorises without a test per value. */
INLINE float grad_at(const float *g, const uint8_t *mask, int masked, int64_t i) {
    if (!masked)
        return g[i];
    uint32_t bits; /* g's bits or +0 as an AND with 0 or ~0: GCC vectorises this, not the select */
    memcpy(&bits, g + i, 4);
    bits &= -(uint32_t)(mask[i] != 0);
    float v;
    memcpy(&v, &bits, 4);
    return v;
}

/* max(top, bits(v) & 0x7fffffff): quantise_cpu.c's absmax_bits, gathered as values are stored
 * so that the quantiser of the layer reading them skips its own pass (NaN and inf included). */
INLINE uint32_t max_bits(uint32_t top, float v) {
    uint32_t b;
    memcpy(&b, &v, 4);
    b &= 0x7fffffffU;
    return b > top ? b : top;
}

#define WITH_MASK(FN, ...) (mask ? FN(g, mask, 1, __VA_ARGS__) : FN(g, NULL, 0, __VA_ARGS__))

/* Channels innermost: rows [r0, r1) added into the double sums pg, px (float over RUN rows). */
INLINE void rows_sums(const float *g, const uint8_t *mask, int masked, const void *m, int wide, int64_t r0, int64_t r1,
                      int64_t C, float scale,
                      const float *mean, float *fg, float *fx, double *pg, double *px) {
    for (int64_t q = r0; q < r1; q += RUN) {
        int64_t q1 = q + RUN < r1 ? q + RUN : r1;
        for (int64_t c = 0; c < C; ++c) fg[c] = fx[c] = 0.0f;
        for (int64_t r = q; r < q1; ++r) {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                float gv = grad_at(g, mask, masked, r * C + c);
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

/* One channel's sums over `outer` runs of `inner` contiguous values: float in 16 lanes over
 * pieces of 16 RUN values (lane l takes the piece's values l, l + 16, ...; the order is the
 * code's, not the vectoriser's, so a fused ReLU's mask changes no rounding), double across. */
INLINE void channel_sums(const float *g, const uint8_t *mask, int masked, const void *m, int wide, int64_t outer,
                         int64_t C, int64_t inner, int64_t c, float scale, float mc, double *sum_g, double *sum_gxc) {
    double a = 0.0, b = 0.0;
    for (int64_t o = 0; o < outer; ++o) {
        for (int64_t i0 = (o * C + c) * inner, end = i0 + inner; i0 < end; i0 += 16 * RUN) {
            int64_t i1 = i0 + 16 * RUN < end ? i0 + 16 * RUN : end;
            float fa[16] = {0}, fb[16] = {0};
            int64_t i = i0;
            for (; i + 16 <= i1; i += 16) {
#pragma omp simd
                for (int l = 0; l < 16; ++l) {
                    float gv = grad_at(g, mask, masked, i + l);
                    fa[l] += gv;
                    fb[l] += gv * (load(m, i + l, wide) * scale - mc);
                }
            }
            for (int l = 0; i < i1; ++i, ++l) {
                float gv = grad_at(g, mask, masked, i);
                fa[l] += gv;
                fb[l] += gv * (load(m, i, wide) * scale - mc);
            }
            for (int l = 0; l < 16; ++l) a += fa[l], b += fb[l];
        }
    }
    sum_g[c] = a;
    sum_gxc[c] = b;
}

/* gx over [i0, i1) for channel c(i) = (i / inner) % C, with the per-channel factors k; returns
 * the values' max_bits (the quantiser of the layer below reads gx next). */
INLINE uint32_t grad_range(const float *g, const uint8_t *mask, int masked, const void *m, int wide, int64_t i0,
                           int64_t i1, int64_t C, int64_t inner, float scale, const float *mean, const float *k,
                           const float *k_g, const float *k_x, float *gx) {
    uint32_t top = 0;
    if (inner == 1) {
        uint32_t *lane = calloc((size_t)C, sizeof(uint32_t)); /* per channel: no horizontal max per row */
        for (int64_t r = i0 / C; r < i1 / C; ++r) {
#pragma omp simd
            for (int64_t c = 0; c < C; ++c) {
                int64_t i = r * C + c;
                float v = k[c] * (grad_at(g, mask, masked, i) - k_g[c] - (load(m, i, wide) * scale - mean[c]) * k_x[c]);
                gx[i] = v;
                lane[c] = max_bits(lane[c], v);
            }
        }
        for (int64_t c = 0; c < C; ++c) top = lane[c] > top ? lane[c] : top;
        free(lane);
        return top;
    }
    for (int64_t oc = i0 / inner; oc < i1 / inner; ++oc) {
        int64_t c = oc % C, base = oc * inner;
        float kc = k[c], kg = k_g[c], kx = k_x[c], mc = mean[c];
#pragma omp simd reduction(max : top)
        for (int64_t i = base; i < base + inner; ++i) {
            float v = kc * (grad_at(g, mask, masked, i) - kg - (load(m, i, wide) * scale - mc) * kx);
            gx[i] = v;
            top = max_bits(top, v);
        }
    }
    return top;
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
    uint32_t NAME(const float *g, const MTYPE *m, int64_t outer, int64_t C, int64_t inner, float scale,      \
              const float *mean, const float *invstd, const float *w, float *gx, double *sum_g,              \
              double *sum_gxc, const uint8_t *mask, int nthreads) {                                          \
        int64_t n = outer * C * inner;                                                                        \
        int nt = n > PAR_MIN ? nthreads : 1;                                                                  \
        /* channels-last rows in groups of k (W = k * C >= 64 lanes, lane j of channel j % C), as the \
         * forward: one row of 16 channels alone would not fill a vector */                                  \
        int64_t k = inner == 1 ? rows_per_group(C) : 1, W = k * C, groups = outer / k;                        \
        float *wide = inner == 1 ? malloc((size_t)4 * W * sizeof(float)) : NULL; /* mean, k, k_g, k_x */    \
        if (inner == 1) {                                                                                     \
            for (int64_t j = 0; j < W; ++j) wide[j] = mean[j % C];                                            \
            double *part = calloc((size_t)(nt * 2 * W + 2 * C), sizeof(double)), *tail = part + nt * 2 * W;   \
            _Pragma("omp parallel num_threads(nt)") {                                                         \
                int t = omp_get_thread_num(), T = omp_get_num_threads();                                      \
                float *f = malloc((size_t)2 * W * sizeof(float));                                             \
                (void)WITH_MASK(rows_sums, m, WIDE, groups * t / T, groups * (t + 1) / T, W, scale, wide, f, f + W, \
                          part + (size_t)t * 2 * W, part + (size_t)t * 2 * W + W);                            \
                if (t == T - 1) /* rows after the last whole group */                                         \
                    (void)WITH_MASK(rows_sums, m, WIDE, groups * k, outer, C, scale, mean, f, f + C, tail, tail + C); \
                free(f);                                                                                      \
            }                                                                                                 \
            for (int64_t c = 0; c < C; ++c) sum_g[c] = tail[c], sum_gxc[c] = tail[C + c];                     \
            for (int t = 0; t < nt; ++t)                                                                      \
                for (int64_t j = 0; j < W; ++j) {                                                             \
                    sum_g[j % C] += part[(size_t)t * 2 * W + j];                                              \
                    sum_gxc[j % C] += part[(size_t)t * 2 * W + W + j];                                        \
                }                                                                                             \
            free(part);                                                                                       \
        } else {                                                                                              \
            _Pragma("omp parallel for num_threads(nt) schedule(static)")                                      \
            for (int64_t c = 0; c < C; ++c)                                                                   \
                (void)WITH_MASK(channel_sums, m, WIDE, outer, C, inner, c, scale, mean[c], sum_g, sum_gxc);           \
        }                                                                                                     \
        if (!gx) {                                                                                            \
            free(wide);                                                                                       \
            return 0;                                                                                         \
        }                                                                                                     \
        float *kf = malloc((size_t)3 * C * sizeof(float));                                                    \
        factors(C, (double)outer * (double)inner, invstd, w, sum_g, sum_gxc, kf, kf + C, kf + 2 * C);        \
        uint32_t top = 0;                                                                                     \
        if (inner == 1) {                                                                                     \
            for (int64_t j = 0; j < 3 * W; ++j) wide[W + j] = kf[(j / W) * C + j % C];                        \
            _Pragma("omp parallel num_threads(nt) reduction(max : top)") {                                    \
                int t = omp_get_thread_num(), T = omp_get_num_threads();                                      \
                top = WITH_MASK(grad_range, m, WIDE, groups * t / T * W, groups * (t + 1) / T * W, W, 1, scale, \
                                wide, wide + W, wide + 2 * W, wide + 3 * W, gx);                              \
                if (t == T - 1) { /* rows after the last whole group */                                       \
                    uint32_t tt = WITH_MASK(grad_range, m, WIDE, groups * W, outer * C, C, 1, scale, mean, kf,  \
                                            kf + C, kf + 2 * C, gx);                                          \
                    top = tt > top ? tt : top;                                                                \
                }                                                                                             \
            }                                                                                                 \
        } else {                                                                                              \
            int64_t units = outer * C; /* channel runs */                                                     \
            _Pragma("omp parallel num_threads(nt) reduction(max : top)") {                                    \
                int t = omp_get_thread_num(), T = omp_get_num_threads();                                      \
                top = WITH_MASK(grad_range, m, WIDE, units * t / T * inner, units * (t + 1) / T * inner, C,   \
                                inner, scale, mean, kf, kf + C, kf + 2 * C, gx);                              \
            }                                                                                                 \
        }                                                                                                     \
        free(kf), free(wide);                                                                                 \
        return top;                                                                                           \
    }

BN_BACKWARD(bn_backward_i8, int8_t, 0)
BN_BACKWARD(bn_backward_i16, int16_t, 1)

/* Forward. Channels-last rows are walked in groups of k rows, W = k * C >= 64 values, with one
 * accumulator (or factor) per value of the group, so that short channel rows (16, 32) still fill
 * whole vectors; lane j belongs to channel j % C. Sums of m and m*m are exact: int32 over blocks
 * of BLOCK groups (127 * 127 * BLOCK and 32767 * BLOCK < 2**31), int64 across them (squares of
 * int16 mantissas go to int64 directly). */
#define BLOCK 32768

/* y[i] = m[i] * a + b, or with a fused ReLU (mask non-NULL) torch.relu's value (NaN and -0.0
 * pass) and relu_cpu.c's mask y != 0; `relu` is a literal at each call, so both copies vectorise. */
#define OUTPUT(I, V, RELU)                         \
    do {                                           \
        float v_ = (V);                            \
        if (RELU) {                                \
            v_ = v_ < 0.0f ? 0.0f : v_;            \
            mask[I] = v_ != 0.0f;                  \
        }                                          \
        y[I] = v_;                                 \
        top = max_bits(top, v_);                   \
    } while (0)

#define BN_FORWARD(NAME, MTYPE, SQTYPE)                                                                        \
    static void NAME##_sums(const MTYPE *m, int64_t outer, int64_t C, int64_t inner, int64_t *s1, int64_t *s2, \
                            int nt) {                                                                         \
        for (int64_t c = 0; c < C; ++c) s1[c] = s2[c] = 0;                                                    \
        if (inner > 1) {                                                                                      \
            _Pragma("omp parallel for num_threads(nt) schedule(static)")                                      \
            for (int64_t c = 0; c < C; ++c) {                                                                 \
                int64_t t1 = 0, t2 = 0;                                                                       \
                for (int64_t o = 0; o < outer; ++o) {                                                         \
                    const MTYPE *run = m + (o * C + c) * inner;                                               \
                    for (int64_t i0 = 0; i0 < inner; i0 += BLOCK) {                                           \
                        int64_t i1 = i0 + BLOCK < inner ? i0 + BLOCK : inner;                                 \
                        int32_t a = 0;                                                                        \
                        SQTYPE b = 0;                                                                         \
                        _Pragma("omp simd reduction(+ : a, b)")                                               \
                        for (int64_t i = i0; i < i1; ++i) {                                                   \
                            int32_t v = run[i];                                                               \
                            a += v;                                                                           \
                            b += (SQTYPE)v * v;                                                               \
                        }                                                                                     \
                        t1 += a, t2 += b;                                                                     \
                    }                                                                                         \
                }                                                                                             \
                s1[c] = t1, s2[c] = t2;                                                                       \
            }                                                                                                 \
            return;                                                                                           \
        }                                                                                                     \
        int64_t k = rows_per_group(C), W = k * C, groups = outer / k;                                         \
        _Pragma("omp parallel num_threads(nt)") {                                                             \
            int t = omp_get_thread_num(), T = omp_get_num_threads();                                          \
            int64_t g0 = groups * t / T, g1 = groups * (t + 1) / T;                                           \
            int32_t *a = malloc((size_t)W * sizeof(int32_t));                                                 \
            SQTYPE *b = malloc((size_t)W * sizeof(SQTYPE));                                                   \
            int64_t *p = calloc((size_t)2 * W, sizeof(int64_t));                                              \
            for (int64_t q = g0; q < g1; q += BLOCK) {                                                        \
                int64_t q1 = q + BLOCK < g1 ? q + BLOCK : g1;                                                 \
                for (int64_t j = 0; j < W; ++j) a[j] = 0, b[j] = 0;                                           \
                for (int64_t g = q; g < q1; ++g) {                                                            \
                    const MTYPE *row = m + g * W;                                                             \
                    _Pragma("omp simd")                                                                       \
                    for (int64_t j = 0; j < W; ++j) {                                                         \
                        int32_t v = row[j];                                                                   \
                        a[j] += v;                                                                            \
                        b[j] += (SQTYPE)v * v;                                                                \
                    }                                                                                         \
                }                                                                                             \
                for (int64_t j = 0; j < W; ++j) p[j] += a[j], p[W + j] += b[j];                               \
            }                                                                                                 \
            if (t == T - 1) /* rows after the last whole group */                                             \
                for (int64_t i = groups * W; i < outer * C; ++i)                                              \
                    p[i % C] += m[i], p[W + i % C] += (int64_t)m[i] * m[i];                                   \
            _Pragma("omp critical")                                                                           \
            for (int64_t j = 0; j < W; ++j) s1[j % C] += p[j], s2[j % C] += p[W + j];                         \
            free(a), free(b), free(p);                                                                        \
        }                                                                                                     \
    }                                                                                                         \
                                                                                                              \
    INLINE uint32_t NAME##_apply_run(const MTYPE *m, int64_t i0, int64_t n, float ac, float bc, float *y,    \
                                     uint8_t *mask, int relu) {                                               \
        /* one channel's run of values i0 .. i0 + n (contiguous layout) */                                    \
        uint32_t top = 0;                                                                                     \
        _Pragma("omp simd reduction(max : top)")                                                              \
        for (int64_t i = i0; i < i0 + n; ++i) OUTPUT(i, (float)m[i] * ac + bc, relu);                         \
        return top;                                                                                           \
    }                                                                                                         \
                                                                                                              \
    INLINE void NAME##_apply_group(const MTYPE *m, int64_t W, const float *a, const float *b, float *y,      \
                                   uint8_t *mask, uint32_t *lane, int relu) {                                 \
        /* W values with their own factors a[j], b[j]; the maximum kept per value in lane[j] */               \
        _Pragma("omp simd")                                                                                   \
        for (int64_t j = 0; j < W; ++j) {                                                                     \
            uint32_t top = lane[j];                                                                           \
            OUTPUT(j, (float)m[j] * a[j] + b[j], relu);                                                       \
            lane[j] = top;                                                                                    \
        }                                                                                                     \
    }                                                                                                         \
                                                                                                              \
    static uint32_t NAME##_apply(const MTYPE *m, int64_t outer, int64_t C, int64_t inner, const float *a,    \
                                 const float *b, float *y, uint8_t *mask, int nt) {                           \
        uint32_t top = 0, t;                                                                                  \
        if (inner > 1) {                                                                                      \
            _Pragma("omp parallel for num_threads(nt) schedule(static) reduction(max : top) private(t)")      \
            for (int64_t oc = 0; oc < outer * C; ++oc) {                                                      \
                if (mask)                                                                                     \
                    t = NAME##_apply_run(m, oc * inner, inner, a[oc % C], b[oc % C], y, mask, 1);             \
                else                                                                                          \
                    t = NAME##_apply_run(m, oc * inner, inner, a[oc % C], b[oc % C], y, mask, 0);             \
                top = t > top ? t : top;                                                                      \
            }                                                                                                 \
            return top;                                                                                       \
        }                                                                                                     \
        int64_t k = rows_per_group(C), W = k * C, groups = outer / k;                                         \
        float *aw = malloc((size_t)2 * W * sizeof(float)), *bw = aw + W;                                      \
        for (int64_t j = 0; j < W; ++j) aw[j] = a[j % C], bw[j] = b[j % C];                                   \
        _Pragma("omp parallel num_threads(nt) reduction(max : top)") {                                        \
            int th = omp_get_thread_num(), T = omp_get_num_threads();                                         \
            uint32_t *lane = calloc((size_t)W, sizeof(uint32_t)); /* no horizontal max per group */          \
            for (int64_t g = groups * th / T; g < groups * (th + 1) / T; ++g) {                               \
                if (mask)                                                                                     \
                    NAME##_apply_group(m + g * W, W, aw, bw, y + g * W, mask + g * W, lane, 1);               \
                else                                                                                          \
                    NAME##_apply_group(m + g * W, W, aw, bw, y + g * W, NULL, lane, 0);                       \
            }                                                                                                 \
            for (int64_t j = 0; j < W; ++j) top = lane[j] > top ? lane[j] : top;                              \
            free(lane);                                                                                       \
        }                                                                                                     \
        uint32_t *lane = calloc((size_t)C, sizeof(uint32_t));                                                 \
        for (int64_t r = groups * k; r < outer; ++r) /* rows after the last whole group */                    \
            NAME##_apply_group(m + r * C, C, a, b, y + r * C, mask ? mask + r * C : NULL, lane, mask != NULL); \
        for (int64_t j = 0; j < C; ++j) top = lane[j] > top ? lane[j] : top;                                  \
        free(lane);                                                                                           \
        free(aw);                                                                                             \
        return top;                                                                                           \
    }                                                                                                         \
                                                                                                              \
    uint32_t NAME(const MTYPE *m, int64_t outer, int64_t C, int64_t inner, double scale, const float *w,      \
                  const float *bias, double eps, double momentum, float *running_mean, float *running_var,    \
                  float *y, uint8_t *mask, float *mean_out, float *invstd_out, int nthreads) {                \
        int nt = outer * C * inner > PAR_MIN ? nthreads : 1;                                                  \
        int64_t *s = malloc((size_t)2 * C * sizeof(int64_t));                                                 \
        float *ab = malloc((size_t)2 * C * sizeof(float));                                                    \
        NAME##_sums(m, outer, C, inner, s, s + C, nt);                                                        \
        double R = (double)outer * (double)inner;                                                             \
        for (int64_t c = 0; c < C; ++c) {                                                                     \
            double s1 = (double)s[c], mean_m = s1 / R, var_m = ((double)s[C + c] - s1 * mean_m) / R;          \
            double mean = mean_m * scale, var = (var_m > 0.0 ? var_m : 0.0) * scale * scale;                  \
            float invstd = (float)(1.0 / sqrt(var + eps));                                                    \
            float alpha = w ? invstd * w[c] : invstd; /* ATen's x * alpha + beta, in float */                 \
            ab[c] = (float)(alpha * scale);                                                                   \
            ab[C + c] = (bias ? bias[c] : 0.0f) - (float)mean * alpha;                                        \
            mean_out[c] = (float)mean;                                                                        \
            invstd_out[c] = invstd;                                                                           \
            if (running_mean)                                                                                 \
                running_mean[c] = (float)((1.0 - momentum) * running_mean[c] + momentum * mean);              \
            if (running_var)                                                                                  \
                running_var[c] = (float)((1.0 - momentum) * running_var[c] + momentum * var * R / (R - 1.0)); \
        }                                                                                                     \
        uint32_t top = NAME##_apply(m, outer, C, inner, ab, ab + C, y, mask, nt);                             \
        free(s), free(ab);                                                                                    \
        return top;                                                                                           \
    }

BN_FORWARD(bn_forward_i8, int8_t, int32_t)
BN_FORWARD(bn_forward_i16, int16_t, int64_t)

/* The exact channel sums of m and m * m alone (s: 2 C values), e.g. for a bias gradient. */
#define CHANNEL_SUMS(NAME, MTYPE)                                                                     \
    void NAME##_channel_sums(const MTYPE *m, int64_t outer, int64_t C, int64_t inner, int64_t *s, int nthreads) { \
        NAME##_sums(m, outer, C, inner, s, s + C, outer * C * inner > PAR_MIN ? nthreads : 1);       \
    }
CHANNEL_SUMS(bn_forward_i8, int8_t)
CHANNEL_SUMS(bn_forward_i16, int16_t)
