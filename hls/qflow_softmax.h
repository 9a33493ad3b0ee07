// qflow FixedSoftmax: the integer softmax of docs/transformer_ops.md, code for code.
//
// Per row: the maximum code m; for each element d = m - q, the exponent
// a = (d * LOG2E_CODE) shifted to 10 fractional bits (arg_right / arg_left), its integer
// part n (at most 31) and fraction r; g = 2^30 - r * 2^19 - 174 * r * (1024 - r); the exp
// code E = g >> n; the row sum S; one integer division rec = 2^K / S; then
// cast_K(E * rec -> res_t). Every type below is as wide as the spec's bound on its
// value (qflow writes the widths into the config), so no step wraps or rounds.
#ifndef QFLOW_SOFTMAX_H_
#define QFLOW_SOFTMAX_H_

#include "nnet_common.h"
#include "qflow_codes.h"

namespace nnet {

struct qflow_softmax_config {
    static const unsigned n_in = 1;
    static const unsigned outer = 1;
    static const unsigned length = 1;
    static const unsigned inner = 1;
    static const unsigned arg_right = 0; // right shift of d * LOG2E_CODE to 10 fraction bits
    static const unsigned arg_left = 0;  // or left shift (one of the two is 0)
    static const unsigned reciprocal_frac = 38; // K
    typedef ap_int<8> code_t;
    typedef ap_uint<8> diff_t;
    typedef ap_uint<25> scaled_t;
    typedef ap_uint<25> arg_t;
    typedef ap_uint<31> exp_t;
    typedef ap_uint<34> sum_t;
    typedef ap_uint<17> rec_t;
    typedef ap_uint<39> prod_t;
    typedef ap_ufixed<39, 1> value_t;
};

static const unsigned long long QFLOW_LOG2E_CODE = 94548;  // log2(e) at 16 fraction bits
static const unsigned QFLOW_POW2_CURVE_CODE = 174;        // a at 10 fraction bits

// About 2^30 * e^-(d * LSB): the spec's exp_codes for one difference d >= 0.
template <typename CONFIG_T> typename CONFIG_T::exp_t qflow_softmax_exp(typename CONFIG_T::diff_t d) {
    #pragma HLS INLINE
    const typename CONFIG_T::scaled_t scaled = d * QFLOW_LOG2E_CODE;
    typename CONFIG_T::arg_t arg = scaled;
    arg = (arg << CONFIG_T::arg_left) >> CONFIG_T::arg_right;
    const typename CONFIG_T::arg_t whole_all = arg >> 10;
    const ap_uint<5> whole = whole_all > 31 ? ap_uint<5>(31) : ap_uint<5>(whole_all);
    const ap_uint<10> rho = arg.range(9, 0);
    const ap_uint<11> rest = ap_uint<11>(1024) - rho;
    const ap_uint<27> curve = ap_uint<8>(QFLOW_POW2_CURVE_CODE) * rho * rest;
    const ap_uint<31> frac_pow = (ap_uint<31>(1) << 30) - (ap_uint<31>(rho) << 19) - curve;
    return frac_pow >> whole;
}

template <class data_T, class res_T, typename CONFIG_T>
void qflow_softmax(data_T data[CONFIG_T::n_in], res_T res[CONFIG_T::n_in]) {
    #pragma HLS PIPELINE
    typedef typename CONFIG_T::code_t code_t;
    for (unsigned o = 0; o < CONFIG_T::outer; o++) {
        for (unsigned j = 0; j < CONFIG_T::inner; j++) {
            code_t top = qflow_code<code_t>(data[qflow_row_index<CONFIG_T>(o, 0, j)]);
            for (unsigned i = 1; i < CONFIG_T::length; i++) {
                const code_t q = qflow_code<code_t>(data[qflow_row_index<CONFIG_T>(o, i, j)]);
                if (q > top)
                    top = q;
            }
            typename CONFIG_T::exp_t exps[CONFIG_T::length];
            #pragma HLS ARRAY_PARTITION variable=exps complete
            typename CONFIG_T::sum_t total = 0;
            for (unsigned i = 0; i < CONFIG_T::length; i++) {
                const code_t q = qflow_code<code_t>(data[qflow_row_index<CONFIG_T>(o, i, j)]);
                const typename CONFIG_T::diff_t d = top - q;
                exps[i] = qflow_softmax_exp<CONFIG_T>(d);
                total += exps[i];
            }
            // the one division of the row: total >= 2^30 (the maximum's own exp code)
            const typename CONFIG_T::prod_t numerator = typename CONFIG_T::prod_t(1)
                                                        << CONFIG_T::reciprocal_frac;
            const typename CONFIG_T::rec_t recip = numerator / total;
            for (unsigned i = 0; i < CONFIG_T::length; i++) {
                const typename CONFIG_T::prod_t v = exps[i] * recip;
                res[qflow_row_index<CONFIG_T>(o, i, j)] =
                    qflow_cast_code<typename CONFIG_T::value_t, res_T>(v);
            }
        }
    }
}

} // namespace nnet

#endif
