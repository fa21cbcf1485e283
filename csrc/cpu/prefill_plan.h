// The plain-pointer description of one fused prefill call (prefill.cpp fills it, the
// per-ISA body in prefill_impl.h runs it). Activations are float32 row-major, M = B*T rows.
#pragma once

#include <atomic>
#include <cstdint>
#include <thread>

namespace gla {

// Barrier of the prefill's threads: spins briefly, then yields the CPU. On a busy machine a
// waiting thread may share its core with the thread it waits for; an OpenMP barrier would
// spin there for its whole spin count instead of letting that thread run.
struct PrefillBarrier {
  std::atomic<int> arrived{0}, generation{0};
  int threads = 1;
  void wait() {
    const int gen = generation.load(std::memory_order_acquire);
    if (arrived.fetch_add(1, std::memory_order_acq_rel) == threads - 1) {
      arrived.store(0, std::memory_order_relaxed);
      generation.fetch_add(1, std::memory_order_release);
      return;
    }
    for (int spin = 0; generation.load(std::memory_order_acquire) == gen; ++spin) {
      if (spin < 2000) {
#if defined(__x86_64__) || defined(__i386__)
        __builtin_ia32_pause();
#endif
      } else {
        std::this_thread::yield();
      }
    }
  }
};

struct PrefillLayerPtrs {
  // packed weight panels: proj [Pp/NP][d][NP], wo [dp/NP][a][NP], w13 (W1 panel j, W3 panel j
  // interleaved) [2 fp/NP][d][NP], w2 [dp/NP][f][NP]; vectors zero-padded: ln weights and
  // biases to dp, gate_b to a + 16, rms_w to D + 16
  const float *ln1_w, *ln1_b, *proj, *gate_b, *rms_w, *wo, *ln2_w, *ln2_b, *w13, *w2;
};

struct PrefillPlan {
  // model (dp, Pp, fp: d, P, f rounded up to the panel width)
  int64_t E, d, dp, H, D, a, f, fp, P, Pp, off_r, off_gate, nl;
  bool use_norm, use_gate;
  float inv_normalizer, eps, scale;
  const float *in_w, *in_b, *norm_w, *norm_b;  // in_w null: identity input (E == d)
  const PrefillLayerPtrs* layers;
  // call
  int64_t B, T, C;                   // C: chunk length of the attention core
  const float* x;                    // [M, E]
  const float* const* h0;            // per layer [B, H, D, D] or null (zeros)
  float* const* ht;                  // per layer, or null: final states not wanted
  float* y;                          // [B, d], or [M, d] with all_positions
  bool all_positions;
  float *h, *xn, *proj, *o, *u, *act;  // [M, dp] [M, dp] [M, Pp] [M, a] [M, 2 fp] [M, fp]
  char* const* ws;                   // per thread (omp_get_thread_num): chunk-kernel scratch
  std::atomic<int64_t>* counters;    // one per phase, zero at the start: dynamic work split
  PrefillBarrier* barrier;           // threads = the team's size
};

}  // namespace gla
