// The fused CPU engine of the GLA model (issue 17): one object per model that holds one
// validated view of its parameters and one packed copy of each weight matrix, and runs
//   step        GLA.step: one token for B rows (new states returned)
//   step_pool   StatePool.step: one token for rows of a state pool, advanced in place
//   forward     GLA.forward over a window: full rows, right-padded rows (lengths)
// Exposed to Python as gla_ext._C.CpuEngine; gla_ext/cpu_engine.py builds and caches it.
//
// Files: engine_load.cpp (loader, packing, status), engine_gemm.cpp (vendor GEMM and the
// measured own-kernel / vendor choice), engine_step.cpp (token-step loop), engine_window.cpp
// (window loop), engine_isa.cpp (the per-ISA bodies: math_impl.h, the layer math both loops
// call; step_impl.h; window_impl.h).
//
// Weights: every matrix product is one "kind" (input projection, [Wq;Wk;Wv;Wr;Wg] with the
// low-rank gate's second half, Wo, [W1|W3], W2). A kind runs on the own kernels, reading a
// PackedMatrix (linear.h) packed on first use in the stored format (float32, bf16, fp16, or
// int8 / int4 as quantized), or on the vendor GEMM (at::mm_out on the parameter itself, no
// copy). Which one is measured per kind and rows bucket (engine_gemm.cpp); the token step
// keeps batches under kStepVendorRows on the own kernels. Quantized models run the token
// step only (the window declines them: gla_ext/cpu_engine.py takes the PyTorch path).
#pragma once

#include <ATen/ATen.h>

#include "cpu/engine/engine_plan.h"
#include "cpu/linear.h"
#include "cpu/engine/watched_params.h"

#include <array>
#include <cstdint>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

// Hidden like the pybind11 types that wrap it (no -Wattributes warning in bindings.cpp).
#if defined(__GNUC__)
#define GLA_ENGINE_HIDDEN __attribute__((visibility("hidden")))
#else
#define GLA_ENGINE_HIDDEN
#endif

namespace gla {

// Slots of one layer's parameter list, as passed by gla_ext/cpu_engine.py (None = absent).
enum EngineSlot : int {
  kLn1W, kLn1B,        // attn_norm (LayerNorm) weight, bias           [d]
  kWq, kWk, kWv,       // q/k/v projections                            [a, d]
  kWr,                 // output-gate projection g_proj, or None       [a, d]
  kWg,                 // full gate [a, d], or the low-rank first part [r, d]
  kWg2,                // low-rank second part [a, r], or None (full gate)
  kGateBias,           // bias of the (last) gate projection           [a]
  kRmsW,               // per-head RMSNorm weight, or None             [D]
  kWo,                 // output projection                            [d, a]
  kLn2W, kLn2B,        // ffn_norm (LayerNorm) weight, bias            [d]
  kW1, kW3, kW2,       // SwiGLU: w1, w3 [f, d], w2 [d, f]
  kNumSlots
};
// Model-level list: input projection weight and bias (None when embed_dim == hidden_size;
// the bias may be None), final LayerNorm weight and bias.
enum EngineGlobalSlot : int { kInW, kInB, kNormW, kNormB, kNumGlobalSlots };

// Kinds of matrix product: the unit of packing and of the own-kernel / vendor choice. The
// low-rank gate's second half belongs to kMatProj (it follows that kind's choice).
enum MatKind : int { kMatIn, kMatProj, kMatWo, kMatW13, kMatW2, kNumMatKinds };

// One weight matrix before packing: a float parameter (group 0), or the parts of a
// quantized one (q: int8 [rows, cols] or int4 nibbles uint8 [rows, cols / 2]; float16
// scales and, int4, offsets [rows, cols / group]).
struct EngineRows {
  at::Tensor w, scales, offsets;
  int64_t group = 0;
};

// One matrix product of a layer: its source matrices (stacked by rows for the own kernel,
// each at column `cols[i]` of the output for the vendor GEMM) and the own kernel's copy.
struct EngineProduct {
  std::vector<EngineRows> parts;
  std::vector<int64_t> cols;
  PackedMatrix packed;  // empty until the own kernel first runs this product
  bool w13 = false;     // [W1 | W3]: interleaved by half panels when packed
};


// The per-ISA entry points (one table per instruction set, engine_isa.cpp).
struct EngineKernels {
  void (*step_thread)(const StepPlan&, int64_t s0, int64_t s1, int t, int T);
  size_t (*window_ws)(int64_t C, int64_t D);
  void (*window_run)(const WindowPlan&, int64_t s0, int64_t s1);
  int64_t (*window_panel)();
  // the row math for steps outside the engine (step_rows.cpp): (row, kv head) tasks
  // [t0, t1) of the attention core; RMSNorm of rows; SwiGLU of rows [r0, r1)
  void (*attn_rows)(const AttnRowsPlan&, int64_t t0, int64_t t1);
  void (*rms_norm_rows)(const float* x, int64_t ldx, float* y, int64_t ldy, const float* w,
                        int64_t rows, int64_t n, float eps);
  void (*swiglu_rows)(const float* u, float* act, int64_t r0, int64_t r1, int64_t f,
                      int64_t f_pad);
};
const EngineKernels* engine_kernels(int isa);

class GLA_ENGINE_HIDDEN CpuEngine {
 public:
  // scales / offsets: per layer, per slot the float16 scales / int4 offsets of a quantized
  // matrix whose qweight is in that slot of `layers` (empty lists: no quantized matrix).
  CpuEngine(const std::vector<std::optional<at::Tensor>>& globals,
            const std::vector<std::vector<std::optional<at::Tensor>>>& layers, int64_t num_heads,
            int64_t head_dim, double gate_normalizer, double eps, double scale,
            const std::vector<std::vector<std::optional<at::Tensor>>>& scales = {},
            const std::vector<std::vector<std::optional<at::Tensor>>>& offsets = {});

  // WatchedParams::Status: 0 ready, 1 stale, 2 autograd needed.
  int64_t status(bool grad_enabled) const { return watched_.status(grad_enabled); }

  // Matrix engine of the products: kGemmAuto measures (per kind, rows bucket, threads),
  // kGemmOwn / kGemmVendor force one (tests, benchmarks).
  enum Gemm : int64_t { kGemmAuto = 0, kGemmOwn = 1, kGemmVendor = 2 };

  // x [B, E] or [B, 1, E] in the weights' dtype; states: num_layers float32 [B, H, D, D] (read
  // only) or empty (zeros). Returns (y [B, hidden] in the weights' dtype, new states).
  std::tuple<at::Tensor, std::vector<at::Tensor>> step(const at::Tensor& x,
                                                       const std::vector<at::Tensor>& states,
                                                       int64_t gemm = kGemmAuto);
  // x [n, E] or [n, 1, E]; pools: num_layers contiguous float32 [P, H, D, D]; slots int [n].
  // Row i advances pool[slots[i]] of every layer in place; a negative slot is a padding row
  // (zero output, no state read or written). Returns y [n, hidden].
  at::Tensor step_pool(const at::Tensor& x, const std::vector<at::Tensor>& pools,
                       const at::Tensor& slots, int64_t gemm = kGemmAuto);
  // x [B, T, E]; states as in step; lengths: int [B] in 1..T (right-padded rows: y and the
  // states are taken at each row's last valid position) or none. Returns (y [B, hidden], or
  // [B, T, hidden] with all_positions; new states when return_state, else empty).
  std::tuple<at::Tensor, std::vector<at::Tensor>> forward(
      const at::Tensor& x, const std::vector<at::Tensor>& states, bool return_state,
      bool all_positions, const std::optional<at::Tensor>& lengths, int64_t gemm);

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }
  int64_t num_workspaces() const { return static_cast<int64_t>(workspaces_.size()); }
  std::string isa() const;
  std::string weight_format() const;  // "int8", "int4", or the float dtype's name
  bool quantized() const { return quantized_; }
  int64_t weight_bytes() const;   // bytes of weights one step streams (packed, padded)
  int64_t packed_bytes() const;   // bytes of packed copies held now
  int64_t packed_float32_bytes() const;  // of those, float32 copies
  // Threads the next step of batch B runs on (thread_limit: 0 = measured policy, n = at most n).
  int64_t threads_for(int64_t B) const;
  int64_t thread_limit = 0;
  // The vendor route of 16-bit weights: false = the product in their dtype (x rounded, as
  // nn.Linear; oneDNN's AMX / AVX512-BF16 path), true = the weights widened to float32 a
  // block of rows at a time and a float32 GEMM (CPUs without bf16 hardware, where torch's bf16
  // GEMM runs ~1 GFLOP/s). Set when the engine is built (gla_ext.matmul16 measures it);
  // setting it forgets the measured own / vendor choices (timed on the other route).
  bool widen16() const { return widen16_; }
  void set_widen16(bool widen);
  // per kind: whether the last forward / step ran it on the vendor GEMM
  std::vector<bool> last_vendor() const;
  std::vector<bool> last_step_vendor() const;
  // measured choices: (rows bucket, threads, per kind: vendor GEMM) of windows / steps
  using ChoiceList = std::vector<std::tuple<int64_t, int64_t, std::vector<bool>>>;
  ChoiceList choices() const;
  ChoiceList step_choices() const;

 private:
  struct Layer {
    // float32 vectors, zero-padded to a whole number of panels (d) or + 16 (a, D)
    std::vector<float> ln1_w, ln1_b, gate_b, rms_w, ln2_w, ln2_b;
    EngineProduct proj, gate2, wo, w13, w2;
  };
  using Choice = std::array<bool, kNumMatKinds>;  // per kind: vendor GEMM
  using ChoiceTable = std::map<std::pair<int64_t, int>, Choice>;  // (rows bucket, threads)
  // The own kernel of a loop alone on one product: (product, A, lda, M rows, out, ldo, nt
  // threads); the choice's measurement (engine_gemm.cpp) times it like the vendor GEMM.
  using OwnRun = std::function<void(const PackedMatrix&, const float*, int64_t, int64_t,
                                    float*, int64_t, int)>;
  struct Workspace {  // token step, per batch size B: float32 buffers (EngineBufs)
    std::vector<float> x, h, xn, xn_threads, proj, o, u, act, scratch, y;
    std::vector<const float*> old_states;
    std::vector<float*> new_states;
    std::vector<c10::Storage> spare;  // state storages handed out before (reused once free)
    // thread policy (threads_for): step times of one thread and of all threads, measured on
    // this batch size's first steps; `chosen` = the winner (0 while measuring)
    std::vector<double> probe_one, probe_all;
    int64_t chosen = 0, steps_since_choice = 0;
  };

  // packing (engine_load.cpp)
  std::vector<EngineProduct*> products(int kind, int64_t layer);
  void ensure_packed(int kind);
  void release_unused();
  // vendor GEMM and the choice (engine_gemm.cpp)
  void vendor_product(const EngineProduct& p, const float* A, int64_t lda, int64_t M, float* out,
                      int64_t ldo, bool accumulate) const;
  Choice choose(ChoiceTable& table, int64_t M, int nt, int64_t gemm, const float* x,
                const EngineBufs& b, const OwnRun& own, bool all_layers);
  EngineModel model(const std::vector<EngineLayerPtrs>& layers) const;
  std::vector<EngineLayerPtrs> layer_ptrs() const;
  // the stages: runs of own stages through region(s0, s1), vendor ones here
  void run_stages(const std::vector<EngineStage>& stages, const float* x, int64_t M,
                  const EngineBufs& b, const std::function<void(size_t, size_t)>& region) const;

  // token step (engine_step.cpp)
  Workspace& workspace(int64_t B);
  void record_step_time(Workspace& ws, int T, double seconds);
  at::Tensor fresh_state(Workspace& ws, int64_t B);
  void check_x(const at::Tensor& x) const;
  const float* load_x(const at::Tensor& x, Workspace& ws, const int64_t* rows, int64_t B) const;
  void run_step(int64_t B, Workspace& ws, const float* x, float* y, int64_t gemm);

  int64_t kind_k(int kind) const;
  // argument checks shared by the calls (engine_load.cpp)
  void check_gemm(int64_t gemm) const;
  void check_states(const std::vector<at::Tensor>& states, int64_t B) const;

  std::vector<Layer> layers_;
  EngineProduct in_;
  std::vector<float> in_b_, norm_w_, norm_b_;  // padded like the layer vectors
  at::ScalarType wdtype_ = at::kFloat;  // the float parameters' dtype
  bool quantized_ = false;
  bool widen16_ = false;
  int isa_ = 0;       // CpuIsa every copy is packed for (fixed at construction)
  int64_t nr_ = 0;    // its panel width
  const EngineKernels* kern_ = nullptr;
  int64_t E_ = 0, d_ = 0, dp_ = 0, H_ = 0, D_ = 0, a_ = 0, f_ = 0, f_pad_ = 0, rank_ = 0;
  int64_t P_ = 0, Pp_ = 0;               // projection columns (q, k, v, r, gate), padded
  int64_t off_r_ = -1, off_gate_ = 0;    // column offsets inside the projection
  bool use_norm_ = false, use_gate_ = false;
  float normalizer_ = 1.f, eps_ = 1e-5f, scale_ = 1.f;

  std::array<bool, kNumMatKinds> step_own_{};  // kinds a step ran on the own kernel
  ChoiceTable window_choices_, step_choices_;
  Choice last_{}, last_step_{};

  WatchedParams watched_;  // what was loaded, to notice changed parameters
  std::map<int64_t, Workspace> workspaces_;
  std::vector<std::vector<char>> thread_ws_;  // window: per-thread kernel scratch
  mutable std::mutex mutex_;  // calls run without the GIL; one call per engine at a time
};

}  // namespace gla
