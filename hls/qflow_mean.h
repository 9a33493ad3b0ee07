// qflow FixedMean: the QGraph's mean along an axis (docs/qgraph.md), e.g. over tokens:
// the integer sum along the middle axis of (outer, length, inner) in accum_t (which holds
// every partial sum) times the reciprocal code in scale_t; the product is exact and fits
// res_t, the QGraph's type, as in FixedAvgPool.
#ifndef QFLOW_MEAN_H_
#define QFLOW_MEAN_H_

#include "nnet_common.h"
#include "qflow_codes.h"

namespace nnet {

struct qflow_mean_config {
    static const unsigned outer = 1;
    static const unsigned length = 1;
    static const unsigned inner = 1;
    static const unsigned long long reciprocal = 1;
    typedef ap_fixed<16, 6> accum_t;
    typedef ap_ufixed<18, 0> scale_t;
    typedef ap_uint<18> scale_code_t;
};

template <class data_T, class res_T, typename CONFIG_T>
void qflow_mean(data_T data[CONFIG_T::outer * CONFIG_T::length * CONFIG_T::inner],
                res_T res[CONFIG_T::outer * CONFIG_T::inner]) {
    #pragma HLS PIPELINE
    const typename CONFIG_T::scale_t recip =
        qflow_fixed<typename CONFIG_T::scale_t>(typename CONFIG_T::scale_code_t(CONFIG_T::reciprocal));
    for (unsigned o = 0; o < CONFIG_T::outer; o++) {
        for (unsigned j = 0; j < CONFIG_T::inner; j++) {
            typename CONFIG_T::accum_t sum = 0;
            for (unsigned i = 0; i < CONFIG_T::length; i++) {
                sum += data[qflow_row_index<CONFIG_T>(o, i, j)];
            }
            res[o * CONFIG_T::inner + j] = sum * recip;
        }
    }
}

} // namespace nnet

#endif
