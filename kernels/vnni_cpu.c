/* Convolutions on AVX-512 VNNI (vpdpbusd, vpdpwssd), for CPUs without AMX tiles: the weight
 * gradient first.
 *
 * dW[co, i, j, c] = sum over output positions p of g[p, co] * x[p shifted by tap (i, j), c],
 * exact in integers. vpdpbusd multiplies 4 unsigned by 4 signed bytes per int32 lane and adds
 * the four products to the lane. Here a lane is an input channel c and its 4 bytes are 4
 * consecutive output columns (ow .. ow + 3) of one output row: the input as u = x + 128
 * (unsigned, 128 where the tap falls in the zero padding) and the gradient g[p, co] broadcast
 * as the signed operand. Since sum u * g = sum x * g + 128 * sum g, one correction per output
 * channel, 128 * sum_p g[p, co], makes the result exact; every tap sees every position, so the
 * correction is the same for all taps and channels.
 *
 * Per image, the input is packed once per kernel column j (xp_j[h][ow4][c][q], the input at
 * column SW * (4 ow4 + q) + j DW - PW) and the gradient once (gp[oh][ow4][co][q], 0 past OW),
 * each a 4-row byte interleave (one vpermb per 16 channels); images are packed together up to
 * CHUNK_BYTES. Then for each tap and block of 16 output x 16 input channels, 16 int32
 * accumulators stay in registers over a run of the chunk's rows and are added into int64
 * sums: a lane takes at most 4 * 255 * 128 per group of 4 columns, so a run stays below 2**31
 * over RUN_GROUPS groups.
 *
 * Threads take whole images, each with its own int64 partial sums, added at the end.
 *
 * The convolution (forward, and the grad-input as a convolution) follows below.
 */
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AVX512VNNI__) && defined(__AVX512VBMI__) && defined(__AVX512BW__)
#include <immintrin.h>
#include <omp.h>

#define RUN_GROUPS 16384 /* 16384 * 4 * 255 * 128 < 2**31 */
#define CHUNK_BYTES (384 << 10) /* packed images per chunk: about a third of a 1 MiB L2 */

int vnni_available(void) { return 1; }

/* The first n of 16 lanes (all for n >= 16). */
static inline __mmask16 first_lanes(int64_t n) { return n >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1); }

/* The 16 int32 lanes of a, widened, stored into dst[0 .. 16) (have == 0) or added to them. */
static inline __attribute__((always_inline)) void widen_into(__m512i a, int64_t *dst, int have) {
    __m512i lo = _mm512_cvtepi32_epi64(_mm512_castsi512_si256(a));
    __m512i hi = _mm512_cvtepi32_epi64(_mm512_extracti64x4_epi64(a, 1));
    if (have) {
        lo = _mm512_add_epi64(_mm512_loadu_si512(dst), lo);
        hi = _mm512_add_epi64(_mm512_loadu_si512(dst + 8), hi);
    }
    _mm512_storeu_si512(dst, lo);
    _mm512_storeu_si512(dst + 8, hi);
}

/* The largest of 32 unsigned 16-bit lanes. */
static inline int64_t max_u16(__m512i v) {
    __m512i hi = _mm512_srli_epi32(v, 16), lo = _mm512_and_si512(v, _mm512_set1_epi32(0xffff));
    return _mm512_reduce_max_epu32(_mm512_max_epu32(hi, lo));
}

/* dst[c * 4 + q] = rows[q][c] ^ flip for c < 16 (n valid bytes per row, the rest 0 ^ flip):
 * four rows of 16 bytes interleaved into 64. */
static const uint8_t ORDER4[64] = {
    0, 16, 32, 48, 1, 17, 33, 49, 2, 18, 34, 50, 3, 19, 35, 51, 4, 20, 36, 52, 5, 21, 37, 53,
    6, 22, 38, 54, 7, 23, 39, 55, 8, 24, 40, 56, 9, 25, 41, 57, 10, 26, 42, 58, 11, 27, 43, 59,
    12, 28, 44, 60, 13, 29, 45, 61, 14, 30, 46, 62, 15, 31, 47, 63};
static const uint16_t ORDER2[32] = {0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23,
                                    8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31};

static inline void interleave4(const int8_t *const rows[4], int n, uint8_t flip, int8_t *dst) {
    __mmask16 m = first_lanes(n);
    __m512i v = _mm512_castsi128_si512(_mm_maskz_loadu_epi8(m, rows[0]));
    v = _mm512_inserti32x4(v, _mm_maskz_loadu_epi8(m, rows[1]), 1);
    v = _mm512_inserti32x4(v, _mm_maskz_loadu_epi8(m, rows[2]), 2);
    v = _mm512_inserti32x4(v, _mm_maskz_loadu_epi8(m, rows[3]), 3);
    v = _mm512_permutexvar_epi8(_mm512_loadu_si512(ORDER4), v);
    _mm512_storeu_si512(dst, _mm512_xor_si512(v, _mm512_set1_epi8((char)flip)));
}

/* The int16 twin: dst[c * 2 + q] = rows[q][c] for c < 16 (n valid channels, the rest 0), two
 * rows of 16 int16 interleaved into 32; returns max |value| in 16-bit lanes (|-32768| = 0x8000). */
static inline __m512i interleave2(const int8_t *const rows[2], int n, int8_t *dst) {
    __mmask16 m = first_lanes(n);
    __m512i v = _mm512_castsi256_si512(_mm256_maskz_loadu_epi16(m, rows[0]));
    v = _mm512_inserti64x4(v, _mm256_maskz_loadu_epi16(m, rows[1]), 1);
    v = _mm512_permutexvar_epi16(_mm512_loadu_si512(ORDER2), v);
    _mm512_storeu_si512(dst, v);
    return _mm512_abs_epi16(v);
}

/* 16 output channels [co0, co0 + 16) x 16 input channels [c0, c0 + 16) over packed gradient
 * rows [r0, r1) of one tap, added into sums[co][c] (int64, row stride `ldo`): `groups` dwords
 * per row (4 int8 columns or 2 int16 ones each). One input vector per 16 broadcasts: wider
 * blocks (2 or 4 input vectors per 8 or 4 output channels) measured no faster. */
static inline __attribute__((always_inline)) void block(const int8_t *gp, const int8_t *xp_rows[], int64_t r0,
                                                         int64_t r1, int64_t groups, int64_t Coutp, int64_t C,
                                                         int64_t co0, int64_t c0, int64_t *sums, int64_t ldo,
                                                         const int WIDE) {
    __m512i acc[16];
    for (int k = 0; k < 16; ++k) acc[k] = _mm512_setzero_si512();
    for (int64_t r = r0; r < r1; ++r) {
        const int8_t *xr = xp_rows[r] + c0 * 4, *gr = gp + r * groups * Coutp * 4 + co0 * 4;
        for (int64_t q = 0; q < groups; ++q, xr += C * 4, gr += Coutp * 4) {
            __m512i u = _mm512_loadu_si512(xr);
            for (int co = 0; co < 16; ++co) {
                __m512i s = _mm512_set1_epi32(*(const int32_t *)(gr + co * 4));
                acc[co] = WIDE ? _mm512_dpwssd_epi32(acc[co], u, s) : _mm512_dpbusd_epi32(acc[co], u, s);
            }
        }
    }
    for (int co = 0; co < 16; ++co) widen_into(acc[co], sums + (co0 + co) * ldo + c0, 1);
}

/* The geometry of one weight-gradient call; strides in bytes. */
typedef struct {
    int64_t Cout, Coutp, OH, OW, groups, gsH, gsW, C, H, W, xsH, xsW;
    int KW, SW, PW, DW, wide, Q; /* Q: columns per dword, 4 (int8) or 2 (int16) */
} gw_shape;

/* One image: the gradient as gp[oh][group][co][q] (0 past OW and Cout), and the input once
 * per kernel column j as xp[j][h][group][c][q] (int8: u = x + 128, 128 in the padding; int16:
 * x, 0 in the padding). int8: the gradient's channel sums added into gsum, taken from the
 * packed groups (one vpdpbusd of ones per 4 columns); int16: the largest |g| and |x| raised
 * into tops[0], tops[1]. Where 16 channels make a pixel 16 bytes (int8), 4 consecutive columns
 * are 64 contiguous bytes: one load instead of four; 2 int16 columns likewise. */
static void pack_image(const gw_shape *s, const int8_t *gn, const int8_t *xn, const int8_t *zero, int8_t *gp,
                       int8_t *xp, int32_t *gs, int64_t *gsum, int64_t *tops) {
    const int Q = s->Q;
    const __m512i perm = _mm512_loadu_si512(ORDER4), pair = _mm512_loadu_si512(ORDER2), ones = _mm512_set1_epi8(1),
                  flip = _mm512_set1_epi8((char)0x80);
    /* 16 channels, so that a group's Q columns are 64 contiguous bytes (the input's at stride 1) */
    const int g_run = s->Cout == 16 && s->gsW == 64 / Q, x_run = s->C == 16 && s->xsW == 64 / Q && s->SW == 1;
    __m512i gtop = _mm512_setzero_si512(), xtop = _mm512_setzero_si512();
    if (Q == 4) { /* int8 gradient, with its channel sums */
        for (int64_t c0 = 0; c0 < s->Coutp; c0 += 16) {
            __m512i sum = _mm512_setzero_si512();
            for (int64_t oh = 0; oh < s->OH; ++oh)
                for (int64_t q0 = 0; q0 < s->groups; ++q0) {
                    int8_t *dst = gp + ((oh * s->groups + q0) * s->Coutp + c0) * 4;
                    if (g_run && 4 * q0 + 3 < s->OW) {
                        __m512i v = _mm512_permutexvar_epi8(perm, _mm512_loadu_si512(gn + oh * s->gsH + 4 * q0 * 16));
                        _mm512_storeu_si512(dst, v);
                    } else {
                        const int8_t *r[4];
                        int64_t left = s->Cout - c0;
                        for (int q = 0; q < 4; ++q)
                            r[q] = (4 * q0 + q < s->OW ? gn + oh * s->gsH + (4 * q0 + q) * s->gsW : zero) + c0;
                        interleave4(r, left >= 16 ? 16 : (int)left, 0, dst);
                    }
                    sum = _mm512_dpbusd_epi32(sum, ones, _mm512_loadu_si512(dst)); /* lane c: its 4 columns */
                }
            _mm512_storeu_si512(gs + c0, sum);
        }
        for (int64_t co = 0; co < s->Coutp; ++co) gsum[co] += gs[co];
    } else { /* int16 gradient, with its largest magnitude */
        for (int64_t oh = 0; oh < s->OH; ++oh)
            for (int64_t q0 = 0; q0 < s->groups; ++q0) {
                if (g_run && 2 * q0 + 1 < s->OW) {
                    __m512i v = _mm512_permutexvar_epi16(pair, _mm512_loadu_si512(gn + oh * s->gsH + 2 * q0 * 32));
                    _mm512_storeu_si512(gp + (oh * s->groups + q0) * s->Coutp * 4, v);
                    gtop = _mm512_max_epu16(gtop, _mm512_abs_epi16(v));
                    continue;
                }
                const int8_t *src[2];
                for (int q = 0; q < 2; ++q)
                    src[q] = 2 * q0 + q < s->OW ? gn + oh * s->gsH + (2 * q0 + q) * s->gsW : zero;
                for (int64_t c0 = 0; c0 < s->Coutp; c0 += 16) {
                    int64_t left = s->Cout - c0;
                    const int8_t *r[2] = {src[0] + 2 * c0, src[1] + 2 * c0};
                    gtop = _mm512_max_epu16(gtop, interleave2(r, left >= 16 ? 16 : (int)left,
                                                              gp + ((oh * s->groups + q0) * s->Coutp + c0) * 4));
                }
            }
    }
    for (int j = 0; j < s->KW; ++j)
        for (int64_t h = 0; h < s->H; ++h)
            for (int64_t q0 = 0; q0 < s->groups; ++q0) {
                int8_t *dst = xp + ((j * s->H + h) * s->groups + q0) * s->C * 4;
                int64_t w0 = Q * q0 + (int64_t)j * s->DW - s->PW; /* the group's first column, at stride 1 */
                if (x_run && w0 >= 0 && w0 + Q - 1 < s->W && Q * q0 + Q - 1 < s->OW) {
                    __m512i v = _mm512_loadu_si512(xn + h * s->xsH + w0 * s->xsW);
                    if (Q == 4) {
                        _mm512_storeu_si512(dst, _mm512_xor_si512(_mm512_permutexvar_epi8(perm, v), flip));
                    } else {
                        v = _mm512_permutexvar_epi16(pair, v);
                        _mm512_storeu_si512(dst, v);
                        xtop = _mm512_max_epu16(xtop, _mm512_abs_epi16(v));
                    }
                    continue;
                }
                const int8_t *src[4];
                for (int q = 0; q < Q; ++q) {
                    int64_t w = s->SW * (Q * q0 + q) + (int64_t)j * s->DW - s->PW;
                    src[q] = w >= 0 && w < s->W && Q * q0 + q < s->OW ? xn + h * s->xsH + w * s->xsW : zero;
                }
                for (int64_t c0 = 0; c0 < s->C; c0 += 16) {
                    if (Q == 4) {
                        const int8_t *r[4] = {src[0] + c0, src[1] + c0, src[2] + c0, src[3] + c0};
                        interleave4(r, 16, 0x80, dst + c0 * 4);
                    } else {
                        const int8_t *r[2] = {src[0] + 2 * c0, src[1] + 2 * c0};
                        xtop = _mm512_max_epu16(xtop, interleave2(r, 16, dst + c0 * 4));
                    }
                }
            }
    if (s->wide) {
        int64_t gt = max_u16(gtop), xt = max_u16(xtop);
        tops[0] = gt > tops[0] ? gt : tops[0];
        tops[1] = xt > tops[1] ? xt : tops[1];
    }
}

/* out[co][(i * KW + j) * C + c] (int64, Cout rows): the exact weight gradient of int8 (wide
 * 0) or int16 (wide 1) operands. g and x are channels-last (channel stride 1), addressed
 * through their other strides in bytes. int16 runs take as many rows as the chunk's largest
 * |g| and |x| allow (2 |g| |x| per dword step); a chunk where one row could overflow int32
 * fails the call. */
int vnni_conv_grad_weight(const int8_t *g, int wide, int64_t N, int64_t Cout, int64_t OH, int64_t OW, int64_t gsN,
                          int64_t gsH, int64_t gsW, const int8_t *x, int64_t C, int64_t H, int64_t W, int64_t xsN,
                          int64_t xsH, int64_t xsW, int KH, int KW, int SH, int SW, int PH, int PW, int DH, int DW,
                          int64_t *out, int nthreads) {
    int Q = wide ? 2 : 4;
    if (C % 16 || OW > Q * (int64_t)RUN_GROUPS)
        return 0;
    int64_t groups = (OW + Q - 1) / Q, Coutp = (Cout + 15) / 16 * 16, taps = (int64_t)KH * KW, ldo = taps * C;
    gw_shape sh = {Cout, Coutp, OH, OW, groups, gsH, gsW, C, H, W, xsH, xsW, KW, SW, PW, DW, wide, Q};
    int64_t run8 = RUN_GROUPS / groups; /* int8: packed rows per int32 run */
    int nt = N < nthreads ? (int)N : nthreads;
    int64_t part = Coutp * ldo;
    int64_t *sums = calloc((size_t)(nt * part + nt * Coutp), sizeof(int64_t));
    int8_t *fill = malloc((size_t)(groups * C * 4)); /* a packed row of the zero padding */
    int8_t *zero = calloc((size_t)2 * (C > Cout ? C : Cout) + 64, 1);
    if (!sums || !fill || !zero) {
        free(sums), free(fill), free(zero);
        return 0;
    }
    memset(fill, wide ? 0 : 0x80, (size_t)(groups * C * 4)); /* x = 0: u = 128 (int8), 0 (int16) */
    /* images packed together: as many as fit CHUNK_BYTES */
    int64_t gbytes = OH * groups * Coutp * 4, xbytes = KW * H * groups * C * 4;
    int64_t per_chunk = CHUNK_BYTES / (gbytes + xbytes);
    per_chunk = per_chunk < 1 ? 1 : per_chunk;
    int failed = 0;
#pragma omp parallel num_threads(nt)
    {
        int t = omp_get_thread_num(), T = omp_get_num_threads();
        int64_t *mine = sums + t * part, *gsum = sums + nt * part + t * Coutp;
        int8_t *gp = malloc((size_t)(per_chunk * gbytes)), *xp = malloc((size_t)(per_chunk * xbytes));
        const int8_t **rows = malloc((size_t)(per_chunk * OH) * sizeof(int8_t *));
        int32_t *gs = malloc((size_t)Coutp * sizeof(int32_t));
        if (!gp || !xp || !rows || !gs) {
#pragma omp atomic write
            failed = 1;
        } else {
            for (int64_t n0 = N * t / T, n_end = N * (t + 1) / T; n0 < n_end; n0 += per_chunk) {
                int64_t n1 = n0 + per_chunk < n_end ? n0 + per_chunk : n_end, tops[2] = {0, 0};
                for (int64_t n = n0; n < n1; ++n)
                    pack_image(&sh, g + n * gsN, x + n * xsN, zero, gp + (n - n0) * gbytes, xp + (n - n0) * xbytes, gs,
                               gsum, tops);
                int64_t run = run8;
                if (wide) {
                    int64_t most = 2 * tops[0] * tops[1]; /* one dword step's largest sum */
                    run = most > 0 ? INT32_MAX / most / groups : INT64_MAX;
                    if (run < 1) {
#pragma omp atomic write
                        failed = 1;
                        break;
                    }
                }
                int64_t R = (n1 - n0) * OH; /* packed gradient rows, image after image */
                for (int i = 0; i < KH; ++i)
                    for (int j = 0; j < KW; ++j) {
                        for (int64_t r = 0; r < R; ++r) {
                            int64_t h = (r % OH) * SH + (int64_t)i * DH - PH;
                            rows[r] = h >= 0 && h < H ? xp + (r / OH) * xbytes + ((j * H + h) * groups) * C * 4 : fill;
                        }
                        int64_t *tap = mine + (i * KW + j) * C;
                        for (int64_t r0 = 0; r0 < R; r0 += run) {
                            int64_t r1 = r0 + run < R ? r0 + run : R;
                            for (int64_t co0 = 0; co0 < Coutp; co0 += 16)
                                for (int64_t c0 = 0; c0 < C; c0 += 16) {
                                    if (wide)
                                        block(gp, rows, r0, r1, groups, Coutp, C, co0, c0, tap, ldo, 1);
                                    else
                                        block(gp, rows, r0, r1, groups, Coutp, C, co0, c0, tap, ldo, 0);
                                }
                        }
                    }
            }
        }
        free(gp), free(xp), free(rows), free(gs);
    }
    if (!failed)
        for (int64_t co = 0; co < Cout; ++co) {
            int64_t total = 0; /* int8: the offset's share, 128 * sum of g[., co] */
            for (int t = 0; t < nt && !wide; ++t) total += sums[nt * part + t * Coutp + co];
            for (int64_t k = 0; k < ldo; ++k) {
                int64_t v = -128 * total;
                for (int t = 0; t < nt; ++t) v += sums[t * part + co * ldo + k];
                out[co * ldo + k] = v;
            }
        }
    free(sums), free(fill), free(zero);
    return !failed;
}

/* ------------------------------------------------------------------------------- forward
 * y[p, co] = sum over taps and c of x[p + tap, c] * w[co, tap, c], exact in int32. Lanes are
 * 16 output positions and a lane's 4 bytes 4 consecutive input channels: the input is the
 * unsigned operand, u = x + 128, packed per image as xq[c / 4][h][phase][k] (dword planes of
 * the padded image, column k * SW + phase, u = 128 in the padding), so that 16 positions of
 * an output row are 16 consecutive dwords for every tap; the weight, w[co, tap, 4 channels]
 * as one dword, is the signed operand, broadcast. sum u * w = y + 128 * sum w[co]: one
 * constant per output channel. A lane adds at most 255 * 128 per product, so reductions up
 * to MAX_K = 65,792 products stay exact in int32 (checked by the caller). The 16 x 16 block of
 * sums (output channels x positions) is transposed before it is stored channels-last. Maps
 * narrower than 9 columns put 2 or 4 output rows in one vector. */

/* 16 consecutive dwords, or RPV runs of 16 / RPV dwords `step` dwords apart. */
static inline __attribute__((always_inline)) __m512i positions(const int32_t *p, int64_t step, const int RPV) {
    if (RPV == 1)
        return _mm512_loadu_si512(p);
    if (RPV == 2)
        return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)p)),
                                  _mm256_loadu_si256((const __m256i *)(p + step)), 1);
    __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)p));
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + step)), 1);
    v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + 2 * step)), 2);
    return _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(p + 3 * step)), 3);
}

/* r[i][j] -> r[j][i] for a 16 x 16 block of floats. */
static inline void transpose16(__m512 *r) {
    __m512 t[16];
    for (int k = 0; k < 16; k += 2) {
        t[k] = _mm512_unpacklo_ps(r[k], r[k + 1]);
        t[k + 1] = _mm512_unpackhi_ps(r[k], r[k + 1]);
    }
    for (int k = 0; k < 16; k += 4) { /* r[k + m]: columns m, m + 4, m + 8, m + 12 of rows k .. k + 3 */
        __m512d a = _mm512_castps_pd(t[k]), b = _mm512_castps_pd(t[k + 1]);
        __m512d c = _mm512_castps_pd(t[k + 2]), d = _mm512_castps_pd(t[k + 3]);
        r[k] = _mm512_castpd_ps(_mm512_unpacklo_pd(a, c));
        r[k + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(a, c));
        r[k + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(b, d));
        r[k + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(b, d));
    }
    for (int m = 0; m < 4; ++m) {
        __m512 lo01 = _mm512_shuffle_f32x4(r[m], r[4 + m], 0x44), lo23 = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0x44);
        __m512 hi01 = _mm512_shuffle_f32x4(r[m], r[4 + m], 0xee), hi23 = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0xee);
        t[m] = _mm512_shuffle_f32x4(lo01, lo23, 0x88);
        t[m + 4] = _mm512_shuffle_f32x4(lo01, lo23, 0xdd);
        t[m + 8] = _mm512_shuffle_f32x4(hi01, hi23, 0x88);
        t[m + 12] = _mm512_shuffle_f32x4(hi01, hi23, 0xdd);
    }
    for (int k = 0; k < 16; ++k) r[k] = t[k];
}

/* The geometry of one call. */
typedef struct {
    int64_t C4, Cout, OH, OW, HQ, KQ, plane; /* C4: channel dwords; KQ dwords per phase row, plane per C4 */
    int64_t run;                             /* int16: dword steps per int32 run */
    int64_t OY, OX, ysH, ysW;                /* the grid's origin; output strides (channels: 1) */
    const int64_t *tap;                      /* per tap (i, j): its dword offset in a plane */
    int KH, KW, SH, SW, DH, DW;
} fwd_shape;

/* acc[co] stored (have == 0) or added into the int64 sums part[co][16], and cleared. */
static inline __attribute__((always_inline)) void flush(__m512i *acc, int64_t *part, int have) {
    for (int co = 0; co < 16; ++co) {
        widen_into(acc[co], part + co * 16, have);
        acc[co] = _mm512_setzero_si512();
    }
}

/* Output channels [co0, co0 + 16) at the 16 positions rows oh .. oh + RPV - 1, columns
 * ow .. ow + 16 / RPV - 1 of the grid (those inside it stored). WIDE: int16 operands
 * (vpdpwssd: 2 signed products per lane, no offset), int32 runs of at most g->run steps,
 * closed between runs of channel dwords and summed in int64; else int8 (vpdpbusd, the offset
 * taken off through corr). */
static inline __attribute__((always_inline)) void fwd_block(const fwd_shape *g, const int32_t *xq, const int32_t *wq,
                                                             const int32_t *corr, float scale, const float *bias,
                                                             float *yn, int64_t oh, int64_t ow, int64_t co0,
                                                             __m512i *top, const int RPV, const int WIDE) {
    __m512i acc[16];
    int64_t part[256], steps = 0; /* WIDE: the int64 sums of closed runs */
    int have = 0;
    for (int k = 0; k < 16; ++k) acc[k] = _mm512_setzero_si512();
    int64_t step = g->SH * g->SW * g->KQ; /* one output row down */
    int64_t chunk = WIDE && g->run < g->C4 ? g->run : g->C4;
    const int32_t *origin = xq + (g->OY + oh) * g->SH * g->SW * g->KQ + g->OX + ow;
    for (int i = 0; i < g->KH; ++i)
        for (int j = 0; j < g->KW; ++j) {
            const int32_t *xp = origin + g->tap[i * g->KW + j];
            const int32_t *wt = wq + (int64_t)(i * g->KW + j) * g->C4 * g->Cout + co0;
            for (int64_t c0 = 0; c0 < g->C4; c0 += chunk) {
                int64_t c1 = c0 + chunk < g->C4 ? c0 + chunk : g->C4;
                if (WIDE && steps + (c1 - c0) > g->run) {
                    flush(acc, part, have);
                    have = 1, steps = 0;
                }
                steps += c1 - c0;
                for (int64_t c4 = c0; c4 < c1; ++c4, xp += g->plane, wt += g->Cout) {
                    __m512i u = positions(xp, step, RPV);
                    for (int co = 0; co < 16; ++co)
                        acc[co] = WIDE ? _mm512_dpwssd_epi32(acc[co], u, _mm512_set1_epi32(wt[co]))
                                       : _mm512_dpbusd_epi32(acc[co], u, _mm512_set1_epi32(wt[co]));
                }
            }
        }
    __m512 r[16];
    if (WIDE && have)
        flush(acc, part, 1);
    for (int co = 0; co < 16; ++co) {
        __m512 v = WIDE && have ? _mm512_insertf32x8(_mm512_castps256_ps512(_mm512_cvtepi64_ps(_mm512_loadu_si512(part + co * 16))),
                                                     _mm512_cvtepi64_ps(_mm512_loadu_si512(part + co * 16 + 8)), 1)
                  : WIDE ? _mm512_cvtepi32_ps(acc[co])
                         : _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[co], _mm512_set1_epi32(corr[co0 + co])));
        r[co] = _mm512_mul_ps(v, _mm512_set1_ps(scale));
        if (bias)
            r[co] = _mm512_add_ps(r[co], _mm512_set1_ps(bias[co0 + co]));
    }
    transpose16(r); /* r[lane]: the 16 channels of one position */
    const int L = 16 / RPV;
    for (int lane = 0; lane < 16; ++lane) {
        int64_t h = oh + lane / L, w = ow + lane % L;
        if (h < g->OH && w < g->OW) {
            _mm512_storeu_ps(yn + h * g->ysH + w * g->ysW + co0, r[lane]);
            *top = _mm512_max_epu32(*top, _mm512_and_si512(_mm512_castps_si512(r[lane]), _mm512_set1_epi32(0x7fffffff)));
        }
    }
}

/* fwd_block with RPV and WIDE as literals. */
static inline __attribute__((always_inline)) void fwd_variant(const fwd_shape *g, const int32_t *xq, const int32_t *wq,
                                                               const int32_t *corr, float scale, const float *bias,
                                                               float *yn, int64_t oh, int64_t ow, int64_t co0,
                                                               __m512i *top, int RPV, const int WIDE) {
    if (RPV == 1)
        fwd_block(g, xq, wq, corr, scale, bias, yn, oh, ow, co0, top, 1, WIDE);
    else if (RPV == 2)
        fwd_block(g, xq, wq, corr, scale, bias, yn, oh, ow, co0, top, 2, WIDE);
    else
        fwd_block(g, xq, wq, corr, scale, bias, yn, oh, ow, co0, top, 4, WIDE);
}

/* Index vectors for pack_tree, level by level: idx[level][half]. A level's registers hold
 * P pixels x K channel dwords each, channel fastest; a pair (pixels 0 .. P - 1 in a, P .. 2P - 1
 * in b) becomes two registers of 2P pixels x K / 2 channels: the lower channels (half 0) and
 * the upper ones (half 1). */
static void split_indices(int C4, __m512i idx[4][2]) {
    int level = 0;
    for (int K = C4; K > 1; K /= 2, ++level) {
        int P = 16 / K;
        for (int half = 0; half < 2; ++half) {
            int32_t lane[16];
            for (int t = 0; t < 16; ++t) {
                int p = t / (K / 2), c = t % (K / 2) + half * K / 2;
                lane[t] = p < P ? p * K + c : 16 + (p - P) * K + c;
            }
            idx[level][half] = _mm512_loadu_si512(lane);
        }
    }
}

/* 16 pixels x C4 channel dwords (C4 = 2, 4 or 8, a literal) from src, contiguous (pixel-major),
 * stored as the C4 plane rows dst + c * plane (XOR fill): log2(C4) levels of C4 two-source
 * permutes (8 for C4 = 4, where a 16 x 16 transpose takes 64 shuffles). Raises *top by the
 * int16 magnitudes (flip == 0). */
static inline __attribute__((always_inline)) void pack_tree(const int8_t *src, int32_t *dst, int64_t plane,
                                                             __m512i fill, int32_t flip, __m512i *top,
                                                             __m512i idx[4][2], const int C4) {
    __m512i v[8], t[8];
#pragma GCC unroll 8
    for (int k = 0; k < C4; ++k) v[k] = _mm512_loadu_si512(src + 64 * k);
    int level = 0;
#pragma GCC unroll 3
    for (int groups = C4; groups > 1; groups /= 2, ++level) { /* groups: pixel groups per channel set */
        int n = 0;
#pragma GCC unroll 4
        for (int h = 0; h < C4 / groups; ++h) /* v[h * groups + g]: pixel group g, channel set h */
#pragma GCC unroll 2
            for (int half = 0; half < 2; ++half)
#pragma GCC unroll 4
                for (int g = 0; g < groups; g += 2)
                    t[n++] = _mm512_permutex2var_epi32(v[h * groups + g], idx[level][half], v[h * groups + g + 1]);
        /* t is ordered (set h, half, group pair): the new channel set 2h + half, groups / 2 of them */
#pragma GCC unroll 8
        for (int k = 0; k < C4; ++k) v[k] = t[k];
    }
#pragma GCC unroll 8
    for (int c = 0; c < C4; ++c) {
        _mm512_storeu_si512(dst + c * plane, _mm512_xor_si512(v[c], fill));
        if (!flip)
            *top = _mm512_max_epu16(*top, _mm512_abs_epi16(v[c]));
    }
}

/* One image as xq (see above): `flip` everywhere (the padding's x = 0: 128 in each byte for
 * int8, 0 for int16), then the image's dwords XOR flip. A pixel's channel dwords are
 * contiguous (channels-last), so 16 columns of one phase x 16 channel dwords are loaded as 16
 * rows and transposed in registers into 16 plane rows: on Zen 5, 16-lane gathers had taken a
 * seventh of a 16-channel forward. xsH, xsW in bytes, xsW a multiple of 4. Returns the largest
 * |x| of the packed int16 values (0 for int8). */
static int64_t pack_input(const int8_t *xn, int64_t H, int64_t W, int64_t xsH, int64_t xsW, int PH, int PW,
                          const fwd_shape *g, int32_t flip, int32_t *xq) {
    __m512i top = _mm512_setzero_si512(); /* |x| as unsigned 16-bit lanes: |-32768| is 0x8000 */
    const __m512i fill = _mm512_set1_epi32(flip);
    int64_t total = g->C4 * g->plane, k = 0;
    for (; k + 16 <= total; k += 16) _mm512_storeu_si512(xq + k, fill);
    for (; k < total; ++k) xq[k] = flip;
    const int SW = g->SW;
    /* stride 1 over densely packed pixels of 2, 4 or 8 channel dwords: the permute tree */
    const int tree = SW == 1 && xsW == 4 * g->C4 && (g->C4 == 2 || g->C4 == 4 || g->C4 == 8);
    __m512i idx[4][2];
    if (tree)
        split_indices((int)g->C4, idx);
    for (int64_t h = 0; h < H && h + PH < g->HQ; ++h)
        for (int ph = 0; ph < SW; ++ph) {
            int64_t w0 = ((ph - PW) % SW + SW) % SW; /* first column with (w + PW) % SW == ph */
            for (int64_t w = w0; w < W; w += 16 * SW) {
                int64_t kq = SW == 1 ? w + PW : (w + PW) / SW, lanes = SW == 1 ? W - w : (W - w + SW - 1) / SW;
                lanes = lanes < 16 ? lanes : 16;
                lanes = lanes < g->KQ - kq ? lanes : g->KQ - kq;
                if (lanes <= 0)
                    break;
                __mmask16 m = first_lanes(lanes);
                const int8_t *src = xn + h * xsH + w * xsW;
                int32_t *dst = xq + ((h + PH) * SW + ph) * g->KQ + kq;
                if (tree && lanes == 16) { /* 16 contiguous pixels; literal sizes keep it in registers */
                    if (g->C4 == 2)
                        pack_tree(src, dst, g->plane, fill, flip, &top, idx, 2);
                    else if (g->C4 == 4)
                        pack_tree(src, dst, g->plane, fill, flip, &top, idx, 4);
                    else
                        pack_tree(src, dst, g->plane, fill, flip, &top, idx, 8);
                    continue;
                }
                for (int64_t c0 = 0; c0 < g->C4; c0 += 16) {
                    int64_t nc = g->C4 - c0 < 16 ? g->C4 - c0 : 16;
                    __mmask16 cm = first_lanes(nc);
                    __m512 r[16];
                    for (int l = 0; l < 16; ++l)
                        r[l] = l < lanes ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi32(
                                               cm, src + (int64_t)l * SW * xsW + 4 * c0))
                                         : _mm512_setzero_ps();
                    transpose16(r); /* r[c]: channel dword c0 + c of the 16 columns */
                    for (int64_t c = 0; c < nc; ++c) {
                        __m512i v = _mm512_castps_si512(r[c]);
                        _mm512_mask_storeu_epi32(dst + (c0 + c) * g->plane, m, _mm512_xor_si512(v, fill));
                        if (!flip)
                            top = _mm512_max_epu16(top, _mm512_abs_epi16(v));
                    }
                }
            }
        }
    return flip ? 0 : max_u16(top);
}

/* y = conv2d(x, w) * scale (+ bias) over the OH x OW output positions from (OY, OX) on,
 * float32 at y[n * ysN + oh * ysH + ow * ysW + co]: x channels-last through its strides in
 * bytes, int8 (wide 0, C % 4 == 0) or int16 (wide 1, C % 2 == 0), Cout % 16 == 0; wq[tap][c
 * dword][co] (the weight's 4 int8 or 2 int16 channels as a dword) packed by the caller, with
 * corr[co] = 128 * sum of w[co] for int8, and for int16 w_top = max |w|. An int16 image's
 * int32 runs take as many dword steps as its largest |x| allows (each adds at most
 * 2 |x| |w|); an image where one step could overflow (|x| = |w| = 32768) fails the call.
 * *absmax: the largest float32 bits & 0x7fffffff stored (quantise_cpu.c's absmax_bits), so
 * that the quantiser reading y skips its scan. */
int vnni_conv_forward(const int8_t *x, int wide, int64_t w_top, int64_t N, int64_t C, int64_t H, int64_t W, int64_t xsN,
                      int64_t xsH, int64_t xsW, const int32_t *wq, const int32_t *corr, int64_t Cout, int KH, int KW,
                      int SH, int SW, int PH, int PW, int DH, int DW, int64_t OY, int64_t OX, int64_t OH, int64_t OW,
                      float scale, const float *bias, float *y, int64_t ysN, int64_t ysH, int64_t ysW, uint32_t *absmax,
                      int nthreads) {
    if (C % (wide ? 2 : 4) || Cout % 16)
        return 0;
    uint32_t best = 0;
    const int RPV = OW > 8 ? 1 : OW > 4 ? 2 : 4, L = 16 / RPV;
    int64_t OWP = (OW + L - 1) / L * L, OHP = (OH + RPV - 1) / RPV * RPV;
    int64_t *tap = malloc((size_t)KH * KW * sizeof(int64_t));
    if (!tap)
        return 0;
    fwd_shape g = {C / (wide ? 2 : 4), Cout, OH, OW, 0, 0, 0, 0, OY, OX, ysH, ysW, tap, KH, KW, SH, SW, DH, DW};
    g.HQ = (OY + OHP - 1) * SH + (int64_t)(KH - 1) * DH + 1; /* padded rows read */
    g.KQ = OX + OWP + ((int64_t)(KW - 1) * DW) / SW + 1;      /* dwords per phase row */
    g.plane = g.HQ * SW * g.KQ;
    for (int i = 0; i < KH; ++i) /* row i * DH, phase and dword of column j * DW, hoisted out of the blocks */
        for (int j = 0; j < KW; ++j)
            tap[i * KW + j] = ((int64_t)i * DH * SW + (int64_t)j * DW % SW) * g.KQ + (int64_t)j * DW / SW;
    int nt = N < nthreads ? (int)N : nthreads, failed = 0;
#pragma omp parallel num_threads(nt) reduction(max : best)
    {
        int t = omp_get_thread_num(), T = omp_get_num_threads();
        int32_t *xq = malloc((size_t)(g.C4 * g.plane) * sizeof(int32_t));
        fwd_shape mine = g; /* this thread's run length, per image */
        __m512i top = _mm512_setzero_si512();
        if (!xq) {
#pragma omp atomic write
            failed = 1;
        } else {
            for (int64_t n = N * t / T; n < N * (t + 1) / T; ++n) {
                int64_t x_top = pack_input(x + n * xsN, H, W, xsH, xsW, PH, PW, &g, wide ? 0 : (int32_t)0x80808080u, xq);
                int64_t most = 2 * x_top * w_top; /* one dword step's largest sum */
                mine.run = most > 0 ? INT32_MAX / most : INT64_MAX;
                if (wide && mine.run < 1) {
#pragma omp atomic write
                    failed = 1;
                    break;
                }
                float *yn = y + n * ysN;
                for (int64_t oh = 0; oh < OHP; oh += RPV)
                    for (int64_t ow = 0; ow < OWP; ow += L)
                        for (int64_t co0 = 0; co0 < Cout; co0 += 16) {
                            if (wide)
                                fwd_variant(&mine, xq, wq, corr, scale, bias, yn, oh, ow, co0, &top, RPV, 1);
                            else
                                fwd_variant(&mine, xq, wq, corr, scale, bias, yn, oh, ow, co0, &top, RPV, 0);
                        }
            }
        }
        best = _mm512_reduce_max_epu32(top);
        free(xq);
    }
    free(tap);
    if (absmax)
        *absmax = best;
    return !failed;
}

#else
int vnni_available(void) { return 0; }
int vnni_conv_grad_weight(void) { return 0; }
int vnni_conv_forward(void) { return 0; }
#endif
