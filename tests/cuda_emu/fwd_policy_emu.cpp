// The chunked forward launcher's fused / split choice (csrc/cuda/chunk_fwd.cu's want_split) for
// one shape, without running a kernel: want_split reads only the sizes, so shapes far larger
// than the emulator could run (T = 16384) are checked. tests/test_cuda_fwd_policy_emu.py.
//
//   fwd_policy_emu dtype=f32|bf16 B=4 T=2048 H=16 K=128 V=128 nseq=0 sms=132 blocks=1
//   nseq > 0: B = 1 and nseq packed sequences (cu_seqlens set; only its presence is read).
//   blocks: resident fused float32 blocks per SM (the occupancy the launcher asks CUDA for).
// Prints "split=S fill=F" (F: the fused grid's share of the block slots over its waves).
#include "emu.h"

#define GLA_CHUNK_EMULATE 1
#pragma GCC diagnostic ignored "-Wunused-function"  // only the launcher's policy is used here
#include "cuda/chunk_fwd.cu"
#include "harness.h"

int main(int argc, char** argv) {
  auto kv = harness::parse_args(argc, argv,
                                {{"dtype", "f32"}, {"B", "1"}, {"T", "64"}, {"H", "1"},
                                 {"K", "64"}, {"V", "64"}, {"nseq", "0"}, {"sms", "132"},
                                 {"blocks", "1"}});
  gla::GlaParams p;
  p.dtype = kv["dtype"] == "f32" ? gla::DType::kFloat32 : gla::DType::kBFloat16;
  p.B = std::stoll(kv["B"]), p.T = std::stoll(kv["T"]), p.H = std::stoll(kv["H"]);
  p.K = std::stoll(kv["K"]), p.V = std::stoll(kv["V"]);
  const int64_t nseq = std::stoll(kv["nseq"]);
  const int64_t dummy_offsets[1] = {0};
  p.N = nseq > 0 ? nseq : p.B;
  p.cu_seqlens = nseq > 0 ? dummy_offsets : nullptr;
  const int sms = std::stoi(kv["sms"]), blocks = std::stoi(kv["blocks"]);
  const int64_t fused_blocks = p.N * p.H * ((p.V + gla::kBV - 1) / gla::kBV);
  std::printf("split=%d fill=%.4f\n", gla::want_split(p, sms, blocks),
              gla::wave_fill(fused_blocks, static_cast<int64_t>(sms) * blocks));
  return 0;
}
