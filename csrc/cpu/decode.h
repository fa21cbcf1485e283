// Whole-model decode step on the CPU (issue 3): one C++ call runs GLA.step for every layer.
// Unlike the kernels declared in gla.h this uses torch tensors (GEMMs go through at::mm_out
// into preallocated buffers), so it has its own header; bindings.cpp exposes it to Python as
// gla_ext._C.CpuDecoder and gla_ext/decode.py decides when GLA.step uses it.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
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
//   q/k/v/(r)/(gate or its low-rank first half) are concatenated into one [P, d] matrix and
//   w1/w3 into one [2f, d], so a layer costs four GEMMs; everything between the GEMMs (norms,
//   gates, the state update fused with the output, RMSNorm, swish gate, SwiGLU) is plain loops.
// The parameters the copies were made from are kept, with their version counters and data
// pointers, so status() can tell when the copies are stale.
class GLA_DECODE_HIDDEN CpuDecoder {
 public:
  CpuDecoder(const std::vector<std::optional<at::Tensor>>& globals,
             const std::vector<std::vector<std::optional<at::Tensor>>>& layers, int64_t num_heads,
             int64_t head_dim, double gate_normalizer, double eps, double scale);

  enum Status : int64_t { kReady = 0, kStale = 1, kNeedsAutograd = 2 };
  // kStale: a watched parameter was written in place (version), re-pointed (data pointer),
  // or changed dtype/device since packing. kNeedsAutograd: grad_enabled and some parameter
  // requires grad. Otherwise kReady.
  int64_t status(bool grad_enabled) const;

  // x [B, embed_dim] or [B, 1, embed_dim] float32; states: num_layers tensors [B, H, D, D]
  // float32 (read only), or an empty list for zero states. Returns (y [B, hidden], new states).
  std::tuple<at::Tensor, std::vector<at::Tensor>> step(const at::Tensor& x,
                                                       const std::vector<at::Tensor>& states);

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }
  int64_t num_workspaces() const { return static_cast<int64_t>(workspaces_.size()); }

 private:
  struct Layer {
    at::Tensor ln1_w, ln1_b, proj_t, gate_b, gate2_t, rms_w, wo_t, ln2_w, ln2_b, w13_t, w2_t;
  };
  struct Workspace {  // per batch size; [B, n] float32 buffers
    at::Tensor h, xn, proj, z, gate, o, u, act;
  };
  Workspace& workspace(int64_t B);
  void attention_core(const Layer& L, const Workspace& ws, int64_t B, const float* old_state,
                      float* new_state) const;

  std::vector<Layer> layers_;
  at::Tensor in_w_t_, in_b_, norm_w_, norm_b_;
  int64_t E_ = 0, d_ = 0, H_ = 0, D_ = 0, a_ = 0, f_ = 0, rank_ = 0, P_ = 0;
  int64_t off_r_ = -1, off_gate_ = 0;  // column offsets inside the packed projection
  bool use_norm_ = false, use_gate_ = false;
  float normalizer_ = 1.f, eps_ = 1e-5f, scale_ = 1.f;

  std::vector<at::Tensor> watched_;
  std::vector<int64_t> versions_;
  std::vector<const void*> pointers_;
  std::vector<at::Tensor> aliases_;  // keep the watched storages alive: no address reuse

  std::map<int64_t, Workspace> workspaces_;
  std::mutex mutex_;  // step() runs without the GIL; one step per decoder at a time
};

}  // namespace gla
