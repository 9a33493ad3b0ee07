// qflow FixedTranspose: a (rows x cols) token tensor to (cols x rows), as the QGraph's
// transpose of a per-sample matrix (docs/qgraph.md). Pure data movement.
#ifndef QFLOW_TRANSPOSE_H_
#define QFLOW_TRANSPOSE_H_

#include "nnet_common.h"

namespace nnet {

struct qflow_transpose_config {
    static const unsigned rows = 1;
    static const unsigned cols = 1;
};

template <class data_T, class res_T, typename CONFIG_T>
void qflow_transpose(data_T data[CONFIG_T::rows * CONFIG_T::cols], res_T res[CONFIG_T::rows * CONFIG_T::cols]) {
    #pragma HLS PIPELINE
    for (unsigned i = 0; i < CONFIG_T::rows; i++) {
        for (unsigned j = 0; j < CONFIG_T::cols; j++) {
            res[j * CONFIG_T::rows + i] = data[i * CONFIG_T::cols + j];
        }
    }
}

} // namespace nnet

#endif
