// qflow ActivationMatMul: the product of two activations (attention's q·kᵀ and
// probabilities·v), a (rows x depth) times b (depth x cols), or b given as (cols x depth)
// when transpose_b. Every product of two ap_fixed values is exact in ap_fixed's
// full-precision product type, and accum_t is the QGraph's exact accumulator type
// (qflow.numerics.transformer.matmul_accumulator_type): it holds every partial sum, so
// the result neither rounds nor wraps.
//
// The reuse factor folds it as hls4ml's Latency Dense is folded: the function is
// pipelined with II = reuse_factor and at most multiplier_limit =
// ceil(rows * cols * depth / reuse_factor) multipliers are allocated, each used up to
// reuse_factor times per sample. The pragmas change the hardware, never a value.
#ifndef QFLOW_MATMUL_H_
#define QFLOW_MATMUL_H_

#include "nnet_common.h"

namespace nnet {

struct qflow_matmul_config {
    static const unsigned rows = 1;
    static const unsigned depth = 1;
    static const unsigned cols = 1;
    static const bool transpose_b = false;
    static const unsigned reuse_factor = 1;
    static const unsigned multiplier_limit = rows * cols * depth;
    typedef ap_fixed<16, 6> accum_t;
};

template <class a_T, class b_T, class res_T, typename CONFIG_T>
void qflow_matmul(a_T a[CONFIG_T::rows * CONFIG_T::depth], b_T b[CONFIG_T::depth * CONFIG_T::cols],
                  res_T res[CONFIG_T::rows * CONFIG_T::cols]) {
    #pragma HLS PIPELINE II=CONFIG_T::reuse_factor
    #pragma HLS ALLOCATION operation instances=mul limit=CONFIG_T::multiplier_limit
    for (unsigned i = 0; i < CONFIG_T::rows; i++) {
        for (unsigned j = 0; j < CONFIG_T::cols; j++) {
            typename CONFIG_T::accum_t acc = 0;
            for (unsigned k = 0; k < CONFIG_T::depth; k++) {
                const unsigned at = CONFIG_T::transpose_b ? j * CONFIG_T::depth + k : k * CONFIG_T::cols + j;
                acc += a[i * CONFIG_T::depth + k] * b[at];
            }
            res[i * CONFIG_T::cols + j] = acc;
        }
    }
}

} // namespace nnet

#endif
