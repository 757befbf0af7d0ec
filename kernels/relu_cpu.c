/* ReLU that keeps a one-byte mask for backward, and its backward, called through ctypes.
 *
 * relu_mask: y = x < 0 ? 0 : x (torch.relu: NaN and -0.0 pass), mask = (y != 0), one pass.
 * add_relu_mask: relu_mask of a + b, one pass.
 * relu_mask_backward: gx = mask ? g : 0, one pass: what threshold_backward(g, y, 0) computes
 *   (y <= 0 gives +0, anything else, NaN included, passes g).
 */
#include <stdint.h>
#include <string.h>

/* Small inputs get a team of one through num_threads rather than an if clause: GCC's if(false)
 * path ran these loops unvectorised, 9x slower on 32768 elements. */
#define PAR_MIN 32768

/* Stores relu(v) and its mask at i; returns max(top, bits(relu(v)) & 0x7fffffff), the absmax
 * quantise_cpu.c's absmax_bits would find, so the quantiser of the layer reading y skips its
 * own pass over y. */
static inline __attribute__((always_inline)) uint32_t relu_store(float v, float *y, uint8_t *mask, int64_t i,
                                                                 uint32_t top) {
    float r = v < 0.0f ? 0.0f : v; /* torch.relu: NaN and -0.0 pass unchanged */
    uint32_t b;
    y[i] = r;
    mask[i] = r != 0.0f;
    memcpy(&b, &r, 4);
    b &= 0x7fffffffU;
    return b > top ? b : top;
}

uint32_t relu_mask(const float *x, int64_t n, float *y, uint8_t *mask, int nthreads) {
    uint32_t top = 0;
#pragma omp parallel for simd num_threads(n > PAR_MIN ? nthreads : 1) schedule(static) reduction(max : top)
    for (int64_t i = 0; i < n; ++i) top = relu_store(x[i], y, mask, i, top);
    return top;
}

void relu_mask_backward(const float *g, const uint8_t *mask, int64_t n, float *gx, int nthreads) {
#pragma omp parallel for simd num_threads(n > PAR_MIN ? nthreads : 1) schedule(static)
    for (int64_t i = 0; i < n; ++i) gx[i] = mask[i] ? g[i] : 0.0f;
}

/* y = relu(a + b) (the float32 sum, then relu_mask's rule), its mask and absmax, one pass: a
 * residual block's add and ReLU without writing and re-reading the sum. */
uint32_t add_relu_mask(const float *a, const float *b, int64_t n, float *y, uint8_t *mask, int nthreads) {
    uint32_t top = 0;
#pragma omp parallel for simd num_threads(n > PAR_MIN ? nthreads : 1) schedule(static) reduction(max : top)
    for (int64_t i = 0; i < n; ++i) top = relu_store(a[i] + b[i], y, mask, i, top);
    return top;
}
