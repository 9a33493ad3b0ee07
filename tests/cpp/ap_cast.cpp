// Reference casts through Xilinx ap_fixed / ap_ufixed (the headers shipped with hls4ml).
//
// Usage: ap_cast IN OUT
//   IN : a sequence of jobs, each `int32 W, int32 I, int32 S, int64 N` then N doubles.
//   OUT: for each job and each (rounding, overflow) pair in the order printed on stdout,
//        N int64 codes: the raw W bits of the cast value, sign-extended when S != 0.
// Stdout: the mode order ("AP_TRN AP_SAT" ...), one pair per line, then one line
// "W I S N" per job so that the caller can check it was understood.
//
// The (W, I, S) shapes are instantiated at compile time from the macro AP_CAST_SHAPES,
// a list of SHAPE(W, I, S) entries, so the caller owns the list of shapes.
#include <cstdint>
#include <cstdio>
#include <type_traits>
#include <vector>

#include "ap_fixed.h"

#ifndef AP_CAST_SHAPES
#error "define AP_CAST_SHAPES, e.g. -DAP_CAST_SHAPES='SHAPE(8,3,1) SHAPE(4,6,0)'"
#endif

// Mode names in the order of the switch statements in cast_shape and cast_overflow.
static const char* const kRoundingName[] = {"AP_TRN",     "AP_TRN_ZERO",    "AP_RND",
                                            "AP_RND_ZERO", "AP_RND_INF", "AP_RND_MIN_INF",
                                            "AP_RND_CONV"};
static const char* const kOverflowName[] = {"AP_SAT", "AP_SAT_ZERO", "AP_SAT_SYM", "AP_WRAP"};
static const int kNumRounding = 7, kNumOverflow = 4;

template <int W, int I, bool S, ap_q_mode Q, ap_o_mode O>
static void cast_all(const std::vector<double>& in, int64_t* out) {
  typedef typename std::conditional<S, ap_fixed<W, I, Q, O>, ap_ufixed<W, I, Q, O> >::type T;
  for (size_t k = 0; k < in.size(); ++k) {
    T v = in[k];  // the double constructor under test
    uint64_t bits = v.range(W - 1, 0).to_uint64();
    int64_t code = (int64_t)bits;
    if (S && ((bits >> (W - 1)) & 1)) code -= (int64_t)1 << W;  // sign-extend W bits
    out[k] = code;
  }
}

template <int W, int I, bool S, ap_q_mode Q>
static void cast_overflow(int o, const std::vector<double>& in, int64_t* out) {
  switch (o) {
    case 0: cast_all<W, I, S, Q, AP_SAT>(in, out); break;
    case 1: cast_all<W, I, S, Q, AP_SAT_ZERO>(in, out); break;
    case 2: cast_all<W, I, S, Q, AP_SAT_SYM>(in, out); break;
    default: cast_all<W, I, S, Q, AP_WRAP>(in, out); break;
  }
}

template <int W, int I, bool S>
static void cast_shape(const std::vector<double>& in, std::vector<int64_t>& out) {
  const size_t n = in.size();
  out.resize(n * kNumRounding * kNumOverflow);
  for (int q = 0; q < kNumRounding; ++q) {
    for (int o = 0; o < kNumOverflow; ++o) {
      int64_t* dst = out.data() + (q * kNumOverflow + o) * n;
      switch (q) {
        case 0: cast_overflow<W, I, S, AP_TRN>(o, in, dst); break;
        case 1: cast_overflow<W, I, S, AP_TRN_ZERO>(o, in, dst); break;
        case 2: cast_overflow<W, I, S, AP_RND>(o, in, dst); break;
        case 3: cast_overflow<W, I, S, AP_RND_ZERO>(o, in, dst); break;
        case 4: cast_overflow<W, I, S, AP_RND_INF>(o, in, dst); break;
        case 5: cast_overflow<W, I, S, AP_RND_MIN_INF>(o, in, dst); break;
        default: cast_overflow<W, I, S, AP_RND_CONV>(o, in, dst); break;
      }
    }
  }
}

static bool dispatch(int w, int i, int s, const std::vector<double>& in,
                     std::vector<int64_t>& out) {
#define SHAPE(W, I, S)                              \
  if (w == (W) && i == (I) && s == (S)) {           \
    cast_shape<(W), (I), (S) != 0>(in, out);        \
    return true;                                    \
  }
  AP_CAST_SHAPES
#undef SHAPE
  return false;
}

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s IN OUT\n", argv[0]);
    return 2;
  }
  FILE* fin = std::fopen(argv[1], "rb");
  FILE* fout = std::fopen(argv[2], "wb");
  if (!fin || !fout) {
    std::perror("ap_cast: open");
    return 2;
  }
  for (int q = 0; q < kNumRounding; ++q)
    for (int o = 0; o < kNumOverflow; ++o)
      std::printf("%s %s\n", kRoundingName[q], kOverflowName[o]);
  int32_t head[3];
  int64_t n;
  std::vector<double> in;
  std::vector<int64_t> out;
  while (std::fread(head, sizeof(int32_t), 3, fin) == 3) {
    if (std::fread(&n, sizeof(int64_t), 1, fin) != 1 || n < 0) {
      std::fprintf(stderr, "ap_cast: truncated job header\n");
      return 2;
    }
    in.resize((size_t)n);
    if (std::fread(in.data(), sizeof(double), (size_t)n, fin) != (size_t)n) {
      std::fprintf(stderr, "ap_cast: truncated job data\n");
      return 2;
    }
    if (!dispatch(head[0], head[1], head[2], in, out)) {
      std::fprintf(stderr, "ap_cast: shape W=%d I=%d S=%d was not compiled in\n", head[0],
                   head[1], head[2]);
      return 2;
    }
    if (std::fwrite(out.data(), sizeof(int64_t), out.size(), fout) != out.size()) {
      std::perror("ap_cast: write");
      return 2;
    }
    std::printf("%d %d %d %lld\n", head[0], head[1], head[2], (long long)n);
  }
  if (std::fclose(fout) != 0) {
    std::perror("ap_cast: close");
    return 2;
  }
  std::fclose(fin);
  return 0;
}
