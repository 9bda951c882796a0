// GroupNorm(+SiLU) backward: the split kernels (gn_stats-free path gn_bwd_xsums → gn_bwd_fold_x →
// gn_bwd_dsums → gn_bwd_fold_d → gn_bwd_dx, then gn_backward_params) and the single-block
// gn_backward, both against a plain double reference with the CPU backend's formulas
// (src/backend/cpu/norm.rs group_norm_backward). Outputs and workspaces start as NaN, so a
// missed element shows. Shapes: H·W a multiple of 4 (float4) or odd, one or many spans per
// channel (more than 32, and a ragged last one), small and large groups, batch 1 and > 1.
#include "all_kernels.cpp"
#include <random>
static std::mt19937 rng_(7);
static int fails = 0;

struct Grads { std::vector<double> dx, dg, db; };

static Grads reference(const std::vector<float>& x, const std::vector<float>& dy, const std::vector<float>& gm,
                       const std::vector<float>& bt, int N, int C, long long hw, int groups, bool silu) {
    const long long cg = C / groups, len = cg * hw;
    Grads r{std::vector<double>(x.size()), std::vector<double>(C), std::vector<double>(C)};
    for (int n = 0; n < N; ++n) for (int g = 0; g < groups; ++g) {
        const size_t base = ((size_t)n * groups + g) * len;
        double m = 0; for (long long j = 0; j < len; ++j) m += x[base + j]; m /= len;
        double v = 0; for (long long j = 0; j < len; ++j) v += (x[base + j] - m) * (x[base + j] - m); v /= len;
        const double rstd = 1 / sqrt(v + 1e-6);
        std::vector<double> gv(len);
        double sg = 0, sgx = 0;
        for (long long j = 0; j < len; ++j) {
            const int c = g * cg + j / hw;
            const double xh = (x[base + j] - m) * rstd;
            double dz = dy[base + j];
            if (silu) { double z = xh * gm[c] + bt[c], s = 1 / (1 + exp(-z)); dz *= s * (1 + z * (1 - s)); }
            r.dg[c] += dz * xh; r.db[c] += dz;
            gv[j] = dz * gm[c]; sg += gv[j]; sgx += gv[j] * xh;
        }
        for (long long j = 0; j < len; ++j) {
            const double xh = (x[base + j] - m) * rstd;
            r.dx[base + j] = rstd * (gv[j] - sg / len - xh * sgx / len);
        }
    }
    return r;
}

template <class T> static double rel(const std::vector<T>& a, const std::vector<double>& ref) {
    double num = 0, den = 0;
    for (size_t i = 0; i < a.size(); ++i) {
        if (!std::isfinite((double)a[i])) return INFINITY;
        num += (a[i] - ref[i]) * (a[i] - ref[i]); den += ref[i] * ref[i];
    }
    return sqrt(num / den);
}

// `span` < 0: the single-block gn_backward; otherwise the split kernels with that span, launched
// as src/backend/cuda/backward.rs group_norm_backward does.
static void test(int N, int C, int H, int W, int groups, int span, bool silu) {
    std::normal_distribution<float> d(0.5f, 2.0f), e(0.0f, 1.0f);
    const long long hw = (long long)H * W, cg = C / groups;
    std::vector<float> x((size_t)N * C * hw), dy(x.size()), gm(C), bt(C);
    for (auto& v : x) v = d(rng_);
    for (auto& v : dy) v = e(rng_);
    for (int c = 0; c < C; ++c) { gm[c] = 1.0f + 0.3f * e(rng_); bt[c] = e(rng_); }
    const Grads ref = reference(x, dy, gm, bt, N, C, hw, groups, silu);

    std::vector<float> dx(x.size(), NAN), dg(C, NAN), db(C, NAN);
    std::vector<double> pg((size_t)N * C, NAN), pb((size_t)N * C, NAN);
    if (span < 0) {
        launch({(unsigned)(N * groups)}, {256}, [&] {
            gn_backward(x.data(), gm.data(), bt.data(), dy.data(), dx.data(), pg.data(), pb.data(), C, groups, hw,
                        1e-6, silu); });
    } else {
        const int spans = (int)((hw + span - 1) / span);
        const long long units = (long long)N * C * spans, ngroups = (long long)N * groups;
        const unsigned ublocks = (unsigned)((units + 7) / 8), gblocks = (unsigned)((ngroups + 7) / 8);
        std::vector<double> part(units * 2, NAN);
        std::vector<float> gstat(ngroups * 4, NAN);
        const double len = (double)(cg * hw);
        launch({ublocks}, {256}, [&] { gn_bwd_xsums(x.data(), part.data(), hw, span, spans, units); });
        launch({gblocks}, {256}, [&] { gn_bwd_fold_x(part.data(), gstat.data(), ngroups, cg * spans, len, 1e-6); });
        std::fill(part.begin(), part.end(), NAN);
        launch({ublocks}, {256}, [&] {
            gn_bwd_dsums(x.data(), dy.data(), gstat.data(), gm.data(), bt.data(), part.data(), C, cg, hw, span,
                         spans, units, silu); });
        launch({gblocks}, {256}, [&] {
            gn_bwd_fold_d(part.data(), gm.data(), gstat.data(), pg.data(), pb.data(), C, cg, spans, ngroups, len); });
        launch({ublocks}, {256}, [&] {
            gn_bwd_dx(x.data(), dy.data(), gstat.data(), gm.data(), bt.data(), dx.data(), C, cg, hw, span, spans,
                      units, silu); });
    }
    launch({(unsigned)((C + 255) / 256)}, {256}, [&] {
        gn_backward_params(pg.data(), pb.data(), dg.data(), db.data(), N, C); });
    const double ex = rel(dx, ref.dx), eg = rel(dg, ref.dg), eb = rel(db, ref.db);
    const bool ok = ex <= 1e-5 && eg <= 1e-5 && eb <= 1e-5;
    fails += !ok;
    printf("gn bwd %-6s N%d C%-2d %3dx%-3d g%d span%-5d silu%d  dx %9.2e dg %9.2e db %9.2e %s\n",
           span < 0 ? "single" : "split", N, C, H, W, groups, span, silu, ex, eg, eb, ok ? "ok" : "FAIL");
}

int main() {
    test(2, 8, 64, 72, 4, 1024, true);   // float4, 5 spans per channel, ragged last span
    test(1, 4, 64, 72, 2, 128, false);   // 36 spans per channel (> one per lane in the folds)
    test(1, 4, 128, 128, 1, 2048, true); // large group (65536), batch 1, 32 units per group
    test(1, 6, 5, 7, 3, 128, false);     // odd H·W, one span per channel
    test(1, 4, 33, 35, 2, 128, true);    // odd H·W, 10 spans, ragged
    test(3, 32, 4, 4, 2, 128, true);     // small H·W, 16 channels per group, batch 3
    test(2, 9, 1, 1, 3, 128, true);      // 1×1
    test(2, 8, 16, 16, 4, -1, true);     // the single-block kernel, kept for small groups
    test(3, 12, 5, 7, 4, -1, false);
    printf("%d failures\n", fails);
    return fails != 0;
}
