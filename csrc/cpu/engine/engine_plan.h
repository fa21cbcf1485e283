// The plain-pointer description of one engine call (the drivers in engine_step.cpp and
// engine_window.cpp fill it, the per-ISA bodies run it). Activations are float32 row-major.
#pragma once

#include "cpu/linear.h"

#include <atomic>
#include <cstdint>
#include <thread>
#include <vector>

namespace gla {

// The stages of one call, in order, for both loops. A stage whose product runs on the vendor
// GEMM runs on the calling thread between two parallel regions; every other run of stages
// runs in one region.
enum EngineOp : int {
  kOpIn,      // h = x Win^T + b (or a copy of x)
  kOpLn1,     // xn = LN1(h) (the step fuses it into an own-kernel kOpProj, per thread)
  kOpProj,    // proj = xn [Wq;Wk;Wv;Wr;Wg]^T (window, own kernel: gate activation per panel)
  kOpGate2,   // low-rank gate: gate columns = proj[:, off_gate:+rank] Wg2^T
  kOpGate,    // window, after a vendor gate product: gate columns -> log decay
  kOpAttn,    // per (row, head): state update / chunk loop, RMSNorm, output gate -> o
  kOpWo,      // h += o Wo^T
  kOpLn2,     // xn = LN2(h) (fused into an own-kernel kOpW13 in the step)
  kOpW13,     // own: act = silu(xn W1^T) * (xn W3^T) per panel; vendor: u = [u1 | u3]
  kOpSwiGlu,  // act = silu(u1) * u3 (after a vendor W13)
  kOpW2,      // h += act W2^T
  kOpFinal    // y = LN(h) (window: at the last valid position of each row, or every one)
};
struct EngineStage {
  int op;
  int64_t layer;
  bool vendor;
};
// The stage list of a call: vendor[kind] says which products run on the vendor GEMM
// (engine_gemm.cpp).
std::vector<EngineStage> engine_stages(int64_t num_layers, const bool* vendor, bool low_rank,
                                       bool window);

struct EngineLayerPtrs {
  // float32, zero-padded: ln to dp, gate_b to a + 16, rms_w to D + 16 (null: no RMSNorm)
  const float *ln1_w, *ln1_b, *gate_b, *rms_w, *ln2_w, *ln2_b;
  // own-kernel copies (empty where the vendor GEMM runs the kind); gate2 empty: full gate
  const PackedMatrix *proj, *gate2, *wo, *w13, *w2;
};

// The model's dimensions and packed weights (the same for both loops).
struct EngineModel {
  // d, P, f rounded up: dp and Pp to the panel width nr, f_pad to nr / 2 (half a panel)
  int64_t E, d, dp, H, D, a, f, f_pad, half, nr, P, Pp, nl, rank;
  int64_t off_r, off_gate;  // column offsets inside the projection (off_r < 0: no r)
  int64_t g_col;            // column of the gate logits in proj: off_gate, or Pp (low rank)
  bool use_norm, use_gate;
  float inv_normalizer, eps, scale;
  const PackedMatrix* in;   // input projection, or null (identity)
  const float *in_b, *norm_w, *norm_b;  // in_b: null when there is none
  const EngineLayerPtrs* layers;
};

// Activation buffers of a call, M rows each: h [M, dp] (padding columns 0), xn [M, dp],
// proj [M, ldp] (q, k, v, r, gate or low-rank first half; the low-rank gate's logits at
// g_col), o [M, a], u [M, 2 f_pad], act [M, f_pad].
struct EngineBufs {
  float *h, *xn, *proj, *o, *u, *act;
  int64_t ldp;
};

struct StepPlan {
  EngineModel m;
  EngineBufs b;
  int64_t B;
  const float* x;                    // [B, E]
  const float* const* old_states;    // [layer * B + row]: [H, D, D] or null (zero state)
  float* const* new_states;          // [layer * B + row] (may equal the old one: a pool)
  float* y;                          // [B, d]
  float* xn_threads;                 // per thread [B, dp]: own kOpProj / kOpW13 fuse the LN
  float* scratch;                    // per thread [a + 16]
  const EngineStage* stages;
};

// The attention core of one token for rows outside the engine's own model layout (fla's GLA
// decode step, gla_ext/integrations/fla_decode.py, through gla_ext._C.StepRows): per row and
// key/value head h the state advanced in place and the outputs of the G = H / Hkv query heads
// h * G + g that share it. Row r of proj holds q [H * K] at q_col, k [Hkv * K] at k_col,
// v [Hkv * V] at v_col and the output gate's input [H * V] at r_col (r_col < 0: none).
struct AttnRowsPlan {
  const float* proj;
  int64_t ldp, q_col, k_col, v_col, r_col;
  const float* gk;        // gate logits [rows, Hkv * K], row stride ldg (biases added)
  int64_t ldg;
  float* states;          // [rows, Hkv, K, V] float32, advanced in place
  float* o;               // [rows, H * V], row stride ldo
  int64_t ldo;
  const float* rms_w;     // per-head RMSNorm weight [V], or null (RMSNorm without weight)
  int64_t rows, H, Hkv, K, V;
  float inv_normalizer, clamp_min, scale, eps;
  bool clamp;             // clamp the log decay at clamp_min
};

// Barrier of the window's threads: spins briefly, then yields the CPU. On a busy machine a
// waiting thread may share its core with the thread it waits for; an OpenMP barrier would
// spin there for its whole spin count instead of letting that thread run.
struct EngineBarrier {
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

struct WindowPlan {
  EngineModel m;
  EngineBufs b;
  int64_t B, T, C;                   // C: chunk length of the attention core
  const float* x;                    // [B * T, E]
  const int64_t* lengths;            // [B] valid positions per row (right padding), or null
  const float* const* h0;            // per layer [B, H, D, D] or null (zeros)
  float* const* ht;                  // per layer, or null: final states not wanted
  float* y;                          // [B, d], or [B * T, d] with all_positions
  bool all_positions;
  char* const* ws;                   // per thread (omp_get_thread_num): kernel scratch
  const EngineStage* stages;
  std::atomic<int64_t>* counters;    // one per stage, zero at the start: dynamic work split
  EngineBarrier* barrier;            // threads = the team's size
};

}  // namespace gla
