/* Exact integer GEMM for x86 CPUs with AVX2 but no int8 dot-product instructions (no VNNI, no
 * AMX), called through ctypes: C[M, N] = A[M, K] @ B[K, N] for int8 operands (int32 C) and for
 * int16 operands of at most 12 bits (int64 C), each operand a strided matrix or the im2col
 * matrix of a channels-last convolution input, gathered as it is packed.
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
 * block of C lives in 12 ymm accumulators across a block of reduction steps. int8 callers keep
 * K * 128 * 128 below 2**31 (int32 sums cannot overflow; gemm_avx2.py cuts longer reductions).
 * int16 operands come with a bound L on |m| checked as they are packed (the call returns 1 and
 * its output is undefined where an element exceeds it) and a block length short enough that
 * the block's int32 sums stay exact (2 L^2 per pair); each block's sums are added into C in
 * int64.
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

/* ------------------------------------------------------------------------------ operands */

/* The im2col matrix of a convolution input x (channels-last: channel stride 1), never written
 * out: element (pos, col) with pos = (n, oh, ow) and col = (i, j, c) is
 * x[n, oh * SH - PH + i * DH, ow * SW - PW + j * DW, c], 0 in the padding. */
typedef struct {
    int64_t xn, xh, xw; /* element strides of x */
    int64_t C, H, W, OH, OW;
    int64_t KH, KW, SH, SW, PH, PW, DH, DW;
} patches;

/* A[i, k] = p[i * s0 + k * s1] (int8, or int16 where wide), or the patches g of the input p. */
typedef struct {
    const void *p;
    int64_t s0, s1;
    const patches *g;
    int64_t wide;
} operand;

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
 * di, dj from a window's corner and the element offset of its first channel from there. */
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

/* The element offset of a piece at a position, or -1 where its tap falls in the padding. */
static inline int64_t at(const patches *g, const position *q, const piece *pc) {
    int64_t ih = q->ih0 + pc->di, iw = q->iw0 + pc->dj;
    return ih < 0 || ih >= g->H || iw < 0 || iw >= g->W ? -1 : q->base + q->ih0 * g->xh + q->iw0 * g->xw + pc->off;
}

/* A thread's packing state: the pieces of the block's columns (forward: A's) or its positions
 * (weight gradient: B's rows), worked out once per block, and the largest |int16| packed. */
typedef struct {
    int64_t npieces;
    piece pieces[KC + 1];
    position q[KC];
    __m256i top;
} packer;

static inline const void *elem_at(const operand *o, int64_t i) {
    return (const char *)o->p + (o->wide ? 2 * i : i);
}

static inline int16_t elem(const operand *o, int64_t i) {
    return o->wide ? ((const int16_t *)o->p)[i] : ((const int8_t *)o->p)[i];
}

/* 16 elements as int16 (int16 ones also raise the running maximum of |m|). */
static inline __m256i load16(const operand *o, const void *src, packer *s) {
    if (!o->wide) return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i *)src));
    __m256i v = _mm256_loadu_si256((const __m256i *)src);
    s->top = _mm256_max_epu16(s->top, _mm256_abs_epi16(v)); /* unsigned: |-32768| stays 32768 */
    return v;
}

static inline void note(packer *s, int16_t v) {
    s->top = _mm256_max_epu16(s->top, _mm256_set1_epi16((int16_t)(v < 0 ? -v : v)));
}

/* d[0..n) = the n elements from element offset i on (zeros where i < 0), 16 at a time: pieces
 * are short (one tap's channels, 16 on ResNet-20's first stage), where a generic loop's set-up
 * cost more than the copy. */
static inline void widen(const operand *o, int64_t i, int64_t n, int16_t *d, packer *s) {
    int64_t c = 0;
    if (i < 0) {
        for (; c + 16 <= n; c += 16) _mm256_storeu_si256((__m256i *)(d + c), _mm256_setzero_si256());
        for (; c < n; c++) d[c] = 0;
        return;
    }
    for (; c + 16 <= n; c += 16) _mm256_storeu_si256((__m256i *)(d + c), load16(o, elem_at(o, i + c), s));
    for (; c < n; c++) {
        d[c] = elem(o, i + c);
        if (o->wide) note(s, d[c]);
    }
}

/* Two rows of 16 int16 interleaved into 16 pairs: d[0..32). */
static inline void interleave(__m256i r0, __m256i r1, int16_t *d, int aligned) {
    __m256i lo = _mm256_unpacklo_epi16(r0, r1), hi = _mm256_unpackhi_epi16(r0, r1);
    __m256i o0 = _mm256_permute2x128_si256(lo, hi, 0x20), o1 = _mm256_permute2x128_si256(lo, hi, 0x31);
    if (aligned) {
        _mm256_store_si256((__m256i *)d, o0);
        _mm256_store_si256((__m256i *)d + 1, o1);
    } else {
        _mm256_storeu_si256((__m256i *)d, o0);
        _mm256_storeu_si256((__m256i *)d + 1, o1);
    }
}

static void prepare_block(packer *s, const operand *a, const operand *b, int64_t k0, int64_t kc) {
    if (a->g) s->npieces = cut(a->g, k0, kc, s->pieces);
    if (b->g) locate(b->g, k0, kc, s->q);
}

/* ------------------------------------------------------------------------------- packing */

/* Panel of columns n0..n0+nr-1, reduction steps k0..k0+kc-1 (kc even after padding with a
 * zero step): dst[p][j] = (B[k0 + 2p, n0 + j], B[k0 + 2p + 1, n0 + j]) as int16, zero past the
 * edges. Rows along memory (or patches whose 16 columns are channels of one tap): two 16-wide
 * loads a pair of steps, interleaved; else element by element. */
static void pack_b(const operand *b, packer *s, int64_t k0, int64_t kc, int64_t n0, int nr, int16_t *dst) {
    const int64_t kp = (kc + 1) / 2;
    const patches *g = b->g;
    if (g) {
        piece cols[NR];
        for (int j = 0; j < nr; j++) cut(g, n0 + j, 1, cols + j);
        const int one_tap = nr == NR && n0 % g->C + NR <= g->C;
        for (int64_t p = 0; p < kp; p++) {
            const position *q0 = s->q + 2 * p, *q1 = 2 * p + 1 < kc ? q0 + 1 : NULL;
            if (one_tap) {
                int64_t i0 = at(g, q0, cols), i1 = q1 ? at(g, q1, cols) : -1;
                __m256i r0 = i0 >= 0 ? load16(b, elem_at(b, i0), s) : _mm256_setzero_si256();
                __m256i r1 = i1 >= 0 ? load16(b, elem_at(b, i1), s) : _mm256_setzero_si256();
                interleave(r0, r1, dst + 32 * p, 1);
                continue;
            }
            for (int j = 0; j < NR; j++) {
                int64_t i0 = j < nr ? at(g, q0, cols + j) : -1, i1 = j < nr && q1 ? at(g, q1, cols + j) : -1;
                dst[32 * p + 2 * j] = i0 >= 0 ? elem(b, i0) : 0;
                dst[32 * p + 2 * j + 1] = i1 >= 0 ? elem(b, i1) : 0;
                if (b->wide) { note(s, dst[32 * p + 2 * j]); note(s, dst[32 * p + 2 * j + 1]); }
            }
        }
        return;
    }
    for (int64_t p = 0; p < kp; p++) {
        const int64_t k = k0 + 2 * p;
        const int second = 2 * p + 1 < kc;
        if (b->s1 == 1 && nr == NR) {
            __m256i r0 = load16(b, elem_at(b, k * b->s0 + n0), s);
            __m256i r1 = second ? load16(b, elem_at(b, (k + 1) * b->s0 + n0), s) : _mm256_setzero_si256();
            interleave(r0, r1, dst + 32 * p, 1);
            continue;
        }
        for (int j = 0; j < NR; j++) {
            dst[32 * p + 2 * j] = j < nr ? elem(b, k * b->s0 + (n0 + j) * b->s1) : 0;
            dst[32 * p + 2 * j + 1] = j < nr && second ? elem(b, (k + 1) * b->s0 + (n0 + j) * b->s1) : 0;
            if (b->wide) { note(s, dst[32 * p + 2 * j]); note(s, dst[32 * p + 2 * j + 1]); }
        }
    }
}

/* Rows m0..m0+mr-1 of A, steps k0..k0+kc-1, as int16 pairs (zero padded); returns the layout's
 * row distance in bytes for kernel_6x16. Rows along memory, and patches: one row after another.
 * Columns along memory (a weight gradient's G^T): per pair of steps, two 16-wide loads
 * interleaved like B's panels, the pairs of the 6 rows next to each other (24 bytes a step;
 * each 32-byte store overlaps the next step's, which overwrites the extra 8 bytes). */
static int64_t pack_a(const operand *a, packer *s, int64_t M, int64_t m0, int mr, int64_t k0, int64_t kc,
                      int16_t *dst, int64_t kp) {
    const patches *g = a->g;
    if (!g && a->s0 == 1 && a->s1 >= 16 && m0 + 16 <= M) {
        for (int64_t p = 0; p < kp; p++) {
            const int64_t k = k0 + 2 * p;
            __m256i r0 = load16(a, elem_at(a, k * a->s1 + m0), s);
            __m256i r1 = 2 * p + 1 < kc ? load16(a, elem_at(a, (k + 1) * a->s1 + m0), s) : _mm256_setzero_si256();
            interleave(r0, r1, dst + 12 * p, 0);
        }
        return 4;
    }
    position q[MR];
    /* patches holding the whole reduction in this block, taps next to each other in memory: a
     * window inside the image is KH runs of KW * C elements */
    const int rows_run = g && k0 == 0 && kc == g->KH * g->KW * g->C && g->DW == 1 && g->xw == g->C;
    if (g) locate(g, m0, mr, q);
    for (int r = 0; r < MR; r++) {
        int16_t *d = dst + r * 2 * kp;
        if (r >= mr) {
            memset(d, 0, 4 * kp);
            continue;
        }
        if (!g && a->s1 == 1) {
            widen(a, (m0 + r) * a->s0 + k0, kc, d, s);
        } else if (!g) {
            for (int64_t k = 0; k < kc; k++) {
                d[k] = elem(a, (m0 + r) * a->s0 + (k0 + k) * a->s1);
                if (a->wide) note(s, d[k]);
            }
        } else if (rows_run && q[r].ih0 >= 0 && q[r].ih0 + (g->KH - 1) * g->DH < g->H && q[r].iw0 >= 0
                   && q[r].iw0 + g->KW <= g->W) {
            const int64_t i = q[r].base + q[r].ih0 * g->xh + q[r].iw0 * g->xw;
            for (int64_t t = 0; t < g->KH; t++) widen(a, i + t * g->DH * g->xh, g->KW * g->C, d + t * g->KW * g->C, s);
        } else {
            for (int64_t i = 0; i < s->npieces; i++) {
                const piece *pc = s->pieces + i;
                widen(a, at(g, q + r, pc), pc->run, d + pc->col, s);
            }
        }
        if (kc & 1) d[kc] = 0;
    }
    return 4 * kp;
}

/* C tile (int32, or int64 where wide) = or += tmp. */
static void store_tile(void *cv, int64_t ldc, const int32_t *tmp, int mr, int nr, int first, int wide) {
    if (wide) {
        int64_t *c = cv;
        for (int i = 0; i < mr; i++)
            for (int j = 0; j < nr; j++) c[i * ldc + j] = (first ? 0 : c[i * ldc + j]) + tmp[NR * i + j];
        return;
    }
    int32_t *c = cv;
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

static int top_of(const packer *s) {
    uint16_t v[16];
    _mm256_storeu_si256((__m256i *)v, s->top);
    int m = 0;
    for (int i = 0; i < 16; i++) m = v[i] > m ? v[i] : m;
    return m;
}

/* ------------------------------------------------------------------------------- drivers */

static inline void *tile(void *C, int wide, int64_t off) {
    return wide ? (void *)((int64_t *)C + off) : (void *)((int32_t *)C + off);
}

/* One thread: C (+)= A[:, k_begin:k_end] @ B[k_begin:k_end] in blocks of kb steps (written,
 * not added, where `first`). bpack: NC * KC int16, aligned to 32 bytes. Returns max |int16|. */
static int gemm_serial(const operand *a, const operand *b, void *C, int64_t ldc, int wide, int64_t M, int64_t N,
                       int64_t k_begin, int64_t k_end, int64_t kb, int16_t *bpack, int first) {
    int16_t apack[MR * KC + 16] __attribute__((aligned(32)));
    int32_t tmp[MR * NR] __attribute__((aligned(32)));
    packer s;
    s.top = _mm256_setzero_si256();
    for (int64_t k0 = k_begin; k0 < k_end; k0 += kb) {
        const int64_t kc = k_end - k0 < kb ? k_end - k0 : kb, kp = (kc + 1) / 2;
        prepare_block(&s, a, b, k0, kc);
        for (int64_t n0 = 0; n0 < N; n0 += NC) {
            const int64_t nc = N - n0 < NC ? N - n0 : NC, panels = (nc + NR - 1) / NR;
            for (int64_t j = 0; j < panels; j++)
                pack_b(b, &s, k0, kc, n0 + j * NR, nc - j * NR < NR ? (int)(nc - j * NR) : NR, bpack + j * kp * 2 * NR);
            for (int64_t m0 = 0; m0 < M; m0 += MR) {
                const int mr = M - m0 < MR ? (int)(M - m0) : MR;
                const int64_t ld = pack_a(a, &s, M, m0, mr, k0, kc, apack, kp);
                for (int64_t j = 0; j < panels; j++) {
                    kernel_6x16((const int32_t *)apack, ld, ld == 4 ? 4 * MR : 4, bpack + j * kp * 2 * NR, kp, tmp);
                    store_tile(tile(C, wide, m0 * ldc + n0 + j * NR), ldc, tmp, mr,
                               nc - j * NR < NR ? (int)(nc - j * NR) : NR, first && k0 == k_begin, wide);
                }
            }
        }
    }
    return top_of(&s);
}

/* C = A @ B (C int64 where `wide`, else int32) in blocks of kb <= KC reduction steps. Long
 * reductions into small outputs (splits > 1) run as `splits` ranges of K, one per thread, each
 * into its own sum (C, then partials[s - 1] as [M, N] row-major), added up at the end: no
 * barrier per block of K. Otherwise the threads share each B block and split the rows of C.
 * bpack: splits * NC * KC int16, aligned to 32 bytes. Returns 1 where an int16 element's |m|
 * exceeds `limit` (the output is then undefined), else 0. */
int gemm_avx2(const operand *a, const operand *b, void *C, int64_t ldc, int wide, int64_t M, int64_t N, int64_t K,
              int64_t kb, int64_t limit, int16_t *bpack, void *partials, int splits, int nthreads) {
    int top = 0;
    if (splits > 1) {
        const int64_t step = ((K + splits - 1) / splits + 1) / 2 * 2;
#pragma omp parallel for num_threads(nthreads) schedule(static, 1) reduction(max : top)
        for (int s = 0; s < splits; s++) {
            int64_t k0 = s * step, k1 = k0 + step < K ? k0 + step : K;
            void *dst = s == 0 ? C : tile(partials, wide, (s - 1) * M * N);
            int64_t ld = s == 0 ? ldc : N;
            if (k0 < k1) {
                int t = gemm_serial(a, b, dst, ld, wide, M, N, k0, k1, kb, bpack + (int64_t)s * NC * KC, 1);
                top = t > top ? t : top;
            } else {
                for (int64_t i = 0; i < M; i++) memset(tile(dst, wide, i * ld), 0, (wide ? 8 : 4) * N);
            }
        }
        for (int s = 1; s < splits; s++)
            for (int64_t i = 0; i < M; i++)
                for (int64_t j = 0; j < N; j++) {
                    if (wide) ((int64_t *)C)[i * ldc + j] += ((int64_t *)partials)[(s - 1) * M * N + i * N + j];
                    else ((int32_t *)C)[i * ldc + j] += ((int32_t *)partials)[(s - 1) * M * N + i * N + j];
                }
        return top > limit;
    }
    const int64_t mblocks = (M + MR - 1) / MR;
#pragma omp parallel num_threads(nthreads) reduction(max : top)
    {
        int16_t apack[MR * KC + 16] __attribute__((aligned(32)));
        int32_t tmp[MR * NR] __attribute__((aligned(32)));
        packer s;
        s.top = _mm256_setzero_si256();
        for (int64_t k0 = 0; k0 < K; k0 += kb) {
            const int64_t kc = K - k0 < kb ? K - k0 : kb, kp = (kc + 1) / 2;
            prepare_block(&s, a, b, k0, kc);
            for (int64_t n0 = 0; n0 < N; n0 += NC) {
                const int64_t nc = N - n0 < NC ? N - n0 : NC, panels = (nc + NR - 1) / NR;
#pragma omp for schedule(static)
                for (int64_t j = 0; j < panels; j++)
                    pack_b(b, &s, k0, kc, n0 + j * NR, nc - j * NR < NR ? (int)(nc - j * NR) : NR,
                           bpack + j * kp * 2 * NR);
                /* few row blocks: split the panels as well, so that every thread has work */
                int64_t chunks = mblocks >= 4 * nthreads ? 1 : (4 * nthreads + mblocks - 1) / mblocks;
                if (chunks > panels) chunks = panels;
                const int64_t per = (panels + chunks - 1) / chunks;
#pragma omp for schedule(static)
                for (int64_t t = 0; t < mblocks * chunks; t++) {
                    const int64_t mb = t / chunks, j0 = (t % chunks) * per;
                    const int mr = M - mb * MR < MR ? (int)(M - mb * MR) : MR;
                    const int64_t ld = pack_a(a, &s, M, mb * MR, mr, k0, kc, apack, kp);
                    for (int64_t j = j0; j < j0 + per && j < panels; j++) {
                        const int nr = nc - j * NR < NR ? (int)(nc - j * NR) : NR;
                        kernel_6x16((const int32_t *)apack, ld, ld == 4 ? 4 * MR : 4, bpack + j * kp * 2 * NR, kp, tmp);
                        store_tile(tile(C, wide, mb * MR * ldc + n0 + j * NR), ldc, tmp, mr, nr, k0 == 0, wide);
                    }
                }
            }
        }
        top = top_of(&s);
    }
    return top > limit;
}

#else
int gemm_avx2_available(void) { return 0; }

int gemm_avx2(const void *a, const void *b, void *C, int64_t ldc, int wide, int64_t M, int64_t N, int64_t K,
              int64_t kb, int64_t limit, int16_t *bpack, void *partials, int splits, int nthreads) {
    (void)a; (void)b; (void)C; (void)ldc; (void)wide; (void)M; (void)N; (void)K; (void)kb; (void)limit;
    (void)bpack; (void)partials; (void)splits; (void)nthreads;
    return 1;
}
#endif
