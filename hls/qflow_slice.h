// qflow FixedSlice: the elements [start, start + out_len) of the middle axis of an
// (outer, in_len, inner) tensor in hls4ml's memory order (channels last), as the QGraph's
// slice (docs/qgraph.md): attention heads or a class token. Pure data movement.
#ifndef QFLOW_SLICE_H_
#define QFLOW_SLICE_H_

#include "nnet_common.h"

namespace nnet {

struct qflow_slice_config {
    static const unsigned outer = 1;
    static const unsigned in_len = 1;
    static const unsigned start = 0;
    static const unsigned out_len = 1;
    static const unsigned inner = 1;
};

template <class data_T, class res_T, typename CONFIG_T>
void qflow_slice(data_T data[CONFIG_T::outer * CONFIG_T::in_len * CONFIG_T::inner],
                 res_T res[CONFIG_T::outer * CONFIG_T::out_len * CONFIG_T::inner]) {
    #pragma HLS PIPELINE
    for (unsigned o = 0; o < CONFIG_T::outer; o++) {
        for (unsigned i = 0; i < CONFIG_T::out_len; i++) {
            for (unsigned j = 0; j < CONFIG_T::inner; j++) {
                res[(o * CONFIG_T::out_len + i) * CONFIG_T::inner + j] =
                    data[(o * CONFIG_T::in_len + CONFIG_T::start + i) * CONFIG_T::inner + j];
            }
        }
    }
}

} // namespace nnet

#endif
