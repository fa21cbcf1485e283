// Whole-model decode step on the CPU (issue 3): one C++ call runs GLA.step for every layer.
// Unlike the kernels declared in gla.h this takes torch tensors (its matrix products run on
// the packed kernels of linear.h), so it has its own header; bindings.cpp exposes it to Python as
// gla_ext._C.CpuDecoder and gla_ext/decode.py decides when GLA.step uses it.
#pragma once

#include <ATen/ATen.h>

#include "watched_params.h"

#include "linear.h"

#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

// Hidden like the pybind11 types that wrap it (no -Wattributes warning in bindings.cpp).
#if defined(__GNUC__)
#define GLA_DECODE_HIDDEN __attribute__((visibility("hidden")))
#else
#define GLA_DECODE_HIDDEN
#endif

namespace gla {

// Slots of one layer's parameter list, as passed by gla_ext/decode.py (None = absent).
enum DecodeSlot : int {
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

// Slots of the model-level list: input projection (None when embed_dim == hidden_size) and the
// final LayerNorm.
enum DecodeGlobalSlot : int { kInW, kInB, kNormW, kNormB, kNumGlobalSlots };

// Holds packed copies of the weights of one model and runs its decode step.
//   Every matrix product goes through our own kernels (linear.h, no vendor BLAS): q/k/v/(r)/
//   (gate or its low-rank first half) are one packed [P, d] matrix, w1/w3 one [2f, d] matrix
//   interleaved per panel (a panel holds matching rows of both, so SwiGLU is applied by the
//   thread that computed them). Weights stay in the model's dtype (float32, bfloat16 or
//   float16), or in their quantized format (int8 / int4 with float16 group scales, read
//   directly by the q8 / q4 kernels of linear.h); activations, accumulation and states are
//   float32. Everything between the
//   products (norms, gates, the state update fused with the output, RMSNorm, swish gate,
//   SwiGLU) is vectorized per ISA (decode_core_impl.h).
//   Threading: a step runs single-threaded, or as ONE OpenMP parallel region in which each
//   thread owns a fixed slice of every matrix's panels and of the (row, head) tasks, with a
//   barrier between dependent stages (no thread wake-up per product). threads_for() says how
//   many threads a batch size gets: measured at run time, per batch size (see decode.cpp).
// The parameters the copies were made from are kept, with their version counters and data
// pointers, so status() can tell when the copies are stale.
// Quantized matrices (gla_ext.quantize.QuantizedLinear): the layer slot holds its qweight
// (int8 [rows, cols], or uint8 [rows, cols / 2] of int4 nibbles), the same slot of `scales`
// its float16 scales [rows, cols / group] (the group size follows), of `offsets` its int4
// offsets (None for int8). Empty lists: no quantized matrix.
class GLA_DECODE_HIDDEN CpuDecoder {
 public:
  CpuDecoder(const std::vector<std::optional<at::Tensor>>& globals,
             const std::vector<std::vector<std::optional<at::Tensor>>>& layers, int64_t num_heads,
             int64_t head_dim, double gate_normalizer, double eps, double scale,
             const std::vector<std::vector<std::optional<at::Tensor>>>& scales = {},
             const std::vector<std::vector<std::optional<at::Tensor>>>& offsets = {});

  // WatchedParams::Status: stale when a parameter changed since packing, needs-autograd when
  // grad_enabled and a parameter requires grad, else ready.
  int64_t status(bool grad_enabled) const;

  // x [B, embed_dim] or [B, 1, embed_dim] in the weights' dtype; states: num_layers tensors
  // [B, H, D, D] float32 (read only), or an empty list for zero states. Returns (y [B, hidden]
  // in the weights' dtype, new float32 states).
  std::tuple<at::Tensor, std::vector<at::Tensor>> step(const at::Tensor& x,
                                                       const std::vector<at::Tensor>& states);

  // State-pool step: x [n, embed_dim] or [n, 1, embed_dim]; pools: num_layers contiguous
  // float32 tensors [P, H, D, D]; slots int32/int64 [n]. Row i advances pool[slots[i]] of
  // every layer in place; a negative slot is a padding row (zero output, no state read or
  // written). Returns y [n, hidden].
  at::Tensor step_pool(const at::Tensor& x, const std::vector<at::Tensor>& pools,
                       const at::Tensor& slots);

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }
  int64_t num_workspaces() const { return static_cast<int64_t>(workspaces_.size()); }
  std::string isa() const;
  at::ScalarType weight_dtype() const { return wdtype_; }
  // Format of the block matrices: "int8", "int4", or the float dtype's name.
  std::string weight_format() const;
  int64_t weight_bytes() const;  // packed matrix bytes one step streams
  // Threads the next step of batch B runs on (<= at::get_num_threads()). thread_limit: 0 =
  // the measured policy (decode.cpp), n > 0 = at most n (tests and benchmarks compare).
  int64_t threads_for(int64_t B) const;
  int64_t thread_limit = 0;

 private:
  struct Layer {
    std::vector<float> ln1_w, ln1_b, rms_w, ln2_w, ln2_b;
    PackedMatrix proj, gate2, wo, w13, w2;
  };
  struct Workspace {  // per batch size: float32 [B, n] buffers (xn and scratch per thread)
    std::vector<float> x, h, xn, proj, gate, o, u, act, scratch, y;
    std::vector<const float*> old_states;
    std::vector<float*> new_states;
    std::vector<c10::Storage> spare;  // state storages handed out before (reused once free)
    // Threading policy (threads_for): step times of one thread and of all threads, measured
    // on this batch size's first steps; `chosen` = the winner (0 while measuring).
    std::vector<double> probe_one, probe_all;
    int64_t chosen = 0, steps_since_choice = 0;
  };
  void record_step_time(Workspace& ws, int T, double seconds);
  at::Tensor fresh_state(Workspace& ws, int64_t B);
  Workspace& workspace(int64_t B);
  void check_x(const at::Tensor& x) const;
  const float* load_x(const at::Tensor& x, Workspace& ws, const int64_t* rows, int64_t B) const;
  // The whole step for B rows of ws.x (or of x_ptr): states through ws.old_states /
  // ws.new_states ([layer * B + row], old may be null = zero state), result in y (float32,
  // ldy = hidden).
  void run(int64_t B, Workspace& ws, const float* x, float* y);
  void run_thread(int64_t B, Workspace& ws, const float* x, float* y, int t, int T);

  std::vector<Layer> layers_;
  PackedMatrix in_proj_;
  std::vector<float> norm_w_, norm_b_;
  at::ScalarType wdtype_ = at::kFloat;
  int64_t E_ = 0, d_ = 0, H_ = 0, D_ = 0, a_ = 0, f_ = 0, f_pad_ = 0, rank_ = 0, P_ = 0;
  int64_t off_r_ = -1, off_gate_ = 0;  // column offsets inside the packed projection
  int64_t half_ = 0;                   // w1/w3 rows per panel (half a panel)
  bool use_norm_ = false, use_gate_ = false;
  float normalizer_ = 1.f, eps_ = 1e-5f, scale_ = 1.f;
  const struct DecodeCoreKernels* core_ = nullptr;

  WatchedParams watched_;  // what was packed, to notice changed parameters

  std::map<int64_t, Workspace> workspaces_;
  std::mutex mutex_;  // step() runs without the GIL; one step per decoder at a time
};

}  // namespace gla
