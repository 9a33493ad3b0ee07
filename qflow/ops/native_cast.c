/* Fused loops for the per-tensor saturating fixed-point cast used in training
 * (qflow.ops.fixed._ScalarCast): one pass forward, one pass backward, where torch's
 * element-wise operations take three and five.
 *
 * Every value equals the torch path's: the same IEEE operations in the same order,
 * compiled without fast-math (see qflow/ops/native.py for the flags). Only the gradient
 * sum of the integer bits differs, by float rounding: its terms are the same, added in
 * float lanes per block and the blocks in double.
 */
#include <stddef.h>
#include <stdint.h>
#include <string.h>

#define BLOCK 1024 /* elements per block: float lane sums of BLOCK / lanes terms each */

/* 16-byte vectors (SSE2, the x86-64 baseline; NEON on aarch64) through GCC's vector
 * extensions: comparisons give all-ones masks, so selects are bitwise and branch-free. */
typedef float vf32 __attribute__((vector_size(16)));
typedef int32_t vi32 __attribute__((vector_size(16)));
typedef double vf64 __attribute__((vector_size(16)));
typedef int64_t vi64 __attribute__((vector_size(16)));

/* y = (clamp(x, lo, hi) + magic) - magic: a clamp, then RND_CONV to the grid that
 * magic's binade has (see _ScalarCast). NaN stays NaN, as torch.clamp keeps it. */
#define DEFINE_FORWARD(NAME, T)                                                      \
    void NAME(const T *restrict x, T *restrict y, int64_t n, T lo, T hi, T magic) {                    \
        for (int64_t i = 0; i < n; ++i) {                                            \
            T v = x[i];                                                              \
            T c = v < lo ? lo : v;                                                   \
            c = c > hi ? hi : c;                                                     \
            y[i] = (c + magic) - magic;                                              \
        }                                                                            \
    }

/* With x_in = x where below < x < above (torch's hardtanh_backward test, NaN kept
 * inside) and 0 elsewhere: writes grad_x = g there and 0 elsewhere (unless grad_x is
 * NULL) and returns sum(g * (y - x_in)). */
#define DEFINE_BACKWARD(NAME, T, VT, VI)                                             \
    double NAME(const T *restrict g, const T *restrict x, const T *restrict y,       \
                T *restrict grad_x, int64_t n, T below, T above) {                   \
        enum { W = sizeof(VT) / sizeof(T) };                                         \
        double total = 0.0;                                                          \
        int64_t i = 0;                                                               \
        while (i + W <= n) {                                                         \
            int64_t stop = i + BLOCK < n ? i + BLOCK : n;                            \
            VT lane = {0};                                                           \
            for (; i + W <= stop; i += W) {                                          \
                VT gv, xv, yv;                                                       \
                memcpy(&gv, g + i, sizeof gv);                                       \
                memcpy(&xv, x + i, sizeof xv);                                       \
                memcpy(&yv, y + i, sizeof yv);                                       \
                VI keep = ~((xv <= below) | (xv >= above));                          \
                VT x_in = (VT)((VI)xv & keep);                                       \
                lane += gv * (yv - x_in);                                            \
                if (grad_x) {                                                        \
                    VT gx = (VT)((VI)gv & keep);                                     \
                    memcpy(grad_x + i, &gx, sizeof gx);                              \
                }                                                                    \
            }                                                                        \
            for (int j = 0; j < W; ++j) total += (double)lane[j];                    \
        }                                                                            \
        for (; i < n; ++i) {                                                         \
            T v = x[i];                                                              \
            int keep = !((v <= below) | (v >= above));                               \
            total += (double)(g[i] * (y[i] - (keep ? v : (T)0)));                    \
            if (grad_x) grad_x[i] = keep ? g[i] : (T)0;                              \
        }                                                                            \
        return total;                                                                \
    }

DEFINE_FORWARD(qflow_cast_forward_f32, float)
DEFINE_FORWARD(qflow_cast_forward_f64, double)
DEFINE_BACKWARD(qflow_cast_backward_f32, float, vf32, vi32)
DEFINE_BACKWARD(qflow_cast_backward_f64, double, vf64, vi64)

/* Per-channel casts (per-channel weights, BatchNorm scales and shifts): channel c holds
 * the `size` consecutive elements from c * size and has its own bounds [lo[c], hi[c]]
 * and magic number. The backward pass tests lo <= x <= hi, which is the test above
 * with below and above the float neighbours of lo and hi, and writes each channel's
 * sum(g * (y - x_in)) to sums[c]. */
#define DEFINE_CHANNEL_FORWARD(NAME, FORWARD, T)                                     \
    void NAME(const T *restrict x, T *restrict y, int64_t channels, int64_t size,    \
              const T *lo, const T *hi, const T *magic) {                            \
        for (int64_t c = 0; c < channels; ++c)                                       \
            FORWARD(x + c * size, y + c * size, size, lo[c], hi[c], magic[c]);       \
    }

#define DEFINE_CHANNEL_BACKWARD(NAME, T)                                             \
    void NAME(const T *restrict g, const T *restrict x, const T *restrict y,         \
              T *restrict grad_x, int64_t channels, int64_t size, const T *lo,       \
              const T *hi, double *sums) {                                           \
        for (int64_t c = 0; c < channels; ++c) {                                     \
            double total = 0.0;                                                      \
            for (int64_t k = c * size; k < (c + 1) * size; ++k) {                    \
                T v = x[k];                                                          \
                int keep = (v >= lo[c]) & (v <= hi[c]);                              \
                total += (double)(g[k] * (y[k] - (keep ? v : (T)0)));                \
                if (grad_x) grad_x[k] = keep ? g[k] : (T)0;                          \
            }                                                                        \
            sums[c] = total;                                                         \
        }                                                                            \
    }

DEFINE_CHANNEL_FORWARD(qflow_channel_cast_forward_f32, qflow_cast_forward_f32, float)
DEFINE_CHANNEL_FORWARD(qflow_channel_cast_forward_f64, qflow_cast_forward_f64, double)
DEFINE_CHANNEL_BACKWARD(qflow_channel_cast_backward_f32, float)
DEFINE_CHANNEL_BACKWARD(qflow_channel_cast_backward_f64, double)
