// gn_stats + gn_apply (the split GroupNorm forward the backend launches) against a double
// two-pass reference, with and without SiLU, H·W a multiple of 4 (float4 path) or not. See run.sh.
#include "all_kernels.cpp"
#include <random>
#include <string>
static std::mt19937 rng_(11);
static int fails = 0;
static void test(int N, int C, int H, int W, int groups, int chunks, bool silu) {
    std::normal_distribution<float> d(0.5f, 2.0f);
    const long long hw = (long long)H * W, cg = C / groups, len = cg * hw;
    std::vector<float> x((size_t)N * C * hw), gm(C), bt(C);
    for (auto& v : x) v = d(rng_);
    for (int c = 0; c < C; ++c) { gm[c] = 1.0f + 0.1f * c; bt[c] = 0.05f * c - 0.3f; }
    std::vector<double> ref(x.size());
    for (int n = 0; n < N; ++n) for (int g = 0; g < groups; ++g) {
        const float* xs = x.data() + ((size_t)n * groups + g) * len;
        double m = 0; for (long long j = 0; j < len; ++j) m += xs[j]; m /= len;
        double v = 0; for (long long j = 0; j < len; ++j) v += (xs[j] - m) * (xs[j] - m); v /= len;
        for (long long j = 0; j < len; ++j) {
            int c = g * cg + j / hw; double z = (xs[j] - m) / sqrt(v + 1e-6) * gm[c] + bt[c];
            ref[((size_t)n * groups + g) * len + j] = silu ? z / (1 + exp(-z)) : z; } }
    std::vector<double> part((size_t)N * groups * chunks * 2, NAN);
    std::vector<float> out(x.size(), NAN);
    launch({(unsigned)(N * groups), (unsigned)chunks, 1}, {256}, [&] { gn_stats(x.data(), part.data(), len, chunks); });
    launch({(unsigned)(N * C), (unsigned)((hw + 4095) / 4096), 1}, {256}, [&] {
        gn_apply(x.data(), part.data(), gm.data(), bt.data(), out.data(), C, groups, hw, chunks, 1e-6, silu); });
    double num = 0, den = 0; bool finite = true;
    for (size_t i = 0; i < out.size(); ++i) { finite &= std::isfinite(out[i]); num += (out[i] - ref[i]) * (out[i] - ref[i]); den += ref[i] * ref[i]; }
    double e = finite ? sqrt(num / den) : INFINITY; bool ok = e <= 1e-6; fails += !ok;
    printf("gn split N%d C%d %dx%d g%d chunks%d silu%d      %10.3e %s\n", N, C, H, W, groups, chunks, silu, e, ok ? "ok" : "FAIL");
}
int main() {
    test(2, 8, 64, 72, 4, 3, true);   // float4 path, 2 apply blocks per channel
    test(1, 6, 5, 7, 3, 2, false);    // scalar path
    test(3, 4, 4, 4, 2, 1, true);
    printf("%d failures\n", fails);
    return fails != 0;
}
