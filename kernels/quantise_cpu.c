/* Fused CPU quantiser for float32 tensors (SPEC section 1), called through ctypes.
 *
 * absmax_bits: max of (bits & 0x7fffffff) over x as uint32. For finite floats this orders like
 *   |x|; a result >= 0x7f800000 means an inf or NaN is present.
 * quantise_*: one pass that scales by 2**s (two power-of-two factors), rounds (half to even, or
 *   stochastic: floor(v) + (u < v - floor(v)) with u a 24-bit uniform), and writes the integer
 *   mantissas and/or the dequantised values m * 2**-s clamped to +-fmax.
 * Uniforms come from `noise` when given, else from a counter-based hash of (seed, index), so a
 * result depends on the seed only, never on the thread count.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#define PAR_MIN 32768

static inline uint32_t mix32(uint32_t h) { /* avalanche finaliser (lowbias32 constants) */
    h ^= h >> 16; h *= 0x7feb352dU;
    h ^= h >> 15; h *= 0x846ca68bU;
    h ^= h >> 16;
    return h;
}

static inline float uniform24(uint64_t seed, int64_t i) {
    uint32_t lo = (uint32_t)i, hi = (uint32_t)((uint64_t)i >> 32);
    uint32_t h = mix32(lo * 0x9e3779b9U ^ (uint32_t)seed);
    h = mix32(h ^ (uint32_t)(seed >> 32) ^ (hi * 0x85ebca6bU));
    return (float)(h >> 8) * 0x1p-24f;
}

uint32_t absmax_bits(const float *x, int64_t n, int nthreads) {
    uint32_t best = 0;
#pragma omp parallel for simd reduction(max : best) num_threads(nthreads) if (n > PAR_MIN) schedule(static)
    for (int64_t i = 0; i < n; ++i) {
        uint32_t b;
        memcpy(&b, x + i, 4);
        b &= 0x7fffffffU;
        best = b > best ? b : best;
    }
    return best;
}

/* The rounding runs on blocks of CHUNK elements into a float buffer, one branch-free loop per
 * mode, so that each loop vectorises; stores follow in loops of their own. Block starts are
 * multiples of CHUNK, so the high word of the element index is constant within a block. */
#define CHUNK 2048

static void round_block(const float *x, int64_t start, int64_t len, float up_hi, float up_lo,
                        int stochastic, uint64_t seed, const float *noise, float *m) {
    const float *xs = x + start;
    if (!stochastic) {
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) m[i] = rintf(xs[i] * up_hi * up_lo);
    } else if (noise) {
        const float *us = noise + start;
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
            float v = xs[i] * up_hi * up_lo, f = floorf(v);
            m[i] = f + (us[i] < v - f ? 1.0f : 0.0f);
        }
    } else {
        uint32_t lo_seed = (uint32_t)seed;
        uint32_t hi_mix = (uint32_t)(seed >> 32) ^ ((uint32_t)((uint64_t)start >> 32) * 0x85ebca6bU);
        uint32_t base = (uint32_t)start;
#pragma omp simd
        for (int64_t i = 0; i < len; ++i) {
            uint32_t h = mix32((base + (uint32_t)i) * 0x9e3779b9U ^ lo_seed);
            h = mix32(h ^ hi_mix);
            float u = (float)(h >> 8) * 0x1p-24f;
            float v = xs[i] * up_hi * up_lo, f = floorf(v);
            m[i] = f + (u < v - f ? 1.0f : 0.0f);
        }
    }
}

#define QUANTISE_FN(NAME, MTYPE)                                                        \
    void NAME(const float *x, int64_t n, float up_hi, float up_lo, float down_hi,       \
              float down_lo, float fmax, int stochastic, uint64_t seed,                 \
              const float *noise, MTYPE *mant, float *q, int nthreads) {                \
        int64_t blocks = (n + CHUNK - 1) / CHUNK;                                       \
        _Pragma("omp parallel for num_threads(nthreads) schedule(static) if (n > PAR_MIN)") \
        for (int64_t b = 0; b < blocks; ++b) {                                          \
            float m[CHUNK];                                                             \
            int64_t start = b * CHUNK, len = n - start < CHUNK ? n - start : CHUNK;     \
            round_block(x, start, len, up_hi, up_lo, stochastic, seed, noise, m);       \
            if (mant) {                                                                 \
                MTYPE *dst = mant + start;                                              \
                _Pragma("omp simd")                                                     \
                for (int64_t i = 0; i < len; ++i) dst[i] = (MTYPE)m[i];                 \
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
    }

QUANTISE_FN(quantise_i8, int8_t)
QUANTISE_FN(quantise_i16, int16_t)
QUANTISE_FN(quantise_i32, int32_t)
