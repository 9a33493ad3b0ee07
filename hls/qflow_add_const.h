// qflow FixedAddConst: the QGraph's add_const (docs/qgraph.md), x + value for a constant
// of the per-sample shape (a position embedding). The constant's codes are in the
// config (value_code_t, read as value_t); res_t holds every sum, so nothing rounds.
#ifndef QFLOW_ADD_CONST_H_
#define QFLOW_ADD_CONST_H_

#include "nnet_common.h"
#include "qflow_codes.h"

namespace nnet {

struct qflow_add_const_config {
    static const unsigned n_in = 1;
    typedef ap_fixed<8, 3> value_t;
    typedef ap_int<8> value_code_t;
    static long long value(unsigned i) { return 0; }
};

template <class data_T, class res_T, typename CONFIG_T>
void qflow_add_const(data_T data[CONFIG_T::n_in], res_T res[CONFIG_T::n_in]) {
    #pragma HLS PIPELINE
    for (unsigned i = 0; i < CONFIG_T::n_in; i++) {
        #pragma HLS UNROLL
        const typename CONFIG_T::value_t value = qflow_fixed<typename CONFIG_T::value_t>(
            typename CONFIG_T::value_code_t(CONFIG_T::value(i)));
        res[i] = data[i] + value;
    }
}

} // namespace nnet

#endif
