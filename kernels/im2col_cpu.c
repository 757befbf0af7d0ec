/* im2col for integer mantissa tensors, called through ctypes.
 *
 * out[(n*OH + oh)*OW + ow, (i*KW + j)*C + c] = x[n, c, oh*SH - PH + i*DH, ow*SW - PW + j*DW]
 * (0 outside the input). x is addressed through element strides, so NCHW and channels-last
 * inputs both work; with channels-last (sC == 1) each (i, j) tap is one memcpy of C elements,
 * and the KW taps of one kernel row are one memcpy where they lie in the image (dense
 * channels-last, dilation 1): small C makes per-tap calls the cost.
 */
#include <stdint.h>
#include <string.h>

#define IM2COL_FN(NAME, T)                                                               \
    void NAME(const T *x, int64_t N, int64_t C, int64_t H, int64_t W, int64_t sN,        \
              int64_t sC, int64_t sH, int64_t sW, int KH, int KW, int SH, int SW, int PH,  \
              int PW, int DH, int DW, int64_t OH, int64_t OW, T *out, int nthreads) {     \
        int64_t K = (int64_t)KH * KW * C, rows = N * OH * OW;                            \
        _Pragma("omp parallel for num_threads(rows > 256 ? nthreads : 1) schedule(static)") \
        for (int64_t r = 0; r < rows; ++r) {                                             \
            int64_t n = r / (OH * OW), rem = r % (OH * OW), oh = rem / OW, ow = rem % OW; \
            T *dst = out + r * K;                                                        \
            const int64_t iw0 = ow * SW - PW;                                            \
            const int row_run = sC == 1 && sW == C && DW == 1 && iw0 >= 0 && iw0 + KW <= W; \
            for (int i = 0; i < KH; ++i) {                                               \
                int64_t ih = oh * SH - PH + (int64_t)i * DH;                             \
                if (row_run && ih >= 0 && ih < H) { /* the KW taps: one contiguous run */ \
                    memcpy(dst, x + n * sN + ih * sH + iw0 * sW, KW * C * sizeof(T));    \
                    dst += KW * C;                                                       \
                    continue;                                                            \
                }                                                                        \
                for (int j = 0; j < KW; ++j, dst += C) {                                 \
                    int64_t iw = ow * SW - PW + (int64_t)j * DW;                         \
                    if (ih < 0 || ih >= H || iw < 0 || iw >= W) {                        \
                        memset(dst, 0, C * sizeof(T));                                   \
                        continue;                                                        \
                    }                                                                    \
                    const T *src = x + n * sN + ih * sH + iw * sW;                       \
                    if (sC == 1) {                                                       \
                        memcpy(dst, src, C * sizeof(T));                                 \
                    } else {                                                             \
                        for (int64_t c = 0; c < C; ++c) dst[c] = src[c * sC];            \
                    }                                                                    \
                }                                                                        \
            }                                                                            \
        }                                                                                \
    }

IM2COL_FN(im2col_i8, int8_t)
IM2COL_FN(im2col_i16, int16_t)
