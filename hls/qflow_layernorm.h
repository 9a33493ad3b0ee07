// qflow FixedLayerNorm: the integer LayerNorm of docs/transformer_ops.md, code for code.
//
// Per row of N codes q: T = sum q and V = N * sum q^2 - T^2 (N^2 times the variance,
// never rounded); c = N * q - T; t = (62 - bits(V)) / 2 (a priority encoder: the
// leading-zero count); s = floor(sqrt(V * 4^t)) by the 31 steps of the restoring method
// (s = 1 when V = 0); one integer division rec = 2^K / s; the normalised value
// z = sign(c) * (((|c| << t) * rec + 2^(K-Z-1)) >> (K - Z)), rounded half away from
// zero; v = z * gamma + (beta << beta_shift); cast_{Z+f_gamma}(v -> res_t).
// gamma and beta are integer codes in the config (one per element of a row).
#ifndef QFLOW_LAYERNORM_H_
#define QFLOW_LAYERNORM_H_

#include "nnet_common.h"
#include "qflow_codes.h"

namespace nnet {

struct qflow_layernorm_config {
    static const unsigned n_in = 1;
    static const unsigned outer = 1;
    static const unsigned length = 1; // N
    static const unsigned inner = 1;
    static const unsigned var_bits = 1;
    static const unsigned reciprocal_frac = 60; // K
    static const unsigned norm_frac = 16;       // Z
    static const unsigned beta_shift = 0;
    typedef ap_int<8> code_t;
    typedef ap_int<12> sum_t;
    typedef ap_uint<20> squares_t;
    typedef ap_int<30> moment_t;
    typedef ap_uint<30> var_t;
    typedef ap_int<16> centred_t;
    typedef ap_uint<32> rec_t;
    typedef ap_int<24> norm_t;
    typedef ap_int<8> gamma_t;
    typedef ap_int<8> beta_t;
    typedef ap_int<40> affine_t;
    typedef ap_fixed<40, 16> value_t;
    static long long gamma(unsigned i) { return 1; }
    static long long beta(unsigned i) { return 0; }
};

// floor(sqrt(n)) for 0 <= n < 2^62: the restoring digit-by-digit method, 31 steps.
inline ap_uint<31> qflow_isqrt(ap_uint<62> n) {
    #pragma HLS INLINE
    ap_uint<62> rest = n;
    ap_uint<62> root = 0;
    ap_uint<62> bit = ap_uint<62>(1) << 60;
    for (unsigned step = 0; step < 31; step++) {
        #pragma HLS UNROLL
        const ap_uint<63> trial = root + bit;
        if (rest >= trial) {
            rest -= trial;
            root = (root >> 1) + bit;
        } else {
            root = root >> 1;
        }
        bit = bit >> 2;
    }
    return root;
}

// bits(v): 0 for 0, else one more than the position of the highest set bit.
template <typename CONFIG_T> unsigned qflow_bit_length(typename CONFIG_T::var_t v) {
    #pragma HLS INLINE
    unsigned length = 0;
    for (unsigned b = 0; b < CONFIG_T::var_bits; b++) {
        #pragma HLS UNROLL
        if (v[b])
            length = b + 1;
    }
    return length;
}

template <class data_T, class res_T, typename CONFIG_T>
void qflow_layernorm(data_T data[CONFIG_T::n_in], res_T res[CONFIG_T::n_in]) {
    #pragma HLS PIPELINE
    typedef typename CONFIG_T::code_t code_t;
    const unsigned n = CONFIG_T::length;
    for (unsigned o = 0; o < CONFIG_T::outer; o++) {
        for (unsigned j = 0; j < CONFIG_T::inner; j++) {
            typename CONFIG_T::sum_t total = 0;
            typename CONFIG_T::squares_t squares = 0;
            for (unsigned i = 0; i < n; i++) {
                const code_t q = qflow_code<code_t>(data[qflow_row_index<CONFIG_T>(o, i, j)]);
                total += q;
                squares += q * q;
            }
            const typename CONFIG_T::moment_t spread =
                typename CONFIG_T::moment_t(n) * squares - typename CONFIG_T::moment_t(total) * total;
            const typename CONFIG_T::var_t var = spread;
            const unsigned shift = (62 - qflow_bit_length<CONFIG_T>(var)) >> 1;
            ap_uint<31> root = qflow_isqrt(ap_uint<62>(var) << (2 * shift));
            if (root == 0)
                root = 1; // zero variance: every centred value is 0
            const ap_uint<CONFIG_T::reciprocal_frac + 1> numerator =
                ap_uint<CONFIG_T::reciprocal_frac + 1>(1) << CONFIG_T::reciprocal_frac;
            const typename CONFIG_T::rec_t recip = numerator / root;
            const unsigned drop = CONFIG_T::reciprocal_frac - CONFIG_T::norm_frac;
            for (unsigned i = 0; i < n; i++) {
                const unsigned at = qflow_row_index<CONFIG_T>(o, i, j);
                const code_t q = qflow_code<code_t>(data[at]);
                const typename CONFIG_T::centred_t c = typename CONFIG_T::centred_t(n) * q - total;
                const ap_uint<63> magnitude = c < 0 ? ap_uint<63>(-c) : ap_uint<63>(c);
                const ap_uint<63> scaled = ((magnitude << shift) * recip +
                                            (ap_uint<63>(1) << (drop - 1))) >> drop;
                const typename CONFIG_T::norm_t z = c < 0 ? typename CONFIG_T::norm_t(-scaled)
                                                          : typename CONFIG_T::norm_t(scaled);
                const typename CONFIG_T::gamma_t g = CONFIG_T::gamma(i);
                const typename CONFIG_T::affine_t b = typename CONFIG_T::beta_t(CONFIG_T::beta(i));
                const typename CONFIG_T::affine_t v = z * g + (b << CONFIG_T::beta_shift);
                res[at] = qflow_cast_code<typename CONFIG_T::value_t, res_T>(v);
            }
        }
    }
}

} // namespace nnet

#endif
