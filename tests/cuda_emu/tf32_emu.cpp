// The tf32 primitives of csrc/cuda/chunk_common.cuh (cvt_rna_tf32, cvt_rn_tf32, cvt_tf32, mma_tf32,
// tf32_split) on the emulator: both roundings on chosen values (ties both ways, just below and
// above, FLT_MAX, subnormals, NaN, inf) and against a float64 reference on random bits; the m16n8k8
// fragment layout that chunk_common.cuh documents against a plain float64 product; the accuracy of
// one tf32 pass (1xTF32) and of the 3xTF32 split over a 16 x 128 x 8 product, with the rounding the
// kernels use on this build's arch (tf32_emu_sm90.cpp: the sm_90 code, rn).
//
//   tf32_emu seed=1 reps=20
// Prints one line per check and PASS/FAIL at the end; exit status 0 on PASS.
#include <cfloat>
#include <random>

#include "emu.h"

#define GLA_CHUNK_EMULATE 1
#include "cuda/chunk_common.cuh"
#include "harness.h"

namespace {

float bits_to_float(uint32_t u) { return __uint_as_float(u); }
uint32_t float_bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return u;
}

struct CvtCase {
  float in, want;
};

bool check_cases(const char* name, uint32_t (*cvt)(float), const CvtCase* cases, int n) {
  bool ok = true;
  for (int i = 0; i < n; ++i) {
    const float got = bits_to_float(cvt(cases[i].in));
    if (float_bits(got) != float_bits(cases[i].want)) {
      std::printf("%s %.9g (0x%08x) -> %.9g, want %.9g\n", name, cases[i].in,
                  float_bits(cases[i].in), got, cases[i].want);
      ok = false;
    }
  }
  // NaN stays NaN (sign kept) with the 13 low bits clear, as the tensor cores read it. (A
  // NaN whose payload lies only in those 13 bits, e.g. 0x7f800001, becomes inf under rna's
  // SASS, which only masks NaN; the GPU's rn is not known there, so neither is checked.)
  for (uint32_t nan : {0x7fc00001u, 0xffc00000u, 0x7fffffffu, 0xff802000u}) {
    const uint32_t r = cvt(bits_to_float(nan));
    if (!std::isnan(bits_to_float(r)) || (r & 0x1fffu) != 0 || (r >> 31) != (nan >> 31)) {
      std::printf("%s NaN 0x%08x -> 0x%08x\n", name, nan, r);
      ok = false;
    }
  }
  return ok;
}

bool check_cvt() {
  const float one = 1.0f, ulp = std::ldexp(1.0f, -10);  // tf32 ulp at 1
  const float sub = std::ldexp(1.0f, -136);             // tf32 ulp among subnormals
  const float tie = 1.0f + ulp / 2, tie_odd = 1.0f + ulp + ulp / 2;
  const CvtCase rna[] = {
      {tie, 1.0f + ulp},                                 // tie: away from zero (RNE gives 1)
      {-tie, -(1.0f + ulp)},
      {tie_odd, 1.0f + 2 * ulp},                         // tie, odd kept bit: away again
      {std::nextafter(tie, 0.0f), one},                  // just below the tie: down
      {std::nextafter(tie, 2.0f), 1.0f + ulp},
      {FLT_MAX, INFINITY},                               // rounds up past the largest tf32
      {-INFINITY, -INFINITY},
      {0.0f, 0.0f},
      {std::ldexp(1.0f, -130), std::ldexp(1.0f, -130)},  // subnormal, kept bit: exact
      {std::ldexp(1.0f, -140), 0.0f},                    // subnormal below half a tf32 ulp
      {sub / 2, sub},                                    // subnormal tie: away
  };
  // cvt.rn (sm_90+): ties to even, everything else as rna
  const CvtCase rn[] = {
      {tie, one},                                        // tie, even kept bit: down
      {-tie, -one},
      {tie_odd, 1.0f + 2 * ulp},                         // tie, odd kept bit: up to even
      {-tie_odd, -(1.0f + 2 * ulp)},
      {std::nextafter(tie, 0.0f), one},
      {std::nextafter(tie, 2.0f), 1.0f + ulp},           // just above the tie: up
      {std::nextafter(tie_odd, 0.0f), 1.0f + ulp},
      {std::nextafter(tie_odd, 2.0f), 1.0f + 2 * ulp},
      {bits_to_float(0x3fffffffu), 2.0f},                // carry into the exponent
      {bits_to_float(0x7f7ff000u), INFINITY},            // tie above the largest tf32: to even
      {bits_to_float(0x7f7fefffu), bits_to_float(0x7f7fe000u)},
      {FLT_MAX, INFINITY},
      {-FLT_MAX, -INFINITY},
      {INFINITY, INFINITY},
      {-INFINITY, -INFINITY},
      {0.0f, 0.0f},
      {-0.0f, -0.0f},
      {std::ldexp(1.0f, -130), std::ldexp(1.0f, -130)},
      {std::ldexp(1.0f, -140), 0.0f},
      {sub / 2, 0.0f},                                   // subnormal tie, even: down to 0
      {-sub / 2, -0.0f},
      {3 * sub / 2, 2 * sub},                            // subnormal tie, odd: up
      {bits_to_float(0x00800000u - 1u), std::ldexp(1.0f, -126)},  // largest subnormal
  };
  bool ok = check_cases("cvt_rna_tf32", cvt_rna_tf32, rna, sizeof(rna) / sizeof(rna[0]));
  std::printf("cvt_rna_tf32 %s\n", ok ? "ok" : "WRONG");
  const bool ok_rn = check_cases("cvt_rn_tf32", cvt_rn_tf32, rn, sizeof(rn) / sizeof(rn[0]));
  std::printf("cvt_rn_tf32 %s\n", ok_rn ? "ok" : "WRONG");
  return ok && ok_rn;
}

// Both roundings against an independent float64 reference on random finite bit patterns
// (every binade, subnormals included): x / u rounded to an integer, u = x's tf32 ulp.
bool check_cvt_random(std::mt19937& rng, int n) {
  std::uniform_int_distribution<uint32_t> bits(0u, 0xffffffffu);
  int bad_rn = 0, bad_rna = 0;
  for (int i = 0; i < n; ++i) {
    uint32_t u = bits(rng);
    if (i % 4 == 0) u = (u & ~0x1fffu) | 0x1000u;  // a quarter exact ties
    const float x = bits_to_float(u);
    if (!std::isfinite(x)) continue;
    const int e = x == 0.0f ? -126 : std::max(std::ilogb(x), -126);
    const double ulp = std::ldexp(1.0, e - 10), y = static_cast<double>(x) / ulp;
    const double rn = std::nearbyint(y) * ulp, rna = std::round(y) * ulp;  // to even / away
    const auto want = [](double r, float x) {
      return std::fabs(r) >= std::ldexp(1.0, 128) ? std::copysign(INFINITY, x)
                                                  : std::copysign(static_cast<float>(r), x);
    };
    bad_rn += cvt_rn_tf32(x) != float_bits(want(rn, x));
    bad_rna += cvt_rna_tf32(x) != float_bits(want(rna, x));
  }
  std::printf("cvt_random n=%d rn_wrong=%d rna_wrong=%d\n", n, bad_rn, bad_rna);
  return bad_rn == 0 && bad_rna == 0;
}

// The rounding this build's kernels use (cvt_tf32 picks by __CUDA_ARCH__): "rn" or "rna".
const char* kernel_rounding() {
  const float tie = 1.0f + std::ldexp(1.0f, -11);
  const uint32_t r = gla::cvt_tf32(tie);
  return r == cvt_rn_tf32(tie) ? "rn" : (r == cvt_rna_tf32(tie) ? "rna" : "other");
}

// D (16x8) = C + A (16xKD) @ B (KDx8) on one warp, 8 key dims per mma; mode 0: operands rounded by
// cvt_tf32 (this build's arch), 1: raw float32 bits (the tensor cores truncate), 3: 3xTF32.
template <int KD>
void warp_product(const float (&A)[16][KD], const float (&B)[KD][8], const float (&C)[16][8],
                  int mode, float (&D)[16][8]) {
  emu::run_block({0, 0, 0}, 32, [&] {
    const int lane = static_cast<int>(threadIdx.x), g = lane >> 2, c = lane & 3;
    float d[4];
    for (int e = 0; e < 4; ++e) d[e] = C[g + (e >= 2 ? 8 : 0)][2 * c + (e & 1)];
    for (int k0 = 0; k0 < KD; k0 += 8) {
      const float av[4] = {A[g][k0 + c], A[g + 8][k0 + c], A[g][k0 + c + 4],
                           A[g + 8][k0 + c + 4]};
      const float bv[2] = {B[k0 + c][g], B[k0 + c + 4][g]};
      uint32_t ah[4], al[4], bh[2], bl[2];
      for (int i = 0; i < 4; ++i) {
        if (mode == 1) ah[i] = float_bits(av[i]);
        else if (mode == 0) ah[i] = gla::cvt_tf32(av[i]);
        else gla::tf32_split(av[i], ah[i], al[i]);
      }
      for (int i = 0; i < 2; ++i) {
        if (mode == 1) bh[i] = float_bits(bv[i]);
        else if (mode == 0) bh[i] = gla::cvt_tf32(bv[i]);
        else gla::tf32_split(bv[i], bh[i], bl[i]);
      }
      if (mode == 3) {  // small terms first
        mma_tf32(d, al, bh[0], bh[1]);
        mma_tf32(d, ah, bl[0], bl[1]);
      }
      mma_tf32(d, ah, bh[0], bh[1]);
    }
    for (int e = 0; e < 4; ++e) D[g + (e >= 2 ? 8 : 0)][2 * c + (e & 1)] = d[e];
  });
}

// Relative Frobenius error of D against C + op(A) @ op(B) in float64, op = identity or a
// per-element rounding.
template <int KD, typename Op>
double rel_err(const float (&A)[16][KD], const float (&B)[KD][8], const float (&C)[16][8],
               const float (&D)[16][8], Op op, double* max_abs) {
  double e2 = 0, r2 = 0;
  *max_abs = 0;
  for (int i = 0; i < 16; ++i)
    for (int j = 0; j < 8; ++j) {
      double acc = C[i][j];
      for (int k = 0; k < KD; ++k) acc += op(A[i][k]) * op(B[k][j]);
      const double diff = D[i][j] - acc;
      e2 += diff * diff;
      r2 += acc * acc;
      *max_abs = std::max(*max_abs, std::fabs(diff) / std::max(std::fabs(acc), 1e-30));
    }
  return std::sqrt(e2 / r2);
}

}  // namespace

int main(int argc, char** argv) {
  auto kv = harness::parse_args(argc, argv, {{"seed", "1"}, {"reps", "20"}});
  std::mt19937 rng(static_cast<unsigned>(std::stoul(kv["seed"])));
  std::normal_distribution<float> normal(0.0f, 1.0f);
  bool ok = check_cvt();
  ok = check_cvt_random(rng, 1 << 20) && ok;
  std::printf("arch=%d kernel_rounding=%s\n", __CUDA_ARCH__, kernel_rounding());

  constexpr int KD = 128;
  static float A[16][KD], B[KD][8], C[16][8], D[16][8];
  double worst_layout = 0, worst_trunc_gap = 1e30, worst3 = 0, worst1 = 0, best1 = 1e30;
  const int reps = std::stoi(kv["reps"]);
  for (int rep = 0; rep < reps; ++rep) {
    const float sa = std::ldexp(1.0f, rep % 7 - 3);  // operands over a few binades
    for (auto& r : A)
      for (float& x : r) x = normal(rng) * sa;
    for (auto& r : B)
      for (float& x : r) x = normal(rng);
    for (auto& r : C)
      for (float& x : r) x = normal(rng);
    double m;
    const auto rna = [](float x) { return static_cast<double>(bits_to_float(gla::cvt_tf32(x))); };
    const auto trunc = [](float x) { return static_cast<double>(bits_to_float(float_bits(x) & 0xffffe000u)); };
    const auto exact = [](float x) { return static_cast<double>(x); };
    // layout: one pass on rna-rounded operands equals the float64 product of those operands
    // up to the accumulator's rounding (each mma rounds its sum to float once)
    warp_product<KD>(A, B, C, 0, D);
    worst_layout = std::max(worst_layout, rel_err<KD>(A, B, C, D, rna, &m));
    const double e1 = rel_err<KD>(A, B, C, D, exact, &m);
    worst1 = std::max(worst1, e1), best1 = std::min(best1, e1);
    // raw float32 operands: the emulated tensor cores truncate them
    warp_product<KD>(A, B, C, 1, D);
    const double vs_trunc = rel_err<KD>(A, B, C, D, trunc, &m);
    const double vs_rna = rel_err<KD>(A, B, C, D, rna, &m);
    worst_layout = std::max(worst_layout, vs_trunc);
    worst_trunc_gap = std::min(worst_trunc_gap, vs_rna / std::max(vs_trunc, 1e-300));
    warp_product<KD>(A, B, C, 3, D);
    worst3 = std::max(worst3, rel_err<KD>(A, B, C, D, exact, &m));
  }
  // 16 float roundings of partial sums (one per mma): ~2^-24 each, relative to |D| ~ sqrt(KD)
  const bool layout_ok = worst_layout < 1e-6;
  const bool trunc_ok = worst_trunc_gap > 10;  // raw operands are not what rna gives
  const bool one_ok = worst1 < 2e-3 && best1 > 1e-5;  // a real tf32 pass: ~1e-4, not fp32
  const bool three_ok = worst3 < 2e-6;
  std::printf("layout_rel=%.3e trunc_vs_rna_ratio=%.1f tf32x1_rel=[%.3e,%.3e] tf32x3_rel=%.3e\n",
              worst_layout, worst_trunc_gap, best1, worst1, worst3);
  ok = ok && layout_ok && trunc_ok && one_ok && three_ok;
  std::printf("%s\n", ok ? "PASS" : "FAIL");
  return ok ? 0 : 1;
}
