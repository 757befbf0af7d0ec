/* Shared by the AMX kernels (amx_cpu.c, amx_gemm.c), included where __AMX_TILE__ and
 * __AMX_INT8__ are defined: the tile configuration, the request for the tile state, and the
 * 16 x 16 byte transpose that packs column-major operands into tile rows. */
#ifndef MUPPET_AMX_TILES_H
#define MUPPET_AMX_TILES_H
#include <immintrin.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18
#define TILE 1024 /* bytes in one 16 x 64 tile */

/* Linux hands out the tile state only on request, once per process. */
static inline int request_tiles(void) {
    return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} tile_config;

static inline void configure(void) {
    tile_config cfg;
    memset(&cfg, 0, sizeof cfg);
    cfg.palette = 1;
    for (int t = 0; t < 8; t++) { cfg.rows[t] = 16; cfg.colsb[t] = 64; }
    _tile_loadconfig(&cfg);
}

/* dst[64 j + i] = src[i][j] for a 16 x 16 byte block: four rounds of unpacking. */
static inline void transpose16(const int8_t *const *src, int8_t *dst) {
    __m128i a[16], b[16];
    for (int i = 0; i < 16; i++) a[i] = _mm_loadu_si128((const __m128i *)src[i]);
    for (int i = 0; i < 8; i++) {
        b[2 * i] = _mm_unpacklo_epi8(a[2 * i], a[2 * i + 1]);
        b[2 * i + 1] = _mm_unpackhi_epi8(a[2 * i], a[2 * i + 1]);
    }
    for (int q = 0; q < 4; q++) {
        a[4 * q] = _mm_unpacklo_epi16(b[4 * q], b[4 * q + 2]);
        a[4 * q + 1] = _mm_unpackhi_epi16(b[4 * q], b[4 * q + 2]);
        a[4 * q + 2] = _mm_unpacklo_epi16(b[4 * q + 1], b[4 * q + 3]);
        a[4 * q + 3] = _mm_unpackhi_epi16(b[4 * q + 1], b[4 * q + 3]);
    }
    for (int h = 0; h < 2; h++)
        for (int k = 0; k < 4; k++) {
            b[8 * h + 2 * k] = _mm_unpacklo_epi32(a[8 * h + k], a[8 * h + 4 + k]);
            b[8 * h + 2 * k + 1] = _mm_unpackhi_epi32(a[8 * h + k], a[8 * h + 4 + k]);
        }
    for (int i = 0; i < 8; i++) {
        _mm_storeu_si128((__m128i *)(dst + 64 * (2 * i)), _mm_unpacklo_epi64(b[i], b[8 + i]));
        _mm_storeu_si128((__m128i *)(dst + 64 * (2 * i + 1)), _mm_unpackhi_epi64(b[i], b[8 + i]));
    }
}

#endif
