// What qflow's transformer and token layers share: the integer code of a fixed-point
// value, the fixed-point value of an integer code, and the final cast of every
// transformer op (docs/transformer_ops.md, "cast_K(v -> T)").
//
// A value of ap_fixed<W, I> is its W-bit code times 2^-(W - I). The layers compute on
// codes with ap_int / ap_uint types whose widths qflow derives from the spec's bounds
// (every intermediate holds every value it can take, so nothing wraps), then turn the
// last integer v, which holds a value v * 2^-K, into the output type by one assignment:
// ap_fixed's conversion rounds by the output type's mode and then applies its overflow
// mode, exactly as qflow.numerics.requantize does.
#ifndef QFLOW_CODES_H_
#define QFLOW_CODES_H_

#include "ap_fixed.h"
#include "ap_int.h"

namespace nnet {

// The code of x: code_T has x's width and signedness (ap_int<W> or ap_uint<W>).
template <class code_T, class data_T> code_T qflow_code(const data_T &x) {
    #pragma HLS INLINE
    code_T code;
    code.range() = x.range();
    return code;
}

// The fixed-point value whose code is raw: fixed_T and raw_T have the same width.
template <class fixed_T, class raw_T> fixed_T qflow_fixed(const raw_T &raw) {
    #pragma HLS INLINE
    fixed_T value;
    value.range() = raw.range();
    return value;
}

// cast_K(v -> res_T): value_T is the ap_(u)fixed with v's width and K fractional bits.
template <class value_T, class res_T, class raw_T> res_T qflow_cast_code(const raw_T &v) {
    #pragma HLS INLINE
    return res_T(qflow_fixed<value_T>(v));
}

// Position of element i of row (o, j) when rows run along a middle axis: the tensor is
// (outer, length, inner) in hls4ml's (channels-last) memory order.
template <typename CONFIG_T> unsigned qflow_row_index(unsigned o, unsigned i, unsigned j) {
    #pragma HLS INLINE
    return (o * CONFIG_T::length + i) * CONFIG_T::inner + j;
}

} // namespace nnet

#endif
