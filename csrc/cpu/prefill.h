// Fused CPU prefill (issue 10): the whole GLA model forward over a short window in one C++
// call, in OpenMP parallel regions split only by vendor GEMMs (prefill_impl.h has the
// per-thread body). Exposed to Python as gla_ext._C.CpuPrefill; gla_ext/prefill.py decides
// when GLA.forward uses it.
// Each matrix product runs on the engine's own kernel or the vendor GEMM, measured per shape
// (prefill.cpp). It keeps packed float32 panels only of the float32 products its own kernel
// runs (16-bit weights are read in place) and watches the parameters (version counter, data
// pointer) so status() can say when they are stale.
#pragma once

#include <ATen/ATen.h>

#include "prefill_plan.h"
#include "watched_params.h"

#include <array>
#include <cstdint>
#include <map>
#include <mutex>
#include <optional>
#include <tuple>
#include <vector>

#if defined(__GNUC__)
#define GLA_PREFILL_HIDDEN __attribute__((visibility("hidden")))
#else
#define GLA_PREFILL_HIDDEN
#endif

namespace gla {

// Slots of one layer's parameter list, as passed by gla_ext/prefill.py (None = absent).
enum PrefillSlot : int {
  kPfLn1W, kPfLn1B,      // attn_norm (LayerNorm) weight, bias     [d]
  kPfWq, kPfWk, kPfWv,   // q/k/v projections                      [a, d]
  kPfWr,                 // output-gate projection g_proj, or None [a, d]
  kPfWg, kPfGateB,       // full gate projection weight [a, d] and bias [a]
  kPfRmsW,               // per-head RMSNorm weight, or None       [D]
  kPfWo,                 // output projection                      [d, a]
  kPfLn2W, kPfLn2B,      // ffn_norm weight, bias                  [d]
  kPfW1, kPfW3, kPfW2,   // SwiGLU: w1, w3 [f, d], w2 [d, f]
  kPfNumSlots
};
// Model-level list: input projection weight and bias (None when embed_dim == hidden_size),
// final LayerNorm weight and bias.
enum PrefillGlobalSlot : int { kPfInW, kPfInB, kPfNormW, kPfNormB, kPfNumGlobalSlots };

class GLA_PREFILL_HIDDEN CpuPrefill {
 public:
  CpuPrefill(const std::vector<std::optional<at::Tensor>>& globals,
             const std::vector<std::vector<std::optional<at::Tensor>>>& layers, int64_t num_heads,
             int64_t head_dim, double gate_normalizer, double eps, double scale);

  // WatchedParams::Status (see decode.h's status()).
  int64_t status(bool grad_enabled) const;

  // Matrix engine of the products (PrefillMatKind): kGemmAuto measures the own kernel against
  // the vendor GEMM per (rows bucket, threads) at first use and keeps the faster per kind;
  // kGemmOwn / kGemmVendor force one (tests, benchmarks).
  enum Gemm : int64_t { kGemmAuto = 0, kGemmOwn = 1, kGemmVendor = 2 };

  // x [B, T, embed_dim] in the parameters' dtype; states: num_layers tensors [B, H, D, D] float32 (read only)
  // or empty (zeros); lengths: int64 [B] in 1..T (right-padded rows: y and the states are
  // taken at each row's last valid position) or undefined. Returns (y, new states): y [B, hidden]
  // (last position) or [B, T, hidden] (all_positions); new states only when return_state (else empty).
  std::tuple<at::Tensor, std::vector<at::Tensor>> forward(const at::Tensor& x,
                                                          const std::vector<at::Tensor>& states,
                                                          bool return_state, bool all_positions,
                                                          const std::optional<at::Tensor>& lengths,
                                                          int64_t gemm);

  int64_t num_layers() const { return static_cast<int64_t>(src_.size()); }
  // per PrefillMatKind: whether the last forward ran it on the vendor GEMM
  std::vector<bool> last_vendor() const;
  // the measured choices: (rows bucket, threads, per kind: vendor GEMM)
  std::vector<std::tuple<int64_t, int64_t, std::vector<bool>>> choices() const;
  // bytes of float32 weight panels held (16-bit weights are never copied)
  int64_t packed_bytes() const;

 private:
  struct Src {  // the parameters of one layer, detached (what packing and the vendor GEMM read)
    at::Tensor ln1_w, ln1_b, wq, wk, wv, wr, wg, gate_b, rms_w, wo, ln2_w, ln2_b, w1, w3, w2;
  };
  struct Packed {  // per layer, for the panel width it was packed for
    at::Tensor ln1_w, ln1_b, gate_b, rms_w, ln2_w, ln2_b;  // padded float32 vectors
    std::array<at::Tensor, kNumMatKinds> panels;           // float32 panels, or undefined
    std::array<std::vector<const uint16_t*>, kNumMatKinds> rows;  // 16-bit: rows, panel order
  };
  using Choice = std::array<bool, kNumMatKinds>;  // per kind: vendor GEMM

  // the source rows of matrix `kind` of layer l (kMatIn: layer 0) in panel order, np per
  // panel, null past the matrix
  std::vector<const void*> panel_rows(int64_t l, int kind, int64_t np) const;
  std::vector<at::Tensor> vendor_weights(int64_t l, int kind) const;
  bool has_kind(int kind) const { return kind != kMatIn || in_w_.defined(); }
  int64_t kind_k(int kind) const;     // inner dimension of a kind's product
  int64_t kind_cols(int kind) const;  // output columns of the own kernel (padded)
  void pack(int isa);                 // vectors and 16-bit row tables for this ISA's panels
  void pack_kind(int kind);           // float32 panels of one kind, every layer
  PrefillMat mat(int64_t l, int kind) const;
  // bufs: the call's activation buffers (h, xn, proj, o, u, act; see PrefillPlan), x its
  // float32 input: the measurement runs in them (no allocation that the heap would keep)
  Choice choose(int64_t M, int nt, int64_t gemm, const float* x, float* const* bufs);
  Choice measure(int64_t M, int nt, const float* x, float* const* bufs);
  void release_unused_panels();

  std::vector<Src> src_;
  at::Tensor in_w_, in_b_, norm_w_, norm_b_;
  int64_t E_ = 0, d_ = 0, H_ = 0, D_ = 0, a_ = 0, f_ = 0, P_ = 0, off_r_ = -1, off_gate_ = 0;
  bool use_norm_ = false, use_gate_ = false;
  at::ScalarType dtype_ = at::kFloat;  // the parameters' (float32, bfloat16 or float16)
  float normalizer_ = 1.f, eps_ = 1e-5f, scale_ = 1.f;

  int packed_isa_ = -1;
  int64_t np_ = 0;  // panel width of the packing
  std::vector<Packed> packed_;
  at::Tensor p_in_b_, p_norm_w_, p_norm_b_;
  std::map<std::pair<int64_t, int>, Choice> choices_;  // (rows bucket, threads) -> choice
  Choice last_{};

  WatchedParams watched_;  // what was packed, to notice changed parameters

  std::vector<std::vector<char>> thread_ws_;
  mutable std::mutex mutex_;
};

}  // namespace gla
