/* Fused CPU quantiser for float32 tensors (SPEC section 1), called through ctypes.
 *
 * absmax_bits: max of (bits & 0x7fffffff) over x as uint32. For finite floats this orders like
 *   |x|; a result >= 0x7f800000 means an inf or NaN is present.
 * quantise_*: one pass that scales by 2**s (two power-of-two factors), rounds (half to even, or
 *   stochastic: floor(v) + (u < v - floor(v)) with u a 24-bit uniform), and writes the integer
 *   mantissas and/or the dequantised values m * 2**-s clamped to +-fmax, and optionally the
 *   exact column sums of the mantissas (a bias gradient) from the same pass.
 * Uniforms come from `noise` when given, else from generators seeded per block of CHUNK elements
 * by a hash of (seed, block), so a result depends on the seed only, never on the thread count.
 * With `top` the pass runs on a guessed exponent and also gathers absmax_bits of x into *top:
 * the caller keeps the outputs where the true exponent equals the guess (they are then exactly
 * what the two passes would write) and runs the pass again otherwise; mantissas are clamped to
 * +-mmax so that a wrong guess converts no out-of-range float.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <string.h>

/* Small inputs get a team of one through num_threads rather than an if clause: GCC's if(false)
 * path ran these loops unvectorised, 9x slower on 32768 elements. */
#define PAR_MIN 32768

static inline uint32_t mix32(uint32_t h) { /* avalanche finaliser (lowbias32 constants) */
    h ^= h >> 16; h *= 0x7feb352dU;
    h ^= h >> 15; h *= 0x846ca68bU;
    h ^= h >> 16;
    return h;
}

/* max of (bits & 0x7fffffff) over xs[0 .. len). */
static uint32_t block_absmax(const float *xs, int64_t len) {
    uint32_t best = 0;
#pragma omp simd reduction(max : best)
    for (int64_t i = 0; i < len; ++i) {
        uint32_t b;
        memcpy(&b, xs + i, 4);
        b &= 0x7fffffffU;
        best = b > best ? b : best;
    }
    return best;
}

uint32_t absmax_bits(const float *x, int64_t n, int nthreads) {
    const int64_t block = 1 << 16;
    int64_t blocks = (n + block - 1) / block;
    uint32_t best = 0;
#pragma omp parallel for reduction(max : best) num_threads(n > PAR_MIN ? nthreads : 1) schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
        uint32_t m = block_absmax(x + b * block, n - b * block < block ? n - b * block : block);
        best = m > best ? m : best;
    }
    return best;
}

/* The rounding runs on blocks of CHUNK elements into a float buffer, one branch-free loop per
 * mode, so that each loop vectorises; stores follow in loops of their own. Block starts are
 * multiples of CHUNK, so the high word of the element index is constant within a block. */
#define CHUNK 2048
#define LANES 32 /* xoshiro128+ generators per block, stepped side by side (CHUNK % LANES == 0) */

/* The block's 24-bit uniforms: element j * LANES + l is output j of generator l, whose state is
 * four hashed counters of (seed, block, l). xoshiro128+ (Blackman and Vigna) takes adds, shifts
 * and xors: 0.26 ms per 2M draws on one core, against 0.43 ms for one three-multiply hash per
 * element. Its top 24 bits, the ones used, have no known statistical weakness. */
static void fill_uniforms(uint64_t seed, int64_t start, int64_t len, float *u) {
    uint32_t key = mix32((uint32_t)seed ^ mix32((uint32_t)(seed >> 32)
                                                ^ ((uint32_t)((uint64_t)start >> 32) * 0x85ebca6bU)));
    uint32_t first = ((uint32_t)start / CHUNK) * LANES * 4; /* below 2**28: distinct per block */
    uint32_t s0[LANES], s1[LANES], s2[LANES], s3[LANES];
#pragma omp simd
    for (int l = 0; l < LANES; ++l) { /* mix32 is a bijection: never the all-zero state */
        uint32_t c = first + 4 * (uint32_t)l;
        s0[l] = mix32(c ^ key), s1[l] = mix32((c + 1) ^ key);
        s2[l] = mix32((c + 2) ^ key), s3[l] = mix32((c + 3) ^ key);
    }
    for (int64_t j = 0; j < len; j += LANES) {
#pragma omp simd
        for (int l = 0; l < LANES; ++l) {
            uint32_t r = s0[l] + s3[l], t = s1[l] << 9;
            s2[l] ^= s0[l], s3[l] ^= s1[l], s1[l] ^= s2[l], s0[l] ^= s3[l], s2[l] ^= t;
            s3[l] = (s3[l] << 11) | (s3[l] >> 21);
            u[j + l] = (float)(r >> 8) * 0x1p-24f;
        }
    }
}

/* Rounds xs[0 .. len) (elements start .. start + len of the tensor); us: the block's uniforms,
 * or NULL for the generators' draws. top: also gathers absmax_bits into *top and clamps the
 * rounded values to +-mmax (a guessed exponent may be too large); clamping inside the rounding
 * loop cost 15% where a clamping store loop cost 45%. */
static void round_block(const float *xs, const float *us, int64_t start, int64_t len,
                        float up_hi, float up_lo, int stochastic, uint64_t seed, float *m,
                        uint32_t *top, float mmax) {
    float drawn[CHUNK];
    if (stochastic && !us) {
        fill_uniforms(seed, start, len, drawn);
        us = drawn;
    }
    if (!stochastic) {
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) m[i] = rintf(xs[i] * up_hi * up_lo);
    } else if (top) { /* the same loop gathering absmax_bits: x is in registers already */
        uint32_t best = *top;
#pragma omp simd reduction(max : best)
        for (int64_t i = 0; i < len; ++i) {
            uint32_t b;
            float v = xs[i] * up_hi * up_lo, f = floorf(v);
            memcpy(&b, xs + i, 4);
            b &= 0x7fffffffU;
            best = b > best ? b : best;
            float r = f + (us[i] < v - f ? 1.0f : 0.0f);
            r = r < -mmax ? -mmax : r;
            m[i] = r > mmax ? mmax : r;
        }
        *top = best;
        return;
    } else {
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
            float v = xs[i] * up_hi * up_lo, f = floorf(v);
            m[i] = f + (us[i] < v - f ? 1.0f : 0.0f);
        }
    }
    if (top) {
        uint32_t b = block_absmax(xs, len);
        *top = b > *top ? b : *top;
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
            float r = m[i] < -mmax ? -mmax : m[i];
            m[i] = r > mmax ? mmax : r;
        }
    }
}

/* sums (where not NULL): the exact column sums of the mantissas of a row-major [n / cols, cols]
 * matrix (a linear layer's output gradient, or a channels-last one's rows of channels), the
 * bias gradient, gathered by the same pass; scratch holds nthreads x cols partial sums. */
static void add_columns(const float *m, int64_t start, int64_t len, int64_t cols, int32_t *acc) {
    int64_t c = start % cols;
    for (int64_t i = 0; i < len;) {
        int64_t run = len - i < cols - c ? len - i : cols - c;
#pragma omp simd
        for (int64_t j = 0; j < run; ++j) acc[c + j] += (int32_t)m[i + j];
        i += run;
        c = 0;
    }
}

/* Folds a thread's int32 column sums into its int64 ones before they could overflow: a block
 * adds at most CHUNK / cols + 1 mantissas below 2**15 to each column. */
static void fold_columns(int32_t *acc, int64_t *wide, int64_t cols) {
    for (int64_t c = 0; c < cols; ++c) wide[c] += acc[c], acc[c] = 0;
}

#define QUANTISE_FN(NAME, MTYPE)                                                        \
    void NAME(const float *x, int64_t n, float up_hi, float up_lo, float down_hi,       \
              float down_lo, float fmax, int stochastic, uint64_t seed,                 \
              const float *noise, MTYPE *mant, float *q, int64_t cols, int64_t *sums,   \
              int64_t *scratch, int nthreads, uint32_t *top, float mmax) {              \
        int64_t blocks = (n + CHUNK - 1) / CHUNK;                                       \
        int nt = n > PAR_MIN ? nthreads : 1;                                            \
        uint32_t best = 0;                                                              \
        /* scratch: nt x cols int64 sums, then nt x cols int32 ones */                 \
        if (sums) memset(scratch, 0, (size_t)nt * cols * (sizeof(int64_t) + sizeof(int32_t))); \
        int64_t per_fold = sums ? 65535 / (CHUNK / cols + 2) : 0;                       \
        _Pragma("omp parallel num_threads(nt)") {                                       \
        int64_t *wide = sums ? scratch + omp_get_thread_num() * cols : NULL;            \
        int32_t *acc = sums ? (int32_t *)(scratch + nt * cols) + omp_get_thread_num() * cols : NULL; \
        int64_t since = 0;                                                              \
        uint32_t mine = 0;                                                              \
        _Pragma("omp for schedule(static)")                                             \
        for (int64_t b = 0; b < blocks; ++b) {                                          \
            float m[CHUNK];                                                             \
            int64_t start = b * CHUNK, len = n - start < CHUNK ? n - start : CHUNK;     \
            round_block(x + start, noise ? noise + start : NULL, start, len, up_hi, up_lo, \
                        stochastic, seed, m, top ? &mine : NULL, mmax);                 \
            if (mant) {                                                                 \
                MTYPE *dst = mant + start;                                              \
                _Pragma("omp simd")                                                     \
                for (int64_t i = 0; i < len; ++i) dst[i] = (MTYPE)m[i];                 \
            }                                                                           \
            if (acc) {                                                                  \
                add_columns(m, start, len, cols, acc);                                  \
                if (++since >= per_fold) fold_columns(acc, wide, cols), since = 0;     \
            }                                                                           \
            if (q) {                                                                    \
                float *dst = q + start;                                                 \
                _Pragma("omp simd")                                                     \
                for (int64_t i = 0; i < len; ++i) {                                     \
                    float r = m[i] * down_hi * down_lo;                                 \
                    dst[i] = r > fmax ? fmax : (r < -fmax ? -fmax : r);                 \
                }                                                                       \
            }                                                                           \
        }                                                                               \
        if (acc) fold_columns(acc, wide, cols);                                         \
        if (top) {                                                                      \
            _Pragma("omp critical")                                                     \
            best = mine > best ? mine : best;                                           \
        }                                                                               \
        }                                                                               \
        if (top) *top = best;                                                           \
        if (sums)                                                                       \
            for (int64_t c = 0; c < cols; ++c) {                                        \
                int64_t total = 0;                                                      \
                for (int t = 0; t < nt; ++t) total += scratch[t * cols + c];            \
                sums[c] = total;                                                        \
            }                                                                           \
    }

QUANTISE_FN(quantise_i8, int8_t)
QUANTISE_FN(quantise_i16, int16_t)
QUANTISE_FN(quantise_i32, int32_t)

/* Dequantisation: out = (float)m * 2**e, exact (|m| < 2**24; the scale is a normal power of two). */
#define DEQUANTISE_FN(NAME, MTYPE)                                                           \
    void NAME(const MTYPE *m, int64_t n, float scale, float *out, int nthreads) {           \
        _Pragma("omp parallel for simd num_threads(n > PAR_MIN ? nthreads : 1) schedule(static)") \
        for (int64_t i = 0; i < n; ++i) out[i] = (float)m[i] * scale;                       \
    }

DEQUANTISE_FN(dequantise_i8, int8_t)
DEQUANTISE_FN(dequantise_i16, int16_t)
DEQUANTISE_FN(dequantise_i32, int32_t) /* int32 accumulators: rounded to float32 as torch converts them */
DEQUANTISE_FN(dequantise_i64, int64_t) /* int64 accumulators (split or 12-bit products): likewise */

/* Output quantisation straight from an int32 GEMM accumulator: q = round(acc * 2**e * 2**s)
 * * 2**-s, where (float)acc is the value an FP32 epilogue would hold, so the result equals
 * converting, scaling and quantising in three passes. up_* = 2**(e+s) in two factors. With
 * mant_bytes 1 or 2 the mantissas round(...) go to mant as int8/int16 as well. */
int64_t absmax_i32(const int32_t *a, int64_t n, int nthreads) {
    int64_t best = 0;
#pragma omp parallel for simd reduction(max : best) num_threads(n > PAR_MIN ? nthreads : 1) schedule(static)
    for (int64_t i = 0; i < n; ++i) {
        int64_t v = a[i] < 0 ? -(int64_t)a[i] : (int64_t)a[i];
        best = v > best ? v : best;
    }
    return best;
}

void requantise_i32(const int32_t *acc, int64_t n, float up_hi, float up_lo, float down_hi,
                    float down_lo, float fmax, int stochastic, uint64_t seed, float *q,
                    void *mant, int mant_bytes, int nthreads) {
    int64_t blocks = (n + CHUNK - 1) / CHUNK;
#pragma omp parallel for num_threads(n > PAR_MIN ? nthreads : 1) schedule(static)
    for (int64_t b = 0; b < blocks; ++b) {
        float x[CHUNK], m[CHUNK];
        int64_t start = b * CHUNK, len = n - start < CHUNK ? n - start : CHUNK;
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) x[i] = (float)acc[start + i];
        round_block(x, NULL, start, len, up_hi, up_lo, stochastic, seed, m, NULL, 0.0f);
        if (mant_bytes == 1) {
            int8_t *md = (int8_t *)mant + start;
#pragma omp simd
            for (int64_t i = 0; i < len; ++i) md[i] = (int8_t)m[i];
        } else if (mant_bytes == 2) {
            int16_t *md = (int16_t *)mant + start;
#pragma omp simd
            for (int64_t i = 0; i < len; ++i) md[i] = (int16_t)m[i];
        }
        float *dst = q + start;
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
            float r = m[i] * down_hi * down_lo;
            dst[i] = r > fmax ? fmax : (r < -fmax ? -fmax : r);
        }
    }
}

/* The exponent of SPEC section 1 from absmax_bits `top` (finite): the largest s with
 * amax * 2**s <= qmax = 2**(bits-1) - 1, capped at max_exp, 0 for amax = 0. amax = sig * 2**e
 * exactly, and sig * 2**t with t = bits - 2 - log2(sig) lies in [2**(bits-2), 2**(bits-1)),
 * so t or t - 1 is the largest t with sig * 2**t <= qmax; then s = t - e. */
static int exponent_of_bits(uint32_t top, int bits, int max_exp) {
    if (top == 0) return 0;
    uint32_t field = (top >> 23) & 0xFFu;
    uint64_t sig = field ? ((top & 0x7FFFFFu) | 0x800000u) : (top & 0x7FFFFFu);
    int e = field ? (int)field - 150 : -149;
    uint64_t qmax = ((uint64_t)1 << (bits - 1)) - 1;
    int t = bits - 2 - (63 - __builtin_clzll(sig));
    int fits = t >= 0 ? (sig << t) <= qmax : sig <= (qmax << -t);
    int s = (fits ? t : t - 1) - e;
    return s < max_exp ? s : max_exp;
}

/* One dense float32 tensor quantised in place (values only), as quantise_* with its own
 * absmax pass: exps[0] receives the exponent, or INT32_MIN (tensor untouched) where a NaN or
 * inf is present. */
static void quantise_values_one(float *x, int64_t n, int bits, int max_exp, int stochastic, uint64_t seed,
                                int nthreads, int32_t *exps) {
    uint32_t top = absmax_bits(x, n, nthreads); /* both take one thread up to PAR_MIN values */
    if (top >= 0x7f800000U) {
        *exps = INT32_MIN;
        return;
    }
    int s = exponent_of_bits(top, bits, max_exp), h = s >> 1, l = s - h; /* h = floor(s / 2) */
    quantise_i8(x, n, ldexpf(1.0f, h), ldexpf(1.0f, l), ldexpf(1.0f, -h), ldexpf(1.0f, -l), 3.402823466e38f,
                stochastic, seed, NULL, NULL, x, 0, NULL, NULL, nthreads, NULL,
                (float)(((int64_t)1 << (bits - 1)) - 1));
    *exps = s;
}

/* `count` tensors (an optimiser's gradients) in one call: large ones one after another on every
 * thread, the small ones spread over the threads, one tensor each. Every tensor gets exactly
 * what quantise_* gives it alone with its seed (the draws depend on seed and index only). */
void quantise_values_many(const int64_t *ptrs, const int64_t *ns, const uint64_t *seeds, int count, int bits,
                          int max_exp, int stochastic, int nthreads, int32_t *exps) {
    for (int t = 0; t < count; ++t)
        if (ns[t] > PAR_MIN)
            quantise_values_one((float *)(intptr_t)ptrs[t], ns[t], bits, max_exp, stochastic, seeds[t], nthreads,
                                exps + t);
#pragma omp parallel for schedule(dynamic) num_threads(nthreads)
    for (int t = 0; t < count; ++t)
        if (ns[t] <= PAR_MIN)
            quantise_values_one((float *)(intptr_t)ptrs[t], ns[t], bits, max_exp, stochastic, seeds[t], 1, exps + t);
}
