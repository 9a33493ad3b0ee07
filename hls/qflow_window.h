// qflow's pooling windows: what FixedAvgPool (qflow_avg_pool.h) and FixedMaxPool
// (qflow_max_pool.h) share.
//
// - qflow_window_config: the window geometry both layers' configs hold (channels-last
//   input in_height x in_width x n_chan, the window and its strides, the output size);
// - the io_stream row buffer, rows[pool_height][in_width][n_chan]: the last pool_height
//   input rows, input row h at index h % pool_height, stored one pixel (all channels) at
//   a time by qflow_window_store;
// - qflow_window_at: the input value at row h, column w, channel c, from the whole input
//   (io_parallel) or from the row buffer (io_stream), so that one window walk serves both.
#ifndef QFLOW_WINDOW_H_
#define QFLOW_WINDOW_H_

namespace nnet {

struct qflow_window_config {
    static const unsigned in_height = 1;
    static const unsigned in_width = 1;
    static const unsigned n_chan = 1;
    static const unsigned pool_height = 1;
    static const unsigned pool_width = 1;
    static const unsigned stride_height = 1;
    static const unsigned stride_width = 1;
    static const unsigned out_height = 1;
    static const unsigned out_width = 1;
};

// io_stream: keep input pixel (h, w), all its channels, in the row buffer.
template <class data_T, typename CONFIG_T>
void qflow_window_store(
    typename data_T::value_type rows[CONFIG_T::pool_height][CONFIG_T::in_width][CONFIG_T::n_chan], unsigned h,
    unsigned w, const data_T &in) {
    #pragma HLS INLINE
    for (unsigned c = 0; c < CONFIG_T::n_chan; c++) {
        #pragma HLS UNROLL
        rows[h % CONFIG_T::pool_height][w][c] = in[c];
    }
}

// io_parallel: input value (h, w, c) of the whole input.
template <typename CONFIG_T, class T>
T qflow_window_at(T data[CONFIG_T::in_height * CONFIG_T::in_width * CONFIG_T::n_chan], unsigned h, unsigned w,
                  unsigned c) {
    #pragma HLS INLINE
    return data[(h * CONFIG_T::in_width + w) * CONFIG_T::n_chan + c];
}

// io_stream: input value (h, w, c) from the row buffer (row h must still be held).
template <typename CONFIG_T, class T>
T qflow_window_at(T rows[CONFIG_T::pool_height][CONFIG_T::in_width][CONFIG_T::n_chan], unsigned h, unsigned w,
                  unsigned c) {
    #pragma HLS INLINE
    return rows[h % CONFIG_T::pool_height][w][c];
}

} // namespace nnet

#endif
