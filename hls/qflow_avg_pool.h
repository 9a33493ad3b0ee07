// qflow FixedAvgPool: average pooling as qflow's QGraph defines it, exactly.
//
// Every output is the window's integer sum (in accum_t, which holds every partial sum
// of the window exactly) times the reciprocal code (scale_t, an unsigned fixed-point
// type holding 1/n rounded as the QGraph rounded it). The product is exact in
// ap_fixed's full-precision product type and fits res_t, the QGraph node's output
// type, so the assignment neither rounds nor overflows. hls4ml's own average pooling
// divides by the count instead, which equals this only when n is a power of two.
//
// Windows are unpadded ("valid") and channels-last, as hls4ml lays tensors out.
#ifndef QFLOW_AVG_POOL_H_
#define QFLOW_AVG_POOL_H_

#include "ap_fixed.h"
#include "hls_stream.h"
#include "nnet_common.h"
#include "qflow_window.h"

namespace nnet {

struct qflow_avg_pool_config : qflow_window_config {
    // the reciprocal's integer code: 1/n ~ reciprocal * 2^-(fractional bits of scale_t)
    static const unsigned long long reciprocal = 1;
    typedef ap_fixed<16, 6> accum_t;
    typedef ap_ufixed<18, 0> scale_t;
};

template <typename CONFIG_T> typename CONFIG_T::scale_t qflow_avg_pool_reciprocal() {
    #pragma HLS INLINE
    typename CONFIG_T::scale_t recip = 0;
    recip.range(CONFIG_T::scale_t::width - 1, 0) = CONFIG_T::reciprocal;
    return recip;
}

// The integer sum (channel c) of the window whose first input pixel is (h0, w0), read from
// the whole input (io_parallel) or the row buffer (io_stream).
template <typename CONFIG_T, class src_T>
typename CONFIG_T::accum_t qflow_avg_pool_sum(src_T src, unsigned h0, unsigned w0, unsigned c) {
    #pragma HLS INLINE
    typename CONFIG_T::accum_t sum = 0;
    for (unsigned ph = 0; ph < CONFIG_T::pool_height; ph++) {
        for (unsigned pw = 0; pw < CONFIG_T::pool_width; pw++) {
            sum += qflow_window_at<CONFIG_T>(src, h0 + ph, w0 + pw, c);
        }
    }
    return sum;
}

// io_parallel: every output of the layer at once.
template <class data_T, class res_T, typename CONFIG_T>
void qflow_avg_pool(data_T data[CONFIG_T::in_height * CONFIG_T::in_width * CONFIG_T::n_chan],
                    res_T res[CONFIG_T::out_height * CONFIG_T::out_width * CONFIG_T::n_chan]) {
    #pragma HLS PIPELINE
    const typename CONFIG_T::scale_t recip = qflow_avg_pool_reciprocal<CONFIG_T>();
    for (unsigned oh = 0; oh < CONFIG_T::out_height; oh++) {
        for (unsigned ow = 0; ow < CONFIG_T::out_width; ow++) {
            for (unsigned c = 0; c < CONFIG_T::n_chan; c++) {
                #pragma HLS UNROLL
                const typename CONFIG_T::accum_t sum = qflow_avg_pool_sum<CONFIG_T>(
                    data, oh * CONFIG_T::stride_height, ow * CONFIG_T::stride_width, c);
                res[(oh * CONFIG_T::out_width + ow) * CONFIG_T::n_chan + c] = sum * recip;
            }
        }
    }
}

// io_stream: one pixel (all channels) per step. The last pool_height rows are kept in
// registers; an output pixel is written as soon as its window is complete, in raster
// order. A window covering the whole plane (global pooling) keeps one running sum per
// channel instead.
template <class data_T, class res_T, typename CONFIG_T>
void qflow_avg_pool(hls::stream<data_T> &data, hls::stream<res_T> &res) {
    typedef typename data_T::value_type in_t;
    const typename CONFIG_T::scale_t recip = qflow_avg_pool_reciprocal<CONFIG_T>();
    const bool global = CONFIG_T::pool_height == CONFIG_T::in_height &&
                        CONFIG_T::pool_width == CONFIG_T::in_width;
    typename CONFIG_T::accum_t sums[CONFIG_T::n_chan];
    #pragma HLS ARRAY_PARTITION variable=sums complete
    in_t rows[CONFIG_T::pool_height][CONFIG_T::in_width][CONFIG_T::n_chan];
    #pragma HLS ARRAY_PARTITION variable=rows complete dim=0
    for (unsigned c = 0; c < CONFIG_T::n_chan; c++) {
        #pragma HLS UNROLL
        sums[c] = 0;
    }
    for (unsigned h = 0; h < CONFIG_T::in_height; h++) {
        for (unsigned w = 0; w < CONFIG_T::in_width; w++) {
            #pragma HLS PIPELINE
            const data_T in = data.read();
            if (global) {
                for (unsigned c = 0; c < CONFIG_T::n_chan; c++) {
                    #pragma HLS UNROLL
                    sums[c] += in[c];
                }
                if (h == CONFIG_T::in_height - 1 && w == CONFIG_T::in_width - 1) {
                    res_T out;
                    PRAGMA_DATA_PACK(out)
                    for (unsigned c = 0; c < CONFIG_T::n_chan; c++) {
                        #pragma HLS UNROLL
                        out[c] = sums[c] * recip;
                    }
                    res.write(out);
                }
                continue;
            }
            qflow_window_store<data_T, CONFIG_T>(rows, h, w, in);
            // the window ending at (h, w) starts at (h0, w0), a multiple of the stride
            const bool full = h + 1 >= CONFIG_T::pool_height && w + 1 >= CONFIG_T::pool_width;
            const unsigned h0 = h + 1 - CONFIG_T::pool_height;
            const unsigned w0 = w + 1 - CONFIG_T::pool_width;
            if (full && h0 % CONFIG_T::stride_height == 0 && w0 % CONFIG_T::stride_width == 0 &&
                h0 / CONFIG_T::stride_height < CONFIG_T::out_height &&
                w0 / CONFIG_T::stride_width < CONFIG_T::out_width) {
                res_T out;
                PRAGMA_DATA_PACK(out)
                for (unsigned c = 0; c < CONFIG_T::n_chan; c++) {
                    #pragma HLS UNROLL
                    out[c] = qflow_avg_pool_sum<CONFIG_T>(rows, h0, w0, c) * recip;
                }
                res.write(out);
            }
        }
    }
}

} // namespace nnet

#endif
