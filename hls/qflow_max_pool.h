// qflow FixedMaxPool: max pooling with padding as qflow's QGraph defines it, exactly.
//
// Padded positions never take part: each output is the maximum of the input values its
// window covers inside the image (every window covers at least one, the exporter checks
// that the padding is at most half the kernel). hls4ml's own Pooling2D fills padded
// positions with a constant instead (the value with only the top bit set: the most
// negative signed value, but a large value of an unsigned type) and its io_stream
// pooling takes no padding at all. The maximum is one of the inputs, and res_T (the
// QGraph node's output type) holds every input value, so the assignment is exact.
//
// Channels-last, as hls4ml lays tensors out. The bottom and right padding are implied by
// out_height and out_width (floor division, no ceil mode).
#ifndef QFLOW_MAX_POOL_H_
#define QFLOW_MAX_POOL_H_

#include "ap_fixed.h"
#include "hls_stream.h"
#include "nnet_common.h"
#include "qflow_window.h"

namespace nnet {

struct qflow_max_pool_config : qflow_window_config {
    static const unsigned pad_top = 0;
    static const unsigned pad_left = 0;
};

// The last input row (column) the window of output row (column) o covers.
template <unsigned pool, unsigned stride, unsigned pad, unsigned in_size>
int qflow_max_pool_last(int o) {
    #pragma HLS INLINE
    const int last = o * int(stride) - int(pad) + int(pool) - 1;
    return last < int(in_size) - 1 ? last : int(in_size) - 1;
}

// The largest input value (channel c) in the window of output pixel (oh, ow), of type T,
// read from the whole input (io_parallel) or the row buffer (io_stream).
template <typename CONFIG_T, class T, class src_T>
T qflow_max_pool_window(src_T src, int oh, int ow, unsigned c) {
    #pragma HLS INLINE
    T best = 0;
    bool have = false;
    for (int ph = 0; ph < int(CONFIG_T::pool_height); ph++) {
        for (int pw = 0; pw < int(CONFIG_T::pool_width); pw++) {
            const int h = oh * int(CONFIG_T::stride_height) - int(CONFIG_T::pad_top) + ph;
            const int w = ow * int(CONFIG_T::stride_width) - int(CONFIG_T::pad_left) + pw;
            if (h < 0 || h >= int(CONFIG_T::in_height) || w < 0 || w >= int(CONFIG_T::in_width))
                continue; // padding: never a candidate
            const T v = qflow_window_at<CONFIG_T>(src, h, w, c);
            if (!have || v > best) {
                best = v;
                have = true;
            }
        }
    }
    return best;
}

// io_parallel: every output of the layer at once.
template <class data_T, class res_T, typename CONFIG_T>
void qflow_max_pool(data_T data[CONFIG_T::in_height * CONFIG_T::in_width * CONFIG_T::n_chan],
                    res_T res[CONFIG_T::out_height * CONFIG_T::out_width * CONFIG_T::n_chan]) {
    #pragma HLS PIPELINE
    for (int oh = 0; oh < int(CONFIG_T::out_height); oh++) {
        for (int ow = 0; ow < int(CONFIG_T::out_width); ow++) {
            for (unsigned c = 0; c < CONFIG_T::n_chan; c++) {
                #pragma HLS UNROLL
                res[(oh * CONFIG_T::out_width + ow) * CONFIG_T::n_chan + c] =
                    qflow_max_pool_window<CONFIG_T, data_T>(data, oh, ow, c);
            }
        }
    }
}

// One output pixel (all channels) from the last pool_height input rows, kept in `rows`
// at row index h % pool_height.
template <class res_T, class in_t, typename CONFIG_T>
void qflow_max_pool_pixel(in_t rows[CONFIG_T::pool_height][CONFIG_T::in_width][CONFIG_T::n_chan], int oh,
                          int ow, hls::stream<res_T> &res) {
    #pragma HLS INLINE
    res_T out;
    PRAGMA_DATA_PACK(out)
    for (unsigned c = 0; c < CONFIG_T::n_chan; c++) {
        #pragma HLS UNROLL
        out[c] = qflow_max_pool_window<CONFIG_T, in_t>(rows, oh, ow, c);
    }
    res.write(out);
}

// io_stream: one input pixel (all channels) per step; the last pool_height rows are kept
// in registers. Output row oh is written while input row last(oh) arrives, each pixel as
// soon as the last input column its window covers is in, in raster order. Output rows
// whose windows are cut by the bottom edge share the last input row as their last: the
// first of them is written with it, the others after the last input pixel (the rows they
// need are still held).
template <class data_T, class res_T, typename CONFIG_T>
void qflow_max_pool(hls::stream<data_T> &data, hls::stream<res_T> &res) {
    typedef typename data_T::value_type in_t;
    in_t rows[CONFIG_T::pool_height][CONFIG_T::in_width][CONFIG_T::n_chan];
    #pragma HLS ARRAY_PARTITION variable=rows complete dim=0
    int oh = 0; // the next output row to write
    for (int h = 0; h < int(CONFIG_T::in_height); h++) {
        const bool row_out =
            oh < int(CONFIG_T::out_height) &&
            qflow_max_pool_last<CONFIG_T::pool_height, CONFIG_T::stride_height, CONFIG_T::pad_top,
                                CONFIG_T::in_height>(oh) == h;
        for (int w = 0; w < int(CONFIG_T::in_width); w++) {
            #pragma HLS PIPELINE
            const data_T in = data.read();
            qflow_window_store<data_T, CONFIG_T>(rows, h, w, in);
            if (!row_out)
                continue;
            for (int ow = 0; ow < int(CONFIG_T::out_width); ow++) {
                if (qflow_max_pool_last<CONFIG_T::pool_width, CONFIG_T::stride_width, CONFIG_T::pad_left,
                                        CONFIG_T::in_width>(ow) == w)
                    qflow_max_pool_pixel<res_T, in_t, CONFIG_T>(rows, oh, ow, res);
            }
        }
        if (row_out)
            oh++;
    }
    for (; oh < int(CONFIG_T::out_height); oh++) {
        for (int ow = 0; ow < int(CONFIG_T::out_width); ow++) {
            #pragma HLS PIPELINE
            qflow_max_pool_pixel<res_T, in_t, CONFIG_T>(rows, oh, ow, res);
        }
    }
}

} // namespace nnet

#endif
