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

// One weight matrix for the engine's own kernel, in panel order. float32 weights: panels
// packed once, [panels][K][NP]. 16-bit weights: no copy; `rows` points at the model's own
// rows in panel order (NP per panel, null = zero row) and each K block of a panel is widened
// and transposed into the thread's scratch when it is used.
struct PrefillMat {
  const float* panels = nullptr;
  const uint16_t* const* rows = nullptr;
  bool f16 = false;  // rows are float16 (else bfloat16)
};

// The matrix products of a layer (and the model's input projection), by kind: the unit of the
// per-shape engine choice (own kernel or vendor GEMM).
enum PrefillMatKind : int { kMatIn, kMatProj, kMatWo, kMatW13, kMatW2, kNumMatKinds };

struct PrefillLayerPtrs {
  // vectors zero-padded: ln weights and biases to dp, gate_b to a + 16, rms_w to D + 16
  const float *ln1_w, *ln1_b, *gate_b, *rms_w, *ln2_w, *ln2_b;
  // own-kernel matrices: proj [Wq;Wk;Wv;Wr;Wg] (Pp columns), wo (dp), w13 (W1 panel j, W3
  // panel j interleaved: 2 fp), w2 (dp); unused (empty) where the vendor GEMM runs the kind
  PrefillMat proj, wo, w13, w2;
};

// The steps of one call, in order; the driver (prefill.cpp) runs a vendor-GEMM step on the
// calling thread between parallel regions, every other run of steps in one region.
enum PrefillOp : int {
  kOpIn,        // h = x Win^T + b (or a copy of x)
  kOpLn1,       // xn = LN1(h)
  kOpProj,      // proj = xn [Wq;Wk;Wv;Wr;Wg]^T (own kernel: gate activation per panel)
  kOpGate,      // gate columns -> logsigmoid(. + b) / normalizer (after a vendor proj)
  kOpAttn,      // chunk forward per (row, head), RMSNorm, output gate -> o
  kOpWo,        // h += o Wo^T
  kOpLn2,       // xn = LN2(h)
  kOpW13,       // own: act = silu(xn W1^T) * (xn W3^T); vendor: u = [xn W1^T, xn W3^T]
  kOpSwiGlu,    // act = silu(u1) * u3 (after a vendor W13)
  kOpW2,        // h += act W2^T
  kOpFinal      // y = LN(h) at the last (valid) position of each row, or every position
};
struct PrefillStep {
  int op;
  int64_t layer;
  bool vendor;  // a matrix product run by the vendor GEMM (outside the parallel regions)
};

struct PrefillPlan {
  // model (dp, Pp, fp: d, P, f rounded up to the panel width)
  int64_t E, d, dp, H, D, a, f, fp, P, Pp, off_r, off_gate, nl;
  bool use_norm, use_gate;
  float inv_normalizer, eps, scale;
  bool has_in;                       // false: identity input (E == d)
  PrefillMat in_w;
  const float *in_b, *norm_w, *norm_b;
  const PrefillLayerPtrs* layers;
  // call
  int64_t B, T, C;                   // C: chunk length of the attention core
  const float* x;                    // [M, E]
  const int64_t* lengths;            // [B] valid positions per row (right padding), or null
  const float* const* h0;            // per layer [B, H, D, D] or null (zeros)
  float* const* ht;                  // per layer, or null: final states not wanted
  float* y;                          // [B, d], or [M, d] with all_positions
  bool all_positions;
  float *h, *xn, *proj, *o, *u, *act;  // [M, dp] [M, dp] [M, Pp] [M, a] [M, 2 fp] [M, fp]
                                       // (h's padding columns zero)
  char* const* ws;                   // per thread (omp_get_thread_num): kernel scratch
  const PrefillStep* steps;
  std::atomic<int64_t>* counters;    // one per step, zero at the start: dynamic work split
  PrefillBarrier* barrier;           // threads = the team's size
};

}  // namespace gla
