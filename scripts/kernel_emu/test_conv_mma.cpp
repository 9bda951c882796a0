// The pipelined bf16 conv (conv_bf16_mma / _n64 + conv_pack_bf16) against a double reference
// computed from bf16-rounded operands (so only the f32 accumulation order differs: tight bound)
// and from the raw f32 operands (the selftest's bf16 bound). See run.sh.
#include "all_kernels.cpp"
#include <random>
#include <string>
static std::mt19937 rng_(7);
static std::vector<float> randv(size_t n, float s = 1.f) {
    std::normal_distribution<float> d(0, s); std::vector<float> v(n); for (auto& x : v) x = d(rng_); return v; }
static float rbf(float f) { return bf16_val(bf16_bits(f)); }
static int fails = 0;
static double relerr(const std::vector<float>& a, const std::vector<double>& b) {
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); ++i) { if (!std::isfinite(a[i])) return INFINITY; num += (a[i] - b[i]) * (a[i] - b[i]); den += b[i] * b[i]; }
    return den == 0 ? (num == 0 ? 0 : INFINITY) : sqrt(num / den); }
static void report(const std::string& name, double e, double bound) {
    bool ok = e <= bound; if (!ok) ++fails; printf("%-60s %10.3e %s\n", name.c_str(), e, ok ? "ok" : "FAIL"); }

// nin_layout: weights stored (in, out) like the NIN layer (k = 1 only).
// fused: with a per-(sample, channel) bias and a residual (alpha 0.7, beta 0.6) in the epilogue.
static void test(int N, int C, int H, int W, int O, int k, int s, int p, bool bias, int bn, int splits,
                 bool nin_layout = false, bool fused = false, int nhwc = 0) {  // nhwc: 0 NCHW, 1 NHWC, 2 NHWC k64
    const int OH = (H + 2 * p - k) / s + 1, OW = (W + 2 * p - k) / s + 1, K = C * k * k, KHW = k * k;
    auto x = randv((size_t)N * C * H * W), w = randv((size_t)O * K, 1.f / sqrtf(K)), b = randv(O);
    auto A = [&](int m, int kk) { return nin_layout ? w[(size_t)kk * O + m] : w[(size_t)m * K + kk]; };
    std::vector<double> ref_r((size_t)N * O * OH * OW), ref((size_t)N * O * OH * OW);
    for (int n = 0; n < N; ++n) for (int o = 0; o < O; ++o) for (int oy = 0; oy < OH; ++oy) for (int ox = 0; ox < OW; ++ox) {
        double a = bias ? b[o] : 0, ar = a;
        for (int c = 0; c < C; ++c) for (int ky = 0; ky < k; ++ky) for (int kx = 0; kx < k; ++kx) {
            int iy = oy * s - p + ky, ix = ox * s - p + kx; if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
            float wv = A(o, (c * k + ky) * k + kx), xv = x[(((size_t)n * C + c) * H + iy) * W + ix];
            a += (double)wv * xv; ar += (double)rbf(wv) * rbf(xv); }
        size_t i = (((size_t)n * O + o) * OH + oy) * OW + ox; ref[i] = a; ref_r[i] = ar; }
    std::vector<float> cb, res;
    const float alpha = 0.7f, beta = 0.6f;
    if (fused) {
        cb = randv((size_t)N * O); res = randv(ref.size());
        for (size_t i = 0; i < ref.size(); ++i) {
            const size_t n = i / ((size_t)O * OH * OW), o = i / ((size_t)OH * OW) % O;
            ref[i] = alpha * (ref[i] + cb[n * O + o]) + beta * res[i];
            ref_r[i] = alpha * (ref_r[i] + cb[n * O + o]) + beta * res[i]; } }
    ConvEpi epi{fused ? cb.data() : nullptr, fused ? res.data() : nullptr, alpha, beta};
    ConvEpi none{nullptr, nullptr, 1.f, 0.f};
    const int bk = nhwc == 2 ? 64 : 32;
    const int mp = (O + 127) / 128 * 128, cp = (C + bk - 1) / bk * bk, cs = (C + 63) / 64 * 64;
    std::vector<unsigned> wp((size_t)mp * KHW * cp / 2, 0xFFFFFFFFu);
    launch({3, 1, 1}, {256}, [&] { conv_pack_bf16(w.data(), wp.data(), O, mp, KHW, C, cp, nin_layout ? 1LL : (long long)K, nin_layout ? (long long)O : 1LL); });
    const int tiles = KHW * cp / bk, per = (tiles + splits - 1) / splits, gz = (tiles + per - 1) / per;
    ConvGeom g{N, C, H, W, O, OH, OW, k, k, s, p, 0, 0, 0};
    const long long P = (long long)N * OH * OW, numel = (long long)ref.size();
    std::vector<float> out(numel, NAN), ws((size_t)numel * gz, NAN);
    float* dst = gz > 1 ? ws.data() : out.data();
    const float* bp = gz > 1 ? nullptr : (bias ? b.data() : nullptr);
    dim3 grid{(unsigned)((P + bn - 1) / bn), (unsigned)(mp / 128), (unsigned)gz};
    if (nhwc) {
        // The input as bf16 [N][H][W][cp] (poisoned first: the padding channels must be written).
        std::vector<unsigned> xh((size_t)N * H * W * cs / 2, 0xFFFFFFFFu);
        const long long HW = (long long)H * W;
        launch({(unsigned)(((HW + 31) / 32) * ((cs + 63) / 64)), (unsigned)N, 1}, {256},
               [&] { conv_to_nhwc_bf16(x.data(), xh.data(), C, cs, HW); });
        size_t bad = 0;
        for (int n = 0; n < N; ++n) for (long long q = 0; q < HW; ++q) for (int c = 0; c < cs; ++c) {
            const unsigned u = xh[((size_t)(n * HW + q) * cs + c) / 2];
            const float v = bf16_val((uint16_t)(c % 2 ? u >> 16 : u & 0xFFFF));
            const float want = c < C ? rbf(x[((size_t)n * C + c) * HW + q]) : 0.f;
            if (!(v == want)) ++bad; }
        report("to_nhwc_bf16 N" + std::to_string(N) + " C" + std::to_string(C) + " HW" + std::to_string(HW) + " (mismatches)", (double)bad, 0);
        auto kern = nhwc == 2 ? (bn == 128 ? conv_bf16_nhwc_k64 : conv_bf16_nhwc_k64_n64)
                              : (bn == 128 ? conv_bf16_nhwc : conv_bf16_nhwc_n64);
        launch(grid, {256}, [&] { kern(xh.data(), wp.data(), bp, dst, g, per, gz > 1 ? none : epi); });
    } else {
        launch(grid, {256}, [&] { (bn == 128 ? conv_bf16_mma : conv_bf16_mma_n64)(x.data(), wp.data(), bp, dst, g, per, gz > 1 ? none : epi); });
    }
    if (gz > 1) launch({4, 1, 1}, {256}, [&] { conv_splitk_reduce_epi(ws.data(), bias ? b.data() : nullptr, out.data(), numel, gz, O, (long long)OH * OW, epi); });
    char name[160];
    snprintf(name, sizeof name, "%s bf16 %s/%d N%d C%d %dx%d O%d k%d s%d p%d split%d%s", nin_layout ? "nin" : "conv", nhwc == 2 ? "nhwc-k64" : nhwc ? "nhwc" : "mma", bn, N, C, H, W, O, k, s, p, gz, fused ? " +epi" : "");
    report(std::string(name) + " vs rounded", relerr(out, ref_r), 1e-5);
    report(std::string(name) + " vs f32", relerr(out, ref), 2e-2);
}

// conv_dw_bf16_mma(_n64) + conv_dw_reduce: the weight gradient of a conv (OIHW) or NIN ((in, out)).
static void test_dw(int N, int C, int H, int W, int O, int k, int s, int p, int bn, int splits, bool nin_layout = false,
                    bool nhwc = false) {
    const int OH = (H + 2 * p - k) / s + 1, OW = (W + 2 * p - k) / s + 1, KHW = k * k, K = C * KHW;
    auto x = randv((size_t)N * C * H * W), dy = randv((size_t)N * O * OH * OW);
    std::vector<double> ref((size_t)O * K, 0.0), ref_r((size_t)O * K, 0.0);
    for (int n = 0; n < N; ++n) for (int o = 0; o < O; ++o) for (int oy = 0; oy < OH; ++oy) for (int ox = 0; ox < OW; ++ox) {
        const float d = dy[(((size_t)n * O + o) * OH + oy) * OW + ox];
        for (int c = 0; c < C; ++c) for (int ky = 0; ky < k; ++ky) for (int kx = 0; kx < k; ++kx) {
            int iy = oy * s - p + ky, ix = ox * s - p + kx; if (iy < 0 || iy >= H || ix < 0 || ix >= W) continue;
            const float xv = x[(((size_t)n * C + c) * H + iy) * W + ix];
            const size_t i = nin_layout ? (size_t)c * O + o : (size_t)o * K + (c * k + ky) * k + kx;
            ref[i] += (double)d * xv; ref_r[i] += (double)rbf(d) * rbf(xv); } }
    const long long P = (long long)N * OH * OW;
    const long long chunk = ((P + splits - 1) / splits + 31) / 32 * 32;
    const int gz = (int)((P + chunk - 1) / chunk);
    ConvGeom g{N, C, H, W, O, OH, OW, k, k, s, p, (int)chunk, 0, 0};
    std::vector<float> ws((size_t)gz * O * K, NAN), out((size_t)O * K, NAN);
    const int ctiles = (C + bn - 1) / bn;
    if (nhwc) {
        const int cpx = (C + 63) / 64 * 64, cpo = (O + 63) / 64 * 64;
        const long long HW = (long long)H * W, OHW = (long long)OH * OW;
        std::vector<unsigned> xh((size_t)N * HW * cpx / 2, 0xFFFFFFFFu), dyh((size_t)N * OHW * cpo / 2, 0xFFFFFFFFu);
        launch({(unsigned)(((HW + 31) / 32) * ((cpx + 63) / 64)), (unsigned)N, 1}, {256},
               [&] { conv_to_nhwc_bf16(x.data(), xh.data(), C, cpx, HW); });
        launch({(unsigned)(((OHW + 31) / 32) * ((cpo + 63) / 64)), (unsigned)N, 1}, {256},
               [&] { conv_to_nhwc_bf16(dy.data(), dyh.data(), O, cpo, OHW); });
        launch({(unsigned)(KHW * ctiles), (unsigned)((O + 127) / 128), (unsigned)gz}, {256}, [&] {
            (bn == 128 ? conv_dw_nhwc : conv_dw_nhwc_n64)(xh.data(), dyh.data(), ws.data(), g); });
    } else {
        launch({(unsigned)(KHW * ctiles), (unsigned)((O + 127) / 128), (unsigned)gz}, {256}, [&] {
            (bn == 128 ? conv_dw_bf16_mma : conv_dw_bf16_mma_n64)(x.data(), dy.data(), ws.data(), g); });
    }
    launch({4, 1, 1}, {256}, [&] { conv_dw_reduce(ws.data(), out.data(), O, K, gz, nin_layout ? 1LL : (long long)K, nin_layout ? (long long)O : 1LL); });
    char name[160];
    snprintf(name, sizeof name, "%s dw bf16 %s/%d N%d C%d %dx%d O%d k%d s%d p%d slices%d", nin_layout ? "nin" : "conv", nhwc == 2 ? "nhwc-k64" : nhwc ? "nhwc" : "mma", bn, N, C, H, W, O, k, s, p, gz);
    report(std::string(name) + " vs rounded", relerr(out, ref_r), 1e-5);
    report(std::string(name) + " vs f32", relerr(out, ref), 2e-2);
}

// linear_warp (one warp per output) against a double reference.
static void test_linear(int N, int I, int O, bool bias) {
    auto x = randv((size_t)N * I), w = randv((size_t)O * I), b = randv(O);
    std::vector<double> ref((size_t)N * O);
    for (int n = 0; n < N; ++n) for (int o = 0; o < O; ++o) {
        double a = bias ? b[o] : 0; for (int i = 0; i < I; ++i) a += (double)x[(size_t)n * I + i] * w[(size_t)o * I + i];
        ref[(size_t)n * O + o] = a; }
    std::vector<float> y(ref.size(), NAN);
    launch({2, 1, 1}, {256}, [&] { linear_warp(x.data(), w.data(), bias ? b.data() : nullptr, y.data(), N, I, O); });
    char name[96]; snprintf(name, sizeof name, "linear warp N%d I%d O%d%s", N, I, O, bias ? " +b" : "");
    report(name, relerr(y, ref), 1e-6);
}

int main() {
    test_linear(3, 37, 19, true);   // 57 warps over 16: the grid-stride loop
    test_linear(2, 512, 8, false);


    test_dw(2, 20, 7, 9, 72, 3, 1, 1, 64, 1);
    test_dw(1, 70, 9, 9, 136, 3, 2, 0, 128, 3);   // stride 2, two M tiles, C off the tile, slices
    test_dw(3, 48, 4, 5, 40, 1, 1, 0, 64, 2, true);  // NIN layout
    test_dw(2, 40, 12, 12, 64, 3, 1, 1, 128, 5);  // five pixel slices, partial last step
    test_dw(2, 20, 7, 9, 72, 3, 1, 1, 64, 1, false, true);  // the NHWC-input kernels, same shapes
    test_dw(1, 70, 9, 9, 136, 3, 2, 0, 128, 3, false, true);
    test_dw(3, 48, 4, 5, 40, 1, 1, 0, 64, 2, true, true);
    test_dw(2, 40, 12, 12, 64, 3, 1, 1, 128, 5, false, true);
    test_dw(2, 150, 6, 7, 200, 3, 1, 1, 128, 2, false, true);  // two channel tiles, M off the tile

    test(1, 32, 8, 8, 128, 3, 1, 1, true, 128, 1);
    test(2, 40, 7, 9, 72, 3, 1, 1, true, 128, 1);    // C, O, P off the tiles; partial pixel tile
    test(1, 64, 9, 9, 136, 3, 2, 0, false, 64, 1);   // stride 2, two M tiles
    test(1, 96, 5, 6, 64, 3, 1, 1, true, 64, 4);     // split-K (27 tiles over 4 parts)
    test(3, 48, 4, 4, 40, 1, 1, 0, true, 128, 1, true);  // NIN layout
    test(1, 16, 6, 5, 24, 1, 1, 0, false, 64, 2);    // 1×1 conv, C < tile, split
    test(2, 40, 7, 9, 72, 3, 1, 1, true, 128, 1, false, true);  // fused epilogue
    test(2, 96, 5, 6, 64, 3, 1, 1, true, 64, 4, false, true);   // fused epilogue through split-K
    // The NHWC input path: same shapes (pixel tiles spanning samples and rows, padding channels,
    // stride 2, split-K, NIN layout, the fused epilogue).
    test(1, 32, 8, 8, 128, 3, 1, 1, true, 128, 1, false, false, true);
    test(2, 40, 7, 9, 72, 3, 1, 1, true, 128, 1, false, false, true);
    test(1, 64, 9, 9, 136, 3, 2, 0, false, 64, 1, false, false, true);
    test(1, 96, 5, 6, 64, 3, 1, 1, true, 64, 4, false, false, true);
    test(3, 48, 4, 4, 40, 1, 1, 0, true, 128, 1, true, false, true);
    test(1, 16, 6, 5, 24, 1, 1, 0, false, 64, 2, false, false, true);
    test(2, 96, 5, 6, 64, 3, 1, 1, true, 64, 4, false, true, true);
    test(2, 72, 11, 10, 40, 3, 1, 1, true, 128, 1, false, true, true);
    // The same on the 64-channel-K-tile kernels.
    test(1, 32, 8, 8, 128, 3, 1, 1, true, 128, 1, false, false, 2);
    test(2, 40, 7, 9, 72, 3, 1, 1, true, 128, 1, false, false, 2);
    test(1, 64, 9, 9, 136, 3, 2, 0, false, 64, 1, false, false, 2);
    test(1, 96, 5, 6, 64, 3, 1, 1, true, 64, 4, false, false, 2);
    test(3, 48, 4, 4, 40, 1, 1, 0, true, 128, 1, true, false, 2);
    test(1, 16, 6, 5, 24, 1, 1, 0, false, 64, 2, false, false, 2);
    test(2, 96, 5, 6, 64, 3, 1, 1, true, 64, 4, false, true, 2);
    test(2, 72, 11, 10, 40, 3, 1, 1, true, 128, 1, false, true, 2);
    printf("%d failures\n", fails);
    return fails != 0;
}
