// Runs the chunk kernels' cumulative gate sum (gate_cumsum in csrc/cuda/chunk_common.cuh) on
// the emulator and compares it bitwise with an independent host reference of the same order
// written with std::fma: a GPU computes each step as one FFMA, so the emulator must too for
// its bitwise checks (fused == split) to be about the GPU's arithmetic.
//
//   gate_sum_emu seed=1 chunks=200
// Prints "mismatch=M unfused_differs=D total=N" and PASS when M == 0; D counts the sums that a
// multiply-then-add reference gets differently (the test asserts D > 0, so a non-fused
// gate_step could not pass).
#include <random>

#include "emu.h"

#define GLA_CHUNK_EMULATE 1
#include "cuda/chunk_common.cuh"
#include "harness.h"

namespace {

constexpr int KT = 64, STRIDE = KT + 8, NTHREADS = 128;

// Reference of one chunk's column: kGateSegs segments of kGateRows running sums from 0, then
// segment q adds ((t0 + t1) + t2) truncated to its first q totals. fused picks fma or mul+add.
void reference(const float* g, float* b, bool fused) {
  float tot[gla::kGateSegs];
  for (int seg = 0; seg < gla::kGateSegs; ++seg) {
    float run = 0.0f;
    for (int r = 0; r < gla::kGateRows; ++r) {
      const int t = seg * gla::kGateRows + r;
      const float x = g[t] < gla::kGateFloor ? gla::kGateFloor : g[t];
      if (fused) {
        run = std::fma(x, gla::kLog2e, run);
      } else {
        volatile float p = x * gla::kLog2e;  // rounded product, then the add
        run = run + p;
      }
      b[t] = run;
    }
    tot[seg] = run;
  }
  for (int seg = 1; seg < gla::kGateSegs; ++seg) {
    float pre = tot[0];
    if (seg >= 2) pre = pre + tot[1];
    if (seg >= 3) pre = pre + tot[2];
    for (int r = 0; r < gla::kGateRows; ++r) b[seg * gla::kGateRows + r] += pre;
  }
}

bool same_bits(float x, float y) {
  if (std::isnan(x) || std::isnan(y)) return std::isnan(x) && std::isnan(y);
  return std::memcmp(&x, &y, 4) == 0;
}

}  // namespace

int main(int argc, char** argv) {
  auto kv = harness::parse_args(argc, argv, {{"seed", "1"}, {"chunks", "200"}});
  std::mt19937 rng(static_cast<unsigned>(std::stoul(kv["seed"])));
  const int chunks = std::stoi(kv["chunks"]);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> unif(0.0f, 1.0f);
  long mismatch = 0, unfused_differs = 0, total = 0;
  std::vector<float> g(gla::kC * KT), col(gla::kC), ref(gla::kC), ref_unfused(gla::kC);
  for (int ch = 0; ch < chunks; ++ch) {
    // log-sigmoid-like gates of varied size; a few adversarial values (-inf, NaN, huge)
    for (float& x : g) {
      const float u = unif(rng);
      x = -std::log1p(std::exp(-normal(rng) * 3.0f)) * (u < 0.5f ? 1.0f : 0.01f);
      if (u > 0.998f) x = -INFINITY;
      else if (u > 0.997f) x = NAN;
      else if (u > 0.995f) x = -3e38f;
    }
    float* const sB = reinterpret_cast<float*>(gla::smem);
    float* const sTot = sB + gla::kC * STRIDE;
    emu::st().reverse = (ch & 1) != 0;
    emu::run_block({0, 0, 0}, NTHREADS, [&] {
      const int tid = static_cast<int>(threadIdx.x);
      for (int i = tid; i < gla::kC * KT; i += NTHREADS)
        sB[(i / KT) * STRIDE + i % KT] = g[i];
      __syncthreads();
      gla::gate_cumsum<KT, STRIDE, NTHREADS>(sB, sTot, tid);
    });
    for (int c = 0; c < KT; ++c) {
      for (int t = 0; t < gla::kC; ++t) col[t] = g[t * KT + c];
      reference(col.data(), ref.data(), true);
      reference(col.data(), ref_unfused.data(), false);
      for (int t = 0; t < gla::kC; ++t) {
        const float got = sB[t * STRIDE + c];
        mismatch += !same_bits(got, ref[t]);
        unfused_differs += !same_bits(ref_unfused[t], ref[t]);
        ++total;
      }
    }
  }
  std::printf("mismatch=%ld unfused_differs=%ld total=%ld %s\n", mismatch, unfused_differs,
              total, mismatch == 0 ? "PASS" : "FAIL");
  return mismatch == 0 ? 0 : 1;
}
