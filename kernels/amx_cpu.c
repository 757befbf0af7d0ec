/* Exact int8 products on Intel AMX tiles (TDPBSSD: int8 x int8, int32 accumulation), called
 * through ctypes. Built without AMX (or on another CPU), amx_available() returns 0 and the
 * kernels return -1. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__AMX_TILE__) && defined(__AMX_INT8__)
#include <immintrin.h>
#include <omp.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "amx_tiles.h"

int amx_available(void) { return request_tiles(); }

/* ---- convolution grad-weight: dW[o, (i, j, c)] = sum_m G[m, o] X[pixel(m) + tap(i, j), c] ----
 * An implicit GEMM over the output positions m: A tiles are G transposed (16 output channels x
 * 64 positions), B tiles are gathered straight from the channels-last input (no im2col buffer):
 * row r of a B tile holds, for 16 input channels, the 4 positions 4r..4r+3 interleaved. Positions
 * run in chunks of MB blocks of 64; each chunk is packed once and every (output block, tap and
 * channel block) pair of tiles accumulates over it in place in the int32 output (tiles loaded
 * from it and stored back). */
#define MB 16 /* _MB in amx_cpu.py */

typedef struct {
    const int8_t *x; int64_t xn, xh, xw, C, H, W;
    const int8_t *g; int64_t gn, gc, gh, gw, Cout, OH, OW, M;
    int KH, KW, SH, SW, PH, PW, DH, DW;
    int64_t no, nb, ncb; /* output-channel blocks, B tiles (taps x channel blocks), channel blocks */
    const int8_t *padv;  /* 64 bytes: what the input reads outside the image */
    uint64_t *row_taps, *col_taps; /* per output row / column: the taps whose input row / column is inside */
} gw_problem;

/* The chunk's positions, located once per chunk (no divisions in the packers): goff = offset of
 * G[m, 0] (-1 past M), xoff = offset of X at tap (0, 0) of the position's window (the pixel may
 * lie in the padding), taps = bit KW i + j set where tap (i, j) falls inside the image. */
typedef struct { int64_t goff[64 * MB], xoff[64 * MB]; uint64_t taps[64 * MB]; } gw_coords;

static void gw_locate(const gw_problem *p, int64_t m0, int64_t count, gw_coords *c) {
    int64_t n = m0 / (p->OH * p->OW), rem = m0 % (p->OH * p->OW), oh = rem / p->OW, ow = rem % p->OW;
    for (int64_t k = 0; k < count; k++) {
        if (m0 + k >= p->M) { c->goff[k] = -1; c->taps[k] = 0; c->xoff[k] = 0; continue; }
        int64_t ih0 = oh * p->SH - p->PH, iw0 = ow * p->SW - p->PW;
        c->goff[k] = n * p->gn + oh * p->gh + ow * p->gw;
        c->xoff[k] = n * p->xn + ih0 * p->xh + iw0 * p->xw;
        c->taps[k] = p->row_taps[oh] & p->col_taps[ow];
        if (++ow == p->OW) { ow = 0; if (++oh == p->OH) { oh = 0; n++; } }
    }
}

/* row_taps[oh]: bits KW i + j of the taps (i, any j) whose input row lies inside the image;
 * col_taps[ow] likewise for the columns: a position's taps inside the image are their AND. */
static void gw_tap_masks(gw_problem *p) {
    for (int64_t oh = 0; oh < p->OH; oh++) {
        uint64_t bits = 0;
        for (int i = 0; i < p->KH; i++) {
            int64_t ih = oh * p->SH - p->PH + (int64_t)i * p->DH;
            if (ih >= 0 && ih < p->H) bits |= ((p->KW == 64 ? 0 : 1ULL << p->KW) - 1) << (i * p->KW);
        }
        p->row_taps[oh] = bits;
    }
    for (int64_t ow = 0; ow < p->OW; ow++) {
        uint64_t bits = 0;
        for (int j = 0; j < p->KW; j++) {
            int64_t iw = ow * p->SW - p->PW + (int64_t)j * p->DW;
            if (iw >= 0 && iw < p->W)
                for (int i = 0; i < p->KH; i++) bits |= 1ULL << (i * p->KW + j);
        }
        p->col_taps[ow] = bits;
    }
}

/* A tile (ob, positions k0..k0+63 of the chunk): row o, byte c = G[k0 + c, 16 ob + o]. */
static void gw_pack_a(const gw_problem *p, const gw_coords *cd, int64_t ob, int64_t k0, int8_t *dst) {
    int full = 16 * ob + 16 <= p->Cout;
    if (full && p->gc == 1 && cd->goff[k0 + 63] >= 0) {  /* channels-last G: 16 x 16 transposes */
        const int8_t *src[16];
        for (int blk = 0; blk < 4; blk++) {
            for (int i = 0; i < 16; i++) src[i] = p->g + cd->goff[k0 + 16 * blk + i] + 16 * ob;
            transpose16(src, dst + 16 * blk);
        }
        return;
    }
    for (int c = 0; c < 64; c++) {
        int64_t off = cd->goff[k0 + c];
        if (off < 0) { for (int o = 0; o < 16; o++) dst[64 * o + c] = 0; continue; }
        const int8_t *src = p->g + off + 16 * ob * p->gc;
        if (full) { for (int o = 0; o < 16; o++) dst[64 * o + c] = src[o * p->gc]; continue; }
        for (int o = 0; o < 16; o++) dst[64 * o + c] = 16 * ob + o < p->Cout ? src[o * p->gc] : 0;
    }
}

/* B tile (tap and channel block bt, positions k0..k0+63 of the chunk), 4-byte interleaved. The
 * source offsets of the 64 positions are computed first in one vectorised loop (branch-free
 * bounds tests); each row then gathers 4 x 16 channels and interleaves them with one byte
 * permutation. */
static void gw_pack_b(const gw_problem *p, const gw_coords *cd, int64_t bt, int64_t k0, int8_t *dst) {
    int64_t tap = bt / p->ncb, cb = bt % p->ncb;
    int64_t shift = (tap / p->KW) * p->DH * p->xh + (tap % p->KW) * p->DW * p->xw + 16 * cb;
    int64_t offs[64];
    #pragma omp simd
    for (int k = 0; k < 64; k++)
        offs[k] = (cd->taps[k0 + k] >> tap) & 1 ? cd->xoff[k0 + k] + shift : -1;
    /* byte 4 c + t of a row <- byte 16 t + c of the four gathered 16-byte pieces */
    const __m512i order = _mm512_set_epi8(
        63, 47, 31, 15, 62, 46, 30, 14, 61, 45, 29, 13, 60, 44, 28, 12,
        59, 43, 27, 11, 58, 42, 26, 10, 57, 41, 25, 9, 56, 40, 24, 8,
        55, 39, 23, 7, 54, 38, 22, 6, 53, 37, 21, 5, 52, 36, 20, 4,
        51, 35, 19, 3, 50, 34, 18, 2, 49, 33, 17, 1, 48, 32, 16, 0);
    for (int r = 0; r < 16; r++) {
        const int64_t *o = offs + 4 * r;
        __m512i v = _mm512_castsi128_si512(_mm_loadu_si128((const __m128i *)(o[0] >= 0 ? p->x + o[0] : p->padv)));
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(o[1] >= 0 ? p->x + o[1] : p->padv)), 1);
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(o[2] >= 0 ? p->x + o[2] : p->padv)), 2);
        v = _mm512_inserti32x4(v, _mm_loadu_si128((const __m128i *)(o[3] >= 0 ? p->x + o[3] : p->padv)), 3);
        _mm512_storeu_si512(dst + 64 * r, _mm512_permutexvar_epi8(order, v));
    }
}

#define LOAD_ACC(T, ob, bt) _tile_loadd(T, out + (16 * (ob)) * ld + 16 * (bt), ld * 4)
#define STORE_ACC(T, ob, bt) _tile_stored(T, out + (16 * (ob)) * ld + 16 * (bt), ld * 4)

/* One group of accumulators over the nblk packed m-blocks: output blocks ob..ob+na-1 against B
 * tiles bt..bt+nb-1 (na * nb <= 4, na <= 2), accumulated in place in out (int32, row stride ld):
 * the tiles are loaded from it and stored back. */
static void gw_group(const int8_t *ap, const int8_t *bp, int64_t nblk, int64_t ob, int na,
                     int64_t bt, int nb, int32_t *out, int64_t ld) {
    if (na == 2) {
        LOAD_ACC(0, ob, bt); LOAD_ACC(2, ob + 1, bt);
        if (nb == 2) { LOAD_ACC(1, ob, bt + 1); LOAD_ACC(3, ob + 1, bt + 1); }
    } else {
        LOAD_ACC(0, ob, bt);
        if (nb > 1) LOAD_ACC(1, ob, bt + 1);
        if (nb > 2) LOAD_ACC(2, ob, bt + 2);
        if (nb > 3) LOAD_ACC(3, ob, bt + 3);
    }
    const int8_t *a0 = ap + ob * nblk * TILE, *a1 = a0 + nblk * TILE;
    const int8_t *b0 = bp + bt * nblk * TILE;
    for (int64_t k = 0; k < nblk; k++) {
        const int8_t *ak0 = a0 + k * TILE, *ak1 = a1 + k * TILE, *bk = b0 + k * TILE;
        const int64_t bs = nblk * TILE; /* from one B tile to the next */
        if (na == 2) {
            _tile_loadd(4, ak0, 64); _tile_loadd(5, ak1, 64);
            _tile_loadd(6, bk, 64);
            _tile_dpbssd(0, 4, 6); _tile_dpbssd(2, 5, 6);
            if (nb == 2) { _tile_loadd(7, bk + bs, 64); _tile_dpbssd(1, 4, 7); _tile_dpbssd(3, 5, 7); }
        } else {
            _tile_loadd(4, ak0, 64);
            _tile_loadd(5, bk, 64); _tile_dpbssd(0, 4, 5);
            if (nb > 1) { _tile_loadd(6, bk + bs, 64); _tile_dpbssd(1, 4, 6); }
            if (nb > 2) { _tile_loadd(7, bk + 2 * bs, 64); _tile_dpbssd(2, 4, 7); }
            if (nb > 3) { _tile_loadd(5, bk + 3 * bs, 64); _tile_dpbssd(3, 4, 5); }
        }
    }
    if (na == 2) {
        STORE_ACC(0, ob, bt); STORE_ACC(2, ob + 1, bt);
        if (nb == 2) { STORE_ACC(1, ob, bt + 1); STORE_ACC(3, ob + 1, bt + 1); }
    } else {
        STORE_ACC(0, ob, bt);
        if (nb > 1) STORE_ACC(1, ob, bt + 1);
        if (nb > 2) STORE_ACC(2, ob, bt + 2);
        if (nb > 3) STORE_ACC(3, ob, bt + 3);
    }
}

/* All groups of one packed chunk; groups [g0, g1) of the list only (for splitting among threads). */
static int64_t gw_groups(const gw_problem *p) {
    int64_t pairs = p->no / 2, single = p->no % 2;
    return pairs * ((p->nb + 1) / 2) + single * ((p->nb + 3) / 4);
}

static void gw_run_group(const gw_problem *p, int64_t gi, const int8_t *ap, const int8_t *bp,
                         int64_t nblk, int32_t *out, int64_t ld) {
    int64_t pairs = p->no / 2, per_pair = (p->nb + 1) / 2;
    if (gi < pairs * per_pair) {  /* output blocks vary fastest: a pair of B tiles serves them all */
        int64_t bt = 2 * (gi / pairs), ob = 2 * (gi % pairs);
        gw_group(ap, bp, nblk, ob, 2, bt, p->nb - bt >= 2 ? 2 : 1, out, ld);
    } else {
        int64_t bt = 4 * (gi - pairs * per_pair);
        gw_group(ap, bp, nblk, p->no - 1, 1, bt, p->nb - bt >= 4 ? 4 : (int)(p->nb - bt), out, ld);
    }
}

/* out: int32 [16 * ceil(Cout/16), KH * KW * C], zeroed here; the caller keeps the positions
 * N * OH * OW short enough for int32 sums (below 2**31 / max|value|**2). partials: NULL (threads share
 * each chunk and split its groups), or threads * that size (each thread takes whole chunks).
 * pack: (threads with partials, else 1) * (no + nb) * MB tiles. Returns -1 where C % 16 != 0. */
int amx_conv_grad_weight(const int8_t *x, int64_t N, int64_t C, int64_t H, int64_t W, int64_t xn,
                         int64_t xc, int64_t xh, int64_t xw, const int8_t *g, int64_t Cout,
                         int64_t OH, int64_t OW, int64_t gn, int64_t gc, int64_t gh, int64_t gw,
                         int KH, int KW, int SH, int SW, int PH, int PW, int DH, int DW,
                         int32_t *out, int32_t *partials, int8_t *pack, int pad, int threads) {
    if (C % 16 != 0 || xc != 1 || KH * KW > 64) return -1;
    int8_t padv[64];
    memset(padv, pad, sizeof padv);
    gw_problem p = {x, xn, xh, xw, C, H, W, g, gn, gc, gh, gw, Cout, OH, OW, N * OH * OW,
                    KH, KW, SH, SW, PH, PW, DH, DW, (Cout + 15) / 16, (int64_t)KH * KW * (C / 16), C / 16, padv,
                    malloc(OH * sizeof(uint64_t)), malloc(OW * sizeof(uint64_t))};
    int64_t ld = 16 * p.nb, size = 16 * p.no * ld, chunks = (p.M + 64 * MB - 1) / (64 * MB);
    int64_t groups = gw_groups(&p);
    gw_coords *shared_coords = malloc(sizeof(gw_coords));
    if (!shared_coords || !p.row_taps || !p.col_taps) {
        free(shared_coords); free(p.row_taps); free(p.col_taps);
        return -1;
    }
    gw_tap_masks(&p);
    #pragma omp parallel num_threads(threads)
    {
        int tid = omp_get_thread_num(), nt = omp_get_num_threads();
        gw_coords *coords = malloc(sizeof(gw_coords));
        configure();
        if (partials) {
            int32_t *acc = partials + tid * size;
            int8_t *ap = pack + (int64_t)tid * (p.no + p.nb) * MB * TILE, *bp = ap + p.no * MB * TILE;
            memset(acc, 0, size * sizeof(int32_t));
            for (int64_t ch = tid; ch < chunks; ch += nt) {
                int64_t m0 = ch * 64 * MB, nblk = (p.M - m0 + 63) / 64;
                nblk = nblk < MB ? nblk : MB;
                gw_locate(&p, m0, 64 * nblk, coords);
                for (int64_t ob = 0; ob < p.no; ob++)
                    for (int64_t k = 0; k < nblk; k++) gw_pack_a(&p, coords, ob, 64 * k, ap + (ob * nblk + k) * TILE);
                for (int64_t bt = 0; bt < p.nb; bt++)
                    for (int64_t k = 0; k < nblk; k++) gw_pack_b(&p, coords, bt, 64 * k, bp + (bt * nblk + k) * TILE);
                for (int64_t gi = 0; gi < groups; gi++) gw_run_group(&p, gi, ap, bp, nblk, acc, ld);
            }
            #pragma omp barrier
            #pragma omp for schedule(static)
            for (int64_t i = 0; i < size; i++) {
                int32_t s = 0;
                for (int t = 0; t < nt; t++) s += partials[t * size + i];
                out[i] = s;
            }
        } else {
            int8_t *ap = pack, *bp = pack + p.no * MB * TILE;
            #pragma omp for schedule(static)
            for (int64_t i = 0; i < size; i++) out[i] = 0;
            for (int64_t ch = 0; ch < chunks; ch++) {
                int64_t m0 = ch * 64 * MB, nblk = (p.M - m0 + 63) / 64;
                nblk = nblk < MB ? nblk : MB;
                #pragma omp single
                gw_locate(&p, m0, 64 * nblk, shared_coords);
                #pragma omp for schedule(static)
                for (int64_t it = 0; it < (p.no + p.nb) * nblk; it++) {
                    int64_t t = it / nblk, k = it % nblk;
                    if (t < p.no) gw_pack_a(&p, shared_coords, t, 64 * k, ap + (t * nblk + k) * TILE);
                    else gw_pack_b(&p, shared_coords, t - p.no, 64 * k, bp + ((t - p.no) * nblk + k) * TILE);
                }
                #pragma omp for schedule(dynamic, 1)
                for (int64_t gi = 0; gi < groups; gi++) gw_run_group(&p, gi, ap, bp, nblk, out, ld);
            }
        }
        _tile_release();
        free(coords);
    }
    free(shared_coords);
    free(p.row_taps);
    free(p.col_taps);
    return 0;
}

/* ---- convolution forward: out[m, o] = sum over taps and channels of X[pixel(m) + tap, c] W[o, c, tap] ----
 * Direct: the input is copied once into a zero-bordered channels-last buffer, after which every
 * tap of R consecutive output positions of one image row is R input pixels at a fixed distance
 * (stride * C bytes), so A tiles load straight from it (R rows of P channels) and no im2col
 * matrix is ever written. The reduction runs tap by tap and over channel pieces of P bytes
 * (64, or C when C < 64). Where C is not a multiple of 64 and the kernel is undilated along the
 * width, one kernel row's taps instead form a single run of KW * C bytes (the taps of a position
 * lie side by side in the copy), cut into 64-byte pieces: a 3x3 kernel on 16 channels takes 3
 * tile products per output tile instead of 9. The weight rows past the run are zero, so the
 * bytes a piece reads beyond it do not count. B tiles: the weight per (step, 16 outputs),
 * 4-byte interleaved, packed once per call. Each task takes two segments of R positions against two blocks of 16
 * outputs (four accumulators); results go row-major to int32 [M, Cout], i.e. channels-last. */
typedef struct {
    const int8_t *xp; int64_t pn, ph, pw;   /* padded input and its strides (bytes) */
    int64_t C, Cout, OH, OW, M, P, npc, no, segs, R;
    int KH, KW, SH, SW, DH, DW;
    int rows;        /* kernel rows as runs of KW * C bytes (npc pieces per row), else taps */
    int64_t steps;   /* reduction steps: KH * npc by rows, KH * KW * npc by taps */
    int64_t on, ohs, ows, OH0, OW0;  /* output strides (elements) and the first output's place */
} fw_problem;

/* Whether kernel rows run as byte runs (see above): fewer steps where C % 64 != 0, except for
 * one-tap rows of fewer than 64 channels, which take one step either way. */
static int fw_by_rows(int64_t C, int KW, int DW) { return DW == 1 && C % 64 != 0 && (KW > 1 || C > 64); }

/* The problem of a forward over the bordered input xp: P-byte channel pieces (64, or C when
 * C < 64, else 16), segments of R = min(OW, 16) positions. place: NULL for a contiguous
 * [N, OH, OW, Cout] output whose first position is the convolution's first, else
 * {on, ohs, ows, OH0, OW0}: the output's strides in elements (channel stride 1) and where in the
 * convolution's output grid it starts, so that a strided grad-input's phases land in place. */
static fw_problem fw_init(const int8_t *xp, int64_t N, int64_t C, int64_t H, int64_t W, int64_t Cout,
                          int64_t OH, int64_t OW, int KH, int KW, int SH, int SW, int PH, int PW, int DH, int DW,
                          const int64_t *place) {
    int rows = fw_by_rows(C, KW, DW);
    int64_t P = rows || C % 64 == 0 ? 64 : (C < 64 ? C : 16), R = OW < 16 ? OW : 16, Wp = W + 2 * PW;
    int64_t npc = rows ? (KW * C + 63) / 64 : C / P;
    fw_problem p = {xp, (H + 2 * PH) * Wp * C, Wp * C, C, C, Cout, OH, OW, N * OH * OW, P, npc,
                    (Cout + 15) / 16, (OW + R - 1) / R, R, KH, KW, SH, SW, DH, DW,
                    rows, (rows ? KH : KH * KW) * npc, OH * OW * Cout, OW * Cout, Cout, 0, 0};
    if (place) { p.on = place[0]; p.ohs = place[1]; p.ows = place[2]; p.OH0 = place[3]; p.OW0 = place[4]; }
    return p;
}

/* Byte offset of reduction step kp's A tile from a segment's first input position. */
static inline int64_t fw_offset(const fw_problem *p, int64_t kp) {
    int64_t part = kp / p->npc, piece = (kp % p->npc) * p->P;
    if (p->rows) return part * p->DH * p->ph + piece;
    return (part / p->KW) * p->DH * p->ph + (part % p->KW) * p->DW * p->pw + piece;
}

static void fw_configure(int rows, int piece) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 4; t++) { cfg.rows[t] = rows; cfg.colsb[t] = 64; }  /* accumulators */
    for (int t = 4; t < 6; t++) { cfg.rows[t] = rows; cfg.colsb[t] = piece; }  /* positions */
    for (int t = 6; t < 8; t++) { cfg.rows[t] = piece / 4; cfg.colsb[t] = 64; }  /* weights */
    _tile_loadconfig(&cfg);
}

/* B tile (step kp, ob): row r, byte 4 c + t = W[16 ob + c, k = q P + 4 r + t] of the step's tap
 * and piece q, or by rows of the kernel row's run (k = j C + channel for tap j; 0 past the run). */
static void fw_pack_w(const fw_problem *p, const int8_t *w, int64_t wo, int64_t wc, int64_t wh,
                      int64_t ww, int64_t kp, int64_t ob, int8_t *dst) {
    int64_t part = kp / p->npc, q = kp % p->npc;
    const int8_t *wt = p->rows ? w + part * wh : w + (part / p->KW) * wh + (part % p->KW) * ww;
    for (int r = 0; r < p->P / 4; r++)
        for (int c = 0; c < 16; c++)
            for (int t = 0; t < 4; t++) {
                int64_t o = 16 * ob + c, k = q * p->P + 4 * r + t, v = 0;
                if (o < p->Cout && !p->rows) v = wt[o * wo + k * wc];
                else if (o < p->Cout && k < p->KW * p->C) v = wt[o * wo + (k / p->C) * ww + (k % p->C) * wc];
                dst[64 * r + 4 * c + t] = (int8_t)v;
            }
}

/* Segment s: image n, output row oh, first position ow0 (R positions, fewer at a row's end);
 * *at: the output offset of its first position. */
static const int8_t *fw_segment(const fw_problem *p, int64_t s, int64_t *m0, int64_t *count, int64_t *at) {
    int64_t row = s / p->segs, ow0 = (s % p->segs) * p->R, n = row / p->OH, oh = row % p->OH;
    *m0 = row * p->OW + ow0;
    *count = p->OW - ow0 < p->R ? p->OW - ow0 : p->R;
    *at = n * p->on + oh * p->ohs + ow0 * p->ows;
    return p->xp + n * p->pn + (oh + p->OH0) * p->SH * p->ph + (ow0 + p->OW0) * p->SW * p->pw;
}

/* Stores accumulator tile t for `rows` positions (ld elements apart) from out + at and outputs
 * o..o+15, then, while it is in cache, folds its magnitudes into *amax and (scale != 0) rewrites
 * it as float32 acc * scale. */
static void fw_store(int t, int32_t *out, int64_t ld, int64_t at, int64_t rows, int64_t o, int64_t Cout, int R,
                     float scale, uint32_t *amax) {
    int32_t tmp[256];
    int32_t *dst = out + at + o;
    int full = rows == R && o + 16 <= Cout;
    switch (t) {  /* tile numbers must be immediates */
        case 0: if (full) _tile_stored(0, dst, ld * 4); else _tile_stored(0, tmp, 64); break;
        case 1: if (full) _tile_stored(1, dst, ld * 4); else _tile_stored(1, tmp, 64); break;
        case 2: if (full) _tile_stored(2, dst, ld * 4); else _tile_stored(2, tmp, 64); break;
        default: if (full) _tile_stored(3, dst, ld * 4); else _tile_stored(3, tmp, 64); break;
    }
    int64_t cols = Cout - o < 16 ? Cout - o : 16;
    if (!full)
        for (int64_t r = 0; r < rows; r++) memcpy(dst + r * ld, tmp + 16 * r, cols * 4);
    __mmask16 keep = (__mmask16)((1u << cols) - 1);
    __m512i top = _mm512_setzero_si512();
    __m512 s = _mm512_set1_ps(scale);
    for (int64_t r = 0; r < rows; r++) {
        int32_t *row = dst + r * ld;
        __m512i v = _mm512_maskz_loadu_epi32(keep, row);
        top = _mm512_max_epu32(top, _mm512_abs_epi32(v));  /* |INT32_MIN| reads as 2**31 unsigned */
        if (scale != 0.0f) _mm512_mask_storeu_ps((float *)row, keep, _mm512_mul_ps(_mm512_cvtepi32_ps(v), s));
    }
    uint32_t best = _mm512_reduce_max_epu32(top);
    if (best > *amax) *amax = best;
}

/* Copies x (channels-last strides xn, xh, xw; channel stride 1) into xp [N, H + 2 PH, W + 2 PW, C]
 * with a border of `pad` bytes. */
static void fw_pad(const int8_t *x, int64_t N, int64_t C, int64_t H, int64_t W, int64_t xn, int64_t xh,
                   int64_t xw, int PH, int PW, int8_t *xp, int pad, int threads) {
    int64_t Hp = H + 2 * PH, Wp = W + 2 * PW;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t row = 0; row < N * Hp; row++) {
        int64_t n = row / Hp, ih = row % Hp - PH;
        int8_t *d = xp + row * Wp * C;
        if (ih < 0 || ih >= H) { memset(d, pad, Wp * C); continue; }
        memset(d, pad, PW * C);
        memset(d + (PW + W) * C, pad, PW * C);
        const int8_t *src = x + n * xn + ih * xh;
        if (xw == C) memcpy(d + PW * C, src, W * C);
        else for (int64_t iw = 0; iw < W; iw++) memcpy(d + (PW + iw) * C, src + iw * xw, C);
    }
}

/* out: int32 [N * OH * OW, Cout] (or placed as fw_init's `place` says), float32 acc * scale where
 * scale != 0; *amax receives the largest |acc|. xp: N (H + 2 PH) (W + 2 PW) C bytes and
 * (16 SW + DW KW + OW0 SW) C + 64 more (a row's last segment loads whole tiles, the rows past its
 * end never stored, and a run's last piece reads up to 63 bytes past it); wpack: steps *
 * ceil(Cout / 16) tiles of 64 P / 4 bytes (fw_init's steps and P). Returns -1
 * where C % 16 != 0 or the input is not channels-last. */
int amx_conv_forward(const int8_t *x, int64_t N, int64_t C, int64_t H, int64_t W, int64_t xn,
                     int64_t xc, int64_t xh, int64_t xw, const int8_t *w, int64_t Cout, int64_t wo,
                     int64_t wc, int64_t wh, int64_t ww, int64_t OH, int64_t OW, int KH, int KW,
                     int SH, int SW, int PH, int PW, int DH, int DW, int32_t *out, const int64_t *place,
                     int8_t *xp, int8_t *wpack, float scale, uint32_t *amax, int pad, int threads) {
    if (C % 16 != 0 || xc != 1) return -1;
    uint32_t top = 0;
    fw_problem p = fw_init(xp, N, C, H, W, Cout, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW, place);
    int64_t P = p.P, R = p.R;
    int64_t wtile = 16 * P, nseg = N * OH * p.segs, kparts = p.steps;
    int64_t tasks = ((nseg + 1) / 2) * ((p.no + 1) / 2);
    fw_pad(x, N, C, H, W, xn, xh, xw, PH, PW, xp, pad, threads);
    #pragma omp parallel num_threads(threads) reduction(max : top)
    {
        #pragma omp for schedule(static)
        for (int64_t it = 0; it < kparts * p.no; it++) {
            fw_pack_w(&p, w, wo, wc, wh, ww, it % kparts, it / kparts, wpack + it * wtile);
        }
        fw_configure((int)R, (int)P);
        /* output pairs vary fastest: both segments' input rows stay in cache across them */
        #pragma omp for schedule(static)
        for (int64_t task = 0; task < tasks; task++) {
            int64_t sp = task / ((p.no + 1) / 2), ob = 2 * (task % ((p.no + 1) / 2));
            int64_t m0, m1, c0, c1 = 0, at0, at1 = 0;
            const int8_t *a0 = fw_segment(&p, 2 * sp, &m0, &c0, &at0), *a1 = a0;
            int two = 2 * sp + 1 < nseg, pair = ob + 1 < p.no;
            if (two) a1 = fw_segment(&p, 2 * sp + 1, &m1, &c1, &at1);
            const int8_t *b0 = wpack + ob * kparts * wtile, *b1 = b0 + kparts * wtile;
            _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
            for (int64_t kp = 0; kp < kparts; kp++) {
                int64_t off = fw_offset(&p, kp);
                _tile_loadd(4, a0 + off, SW * C);
                _tile_loadd(6, b0 + kp * wtile, 64);
                _tile_dpbssd(0, 4, 6);
                if (pair) { _tile_loadd(7, b1 + kp * wtile, 64); _tile_dpbssd(1, 4, 7); }
                if (two) {
                    _tile_loadd(5, a1 + off, SW * C);
                    _tile_dpbssd(2, 5, 6);
                    if (pair) _tile_dpbssd(3, 5, 7);
                }
            }
            fw_store(0, out, p.ows, at0, c0, 16 * ob, Cout, (int)R, scale, &top);
            if (pair) fw_store(1, out, p.ows, at0, c0, 16 * ob + 16, Cout, (int)R, scale, &top);
            if (two) {
                fw_store(2, out, p.ows, at1, c1, 16 * ob, Cout, (int)R, scale, &top);
                if (pair) fw_store(3, out, p.ows, at1, c1, 16 * ob + 16, Cout, (int)R, scale, &top);
            }
        }
        _tile_release();
    }
    *amax = top;
    return 0;
}

/* ---- 9-16 bit forward from split planes (gemm_cpu: conv_karatsuba_scaled, conv_digits_scaled) ----
 * The forward's tiling with three accumulators per (segment, 16 outputs), each input plane in its
 * own bordered buffer, and the exact combination done as the tiles are stored, so no int32 map is
 * written:
 *   kind 0, digits (m = 256 h + l + 128; planes h, l; the l plane padded with -128):
 *     v = 65536 HH + 256 (HL + LH) + LL + rc[m] + cc[o]; HL + LH share an accumulator, so the
 *     caller keeps 2 K 128**2 below 2**31;
 *   kind 1, Karatsuba (m = 128 h + l; planes h, l, s = h + l, all padded with 0):
 *     v = 16384 HH + 128 (SS - HH - LL) + LL.
 * out[m, o] = float(v) * scale (+ bias[o]). */
static void split_store(int kind, float *out, int64_t ld, int64_t m, int64_t rows, int64_t o, int64_t Cout,
                        const int64_t *rc, const int64_t *cc, float scale, const float *bias) {
    int32_t a0[256], a1[256], a2[256];
    _tile_stored(0, a0, 64);
    _tile_stored(1, a1, 64);
    _tile_stored(2, a2, 64);
    int64_t cols = Cout - o < 16 ? Cout - o : 16;
    for (int64_t r = 0; r < rows; r++) {
        float *dst = out + r * ld + o;
        int64_t row = rc ? rc[m + r] : 0;
        const int32_t *hh = a0 + 16 * r, *mid = a1 + 16 * r, *ll = a2 + 16 * r;
        if (kind == 0) {
            #pragma omp simd
            for (int64_t c = 0; c < cols; c++) {
                int64_t v = 65536 * (int64_t)hh[c] + 256 * (int64_t)mid[c] + ll[c] + row + cc[o + c];
                dst[c] = (float)v * scale + (bias ? bias[o + c] : 0.0f);
            }
        } else {
            #pragma omp simd
            for (int64_t c = 0; c < cols; c++) {
                int64_t v = 16384 * (int64_t)hh[c] + 128 * ((int64_t)mid[c] - hh[c] - ll[c]) + ll[c];
                dst[c] = (float)v * scale + (bias ? bias[o + c] : 0.0f);
            }
        }
    }
}

int amx_conv_forward_split(int kind, const int8_t *const *x, int64_t N, int64_t C, int64_t H, int64_t W,
                           int64_t xn, int64_t xc, int64_t xh, int64_t xw, const int8_t *const *w, int64_t Cout,
                           int64_t wo, int64_t wc, int64_t wh, int64_t ww, int64_t OH, int64_t OW, int KH, int KW,
                           int SH, int SW, int PH, int PW, int DH, int DW, const int64_t *rc, const int64_t *cc,
                           float scale, const float *bias, float *out, const int64_t *place, int8_t *const *xp,
                           int8_t *const *wpack, int threads) {
    if (C % 16 != 0 || xc != 1 || kind < 0 || kind > 1) return -1;
    int planes = kind == 0 ? 2 : 3;
    fw_problem p = fw_init(xp[0], N, C, H, W, Cout, OH, OW, KH, KW, SH, SW, PH, PW, DH, DW, place);
    int64_t P = p.P, R = p.R;
    int64_t wtile = 16 * P, nseg = N * OH * p.segs, kparts = p.steps, tasks = nseg * p.no;
    for (int i = 0; i < planes; i++)
        fw_pad(x[i], N, C, H, W, xn, xh, xw, PH, PW, xp[i], kind == 0 && i == 1 ? -128 : 0, threads);
    #pragma omp parallel num_threads(threads)
    {
        #pragma omp for schedule(static)
        for (int64_t it = 0; it < kparts * p.no; it++) {
            for (int i = 0; i < planes; i++)
                fw_pack_w(&p, w[i], wo, wc, wh, ww, it % kparts, it / kparts, wpack[i] + it * wtile);
        }
        fw_configure((int)R, (int)P);
        /* output blocks vary fastest: the segment's input rows stay in cache across them */
        #pragma omp for schedule(static)
        for (int64_t task = 0; task < tasks; task++) {
            int64_t s = task / p.no, ob = task % p.no, m0, count, at;
            const int8_t *a0 = fw_segment(&p, s, &m0, &count, &at);
            const int8_t *a1 = xp[1] + (a0 - xp[0]), *a2 = planes > 2 ? xp[2] + (a0 - xp[0]) : a0;
            int64_t wb = ob * kparts * wtile;
            _tile_zero(0); _tile_zero(1); _tile_zero(2);
            for (int64_t kp = 0; kp < kparts; kp++) {
                int64_t off = fw_offset(&p, kp), wk = wb + kp * wtile;
                if (kind == 0) {
                    _tile_loadd(4, a0 + off, SW * C);
                    _tile_loadd(5, a1 + off, SW * C);
                    _tile_loadd(6, wpack[0] + wk, 64);
                    _tile_loadd(7, wpack[1] + wk, 64);
                    _tile_dpbssd(0, 4, 6);
                    _tile_dpbssd(1, 4, 7);
                    _tile_dpbssd(1, 5, 6);
                    _tile_dpbssd(2, 5, 7);
                } else {
                    _tile_loadd(4, a0 + off, SW * C);
                    _tile_loadd(6, wpack[0] + wk, 64);
                    _tile_loadd(5, a1 + off, SW * C);
                    _tile_loadd(7, wpack[1] + wk, 64);
                    _tile_dpbssd(0, 4, 6);
                    _tile_dpbssd(2, 5, 7);
                    _tile_loadd(4, a2 + off, SW * C);
                    _tile_loadd(6, wpack[2] + wk, 64);
                    _tile_dpbssd(1, 4, 6);
                }
            }
            split_store(kind, out + at, p.ows, m0, count, 16 * ob, Cout, rc, cc, scale, bias);
        }
        _tile_release();
    }
    return 0;
}

#else
int amx_available(void) { return 0; }

int amx_conv_grad_weight(const int8_t *x, int64_t N, int64_t C, int64_t H, int64_t W, int64_t xn,
                         int64_t xc, int64_t xh, int64_t xw, const int8_t *g, int64_t Cout,
                         int64_t OH, int64_t OW, int64_t gn, int64_t gc, int64_t gh, int64_t gw,
                         int KH, int KW, int SH, int SW, int PH, int PW, int DH, int DW,
                         int32_t *out, int32_t *partials, int8_t *pack, int pad, int threads) {
    (void)pad; (void)x; (void)N; (void)C; (void)H; (void)W; (void)xn; (void)xc; (void)xh; (void)xw; (void)g;
    (void)Cout; (void)OH; (void)OW; (void)gn; (void)gc; (void)gh; (void)gw; (void)KH; (void)KW;
    (void)SH; (void)SW; (void)PH; (void)PW; (void)DH; (void)DW; (void)out; (void)partials;
    (void)pack; (void)threads;
    return -1;
}
int amx_conv_forward(const int8_t *x, int64_t N, int64_t C, int64_t H, int64_t W, int64_t xn,
                     int64_t xc, int64_t xh, int64_t xw, const int8_t *w, int64_t Cout, int64_t wo,
                     int64_t wc, int64_t wh, int64_t ww, int64_t OH, int64_t OW, int KH, int KW,
                     int SH, int SW, int PH, int PW, int DH, int DW, int32_t *out, const int64_t *place,
                     int8_t *xp, int8_t *wpack, float scale, uint32_t *amax, int pad, int threads) {
    (void)place; (void)pad; (void)x; (void)xp; (void)scale; (void)amax; (void)N; (void)C; (void)H; (void)W; (void)xn; (void)xc; (void)xh; (void)xw; (void)w;
    (void)Cout; (void)wo; (void)wc; (void)wh; (void)ww; (void)OH; (void)OW; (void)KH; (void)KW;
    (void)SH; (void)SW; (void)PH; (void)PW; (void)DH; (void)DW; (void)out; (void)wpack; (void)threads;
    return -1;
}
int amx_conv_forward_split(int kind, const int8_t *const *x, int64_t N, int64_t C, int64_t H, int64_t W,
                           int64_t xn, int64_t xc, int64_t xh, int64_t xw, const int8_t *const *w, int64_t Cout,
                           int64_t wo, int64_t wc, int64_t wh, int64_t ww, int64_t OH, int64_t OW, int KH, int KW,
                           int SH, int SW, int PH, int PW, int DH, int DW, const int64_t *rc, const int64_t *cc,
                           float scale, const float *bias, float *out, const int64_t *place, int8_t *const *xp,
                           int8_t *const *wpack, int threads) {
    (void)place; (void)kind; (void)x; (void)N; (void)C; (void)H; (void)W; (void)xn; (void)xc; (void)xh; (void)xw; (void)w;
    (void)Cout; (void)wo; (void)wc; (void)wh; (void)ww; (void)OH; (void)OW; (void)KH; (void)KW; (void)SH;
    (void)SW; (void)PH; (void)PW; (void)DH; (void)DW; (void)rc; (void)cc; (void)scale; (void)bias; (void)out;
    (void)xp; (void)wpack; (void)threads;
    return -1;
}
#endif
