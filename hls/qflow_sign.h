// qflow FixedSign: the QGraph's sign, +1 where x >= 0 (so sign(0) = +1), else -1.
//
// The result has one of two encodings, chosen by the exporter for each sign:
// - xnor: result_t is hls4ml's binary type (ap_uint<1>), 1 for +1 and 0 for -1, the
//   encoding hls4ml's XNOR/popcount Dense and Conv2D read (a product is a == w, the sum
//   2 * matches - n);
// - otherwise result_t is ap_fixed<2,2> holding +1 and -1 themselves, for every other
//   reader (a padded convolution, whose zero padding must stay 0, not become -1).
// hls4ml's own binary_tanh activation is not used: when it follows a BatchNormalization,
// hls4ml merges the two into x >= floor(-bias / scale) (the threshold rounded down to the
// input grid, a negative scale not flipping the test), which is not the QGraph's sign.
#ifndef QFLOW_SIGN_H_
#define QFLOW_SIGN_H_

#include "hls_stream.h"
#include "nnet_common.h"

namespace nnet {

struct qflow_sign_config {
    static const unsigned n_in = 1;
    static const bool xnor = false;
};

template <class res_T, bool xnor> res_T qflow_sign_code(bool non_negative) {
    #pragma HLS INLINE
    return non_negative ? res_T(1) : res_T(xnor ? 0 : -1);
}

template <class data_T, class res_T, typename CONFIG_T>
void qflow_sign(data_T data[CONFIG_T::n_in], res_T res[CONFIG_T::n_in]) {
    #pragma HLS PIPELINE
    for (unsigned i = 0; i < CONFIG_T::n_in; i++) {
        #pragma HLS UNROLL
        res[i] = qflow_sign_code<res_T, CONFIG_T::xnor>(data[i] >= 0);
    }
}

template <class data_T, class res_T, typename CONFIG_T>
void qflow_sign(hls::stream<data_T> &data, hls::stream<res_T> &res) {
    typedef typename res_T::value_type out_t;
    for (unsigned i = 0; i < CONFIG_T::n_in / data_T::size; i++) {
        #pragma HLS PIPELINE
        data_T in = data.read();
        res_T out;
        PRAGMA_DATA_PACK(out)
        for (unsigned j = 0; j < data_T::size; j++) {
            #pragma HLS UNROLL
            out[j] = qflow_sign_code<out_t, CONFIG_T::xnor>(in[j] >= 0);
        }
        res.write(out);
    }
}

} // namespace nnet

#endif
