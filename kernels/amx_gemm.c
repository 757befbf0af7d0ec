/* Exact integer GEMMs on Intel AMX tiles, called through ctypes (amx_gemm.py): C = A @ B for
 * A [M, K] and B [K, N] in any strides, one product or a batch of them. Both operands are packed
 * first into tile order (A: 16 rows x 64 bytes; B: 16 rows x 64 bytes, each row holding 4
 * consecutive k for 16 columns, as the tile instruction reads them), zero past M, N and K; a
 * row-major A is read in place where its rows exist. int8: each 32 x 32 block of C holds four
 * accumulator tiles (2 A tiles x 2 B tiles per step of 64), stored as int32 or as float32
 * acc * scale (+ bias[n]). int16 (any width up to 16 bits): m = 256 h + u with h signed and u
 * unsigned bytes; each 16 x 16 block sums HH, HU + UH and UU in three tiles and stores the
 * exact value, formed in int64, as float32. Blocks run in groups that share L2, reductions
 * above 1024 in chunks. Built without AMX, amx_gemm_available() returns 0 and amx_gemm -1. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
#include <omp.h>

#include "amx_tiles.h"

int amx_gemm_available(void) { return request_tiles(); }

/* A tile (mb, kb): row r, byte c = A[16 mb + r, 64 kb + c] (0 past M or K). */
static void pack_a(const int8_t *a, int64_t sm, int64_t sk, int64_t M, int64_t K, int64_t mb, int64_t kb,
                   int8_t *dst) {
    int64_t m0 = 16 * mb, k0 = 64 * kb;
    int full = m0 + 16 <= M && k0 + 64 <= K;
    if (full && sk == 1) {
        for (int r = 0; r < 16; r++) memcpy(dst + 64 * r, a + (m0 + r) * sm + k0, 64);
        return;
    }
    if (full && sm == 1) {  /* column-major: A^T rows are k, transpose 16 x 16 blocks */
        for (int kk = 0; kk < 4; kk++) {
            const int8_t *rows[16];
            for (int i = 0; i < 16; i++) rows[i] = a + (k0 + 16 * kk + i) * sk + m0;
            transpose16(rows, dst + 16 * kk);
        }
        return;
    }
    for (int r = 0; r < 16; r++)
        for (int c = 0; c < 64; c++) {
            int64_t m = m0 + r, k = k0 + c;
            dst[64 * r + c] = m < M && k < K ? a[m * sm + k * sk] : 0;
        }
}

/* B tile (nb, kb): row r, byte 4 c + t = B[64 kb + 4 r + t, 16 nb + c] (0 past K or N). */
static void pack_b(const int8_t *b, int64_t sk, int64_t sn, int64_t K, int64_t N, int64_t nb, int64_t kb,
                   int8_t *dst) {
    int64_t n0 = 16 * nb, k0 = 64 * kb;
    int full = n0 + 16 <= N && k0 + 64 <= K;
    if (full && sk == 1) {  /* B^T rows are n: 4 consecutive k of column n are one 32-bit word */
        for (int r = 0; r < 16; r++)
            for (int c = 0; c < 16; c++) memcpy(dst + 64 * r + 4 * c, b + (n0 + c) * sn + k0 + 4 * r, 4);
        return;
    }
    if (full && sn == 1) {  /* row-major: interleave 4 rows of 16 bytes */
        for (int r = 0; r < 16; r++) {
            const int8_t *row = b + (k0 + 4 * r) * sk + n0;
            __m128i r0 = _mm_loadu_si128((const __m128i *)row), r1 = _mm_loadu_si128((const __m128i *)(row + sk));
            __m128i r2 = _mm_loadu_si128((const __m128i *)(row + 2 * sk));
            __m128i r3 = _mm_loadu_si128((const __m128i *)(row + 3 * sk));
            __m128i lo01 = _mm_unpacklo_epi8(r0, r1), hi01 = _mm_unpackhi_epi8(r0, r1);
            __m128i lo23 = _mm_unpacklo_epi8(r2, r3), hi23 = _mm_unpackhi_epi8(r2, r3);
            int8_t *d = dst + 64 * r;
            _mm_storeu_si128((__m128i *)d, _mm_unpacklo_epi16(lo01, lo23));
            _mm_storeu_si128((__m128i *)(d + 16), _mm_unpackhi_epi16(lo01, lo23));
            _mm_storeu_si128((__m128i *)(d + 32), _mm_unpacklo_epi16(hi01, hi23));
            _mm_storeu_si128((__m128i *)(d + 48), _mm_unpackhi_epi16(hi01, hi23));
        }
        return;
    }
    for (int r = 0; r < 16; r++)
        for (int c = 0; c < 16; c++)
            for (int t = 0; t < 4; t++) {
                int64_t k = k0 + 4 * r + t, n = n0 + c;
                dst[64 * r + 4 * c + t] = k < K && n < N ? b[k * sk + n * sn] : 0;
            }
}

/* The float32 bits of |v| (ordered as |v| for finite values; inf and NaN above 0x7f800000), and
 * their maximum folded into *amax: the output's absmax for the quantiser that reads it next. */
static inline __m512i magnitude_bits(__m512 v) {
    return _mm512_and_si512(_mm512_castps_si512(v), _mm512_set1_epi32(0x7fffffff));
}

static inline void fold_max(__m512i top, uint32_t *amax) {
    uint32_t best = _mm512_reduce_max_epu32(top);
    if (best > *amax) *amax = best;
}

/* Stores accumulator tile t (rows m0.., columns n0..) into C: int32 where scale == 0, else
 * float32 acc * scale (+ bias[n]); a bounce buffer at the edges of C. */
static void store(int t, void *c, int64_t ldc, int64_t M, int64_t N, int64_t m0, int64_t n0, float scale,
                  const float *bias, uint32_t *amax) {
    int32_t tmp[256];
    int64_t rows = M - m0 < 16 ? M - m0 : 16, cols = N - n0 < 16 ? N - n0 : 16;
    if (rows <= 0 || cols <= 0) return;
    int direct = scale == 0.0f && rows == 16 && cols == 16;
    int32_t *dst = direct ? (int32_t *)c + m0 * ldc + n0 : tmp;
    int64_t ld = direct ? ldc * 4 : 64;
    switch (t) {  /* tile numbers must be immediates */
        case 0: _tile_stored(0, dst, ld); break;
        case 1: _tile_stored(1, dst, ld); break;
        case 2: _tile_stored(2, dst, ld); break;
        default: _tile_stored(3, dst, ld); break;
    }
    if (direct) return;
    __mmask16 keep = (__mmask16)((1u << cols) - 1);
    if (scale == 0.0f) {
        for (int64_t r = 0; r < rows; r++)
            _mm512_mask_storeu_epi32((int32_t *)c + (m0 + r) * ldc + n0, keep, _mm512_loadu_si512(tmp + 16 * r));
        return;
    }
    __m512 s = _mm512_set1_ps(scale);
    __m512 add = bias ? _mm512_maskz_loadu_ps(keep, bias + n0) : _mm512_setzero_ps();
    __m512i top = _mm512_setzero_si512();
    for (int64_t r = 0; r < rows; r++) {
        /* float(acc) is the one rounding; a power-of-two scale is exact, then the bias adds */
        __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_loadu_si512(tmp + 16 * r)), s);
        if (bias) v = _mm512_add_ps(v, add);
        _mm512_mask_storeu_ps((float *)c + (m0 + r) * ldc + n0, keep, v);
        top = _mm512_mask_max_epu32(top, keep, top, magnitude_bits(v));
    }
    fold_max(top, amax);
}

/* Stores the digit accumulators (tiles 0-2: HH, HU + UH, UU) of the 16 x 16 block at (m0, n0)
 * as float32 (65536 HH + 256 (HU + UH) + UU) * scale (+ bias[n]): the exact sum formed in int64
 * and rounded once. */
static void store_digits(void *c, int64_t ldc, int64_t M, int64_t N, int64_t m0, int64_t n0, float scale,
                         const float *bias, uint32_t *amax) {
    int32_t hh[256], x[256], uu[256];
    _tile_stored(0, hh, 64); _tile_stored(1, x, 64); _tile_stored(2, uu, 64);
    int64_t rows = M - m0 < 16 ? M - m0 : 16, cols = N - n0 < 16 ? N - n0 : 16;
    __mmask16 keep = (__mmask16)((1u << cols) - 1);
    __m512 s = _mm512_set1_ps(scale);
    __m512 add = bias ? _mm512_maskz_loadu_ps(keep, bias + n0) : _mm512_setzero_ps();
    __m512i top = _mm512_setzero_si512();
    for (int64_t r = 0; r < rows; r++) {
        __m512i h = _mm512_loadu_si512(hh + 16 * r), m = _mm512_loadu_si512(x + 16 * r);
        __m512i u = _mm512_loadu_si512(uu + 16 * r);
        __m256 half[2];
        for (int q = 0; q < 2; q++) {
            __m512i h64 = _mm512_cvtepi32_epi64(q ? _mm512_extracti64x4_epi64(h, 1) : _mm512_castsi512_si256(h));
            __m512i m64 = _mm512_cvtepi32_epi64(q ? _mm512_extracti64x4_epi64(m, 1) : _mm512_castsi512_si256(m));
            __m512i u64 = _mm512_cvtepi32_epi64(q ? _mm512_extracti64x4_epi64(u, 1) : _mm512_castsi512_si256(u));
            __m512i v = _mm512_add_epi64(_mm512_add_epi64(_mm512_slli_epi64(h64, 16), _mm512_slli_epi64(m64, 8)), u64);
            half[q] = _mm512_cvtepi64_ps(v);
        }
        __m512 v = _mm512_mul_ps(_mm512_insertf32x8(_mm512_castps256_ps512(half[0]), half[1], 1), s);
        if (bias) v = _mm512_add_ps(v, add);
        _mm512_mask_storeu_ps((float *)c + (m0 + r) * ldc + n0, keep, v);
        top = _mm512_mask_max_epu32(top, keep, top, magnitude_bits(v));
    }
    fold_max(top, amax);
}

#define KC 16 /* steps of 64 per reduction chunk: 2 x 16 KB of panels for one block */

/* One block's products over steps k0..k1 of 64 from its two A tiles (a0, a1) and two B tiles
 * (b0, b1) per step: int8, a 32 x 32 block (A: rows 0-15 and 16-31, B: columns 0-15 and 16-31,
 * four accumulators); digits, a 16 x 16 block (A and B: the h and u planes; accumulators HH,
 * HU + UH, UU). Accumulators start from zero (first chunk) or from `spill` (4 tiles of 16 x 16
 * int32) and go to C (last chunk) or back to `spill`. */
static void block(int digits, const int8_t *a0, const int8_t *a1, int64_t lda, int64_t step, const int8_t *b0,
                  const int8_t *b1, int64_t k0, int64_t k1, int first, int last, int32_t *spill, void *c,
                  int64_t ldc, int64_t M, int64_t N, int64_t m0, int64_t n0, float scale, const float *bias,
                  uint32_t *amax) {
    /* C's lines for ownership now, so the stores at the end do not wait for them: int8 blocks
     * ran 1.1-1.4x faster at K <= 1408 (rows ldc apart defeat the hardware prefetcher); digit
     * blocks, with four times the products per output, measured no gain */
    if (last && !digits)
        for (int64_t r = m0; r < m0 + 32 && r < M; r++)
            for (int64_t q = n0; q < n0 + 32 && q < N; q += 16)
                __builtin_prefetch((const int32_t *)c + r * ldc + q, 1, 3);
    if (first) { _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3); }
    else {
        _tile_loadd(0, spill, 64); _tile_loadd(1, spill + 256, 64);
        _tile_loadd(2, spill + 512, 64); _tile_loadd(3, spill + 768, 64);
    }
    for (int64_t kb = k0; kb < k1; kb++) {
        if (kb + 1 < k1)  /* the next A tiles: B's stay cached across the group, A's come from L2 */
            for (int q = 0; q < 16; q++) {
                _mm_prefetch((const char *)(a0 + (kb + 1) * step + lda * q), _MM_HINT_T0);
                _mm_prefetch((const char *)(a1 + (kb + 1) * step + lda * q), _MM_HINT_T0);
            }
        _tile_loadd(4, a0 + kb * step, lda);
        _tile_loadd(6, b0 + kb * TILE, 64);
        _tile_loadd(7, b1 + kb * TILE, 64);
        _tile_loadd(5, a1 + kb * step, lda);
        if (digits) {  /* h signed, u = m & 255 unsigned: m = 256 h + u, no offsets to correct */
            _tile_dpbssd(0, 4, 6);
            _tile_dpbsud(1, 4, 7);
            _tile_dpbusd(1, 5, 6);
            _tile_dpbuud(2, 5, 7);
        } else {
            _tile_dpbssd(0, 4, 6);
            _tile_dpbssd(1, 4, 7);
            _tile_dpbssd(2, 5, 6);
            _tile_dpbssd(3, 5, 7);
        }
    }
    if (!last) {
        _tile_stored(0, spill, 64); _tile_stored(1, spill + 256, 64);
        _tile_stored(2, spill + 512, 64); _tile_stored(3, spill + 768, 64);
        return;
    }
    if (digits) {
        store_digits(c, ldc, M, N, m0, n0, scale, bias, amax);
        return;
    }
    store(0, c, ldc, M, N, m0, n0, scale, bias, amax);
    store(1, c, ldc, M, N, m0, n0 + 16, scale, bias, amax);
    store(2, c, ldc, M, N, m0 + 16, n0, scale, bias, amax);
    store(3, c, ldc, M, N, m0 + 16, n0 + 16, scale, bias, amax);
}

/* m = 256 h + u: h = m >> 8 (int8), u = m & 255 (uint8), over n dense int16 values. */
void amx_split_digits(const int16_t *m, int64_t n, int8_t *h, uint8_t *u, int threads) {
    #pragma omp parallel for simd num_threads(n > 32768 ? threads : 1) schedule(static)
    for (int64_t i = 0; i < n; i++) {
        h[i] = (int8_t)(m[i] >> 8);
        u[i] = (uint8_t)(m[i] & 255);
    }
}

/* For each of `batch` matrices (elements sab, sbb, scb apart; 0 for an operand shared by all):
 * c [M, N] (row stride ldc) = a [M, K] (strides sam, sak) @ b [K, N] (strides sbk, sbn).
 * int8 (a2 == NULL): int32 when scale == 0, else float32 acc * scale + bias.
 * digits (a2, b2: the u planes of int16 operands whose h planes are a, b; same strides):
 * float32 of the exact product, scaled, + bias. K must keep int32 sums exact (the caller
 * chunks: 131071 steps for int8, 32768 for digits). *amax (where not NULL): the largest float32
 * bits & 0x7fffffff of a float32 output, as quantise_cpu.c's absmax_bits reads it.
 * ap: 32 ceil(M / 32) x 64 ceil(K / 64) bytes per distinct A (digits: 32 ceil(M / 16) x
 * 64 ceil(K / 64)), bp alike for B. Returns -1 where the accumulators' spill memory cannot be
 * had. */
int amx_gemm(const int8_t *a, const int8_t *a2, int64_t sab, int64_t sam, int64_t sak, const int8_t *b,
             const int8_t *b2, int64_t sbb, int64_t sbk, int64_t sbn, int64_t batch, int64_t M, int64_t N, int64_t K,
             void *c, int64_t scb, int64_t ldc, float scale, const float *bias, int8_t *ap, int8_t *bp,
             uint32_t *amax, int threads) {
    int digits = a2 != NULL, BS = digits ? 16 : 32;  /* block side */
    int64_t KB = (K + 63) / 64, MP = (M + BS - 1) / BS, NP = (N + BS - 1) / BS;
    int64_t na = sab ? batch : 1, nb = sbb ? batch : 1;  /* distinct operands to pack */
    int64_t apsize = 2 * MP * KB * TILE, bpsize = 2 * NP * KB * TILE;
    /* Row-major A is loaded in place by every block whose rows all exist and whose last step of
     * 64 stays inside the storage (the bytes past K in a row meet zero rows of B) */
    int64_t direct = sak == 1 ? (K % 64 == 0 ? M / BS : (M - 1) / BS) : 0;
    /* groups: up to 16 x 16 blocks, 8 x 8 where the reduction runs in chunks (their accumulators,
     * 256 KB, and panel chunks share L2), fewer where that leaves a thread without work */
    int64_t chunks = (KB + KC - 1) / KC, G = chunks > 1 ? 8 : (256 / KB > 16 ? 16 : (256 / KB < 1 ? 1 : 256 / KB));
    while (G > 1 && batch * ((MP + G - 1) / G) * ((NP + G - 1) / G) < 2 * threads) G /= 2;
    int64_t GM = (MP + G - 1) / G, GN = (NP + G - 1) / G, pa = 2 * (MP - direct) * KB, pb = 2 * NP * KB;
    /* tile w (0, 1) of a block: int8, rows (columns) 16 w on of the one operand; digits, plane w */
    const int8_t *planes_a[2] = {a, digits ? a2 : a}, *planes_b[2] = {b, digits ? b2 : b};
    int64_t shift = digits ? 0 : 16;
    /* each thread's group accumulators between reduction chunks */
    size_t spill_size = (size_t)G * G * TILE;  /* int32 elements */
    int32_t *spills = chunks > 1 ? aligned_alloc(64, (size_t)threads * spill_size * 4) : NULL;
    if (chunks > 1 && !spills) return -1;
    uint32_t top = 0;
    #pragma omp parallel num_threads(threads) reduction(max : top)
    {
        #pragma omp for schedule(static) nowait
        for (int64_t it = 0; it < na * pa; it++) {  /* tiles (block, w, kb) of each distinct A */
            int64_t t = 2 * direct * KB + it % pa, blk = t / (2 * KB), w = t / KB % 2;
            pack_a(planes_a[w] + it / pa * sab, sam, sak, M, K, (BS * blk + shift * w) / 16, t % KB,
                   ap + it / pa * apsize + t * TILE);
        }
        #pragma omp for schedule(static)
        for (int64_t it = 0; it < nb * pb; it++) {
            int64_t t = it % pb, blk = t / (2 * KB), w = t / KB % 2;
            pack_b(planes_b[w] + it / pb * sbb, sbk, sbn, K, N, (BS * blk + shift * w) / 16, t % KB,
                   bp + it / pb * bpsize + t * TILE);
        }
        configure();
        /* Blocks run in groups of G x G per thread, reduction chunk by chunk, column panel by
         * column panel within a chunk: one B panel chunk (16 KB) stays in L1 while the group's A
         * panel chunks come from L2, and the group's accumulators wait in `spill` (L2) between
         * chunks. Block by block over the whole K, 4096^3 ran at 0.85x torch._int_mm: every
         * column panel read all of A from memory. */
        int32_t *spill = spills ? spills + omp_get_thread_num() * spill_size : NULL;
        #pragma omp for schedule(static)
        for (int64_t g = 0; g < batch * GM * GN; g++) {
            int64_t bt = g / (GM * GN), gg = g % (GM * GN), mg = gg / GN * G, ng = gg % GN * G;
            int64_t me = mg + G < MP ? mg + G : MP, ne = ng + G < NP ? ng + G : NP;
            const int8_t *apb = ap + (sab ? bt : 0) * apsize, *bpb = bp + (sbb ? bt : 0) * bpsize;
            char *cb = (char *)c + bt * scb * 4;
            for (int64_t ch = 0; ch < chunks; ch++) {
                int64_t k0 = ch * KC, k1 = k0 + KC < KB ? k0 + KC : KB;
                for (int64_t np = ng; np < ne; np++)
                    for (int64_t mp = mg; mp < me; mp++) {
                        int in_place = mp < direct;
                        int64_t lda = in_place ? sam : 64, step = in_place ? 64 : TILE;
                        const int8_t *a0 = in_place ? planes_a[0] + bt * sab + BS * mp * sam : apb + 2 * mp * KB * TILE;
                        const int8_t *a1 = in_place ? planes_a[1] + bt * sab + (BS * mp + shift) * sam
                                                    : a0 + KB * TILE;
                        const int8_t *b0 = bpb + 2 * np * KB * TILE;
                        int32_t *sp = spill ? spill + ((np - ng) * G + (mp - mg)) * TILE : NULL;
                        block(digits, a0, a1, lda, step, b0, b0 + KB * TILE, k0, k1, ch == 0, ch == chunks - 1,
                              sp, cb, ldc, M, N, BS * mp, BS * np, scale, bias, &top);
                    }
            }
        }
        _tile_release();
    }
    free(spills);
    if (amax) *amax = top;
    return 0;
}

#else

int amx_gemm_available(void) { return 0; }

void amx_split_digits(const int16_t *m, int64_t n, int8_t *h, uint8_t *u, int threads) {
    (void)m; (void)n; (void)h; (void)u; (void)threads;
}

int amx_gemm(const int8_t *a, const int8_t *a2, int64_t sab, int64_t sam, int64_t sak, const int8_t *b,
             const int8_t *b2, int64_t sbb, int64_t sbk, int64_t sbn, int64_t batch, int64_t M, int64_t N, int64_t K,
             void *c, int64_t scb, int64_t ldc, float scale, const float *bias, int8_t *ap, int8_t *bp,
             uint32_t *amax, int threads) {
    (void)amax; (void)a; (void)a2; (void)sab; (void)sam; (void)sak; (void)b; (void)b2; (void)sbb; (void)sbk; (void)sbn;
    (void)batch; (void)M; (void)N; (void)K; (void)c; (void)scb; (void)ldc; (void)scale; (void)bias; (void)ap;
    (void)bp; (void)threads;
    return -1;
}

#endif
