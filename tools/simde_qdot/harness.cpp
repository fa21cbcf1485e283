// Runs the AVX-512 copy of the quantized linear kernels (csrc/cpu/linear_qdot_impl.h,
// GLA_VEC_BYTES = 64) and the VNNI tiles of the avx512 and avx2 copies (linear_qdot_tile.h,
// vpdpbusd) on a CPU without AVX-512 or VNNI, through the SIMDe emulation headers, and
// compares them on random matrices: the avx512 copy with the generic one (plain C++; the
// activation rounding must match exactly (int8 values, scales), the products up to the
// float32 rounding of the per-group FMA, generic has no FMA), and each VNNI kernel with the
// same copy's non-VNNI one: bitwise equal outputs (equal integer sums, the same float code).
// How to run: tools/simde_qdot/run.sh
//
// linear.cpp is included whole, built as the emulated test build builds it
// (GLA_EMULATE_AVX512: csrc/cpu/simd/avx512_emulated.h supplies _mm512_* from SIMDe): its
// packer (pack_quantized) and its generic and avx512 kernel copies are the extension's.
#define GLA_EMULATE_AVX512 1
#include "cpu/linear.cpp"

#include <cstdio>
#include <random>

namespace {

uint16_t to_half(float f) { return c10::detail::fp16_ieee_from_fp32_value(f); }

struct Case {
  bool int4;
  int64_t out, in, group, n;
  bool bias, acc;
};

// One random matrix: the emulated AVX-512 kernel vs the generic one. Returns the worst
// |difference| / max|y| (the activation rounding is checked exactly first).
double run_case(const Case& c, std::mt19937& rng) {
  std::uniform_int_distribution<int> q8(-127, 127), q4(0, 255);
  std::normal_distribution<float> nd(0.f, 1.f);
  const int64_t groups = c.in / c.group, qcols = c.int4 ? c.in / 2 : c.in;
  std::vector<uint8_t> q(static_cast<size_t>(c.out * qcols));
  for (auto& v : q) v = static_cast<uint8_t>(c.int4 ? q4(rng) : q8(rng));
  std::vector<uint16_t> sc(static_cast<size_t>(c.out * groups)), off(sc.size());
  for (auto& v : sc) v = to_half(0.01f * (0.5f + std::fabs(nd(rng))));
  for (auto& v : off) v = to_half(-0.08f * std::fabs(nd(rng)));
  std::vector<float> bias(static_cast<size_t>(c.out)), x(static_cast<size_t>(c.n * c.in));
  for (auto& v : bias) v = nd(rng);
  for (auto& v : x) v = nd(rng) * (1.f + 3.f * (std::fabs(nd(rng)) > 2.f));
  const gla::LinearWeight t = c.int4 ? gla::LinearWeight::kInt4 : gla::LinearWeight::kInt8;

  // activation rounding: bitwise the same on both copies
  const auto ge = gla::linear_generic::quantize_acts(x.data(), c.in, c.n, c.in, c.group);
  std::vector<int8_t> gq(ge.q, ge.q + c.n * groups * ge.g4);
  std::vector<float> gd(ge.d, ge.d + 2 * c.n * groups);
  const auto ee = gla::linear_avx512::quantize_acts(x.data(), c.in, c.n, c.in, c.group);
  if (std::memcmp(gq.data(), ee.q, gq.size()) || std::memcmp(gd.data(), ee.d, gd.size() * 4)) {
    std::printf("FAIL activation rounding differs (in %ld group %ld n %ld)\n", (long)c.in,
                (long)c.group, (long)c.n);
    return 1e9;
  }

  auto run = [&](int64_t nr, auto apply) {
    const int64_t panels = (c.out + nr - 1) / nr;
    std::vector<uint8_t> packed(static_cast<size_t>(panels * groups * gla::q_group_bytes(t, nr, c.group)) + 64);
    gla::pack_quantized(q.data(), sc.data(), off.data(), t, c.out, c.in, c.group, nr, packed.data());
    std::vector<float> b(static_cast<size_t>(panels * nr), 0.f);
    std::copy(bias.begin(), bias.end(), b.begin());
    const int64_t ldy = c.out + 3;
    std::vector<float> y(static_cast<size_t>(c.n * ldy), 0.5f);   // acc: adds to 0.5
    apply(packed.data(), c.in, c.out, c.group, c.bias ? b.data() : nullptr, x.data(), c.in, c.n,
          y.data(), ldy, c.acc, int64_t(0), panels);
    for (int64_t r = 0; r < c.n; ++r)   // columns past out are never written
      for (int64_t j = c.out; j < ldy; ++j)
        if (y[r * ldy + j] != 0.5f) return std::vector<float>{};
    return y;
  };
  const auto apply_g = c.int4 ? gla::linear_generic::apply_q4 : gla::linear_generic::apply_q8;
  const auto apply_e = c.int4 ? gla::linear_avx512::apply_q4 : gla::linear_avx512::apply_q8;
  const auto apply_ev = c.int4 ? gla::linear_avx512::vnni::apply_q4 : gla::linear_avx512::vnni::apply_q8;
  const auto apply_2 = c.int4 ? gla::linear_avx2::apply_q4 : gla::linear_avx2::apply_q8;
  const auto apply_2v = c.int4 ? gla::linear_avx2::vnni::apply_q4 : gla::linear_avx2::vnni::apply_q8;
  const auto yg = run(2 * 4, apply_g), ye = run(2 * 16, apply_e), yev = run(2 * 16, apply_ev);
  const auto y2 = run(2 * 8, apply_2), y2v = run(2 * 8, apply_2v);
  if (yg.empty() || ye.empty() || yev.empty() || y2.empty() || y2v.empty()) {
    std::printf("FAIL a kernel wrote past its columns\n");
    return 1e9;
  }
  // VNNI vs the same copy without: bitwise (NaN outputs of non-finite inputs compare as bits)
  if (std::memcmp(ye.data(), yev.data(), ye.size() * 4) || std::memcmp(y2.data(), y2v.data(), y2.size() * 4)) {
    std::printf("FAIL %s VNNI output differs from the non-VNNI one (in %ld group %ld n %ld)\n",
                std::memcmp(ye.data(), yev.data(), ye.size() * 4) ? "avx512" : "avx2", (long)c.in,
                (long)c.group, (long)c.n);
    return 1e9;
  }
  double worst = 0, ymax = 1e-30;
  for (size_t i = 0; i < yg.size(); ++i) {
    worst = std::max(worst, (double)std::fabs(yg[i] - ye[i]));
    ymax = std::max(ymax, (double)std::fabs(yg[i]));
  }
  return worst / ymax;
}

}  // namespace

int main() {
  std::mt19937 rng(1234);
  int fails = 0, cases = 0;
  double worst = 0;
  for (int int4 = 0; int4 < 2; ++int4)
    for (int64_t out : {1, 31, 32, 33, 70, 96})
      for (int64_t group : {32, 64, 20, 6, 2})
        for (int64_t n : {1, 2, 3, 4, 5, 7, 8, 9, 17, 64}) {
          if (int4 && group % 2) continue;
          // in: 3 groups (group 6: 18 columns, not a multiple of 4; group 2: 10)
          const int64_t in = group * (group == 2 ? 5 : 3);
          const Case c{int4 != 0, out, in, group, n, n % 2 == 1, n % 3 == 0};
          const double e = run_case(c, rng);
          ++cases;
          worst = std::max(worst, e);
          if (e > 1e-5) {
            ++fails;
            std::printf("FAIL %s out %ld in %ld group %ld n %ld: rel diff %.3g\n",
                        int4 ? "int4" : "int8", (long)out, (long)in, (long)group, (long)n, e);
          }
        }
  std::printf("%d cases, %d failures, worst |emulated avx512 - generic| / max|y| = %.3g "
              "(VNNI = non-VNNI bitwise, avx512 and avx2)\n", cases, fails, worst);
  return fails ? 1 : 0;
}
