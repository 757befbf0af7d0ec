/* Exact int8 GEMM for x86 CPUs with AVX2 but no int8 dot-product instructions (no VNNI, no
 * AMX), called through ctypes: C[M, N] (int32, row stride ldc) = A[M, K] @ B[K, N], int8
 * operands addressed through element strides.
 *
 * The operands are widened to int16 and multiplied with vpmaddwd, which sums each pair of
 * int16 products into an int32 lane: two reduction steps per instruction, exact (a pair of
 * int8 products is at most 2 * 128 * 128 = 32768). On AMD Zen 3 this pair (vpmaddwd, vpaddd)
 * issued 4.26e9 times a second on one core against 5.70e9 FP32 FMAs, so the int8 products
 * peak at about 1.5x the MACs of FP32. The saturating byte instruction (vpmaddubsw) is not an
 * option: two products of 255 and -128 already leave its int16 lane.
 *
 * Layout (as in BLIS): B is packed per block of KC reduction steps and NC columns into panels
 * of 16 columns, each reduction pair stored as 16 interleaved int16 pairs; A is widened per
 * block of 6 rows into a thread's buffer, a row's pairs read as int32 broadcasts. A 6 x 16
 * block of C lives in 12 ymm accumulators across the whole block of KC steps. Callers keep
 * K * 128 * 128 below 2**31 (int32 sums cannot overflow); gemm_avx2.py cuts longer reductions.
 */
#include <stdint.h>
#include <string.h>

#define MR 6
#define NR 16
#define KC 512 /* reduction steps per block: a thread's A block is 6 x 256 int32 pairs (6 KiB) */
#define NC 192 /* columns per B block: 12 panels of 16 KiB, in L2 with room to spare */

#if defined(__AVX2__) && defined(__x86_64__)
#include <immintrin.h>

int gemm_avx2_available(void) { return 1; }

/* tmp[6][16] = sum over kp pairs of A rows x B panel. A's pairs are int32 (two int16), row r
 * of pair p at byte offset r * ld + p * step (ld = 4 kp, step = 4 for rows one after another;
 * ld = 4, step = 24 for pairs interleaved across the rows). */
static void kernel_6x16(const int32_t *a, int64_t ld, int64_t step, const int16_t *b, int64_t kp, int32_t *tmp) {
    const int32_t *a3 = (const int32_t *)((const char *)a + 3 * ld);
#define ROW(addr, c0, c1)                                                   \
    "vpbroadcastd " addr ", %%ymm14\n\t"                                    \
    "vpmaddwd %%ymm12, %%ymm14, %%ymm15\n\t"                                \
    "vpaddd %%ymm15, %%ymm" #c0 ", %%ymm" #c0 "\n\t"                       \
    "vpmaddwd %%ymm13, %%ymm14, %%ymm15\n\t"                                \
    "vpaddd %%ymm15, %%ymm" #c1 ", %%ymm" #c1 "\n\t"
    __asm__ volatile(
        "vpxor %%ymm0, %%ymm0, %%ymm0\n\t" "vpxor %%ymm1, %%ymm1, %%ymm1\n\t"
        "vpxor %%ymm2, %%ymm2, %%ymm2\n\t" "vpxor %%ymm3, %%ymm3, %%ymm3\n\t"
        "vpxor %%ymm4, %%ymm4, %%ymm4\n\t" "vpxor %%ymm5, %%ymm5, %%ymm5\n\t"
        "vpxor %%ymm6, %%ymm6, %%ymm6\n\t" "vpxor %%ymm7, %%ymm7, %%ymm7\n\t"
        "vpxor %%ymm8, %%ymm8, %%ymm8\n\t" "vpxor %%ymm9, %%ymm9, %%ymm9\n\t"
        "vpxor %%ymm10, %%ymm10, %%ymm10\n\t" "vpxor %%ymm11, %%ymm11, %%ymm11\n\t"
        "1:\n\t"
        "vmovdqa (%[b]), %%ymm12\n\t"
        "vmovdqa 32(%[b]), %%ymm13\n\t"
        ROW("(%[a])", 0, 1)
        ROW("(%[a],%[ld],1)", 2, 3)
        ROW("(%[a],%[ld],2)", 4, 5)
        ROW("(%[a3])", 6, 7)
        ROW("(%[a3],%[ld],1)", 8, 9)
        ROW("(%[a3],%[ld],2)", 10, 11)
        "add %[step], %[a]\n\t"
        "add %[step], %[a3]\n\t"
        "add $64, %[b]\n\t"
        "dec %[k]\n\t"
        "jnz 1b\n\t"
        "vmovdqa %%ymm0, (%[t])\n\t" "vmovdqa %%ymm1, 32(%[t])\n\t"
        "vmovdqa %%ymm2, 64(%[t])\n\t" "vmovdqa %%ymm3, 96(%[t])\n\t"
        "vmovdqa %%ymm4, 128(%[t])\n\t" "vmovdqa %%ymm5, 160(%[t])\n\t"
        "vmovdqa %%ymm6, 192(%[t])\n\t" "vmovdqa %%ymm7, 224(%[t])\n\t"
        "vmovdqa %%ymm8, 256(%[t])\n\t" "vmovdqa %%ymm9, 288(%[t])\n\t"
        "vmovdqa %%ymm10, 320(%[t])\n\t" "vmovdqa %%ymm11, 352(%[t])\n\t"
        : [a] "+r"(a), [a3] "+r"(a3), [b] "+r"(b), [k] "+r"(kp)
        : [ld] "r"(ld), [step] "r"(step), [t] "r"(tmp)
        : "memory", "cc", "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8",
          "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
#undef ROW
}

/* The im2col matrix of a convolution input x (int8, channels-last: channel stride 1), never
 * written out: element (pos, col) with pos = (n, oh, ow) and col = (i, j, c) is
 * x[n, oh * SH - PH + i * DH, ow * SW - PW + j * DW, c], 0 in the padding. */
typedef struct {
    int64_t xn, xh, xw; /* element strides of x */
    int64_t C, H, W, OH, OW;
    int64_t KH, KW, SH, SW, PH, PW, DH, DW;
} patches;

typedef struct { int64_t base, ih0, iw0; } position;

/* Positions pos0..pos0+count-1: offset of the image, top-left corner of the window. */
static void locate(const patches *g, int64_t pos0, int64_t count, position *q) {
    int64_t n = pos0 / (g->OH * g->OW), rem = pos0 % (g->OH * g->OW), oh = rem / g->OW, ow = rem % g->OW;
    for (int64_t k = 0; k < count; k++) {
        q[k].base = n * g->xn;
        q[k].ih0 = oh * g->SH - g->PH;
        q[k].iw0 = ow * g->SW - g->PW;
        if (++ow == g->OW) {
            ow = 0;
            if (++oh == g->OH) { oh = 0; n++; }
        }
    }
}

/* A run of columns col..col+run-1 (of a block) that are channels of one tap: the tap's offsets
 * di, dj from a window's corner and the memory offset of its first channel from there. */
typedef struct { int64_t col, run, di, dj, off; } piece;

static int64_t cut(const patches *g, int64_t k0, int64_t kc, piece *out) {
    int64_t n = 0;
    for (int64_t k = k0, run; k < k0 + kc; k += run) {
        int64_t t = k / g->C, c = k - t * g->C;
        run = g->C - c < k0 + kc - k ? g->C - c : k0 + kc - k;
        int64_t di = (t / g->KW) * g->DH, dj = (t % g->KW) * g->DW;
        out[n].col = k - k0, out[n].run = run, out[n].di = di, out[n].dj = dj;
        out[n++].off = di * g->xh + dj * g->xw + c;
    }
    return n;
}

/* The memory of a piece at a position, or NULL where its tap falls in the padding. */
static inline const int8_t *at(const patches *g, const int8_t *x, const position *q, const piece *pc) {
    int64_t ih = q->ih0 + pc->di, iw = q->iw0 + pc->dj;
    return ih < 0 || ih >= g->H || iw < 0 || iw >= g->W ? NULL : x + q->base + q->ih0 * g->xh + q->iw0 * g->xw + pc->off;
}

/* A thread's scratch for one block of the reduction: its pieces (forward: columns of A) or its
 * positions (weight gradient: rows of B), worked out once per block. */
typedef struct {
    const patches *g;
    int64_t npieces;
    piece pieces[KC + 1];
    position q[KC];
} gather;

static void prepare_block(gather *s, const patches *ga, const patches *gb, int64_t k0, int64_t kc) {
    if (ga) { s->g = ga; s->npieces = cut(ga, k0, kc, s->pieces); }
    if (gb) { s->g = gb; locate(gb, k0, kc, s->q); }
}

/* Panel of columns n0..n0+nr-1, reduction steps k0..k0+kc-1 (kc even after padding with a
 * zero step): dst[p][j] = (B[k0 + 2p, n0 + j], B[k0 + 2p + 1, n0 + j]) as int16, zero past the
 * edges. */
static void pack_b_patches(const gather *s, const int8_t *x, int64_t kc, int64_t n0, int nr, int16_t *dst);

static void pack_b(const int8_t *B, int64_t sbk, int64_t sbn, const gather *s, int64_t k0, int64_t kc, int64_t n0,
                   int nr, int16_t *dst) {
    int64_t kp = (kc + 1) / 2;
    if (s) {
        pack_b_patches(s, B, kc, n0, nr, dst);
        return;
    }
    if (sbn == 1 && nr == NR) { /* row-major B: two 16-byte rows interleaved, then widened */
        for (int64_t p = 0; p < kp; p++) {
            const int8_t *r0 = B + (k0 + 2 * p) * sbk + n0;
            __m128i x0 = _mm_loadu_si128((const __m128i *)r0);
            __m128i x1 = 2 * p + 1 < kc ? _mm_loadu_si128((const __m128i *)(r0 + sbk)) : _mm_setzero_si128();
            _mm256_store_si256((__m256i *)(dst + 32 * p), _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(x0, x1)));
            _mm256_store_si256((__m256i *)(dst + 32 * p + 16), _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(x0, x1)));
        }
        return;
    }
    for (int64_t p = 0; p < kp; p++) {
        int16_t *d = dst + 32 * p;
        const int8_t *r0 = B + (k0 + 2 * p) * sbk + n0 * sbn;
        int second = 2 * p + 1 < kc;
        for (int j = 0; j < NR; j++) {
            d[2 * j] = j < nr ? r0[j * sbn] : 0;
            d[2 * j + 1] = j < nr && second ? r0[j * sbn + sbk] : 0;
        }
    }
}

/* pack_b over the patches (a weight gradient's B, rows = positions, located in s->q): where the
 * panel's 16 columns are channels of one tap, two 16-byte runs a pair of positions, else
 * column by column. */
static void pack_b_patches(const gather *s, const int8_t *x, int64_t kc, int64_t n0, int nr, int16_t *dst) {
    const patches *g = s->g;
    const int64_t kp = (kc + 1) / 2;
    piece cols[NR];
    for (int j = 0; j < nr; j++) cut(g, n0 + j, 1, cols + j);
    const int one_tap = nr == NR && n0 % g->C + NR <= g->C;
    for (int64_t p = 0; p < kp; p++) {
        const position *q0 = s->q + 2 * p, *q1 = 2 * p + 1 < kc ? q0 + 1 : NULL;
        if (one_tap) {
            const int8_t *r0 = at(g, x, q0, cols), *r1 = q1 ? at(g, x, q1, cols) : NULL;
            __m128i x0 = r0 ? _mm_loadu_si128((const __m128i *)r0) : _mm_setzero_si128();
            __m128i x1 = r1 ? _mm_loadu_si128((const __m128i *)r1) : _mm_setzero_si128();
            _mm256_store_si256((__m256i *)(dst + 32 * p), _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(x0, x1)));
            _mm256_store_si256((__m256i *)(dst + 32 * p + 16), _mm256_cvtepi8_epi16(_mm_unpackhi_epi8(x0, x1)));
            continue;
        }
        int16_t *d = dst + 32 * p;
        for (int j = 0; j < NR; j++) {
            const int8_t *r0 = j < nr ? at(g, x, q0, cols + j) : NULL;
            const int8_t *r1 = j < nr && q1 ? at(g, x, q1, cols + j) : NULL;
            d[2 * j] = r0 ? *r0 : 0;
            d[2 * j + 1] = r1 ? *r1 : 0;
        }
    }
}

/* o[0..n) = src[0..n) as int16, or zeros where src is NULL; 16 at a time (pieces are short:
 * one tap's channels, 16 on ResNet-20's first stage, where a generic loop's set-up cost more
 * than the copy). */
static inline void widen(int16_t *o, const int8_t *src, int64_t n) {
    int64_t c = 0;
    if (!src) {
        for (; c + 16 <= n; c += 16) _mm256_storeu_si256((__m256i *)(o + c), _mm256_setzero_si256());
        for (; c < n; c++) o[c] = 0;
        return;
    }
    for (; c + 16 <= n; c += 16)
        _mm256_storeu_si256((__m256i *)(o + c), _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)(src + c))));
    for (; c < n; c++) o[c] = src[c];
}

/* Rows m0..m0+mr-1 of A, steps k0..k0+kc-1, widened to int16 pairs (zero padded); returns
 * the layout's row distance in bytes for kernel_6x16. Rows along memory (sak == 1): one row
 * after another, each widened in one vector loop. Columns along memory (sam == 1, a weight
 * gradient's G^T): per pair of steps, two 16-byte loads interleaved like B's panels, the pairs
 * of the 6 rows stored next to each other (24 bytes a step; each 32-byte store overlaps the
 * next step's, which overwrites the extra 8 bytes). */
static int64_t pack_a(const int8_t *A, int64_t sam, int64_t sak, const gather *s, int64_t M, int64_t m0, int mr,
                      int64_t k0, int64_t kc, int16_t *dst, int64_t kp) {
    if (s) { /* a convolution's forward: each row gathered piece by piece from the input */
        const patches *g = s->g;
        position q[MR];
        locate(g, m0, mr, q);
        /* the whole reduction in this block and taps next to each other in memory: a window
         * inside the image is KH runs of KW * C bytes */
        const int rows_run = k0 == 0 && kc == g->KH * g->KW * g->C && g->DW == 1 && g->xw == g->C;
        for (int r = 0; r < MR; r++) {
            int16_t *d = dst + r * 2 * kp;
            if (r >= mr) {
                memset(d, 0, 4 * kp);
                continue;
            }
            const position *w = q + r;
            if (rows_run && w->ih0 >= 0 && w->ih0 + (g->KH - 1) * g->DH < g->H && w->iw0 >= 0
                    && w->iw0 + g->KW <= g->W) {
                const int8_t *src = A + w->base + w->ih0 * g->xh + w->iw0 * g->xw;
                for (int64_t i = 0; i < g->KH; i++)
                    widen(d + i * g->KW * g->C, src + i * g->DH * g->xh, g->KW * g->C);
                if (kc & 1) d[kc] = 0;
                continue;
            }
            for (int64_t i = 0; i < s->npieces; i++) {
                const piece *pc = s->pieces + i;
                const int8_t *src = at(s->g, A, q + r, pc);
                widen(d + pc->col, src, pc->run);
            }
            if (kc & 1) d[kc] = 0;
        }
        return 4 * kp;
    }
    if (sam == 1 && sak >= 16 && m0 + 16 <= M) {
        for (int64_t p = 0; p < kp; p++) {
            const int8_t *r0 = A + (k0 + 2 * p) * sak + m0;
            __m128i x0 = _mm_loadu_si128((const __m128i *)r0);
            __m128i x1 = 2 * p + 1 < kc ? _mm_loadu_si128((const __m128i *)(r0 + sak)) : _mm_setzero_si128();
            _mm256_storeu_si256((__m256i *)(dst + 12 * p), _mm256_cvtepi8_epi16(_mm_unpacklo_epi8(x0, x1)));
        }
        return 4;
    }
    for (int r = 0; r < MR; r++) {
        int16_t *d = dst + r * 2 * kp;
        if (r >= mr) {
            memset(d, 0, 4 * kp);
            continue;
        }
        const int8_t *src = A + (m0 + r) * sam + k0 * sak;
        if (sak == 1) {
#pragma omp simd
            for (int64_t k = 0; k < kc; k++) d[k] = src[k];
        } else {
            for (int64_t k = 0; k < kc; k++) d[k] = src[k * sak];
        }
        if (kc & 1) d[kc] = 0;
    }
    return 4 * kp;
}

static void store_tile(int32_t *c, int64_t ldc, const int32_t *tmp, int mr, int nr, int first) {
    if (mr == MR && nr == NR) {
        for (int i = 0; i < MR; i++) {
            __m256i *d = (__m256i *)(c + i * ldc);
            __m256i t0 = _mm256_load_si256((const __m256i *)(tmp + NR * i));
            __m256i t1 = _mm256_load_si256((const __m256i *)(tmp + NR * i + 8));
            if (!first) {
                t0 = _mm256_add_epi32(t0, _mm256_loadu_si256(d));
                t1 = _mm256_add_epi32(t1, _mm256_loadu_si256(d + 1));
            }
            _mm256_storeu_si256(d, t0);
            _mm256_storeu_si256(d + 1, t1);
        }
        return;
    }
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++) c[i * ldc + j] = (first ? 0 : c[i * ldc + j]) + tmp[NR * i + j];
}

/* One thread: columns n-blocks x rows of C += A[:, k_begin:k_end] @ B[k_begin:k_end] (written,
 * not added, where `first`). bpack: NC * KC int16, aligned to 32 bytes. */
static void gemm_serial(const int8_t *A, int64_t sam, int64_t sak, const patches *ga, const int8_t *B,
                        int64_t sbk, int64_t sbn, const patches *gb, int32_t *C, int64_t ldc, int64_t M, int64_t N, int64_t k_begin, int64_t k_end,
                        int16_t *bpack, int first) {
    int16_t apack[MR * KC + 16] __attribute__((aligned(32)));
    int32_t tmp[MR * NR] __attribute__((aligned(32)));
    gather scratch;
    const gather *sa = ga ? &scratch : NULL, *sb = gb ? &scratch : NULL;
    for (int64_t k0 = k_begin; k0 < k_end; k0 += KC) {
        const int64_t kc = k_end - k0 < KC ? k_end - k0 : KC, kp = (kc + 1) / 2;
        prepare_block(&scratch, ga, gb, k0, kc);
        for (int64_t n0 = 0; n0 < N; n0 += NC) {
            const int64_t nc = N - n0 < NC ? N - n0 : NC, panels = (nc + NR - 1) / NR;
            for (int64_t j = 0; j < panels; j++)
                pack_b(B, sbk, sbn, sb, k0, kc, n0 + j * NR, nc - j * NR < NR ? (int)(nc - j * NR) : NR,
                       bpack + j * kp * 2 * NR);
            for (int64_t m0 = 0; m0 < M; m0 += MR) {
                const int mr = M - m0 < MR ? (int)(M - m0) : MR;
                const int64_t ld = pack_a(A, sam, sak, sa, M, m0, mr, k0, kc, apack, kp);
                for (int64_t j = 0; j < panels; j++) {
                    kernel_6x16((const int32_t *)apack, ld, ld == 4 ? 4 * MR : 4, bpack + j * kp * 2 * NR, kp, tmp);
                    store_tile(C + m0 * ldc + n0 + j * NR, ldc, tmp, mr,
                               nc - j * NR < NR ? (int)(nc - j * NR) : NR, first && k0 == k_begin);
                }
            }
        }
    }
}

/* C = A @ B. Long reductions into small outputs (splits > 1) run as `splits` ranges of K, one
 * per thread, each into its own int32 sum (C, then partials[s - 1] as [M, N] row-major),
 * added up at the end: no barrier per block of K. Otherwise the threads share each B block and
 * split the rows of C. bpack: splits * NC * KC int16, aligned to 32 bytes. */
void gemm_avx2_i8(const int8_t *A, int64_t sam, int64_t sak, const patches *ga, const int8_t *B, int64_t sbk,
                  int64_t sbn, const patches *gb, int32_t *C, int64_t ldc, int64_t M, int64_t N, int64_t K,
                  int16_t *bpack, int32_t *partials, int splits, int nthreads) {
    if (splits > 1) {
        const int64_t step = ((K + splits - 1) / splits + 1) / 2 * 2;
#pragma omp parallel for num_threads(nthreads) schedule(static, 1)
        for (int s = 0; s < splits; s++) {
            int64_t k0 = s * step, k1 = k0 + step < K ? k0 + step : K;
            int32_t *dst = s == 0 ? C : partials + (s - 1) * M * N;
            int64_t ld = s == 0 ? ldc : N;
            if (k0 < k1) {
                gemm_serial(A, sam, sak, ga, B, sbk, sbn, gb, dst, ld, M, N, k0, k1, bpack + (int64_t)s * NC * KC, 1);
            } else {
                for (int64_t i = 0; i < M; i++) memset(dst + i * ld, 0, 4 * N);
            }
        }
        for (int s = 1; s < splits; s++)
            for (int64_t i = 0; i < M; i++)
                for (int64_t j = 0; j < N; j++) C[i * ldc + j] += partials[(s - 1) * M * N + i * N + j];
        return;
    }
    const int64_t mblocks = (M + MR - 1) / MR;
#pragma omp parallel num_threads(nthreads)
    {
        int16_t apack[MR * KC + 16] __attribute__((aligned(32)));
        int32_t tmp[MR * NR] __attribute__((aligned(32)));
        gather scratch;
        const gather *sa = ga ? &scratch : NULL, *sb = gb ? &scratch : NULL;
        for (int64_t k0 = 0; k0 < K; k0 += KC) {
            const int64_t kc = K - k0 < KC ? K - k0 : KC, kp = (kc + 1) / 2;
            prepare_block(&scratch, ga, gb, k0, kc);
            for (int64_t n0 = 0; n0 < N; n0 += NC) {
                const int64_t nc = N - n0 < NC ? N - n0 : NC, panels = (nc + NR - 1) / NR;
#pragma omp for schedule(static)
                for (int64_t j = 0; j < panels; j++) {
                    int nr = nc - j * NR < NR ? (int)(nc - j * NR) : NR;
                    pack_b(B, sbk, sbn, sb, k0, kc, n0 + j * NR, nr, bpack + j * kp * 2 * NR);
                }
                /* few row blocks: split the panels as well, so that every thread has work */
                int64_t chunks = mblocks >= 4 * nthreads ? 1 : (4 * nthreads + mblocks - 1) / mblocks;
                if (chunks > panels) chunks = panels;
                const int64_t per = (panels + chunks - 1) / chunks;
#pragma omp for schedule(static)
                for (int64_t t = 0; t < mblocks * chunks; t++) {
                    const int64_t mb = t / chunks, j0 = (t % chunks) * per;
                    const int mr = M - mb * MR < MR ? (int)(M - mb * MR) : MR;
                    const int64_t ld = pack_a(A, sam, sak, sa, M, mb * MR, mr, k0, kc, apack, kp);
                    for (int64_t j = j0; j < j0 + per && j < panels; j++) {
                        const int nr = nc - j * NR < NR ? (int)(nc - j * NR) : NR;
                        kernel_6x16((const int32_t *)apack, ld, ld == 4 ? 4 * MR : 4, bpack + j * kp * 2 * NR, kp, tmp);
                        store_tile(C + mb * MR * ldc + n0 + j * NR, ldc, tmp, mr, nr, k0 == 0);
                    }
                }
            }
        }
    }
}

#else
int gemm_avx2_available(void) { return 0; }

void gemm_avx2_i8(const int8_t *A, int64_t sam, int64_t sak, const void *ga, const int8_t *B, int64_t sbk,
                  int64_t sbn, const void *gb, int32_t *C, int64_t ldc, int64_t M, int64_t N, int64_t K,
                  int16_t *bpack, int32_t *partials, int splits, int nthreads) {
    (void)A; (void)sam; (void)sak; (void)ga; (void)B; (void)sbk; (void)sbn; (void)gb; (void)C; (void)ldc;
    (void)M; (void)N; (void)K; (void)bpack; (void)partials; (void)splits; (void)nthreads;
}
#endif
