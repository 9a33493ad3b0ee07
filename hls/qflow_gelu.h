// qflow FixedGELU: the integer GELU of docs/transformer_ops.md (I-BERT's erf
// polynomial), code for code.
//
// Per element: A = |q| at 12 fractional bits (a right shift, or a clamp at arg_limit and
// a left shift), clipped at c = 10247; gap = c - A; tail = 591 * gap^2 (1 - |erf| at 36
// bits); h = 2^37 - tail for q >= 0, else tail (1 + erf); then cast_{f+37}(q * h -> res_t).
#ifndef QFLOW_GELU_H_
#define QFLOW_GELU_H_

#include "nnet_common.h"
#include "qflow_codes.h"

namespace nnet {

struct qflow_gelu_config {
    static const unsigned n_in = 1;
    static const unsigned arg_right = 0;
    static const unsigned arg_left = 0;
    static const unsigned long long arg_limit = 0; // |q| above it is past the clip point
    typedef ap_int<8> code_t;
    typedef ap_uint<8> mag_t;
    typedef ap_uint<14> arg_t;
    typedef ap_int<47> prod_t;
    typedef ap_fixed<47, 3> value_t;
};

static const unsigned QFLOW_GELU_CLIP_CODE = 10247; // 2.50171 at 12 fraction bits
static const unsigned QFLOW_GELU_CURVE_CODE = 591;  // 0.14429 at 12 fraction bits

template <typename CONFIG_T> typename CONFIG_T::prod_t qflow_gelu_product(typename CONFIG_T::code_t q) {
    #pragma HLS INLINE
    typename CONFIG_T::mag_t magnitude = q < 0 ? typename CONFIG_T::mag_t(-q) : typename CONFIG_T::mag_t(q);
    if (CONFIG_T::arg_left > 0 && magnitude > CONFIG_T::arg_limit)
        magnitude = CONFIG_T::arg_limit; // already past the clip point: keeps the shift small
    typename CONFIG_T::arg_t arg = magnitude;
    arg = (arg << CONFIG_T::arg_left) >> CONFIG_T::arg_right;
    if (arg > QFLOW_GELU_CLIP_CODE)
        arg = QFLOW_GELU_CLIP_CODE;
    const ap_uint<14> gap = QFLOW_GELU_CLIP_CODE - arg;
    const ap_uint<36> tail = ap_uint<10>(QFLOW_GELU_CURVE_CODE) * gap * gap;
    const ap_uint<38> factor = q < 0 ? ap_uint<38>(tail) : ap_uint<38>((ap_uint<38>(1) << 37) - tail);
    return q * factor;
}

template <class data_T, class res_T, typename CONFIG_T>
void qflow_gelu(data_T data[CONFIG_T::n_in], res_T res[CONFIG_T::n_in]) {
    #pragma HLS PIPELINE
    for (unsigned i = 0; i < CONFIG_T::n_in; i++) {
        #pragma HLS UNROLL
        const typename CONFIG_T::prod_t v =
            qflow_gelu_product<CONFIG_T>(qflow_code<typename CONFIG_T::code_t>(data[i]));
        res[i] = qflow_cast_code<typename CONFIG_T::value_t, res_T>(v);
    }
}

} // namespace nnet

#endif
