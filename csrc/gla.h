// Parameter structs and launcher declarations shared by the CPU and CUDA kernels.
// No torch types here: bindings.cpp validates tensors and fills these structs.
#pragma once

#include <cstdint>

namespace gla {

// Element type of q, k, v, o and their gradients. The gate g, every state tensor
// (h0, ht, dh0, dht) and dg use the accumulation type: float, or double for kFloat64.
enum class DType { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

// One call of the gated recurrence, forward or backward. All tensors contiguous:
//   q, k, g, dq, dk, dg : [B, T, H, K]
//   v, o, dout, dv      : [B, T, H, V]
//   h0, ht, dh0, dht    : [N, H, K, V]
// With cu_seqlens (then B == 1), sequence n covers tokens [cu_seqlens[n], cu_seqlens[n+1])
// of row 0; without it, sequence n is batch row n (N == B).
struct GlaParams {
  DType dtype = DType::kFloat32;
  int64_t B = 0, T = 0, H = 0, K = 0, V = 0;
  int64_t N = 0;
  const int64_t* cu_seqlens = nullptr;  // [N+1]; host pointer for CPU, device pointer for CUDA
  double scale = 1.0;
  bool reverse = false;   // recurrence runs from the last token to the first
  int64_t chunk_size = 0; // chunked kernels: tokens per chunk (0 = kernel's choice)

  // forward
  const void* q = nullptr;
  const void* k = nullptr;
  const void* v = nullptr;
  const void* g = nullptr;
  const void* h0 = nullptr;  // optional
  void* o = nullptr;
  void* ht = nullptr;        // always written by forward kernels

  // backward (reads the forward inputs above, plus dout and optional dht)
  const void* dout = nullptr;
  const void* dht = nullptr;  // optional gradient arriving on the final state
  void* dq = nullptr;
  void* dk = nullptr;
  void* dv = nullptr;
  void* dg = nullptr;
  void* dh0 = nullptr;        // always written by backward kernels

  // State pools (docs/design.md "State pools"); forward kernels only.
  //   state_idx [N]: sequence n reads its initial state from h0 row state_idx[n] (null: row n);
  //     an index < 0 is a padding row: its o stays as the caller zeroed it, and no state row
  //     is read or written for it (ht row n is zeroed unless inplace_final).
  //   inplace_final: ht == h0 (the pool); the final state goes to row state_idx[n].
  //   state_v_first: h0 / ht rows are [H, V, K] instead of [H, K, V] (fla >= 0.5, vLLM).
  // Host pointer for CPU, device pointer for CUDA.
  const int64_t* state_idx = nullptr;
  int64_t P = 0;             // rows of the pool h0 when state_idx is set
  bool inplace_final = false;
  bool state_v_first = false;

  // scratch owned by the caller (CUDA recurrent and chunked backward, split chunked forward),
  // sized by the *_workspace_floats helpers
  float* workspace = nullptr;
};

// Sequence n's token range within its batch row.
inline void sequence_bounds(const GlaParams& p, int64_t n, int64_t* row, int64_t* start,
                            int64_t* end) {
  if (p.cu_seqlens) {
    *row = 0;
    *start = p.cu_seqlens[n];
    *end = p.cu_seqlens[n + 1];
  } else {
    *row = n;
    *start = 0;
    *end = p.T;
  }
}

#if defined(__CUDACC__)
#define GLA_HOST_DEVICE __host__ __device__
#else
#define GLA_HOST_DEVICE
#endif

// The pool-row rule, the one spelling for the CPU and CUDA kernels: sequence n uses row n
// without an index, else row state_idx[n]; below 0 is a padding row (nothing read or
// written). Indices >= P (rejected by the host checks: bindings.cpp, gla_ext/_checks.py;
// this guard keeps a captured graph from writing outside the pool) count as padding too.
GLA_HOST_DEVICE inline int64_t pool_row(const int64_t* state_idx, int64_t P, int64_t n) {
  if (!state_idx) return n;
  const int64_t r = state_idx[n];
  return r < P ? r : -1;
}
// The h0 row sequence n starts from (below 0: padding).
GLA_HOST_DEVICE inline int64_t h0_row(const GlaParams& p, int64_t n) {
  return pool_row(p.state_idx, p.P, n);
}
// The ht row sequence n's final state goes to (the pool row when inplace_final).
GLA_HOST_DEVICE inline int64_t ht_row(const GlaParams& p, int64_t n) {
  return p.inplace_final ? h0_row(p, n) : n;
}
// Element strides of the K and V dims of a state row ([H, K, V], or [H, V, K] when V-first).
GLA_HOST_DEVICE inline int64_t state_k_stride(const GlaParams& p) {
  return p.state_v_first ? 1 : p.V;
}
GLA_HOST_DEVICE inline int64_t state_v_stride(const GlaParams& p) {
  return p.state_v_first ? p.K : 1;
}

// ---- CPU (csrc/cpu) ------------------------------------------------------------------
void recurrent_fwd_cpu(const GlaParams& p);
void recurrent_bwd_cpu(const GlaParams& p);
void chunk_fwd_cpu(const GlaParams& p);
void chunk_bwd_cpu(const GlaParams& p);
// One line for `python -m gla_ext info`: what chunk_gla runs on CPU tensors.
const char* chunk_cpu_description();

// ---- CUDA (csrc/cuda) ----------------------------------------------------------------
// Launchers return nullptr on success, or a message naming what failed.
// `stream` is a cudaStream_t passed as void* so this header needs no CUDA includes.
// Largest K the CUDA recurrent kernels take in one pass (the Python wrapper splits wider K).
constexpr int64_t kCudaRecurrentMaxK = 256;
int64_t recurrent_bwd_cuda_workspace_floats(const GlaParams& p);
const char* recurrent_fwd_cuda(const GlaParams& p, void* stream);
const char* recurrent_bwd_cuda(const GlaParams& p, void* stream);
// Tensor-core chunked forward (csrc/cuda/chunk_fwd.cu): float16/bfloat16 only, sm_80+,
// K <= kCudaChunkMaxK (wider K is split by the caller), any V. When the fused grid would
// leave the GPU idle it runs split (state scan + chunk-parallel outputs):
// chunk_fwd_cuda_workspace_floats(p) says which (0: fused, no workspace; > 0: split, pass a
// workspace of that many floats; -1: GLA_EXT_CHUNK_FWD holds an unknown value).
constexpr int64_t kCudaChunkMaxK = 128;
int64_t chunk_fwd_cuda_workspace_floats(const GlaParams& p);
const char* chunk_fwd_cuda(const GlaParams& p, void* stream);
// Float32 chunked forward on the tf32 tensor cores (csrc/cuda/chunk_fwd_f32.cuh, split path
// chunk_fwd_f32_split.cuh): passes = 1 (one tf32 pass: torch's "high" / "medium") or 3
// (3xTF32: "highest"); K <= chunk_cuda_max_k(), any V. Fused or split as chunk_fwd_cuda:
// chunk_fwd_cuda_workspace_floats(p) with p.dtype float32 sizes the split path's workspace
// (float32 chunk states), and it runs split exactly when p.workspace is set.
const char* chunk_fwd_f32_cuda(const GlaParams& p, int passes, void* stream);
// Tensor-core chunked backward (csrc/cuda/chunk_bwd.cu): same limits as the forward; needs a
// float32 workspace of chunk_bwd_cuda_workspace_floats(p) elements (two states per chunk).
int64_t chunk_bwd_cuda_workspace_floats(const GlaParams& p);
const char* chunk_bwd_cuda(const GlaParams& p, void* stream);
// Float32 chunked backward on the tf32 tensor cores (csrc/cuda/chunk_bwd_f32.cuh): passes as
// for chunk_fwd_f32_cuda, K <= chunk_cuda_max_k(); workspace of
// chunk_bwd_cuda_workspace_floats(p) floats (float32 states: twice the 16-bit backward's).
const char* chunk_bwd_f32_cuda(const GlaParams& p, int passes, void* stream);
// Shared memory per block of the K=128 chunked backward (checked in chunk_bwd.cu). GPUs with
// less per-block opt-in shared memory (sm_86/sm_89: 99 KB) take K in slices of 64.
constexpr int64_t kCudaChunkBwdSmemBytesK128 = 156160;
// Widest K slice the chunk kernels take on the current device: 128 or 64 (see above).
int64_t chunk_cuda_max_k();

}  // namespace gla
