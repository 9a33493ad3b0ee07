// Runs hls/qflow_max_pool.h (io_parallel and io_stream) on integer codes for the window
// geometries in MAX_POOL_GEOMETRIES, for tests/test_hls_depthwise_maxpool.py.
//
// Usage: max_pool IN OUT. IN holds, per geometry in order, int64 n followed by n samples
// of in_height * in_width * n_chan int64 codes (channels last) of ap_fixed<8,3> (signed)
// or ap_ufixed<8,3> (unsigned, by the geometry's last argument); OUT receives, per
// geometry, the io_parallel output codes of every sample and then the io_stream ones.
// stdout echoes each geometry, then the number of words each stream run left unread or
// wrote beyond the output size (0 when the stream code reads and writes exactly).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <type_traits>
#include <vector>

#include "qflow_max_pool.h"
// after it: nnet_types.h uses ap_fixed without including it
#include "nnet_types.h"

template <unsigned H, unsigned W, unsigned C, unsigned KH, unsigned KW, unsigned SH, unsigned SW,
          unsigned PT, unsigned PL, unsigned OH, unsigned OW>
struct geometry : nnet::qflow_max_pool_config {
    static const unsigned in_height = H;
    static const unsigned in_width = W;
    static const unsigned n_chan = C;
    static const unsigned pool_height = KH;
    static const unsigned pool_width = KW;
    static const unsigned stride_height = SH;
    static const unsigned stride_width = SW;
    static const unsigned pad_top = PT;
    static const unsigned pad_left = PL;
    static const unsigned out_height = OH;
    static const unsigned out_width = OW;
};

static int64_t read_i64(FILE *fh) {
    int64_t v;
    if (fread(&v, sizeof v, 1, fh) != 1) {
        fprintf(stderr, "short input\n");
        exit(2);
    }
    return v;
}

template <class T, class CFG> void run(FILE *in, FILE *out) {
    const unsigned n_in = CFG::in_height * CFG::in_width * CFG::n_chan;
    const unsigned n_out = CFG::out_height * CFG::out_width * CFG::n_chan;
    const double scale = 32.0; // 2^fractional bits of ap_(u)fixed<8,3>
    const int64_t n = read_i64(in);
    std::vector<int64_t> codes(n * n_in), par(n * n_out), str(n * n_out);
    for (int64_t i = 0; i < n * n_in; i++)
        codes[i] = read_i64(in);
    long stray = 0;
    for (int64_t s = 0; s < n; s++) {
        T data[n_in], res[n_out];
        for (unsigned i = 0; i < n_in; i++)
            data[i] = T(double(codes[s * n_in + i]) / scale);
        nnet::qflow_max_pool<T, T, CFG>(data, res);
        for (unsigned i = 0; i < n_out; i++)
            par[s * n_out + i] = int64_t(res[i].to_double() * scale);

        hls::stream<nnet::array<T, CFG::n_chan>> in_stream("in"), out_stream("out");
        for (unsigned p = 0; p < CFG::in_height * CFG::in_width; p++) {
            nnet::array<T, CFG::n_chan> pixel;
            for (unsigned c = 0; c < CFG::n_chan; c++)
                pixel[c] = data[p * CFG::n_chan + c];
            in_stream.write(pixel);
        }
        nnet::qflow_max_pool<nnet::array<T, CFG::n_chan>, nnet::array<T, CFG::n_chan>, CFG>(in_stream,
                                                                                            out_stream);
        for (unsigned p = 0; p < CFG::out_height * CFG::out_width; p++) {
            if (out_stream.empty()) {
                stray++;
                continue;
            }
            nnet::array<T, CFG::n_chan> pixel = out_stream.read();
            for (unsigned c = 0; c < CFG::n_chan; c++)
                str[s * n_out + p * CFG::n_chan + c] = int64_t(pixel[c].to_double() * scale);
        }
        stray += long(in_stream.size()) + long(out_stream.size());
    }
    fwrite(par.data(), sizeof(int64_t), par.size(), out);
    fwrite(str.data(), sizeof(int64_t), str.size(), out);
    printf("%u %u %u %u %u %u %u %u %u %u %u %ld\n", CFG::in_height, CFG::in_width, CFG::n_chan,
           CFG::pool_height, CFG::pool_width, CFG::stride_height, CFG::stride_width, CFG::pad_top,
           CFG::pad_left, CFG::out_height, CFG::out_width, stray);
}

#define GEOMETRY(H, W, C, KH, KW, SH, SW, PT, PL, OH, OW, SIGNED)                                            \
    run<typename std::conditional<SIGNED, ap_fixed<8, 3>, ap_ufixed<8, 3>>::type,                             \
        geometry<H, W, C, KH, KW, SH, SW, PT, PL, OH, OW>>(in, out);

int main(int argc, char **argv) {
    if (argc != 3) {
        fprintf(stderr, "usage: max_pool IN OUT\n");
        return 2;
    }
    FILE *in = fopen(argv[1], "rb");
    FILE *out = fopen(argv[2], "wb");
    if (!in || !out) {
        fprintf(stderr, "cannot open the files\n");
        return 2;
    }
    MAX_POOL_GEOMETRIES
    fclose(out);
    fclose(in);
    return 0;
}
