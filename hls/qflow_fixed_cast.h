// qflow FixedCast: requantize every element to the result type.
//
// The conversion is ap_fixed's own assignment, so the result type's rounding mode
// (any of the seven) and overflow mode (any of the four) act exactly as in qflow's
// numerics (checked value by value against ap_fixed in qflow's test suite). hls4ml's
// Quant layer can only state RND_CONV or TRN with SAT / SAT_SYM; qflow uses this layer
// for every other cast.
#ifndef QFLOW_FIXED_CAST_H_
#define QFLOW_FIXED_CAST_H_

#include "hls_stream.h"

namespace nnet {

struct qflow_fixed_cast_config {
    static const unsigned n_in = 1;
};

template <class data_T, class res_T, typename CONFIG_T>
void qflow_fixed_cast(data_T data[CONFIG_T::n_in], res_T res[CONFIG_T::n_in]) {
    #pragma HLS PIPELINE
    for (unsigned i = 0; i < CONFIG_T::n_in; i++) {
        #pragma HLS UNROLL
        res[i] = data[i];
    }
}

template <class data_T, class res_T, typename CONFIG_T>
void qflow_fixed_cast(hls::stream<data_T> &data, hls::stream<res_T> &res) {
    for (unsigned i = 0; i < CONFIG_T::n_in / data_T::size; i++) {
        #pragma HLS PIPELINE
        data_T in = data.read();
        res_T out;
        PRAGMA_DATA_PACK(out)
        for (unsigned j = 0; j < data_T::size; j++) {
            #pragma HLS UNROLL
            out[j] = typename res_T::value_type(in[j]);
        }
        res.write(out);
    }
}

} // namespace nnet

#endif
