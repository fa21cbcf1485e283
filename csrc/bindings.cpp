// Torch ops (TORCH_LIBRARY) and the pybind11 module gla_ext._C.
// Here, and only here, tensors are checked and turned into gla::GlaParams.
#include <torch/extension.h>
#include <torch/library.h>

#include <cstdlib>
#if defined(__GLIBC__)
#include <malloc.h>
#endif
#include <string>
#include <tuple>
#include <vector>

#ifdef GLA_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#endif

#include "gla.h"
#include "cpu/engine/engine.h"
#include "cpu/engine/step_rows.h"
#include "cpu/linear_bindings.h"
#include "cpu/simd/simd_bindings.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

gla::DType to_gla_dtype(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return gla::DType::kFloat32;
    case at::kHalf: return gla::DType::kFloat16;
    case at::kBFloat16: return gla::DType::kBFloat16;
    case at::kDouble: return gla::DType::kFloat64;
    default:
      TORCH_CHECK(false, op, ": q/k/v must be float32, float16, bfloat16 or float64, got ", t);
  }
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_tensor(const Tensor& x, const char* name, const char* op, at::ScalarType dtype,
                  const Tensor& like, int64_t dim) {
  TORCH_CHECK(x.dim() == dim, op, ": ", name, " must have ", dim, " dimensions, got shape ",
              x.sizes());
  TORCH_CHECK(x.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ",
              x.scalar_type());
  TORCH_CHECK(x.device() == like.device(), op, ": ", name, " is on ", x.device(),
              " but q is on ", like.device());
  TORCH_CHECK(x.is_contiguous(), op, ": ", name, " must be contiguous");
}

void check_shape(const Tensor& x, const char* name, const char* op, at::IntArrayRef expected) {
  TORCH_CHECK(x.sizes() == expected, op, ": ", name, " must have shape ", expected, ", got ",
              x.sizes());
}

// Checks the forward inputs and fills the sizes and input pointers of p.
gla::GlaParams make_params(const char* op, const Tensor& q, const Tensor& k, const Tensor& v,
                           const Tensor& g, const OptTensor& h0, const OptTensor& cu_seqlens,
                           double scale) {
  gla::GlaParams p;
  p.dtype = to_gla_dtype(q.scalar_type(), op);
  const auto acc = acc_type(q.scalar_type());
  check_tensor(q, "q", op, q.scalar_type(), q, 4);
  check_tensor(k, "k", op, q.scalar_type(), q, 4);
  check_tensor(v, "v", op, q.scalar_type(), q, 4);
  check_tensor(g, "g", op, acc, q, 4);
  p.B = q.size(0);
  p.T = q.size(1);
  p.H = q.size(2);
  p.K = q.size(3);
  p.V = v.size(3);
  check_shape(k, "k", op, q.sizes());
  check_shape(g, "g", op, q.sizes());
  check_shape(v, "v", op, {p.B, p.T, p.H, p.V});
  p.N = p.B;
  if (cu_seqlens) {
    const Tensor& cu = *cu_seqlens;
    check_tensor(cu, "cu_seqlens", op, at::kLong, q, 1);
    TORCH_CHECK(p.B == 1, op, ": with cu_seqlens the batch size must be 1, got ", p.B);
    TORCH_CHECK(cu.numel() >= 2, op, ": cu_seqlens needs at least 2 entries");
    p.N = cu.numel() - 1;
    p.cu_seqlens = cu.data_ptr<int64_t>();
  }
  if (h0) {
    check_tensor(*h0, "initial_state", op, acc, q, 4);
    check_shape(*h0, "initial_state", op, {p.N, p.H, p.K, p.V});
    p.h0 = h0->data_ptr();
  }
  p.scale = scale;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.g = g.data_ptr();
  return p;
}

// State pools and V-first states (the *_fwd_state ops): checks initial_state (a dense
// [N, H, K|V, V|K] state, or with state_indices a pool [P, H, ...]) and wires it into p.
void attach_state(gla::GlaParams& p, const char* op, const Tensor& q, const OptTensor& h0,
                  const OptTensor& state_indices, bool inplace, bool v_first) {
  const auto acc = acc_type(q.scalar_type());
  const int64_t a = v_first ? p.V : p.K, b = v_first ? p.K : p.V;
  p.state_v_first = v_first;
  TORCH_CHECK(!inplace || state_indices, op, ": inplace_final_state needs state_indices");
  if (state_indices) {
    const Tensor& idx = *state_indices;
    check_tensor(idx, "state_indices", op, at::kLong, q, 1);
    TORCH_CHECK(idx.numel() == p.N, op, ": state_indices must have N=", p.N,
                " entries (one per sequence), got ", idx.numel());
    TORCH_CHECK(h0.has_value(), op, ": state_indices needs initial_state (the pool)");
    check_tensor(*h0, "initial_state (the pool)", op, acc, q, 4);
    TORCH_CHECK(h0->size(1) == p.H && h0->size(2) == a && h0->size(3) == b, op,
                ": the pool (initial_state) must be [P, ", p.H, ", ", a, ", ", b, "], got ",
                h0->sizes());
    p.P = h0->size(0);
    p.state_idx = idx.data_ptr<int64_t>();
    p.inplace_final = inplace;
  } else if (h0) {
    check_tensor(*h0, "initial_state", op, acc, q, 4);
    check_shape(*h0, "initial_state", op, {p.N, p.H, a, b});
  }
  if (h0) p.h0 = h0->data_ptr();
}

// The CPU kernels read state_indices on the host: every live index < P, none twice.
void check_indices_cpu(const gla::GlaParams& p, const char* op) {
  if (!p.state_idx) return;
  std::vector<bool> used(p.P, false);
  for (int64_t n = 0; n < p.N; ++n) {
    const int64_t r = p.state_idx[n];
    TORCH_CHECK(r < p.P, op, ": state_indices must be < P=", p.P, ", got ", r);
    if (r < 0) continue;
    TORCH_CHECK(!used[r], op, ": state_indices names pool row ", r, " twice");
    used[r] = true;
  }
}

struct FwdOut {
  Tensor o, ht;
};

// o is zeroed where no kernel writes it: tokens past cu_seqlens[-1] and padding rows.
FwdOut alloc_fwd(gla::GlaParams& p, const Tensor& q, const Tensor& v) {
  const std::vector<int64_t> o_shape{p.B, p.T, p.H, p.V};
  const bool gaps = p.cu_seqlens || p.state_idx;
  const auto state_opts = q.options().dtype(acc_type(q.scalar_type()));
  FwdOut out{gaps ? at::zeros(o_shape, v.options()) : at::empty(o_shape, v.options()),
             p.inplace_final ? at::empty({0}, state_opts)
             : p.state_v_first ? at::empty({p.N, p.H, p.V, p.K}, state_opts)
                               : at::empty({p.N, p.H, p.K, p.V}, state_opts)};
  p.o = out.o.data_ptr();
  p.ht = p.inplace_final ? const_cast<void*>(p.h0) : out.ht.data_ptr();
  return out;
}

using BwdOut = std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor>;

BwdOut alloc_bwd(const char* op, gla::GlaParams& p, const Tensor& q, const Tensor& v,
                 const Tensor& g, const Tensor& dout, const OptTensor& dht) {
  check_tensor(dout, "grad of o", op, v.scalar_type(), q, 4);
  check_shape(dout, "grad of o", op, v.sizes());
  p.dout = dout.data_ptr();
  if (dht) {
    check_tensor(*dht, "grad of final_state", op, g.scalar_type(), q, 4);
    check_shape(*dht, "grad of final_state", op, {p.N, p.H, p.K, p.V});
    p.dht = dht->data_ptr();
  }
  // tokens past cu_seqlens[-1] get zero gradients: no kernel writes them
  auto grad_like = [&](const Tensor& x) { return p.cu_seqlens ? at::zeros_like(x) : at::empty_like(x); };
  BwdOut out{grad_like(q), grad_like(q), grad_like(v), grad_like(g),
             at::empty({p.N, p.H, p.K, p.V}, g.options())};
  p.dq = std::get<0>(out).data_ptr();
  p.dk = std::get<1>(out).data_ptr();
  p.dv = std::get<2>(out).data_ptr();
  p.dg = std::get<3>(out).data_ptr();
  p.dh0 = std::get<4>(out).data_ptr();
  return out;
}

// The CPU kernels read cu_seqlens on the host; check the offsets there too.
void check_offsets_cpu(const gla::GlaParams& p, const char* op) {
  if (!p.cu_seqlens) return;
  TORCH_CHECK(p.cu_seqlens[0] == 0, op, ": cu_seqlens must start at 0");
  for (int64_t n = 0; n < p.N; ++n)
    TORCH_CHECK(p.cu_seqlens[n + 1] >= p.cu_seqlens[n], op, ": cu_seqlens must be non-decreasing");
  TORCH_CHECK(p.cu_seqlens[p.N] <= p.T, op, ": cu_seqlens must end at T=", p.T, " or before");
}

// ---- CPU ------------------------------------------------------------------------------
// `reverse` applies to the recurrent kernels, `chunk_size` to the chunked ones.

std::tuple<Tensor, Tensor> run_fwd_cpu(const char* op, void (*kernel)(const gla::GlaParams&),
                                       const Tensor& q, const Tensor& k, const Tensor& v,
                                       const Tensor& g, const OptTensor& h0,
                                       const OptTensor& cu_seqlens, double scale, bool reverse,
                                       int64_t chunk_size) {
  auto p = make_params(op, q, k, v, g, h0, cu_seqlens, scale);
  check_offsets_cpu(p, op);
  p.reverse = reverse;
  p.chunk_size = chunk_size;
  auto out = alloc_fwd(p, q, v);
  kernel(p);
  return {out.o, out.ht};
}

BwdOut run_bwd_cpu(const char* op, void (*kernel)(const gla::GlaParams&), const Tensor& q,
                   const Tensor& k, const Tensor& v, const Tensor& g, const Tensor& dout,
                   const OptTensor& dht, const OptTensor& h0, const OptTensor& cu_seqlens,
                   double scale, bool reverse, int64_t chunk_size) {
  auto p = make_params(op, q, k, v, g, h0, cu_seqlens, scale);
  check_offsets_cpu(p, op);
  p.reverse = reverse;
  p.chunk_size = chunk_size;
  auto out = alloc_bwd(op, p, q, v, g, dout, dht);
  kernel(p);
  return out;
}

// Forward with state pools / V-first states (forward only; ht is empty when in place).
std::tuple<Tensor, Tensor> run_fwd_state_cpu(const char* op, void (*kernel)(const gla::GlaParams&),
                                             const Tensor& q, const Tensor& k, const Tensor& v,
                                             const Tensor& g, const OptTensor& h0,
                                             const OptTensor& state_indices,
                                             const OptTensor& cu_seqlens, double scale,
                                             bool reverse, int64_t chunk_size, bool inplace,
                                             bool v_first) {
  auto p = make_params(op, q, k, v, g, std::nullopt, cu_seqlens, scale);
  check_offsets_cpu(p, op);
  attach_state(p, op, q, h0, state_indices, inplace, v_first);
  check_indices_cpu(p, op);
  p.reverse = reverse;
  p.chunk_size = chunk_size;
  auto out = alloc_fwd(p, q, v);
  kernel(p);
  return {out.o, out.ht};
}

// *_fwd_state: h0 dense or a pool read through state_indices, dense final states returned.
// *_fwd_inplace: final states written into the pool rows state_indices names; returns o.
std::tuple<Tensor, Tensor> recurrent_fwd_state_cpu(const Tensor& q, const Tensor& k,
                                                   const Tensor& v, const Tensor& g,
                                                   const OptTensor& h0,
                                                   const OptTensor& state_indices,
                                                   const OptTensor& cu_seqlens, double scale,
                                                   bool reverse, bool v_first) {
  return run_fwd_state_cpu("gla_ext.recurrent_fwd_state (CPU)", gla::recurrent_fwd_cpu, q, k, v,
                           g, h0, state_indices, cu_seqlens, scale, reverse, 0, false, v_first);
}

Tensor recurrent_fwd_inplace_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                 const Tensor& g, const Tensor& pool, const Tensor& state_indices,
                                 const OptTensor& cu_seqlens, double scale, bool reverse,
                                 bool v_first) {
  return std::get<0>(run_fwd_state_cpu("gla_ext.recurrent_fwd_inplace (CPU)",
                                       gla::recurrent_fwd_cpu, q, k, v, g, pool, state_indices,
                                       cu_seqlens, scale, reverse, 0, true, v_first));
}

std::tuple<Tensor, Tensor> chunk_fwd_state_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                               const Tensor& g, const OptTensor& h0,
                                               const OptTensor& state_indices,
                                               const OptTensor& cu_seqlens, double scale,
                                               int64_t chunk_size, bool v_first) {
  return run_fwd_state_cpu("gla_ext.chunk_fwd_state (CPU)", gla::chunk_fwd_cpu, q, k, v, g, h0,
                           state_indices, cu_seqlens, scale, false, chunk_size, false, v_first);
}

Tensor chunk_fwd_inplace_cpu(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                             const Tensor& pool, const Tensor& state_indices,
                             const OptTensor& cu_seqlens, double scale, int64_t chunk_size,
                             bool v_first) {
  return std::get<0>(run_fwd_state_cpu("gla_ext.chunk_fwd_inplace (CPU)", gla::chunk_fwd_cpu, q,
                                       k, v, g, pool, state_indices, cu_seqlens, scale, false,
                                       chunk_size, true, v_first));
}

std::tuple<Tensor, Tensor> recurrent_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                             const Tensor& g, const OptTensor& h0,
                                             const OptTensor& cu_seqlens, double scale,
                                             bool reverse) {
  return run_fwd_cpu("gla_ext.recurrent_fwd (CPU)", gla::recurrent_fwd_cpu, q, k, v, g, h0,
                     cu_seqlens, scale, reverse, 0);
}

BwdOut recurrent_bwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                         const Tensor& dout, const OptTensor& dht, const OptTensor& h0,
                         const OptTensor& cu_seqlens, double scale, bool reverse) {
  return run_bwd_cpu("gla_ext.recurrent_bwd (CPU)", gla::recurrent_bwd_cpu, q, k, v, g, dout,
                     dht, h0, cu_seqlens, scale, reverse, 0);
}

std::tuple<Tensor, Tensor> chunk_fwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v,
                                         const Tensor& g, const OptTensor& h0,
                                         const OptTensor& cu_seqlens, double scale,
                                         int64_t chunk_size) {
  return run_fwd_cpu("gla_ext.chunk_fwd (CPU)", gla::chunk_fwd_cpu, q, k, v, g, h0, cu_seqlens,
                     scale, false, chunk_size);
}

BwdOut chunk_bwd_cpu(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                     const Tensor& dout, const OptTensor& dht, const OptTensor& h0,
                     const OptTensor& cu_seqlens, double scale, int64_t chunk_size) {
  return run_bwd_cpu("gla_ext.chunk_bwd (CPU)", gla::chunk_bwd_cpu, q, k, v, g, dout, dht, h0,
                     cu_seqlens, scale, false, chunk_size);
}

// ---- CUDA -----------------------------------------------------------------------------
#ifdef GLA_WITH_CUDA

void check_cuda(const char* err, const char* op) {
  TORCH_CHECK(err == nullptr, op, ": ", err ? err : "");
}

// make_params plus what the CUDA recurrent kernels need: no float64, K within one pass.
gla::GlaParams recurrent_cuda_params(const char* op, const Tensor& q, const Tensor& k,
                                     const Tensor& v, const Tensor& g, const OptTensor& h0,
                                     const OptTensor& cu_seqlens, double scale, bool reverse) {
  auto p = make_params(op, q, k, v, g, h0, cu_seqlens, scale);
  TORCH_CHECK(p.dtype != gla::DType::kFloat64, op, ": float64 is not supported on CUDA");
  TORCH_CHECK(p.K <= gla::kCudaRecurrentMaxK, op, ": K must be <= ", gla::kCudaRecurrentMaxK,
              " (the Python wrapper splits wider K), got ", p.K);
  p.reverse = reverse;
  return p;
}

// make_params plus what the tensor-core chunked kernels need (bf16/fp16 only reach them).
gla::GlaParams chunk_cuda_params(const char* op, const Tensor& q, const Tensor& k,
                                 const Tensor& v, const Tensor& g, const OptTensor& h0,
                                 const OptTensor& cu_seqlens, double scale) {
  auto p = make_params(op, q, k, v, g, h0, cu_seqlens, scale);
  TORCH_CHECK(p.K <= gla::kCudaChunkMaxK, op, ": K must be <= ", gla::kCudaChunkMaxK,
              " (the Python wrapper splits wider K), got ", p.K);
  return p;
}

// float32 q/k/v whose K fits one pass of the tensor-core chunk kernels take the tf32 chunked
// forward (wider K: the recurrent kernel, up to K = 256).
bool f32_chunk_forward(const Tensor& q) {
  return q.scalar_type() == at::kFloat && q.dim() == 4 && q.size(3) <= gla::chunk_cuda_max_k();
}

// tf32 passes from torch's float32 matmul precision, read per call as torch's own matmuls
// read it (torch.set_float32_matmul_precision / torch.backends.cuda.matmul.allow_tf32):
// "highest" (the default) -> 3xTF32, "high" / "medium" -> one tf32 pass.
int f32_passes() {
  return at::globalContext().float32MatmulPrecision() == at::Float32MatmulPrecision::HIGHEST
             ? 3 : 1;
}

// A float32 scratch tensor of `floats` elements on q's device, wired into p (none for 0).
Tensor attach_workspace(gla::GlaParams& p, int64_t floats, const Tensor& q) {
  if (floats <= 0) return Tensor();
  Tensor workspace = at::empty({floats}, q.options().dtype(at::kFloat));
  p.workspace = workspace.data_ptr<float>();
  return workspace;
}

// The chunked forward's launch, fused or split (chunk_fwd.cu's want_split, a rule for 16-bit
// and one for float32): only the split path (few sequences x heads, long sequences) takes a
// workspace, 16-bit chunk states or, for float32 (tf32 kernels, precision from torch:
// f32_passes), float32 ones.
void run_chunk_fwd(gla::GlaParams& p, const Tensor& q, bool f32, const char* op) {
  const int64_t floats = gla::chunk_fwd_cuda_workspace_floats(p);
  TORCH_CHECK(floats >= 0, op, ": GLA_EXT_CHUNK_FWD must be fused, split or auto, got '",
              std::getenv("GLA_EXT_CHUNK_FWD"), "'");
  Tensor workspace = attach_workspace(p, floats, q);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_cuda(f32 ? gla::chunk_fwd_f32_cuda(p, f32_passes(), stream) : gla::chunk_fwd_cuda(p, stream),
             op);
}

std::tuple<Tensor, Tensor> recurrent_fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v,
                                              const Tensor& g, const OptTensor& h0,
                                              const OptTensor& cu_seqlens, double scale,
                                              bool reverse) {
  const char* op = "gla_ext.recurrent_fwd (CUDA)";
  c10::cuda::CUDAGuard guard(q.device());
  auto p = recurrent_cuda_params(op, q, k, v, g, h0, cu_seqlens, scale, reverse);
  auto out = alloc_fwd(p, q, v);
  check_cuda(gla::recurrent_fwd_cuda(p, c10::cuda::getCurrentCUDAStream().stream()), op);
  return {out.o, out.ht};
}

BwdOut recurrent_bwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                          const Tensor& dout, const OptTensor& dht, const OptTensor& h0,
                          const OptTensor& cu_seqlens, double scale, bool reverse) {
  const char* op = "gla_ext.recurrent_bwd (CUDA)";
  c10::cuda::CUDAGuard guard(q.device());
  auto p = recurrent_cuda_params(op, q, k, v, g, h0, cu_seqlens, scale, reverse);
  auto out = alloc_bwd(op, p, q, v, g, dout, dht);
  Tensor workspace = attach_workspace(p, gla::recurrent_bwd_cuda_workspace_floats(p), q);
  check_cuda(gla::recurrent_bwd_cuda(p, c10::cuda::getCurrentCUDAStream().stream()), op);
  return out;
}

// Forward with state pools / V-first states on CUDA. Pool indices are checked on the host by
// the Python wrapper (reading them here would synchronise); the kernels treat any index
// outside [0, P) as a padding row, so a bad one cannot write outside the pool.
std::tuple<Tensor, Tensor> recurrent_fwd_pool_cuda(const Tensor& q, const Tensor& k,
                                                   const Tensor& v, const Tensor& g,
                                                   const OptTensor& h0,
                                                   const OptTensor& state_indices,
                                                   const OptTensor& cu_seqlens, double scale,
                                                   bool reverse, bool inplace, bool v_first) {
  const char* op = inplace ? "gla_ext.recurrent_fwd_inplace (CUDA)"
                           : "gla_ext.recurrent_fwd_state (CUDA)";
  c10::cuda::CUDAGuard guard(q.device());
  auto p = recurrent_cuda_params(op, q, k, v, g, std::nullopt, cu_seqlens, scale, reverse);
  attach_state(p, op, q, h0, state_indices, inplace, v_first);
  auto out = alloc_fwd(p, q, v);
  check_cuda(gla::recurrent_fwd_cuda(p, c10::cuda::getCurrentCUDAStream().stream()), op);
  return {out.o, out.ht};
}

std::tuple<Tensor, Tensor> chunk_fwd_pool_cuda(const Tensor& q, const Tensor& k,
                                               const Tensor& v, const Tensor& g,
                                               const OptTensor& h0,
                                               const OptTensor& state_indices,
                                               const OptTensor& cu_seqlens, double scale,
                                               bool inplace, bool v_first) {
  c10::cuda::CUDAGuard guard(q.device());
  const bool f32 = f32_chunk_forward(q);
  if (q.scalar_type() != at::kHalf && q.scalar_type() != at::kBFloat16 && !f32)
    return recurrent_fwd_pool_cuda(q, k, v, g, h0, state_indices, cu_seqlens, scale, false,
                                   inplace, v_first);
  const char* op = inplace ? "gla_ext.chunk_fwd_inplace (CUDA)"
                           : "gla_ext.chunk_fwd_state (CUDA)";
  auto p = chunk_cuda_params(op, q, k, v, g, std::nullopt, cu_seqlens, scale);
  attach_state(p, op, q, h0, state_indices, inplace, v_first);
  auto out = alloc_fwd(p, q, v);
  run_chunk_fwd(p, q, f32, op);
  return {out.o, out.ht};
}

std::tuple<Tensor, Tensor> recurrent_fwd_state_cuda(const Tensor& q, const Tensor& k,
                                                    const Tensor& v, const Tensor& g,
                                                    const OptTensor& h0,
                                                    const OptTensor& state_indices,
                                                    const OptTensor& cu_seqlens, double scale,
                                                    bool reverse, bool v_first) {
  return recurrent_fwd_pool_cuda(q, k, v, g, h0, state_indices, cu_seqlens, scale, reverse,
                                 false, v_first);
}

Tensor recurrent_fwd_inplace_cuda(const Tensor& q, const Tensor& k, const Tensor& v,
                                  const Tensor& g, const Tensor& pool,
                                  const Tensor& state_indices, const OptTensor& cu_seqlens,
                                  double scale, bool reverse, bool v_first) {
  return std::get<0>(recurrent_fwd_pool_cuda(q, k, v, g, pool, state_indices, cu_seqlens, scale,
                                             reverse, true, v_first));
}

std::tuple<Tensor, Tensor> chunk_fwd_state_cuda(const Tensor& q, const Tensor& k,
                                                const Tensor& v, const Tensor& g,
                                                const OptTensor& h0,
                                                const OptTensor& state_indices,
                                                const OptTensor& cu_seqlens, double scale,
                                                int64_t /*chunk_size*/, bool v_first) {
  return chunk_fwd_pool_cuda(q, k, v, g, h0, state_indices, cu_seqlens, scale, false, v_first);
}

Tensor chunk_fwd_inplace_cuda(const Tensor& q, const Tensor& k, const Tensor& v,
                              const Tensor& g, const Tensor& pool, const Tensor& state_indices,
                              const OptTensor& cu_seqlens, double scale,
                              int64_t /*chunk_size*/, bool v_first) {
  return std::get<0>(chunk_fwd_pool_cuda(q, k, v, g, pool, state_indices, cu_seqlens, scale,
                                         true, v_first));
}

// chunk_gla forward on CUDA: bf16/fp16 run the tensor-core chunked kernels (K <= 128; the
// Python wrapper splits wider K; fused or split, see chunk_fwd.cu); float32 runs the tf32
// chunked forward (chunk_fwd_f32.cuh; precision from torch, f32_passes) up to the chunk
// kernels' K, and the fused recurrent kernel (same math) for wider K.
std::tuple<Tensor, Tensor> chunk_fwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v,
                                          const Tensor& g, const OptTensor& h0,
                                          const OptTensor& cu_seqlens, double scale,
                                          int64_t /*chunk_size: the kernel uses 64*/) {
  c10::cuda::CUDAGuard guard(q.device());
  const bool f32 = f32_chunk_forward(q);
  if (q.scalar_type() != at::kHalf && q.scalar_type() != at::kBFloat16 && !f32)
    return recurrent_fwd_cuda(q, k, v, g, h0, cu_seqlens, scale, false);
  const char* op = "gla_ext.chunk_fwd (CUDA)";
  auto p = chunk_cuda_params(op, q, k, v, g, h0, cu_seqlens, scale);
  auto out = alloc_fwd(p, q, v);
  run_chunk_fwd(p, q, f32, op);
  return {out.o, out.ht};
}

// chunk_gla backward on CUDA: bf16/fp16 run the tensor-core chunked backward (two launches;
// workspace of two 16-bit states per chunk and head); float32 runs the tf32 chunked backward
// (chunk_bwd_f32.cuh; float32 states, twice that workspace; precision from torch, f32_passes)
// exactly where the forward ran its chunked kernel (f32_chunk_forward), and the fused
// recurrent backward for wider K, as the forward does.
BwdOut chunk_bwd_cuda(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& g,
                      const Tensor& dout, const OptTensor& dht, const OptTensor& h0,
                      const OptTensor& cu_seqlens, double scale, int64_t /*chunk_size*/) {
  c10::cuda::CUDAGuard guard(q.device());
  const bool f32 = f32_chunk_forward(q);
  if (q.scalar_type() != at::kHalf && q.scalar_type() != at::kBFloat16 && !f32)
    return recurrent_bwd_cuda(q, k, v, g, dout, dht, h0, cu_seqlens, scale, false);
  const char* op = "gla_ext.chunk_bwd (CUDA)";
  auto p = chunk_cuda_params(op, q, k, v, g, h0, cu_seqlens, scale);
  auto out = alloc_bwd(op, p, q, v, g, dout, dht);
  Tensor workspace = attach_workspace(p, gla::chunk_bwd_cuda_workspace_floats(p), q);
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  check_cuda(f32 ? gla::chunk_bwd_f32_cuda(p, f32_passes(), stream) : gla::chunk_bwd_cuda(p, stream),
             op);
  return out;
}
#endif

}  // namespace

TORCH_LIBRARY(gla_ext, m) {
  m.def(
      "recurrent_fwd(Tensor q, Tensor k, Tensor v, Tensor g, Tensor? h0, Tensor? cu_seqlens, "
      "float scale, bool reverse) -> (Tensor, Tensor)");
  m.def(
      "recurrent_bwd(Tensor q, Tensor k, Tensor v, Tensor g, Tensor dout, Tensor? dht, "
      "Tensor? h0, Tensor? cu_seqlens, float scale, bool reverse) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "chunk_fwd(Tensor q, Tensor k, Tensor v, Tensor g, Tensor? h0, Tensor? cu_seqlens, "
      "float scale, int chunk_size) -> (Tensor, Tensor)");
  // State pools / V-first states, forward only (docs/design.md "State pools"):
  // *_fwd_state reads h0 (dense, or a pool through state_indices) and returns dense final
  // states; *_fwd_inplace writes the final states into the pool rows and returns o.
  m.def(
      "recurrent_fwd_state(Tensor q, Tensor k, Tensor v, Tensor g, Tensor? h0, "
      "Tensor? state_indices, Tensor? cu_seqlens, float scale, bool reverse, bool v_first) "
      "-> (Tensor, Tensor)");
  m.def(
      "recurrent_fwd_inplace(Tensor q, Tensor k, Tensor v, Tensor g, Tensor(a!) pool, "
      "Tensor state_indices, Tensor? cu_seqlens, float scale, bool reverse, bool v_first) "
      "-> Tensor");
  m.def(
      "chunk_fwd_state(Tensor q, Tensor k, Tensor v, Tensor g, Tensor? h0, "
      "Tensor? state_indices, Tensor? cu_seqlens, float scale, int chunk_size, bool v_first) "
      "-> (Tensor, Tensor)");
  m.def(
      "chunk_fwd_inplace(Tensor q, Tensor k, Tensor v, Tensor g, Tensor(a!) pool, "
      "Tensor state_indices, Tensor? cu_seqlens, float scale, int chunk_size, bool v_first) "
      "-> Tensor");
  m.def(
      "chunk_bwd(Tensor q, Tensor k, Tensor v, Tensor g, Tensor dout, Tensor? dht, "
      "Tensor? h0, Tensor? cu_seqlens, float scale, int chunk_size) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(gla_ext, CPU, m) {
  m.impl("recurrent_fwd", &recurrent_fwd_cpu);
  m.impl("recurrent_bwd", &recurrent_bwd_cpu);
  m.impl("chunk_fwd", &chunk_fwd_cpu);
  m.impl("chunk_bwd", &chunk_bwd_cpu);
  m.impl("recurrent_fwd_state", &recurrent_fwd_state_cpu);
  m.impl("recurrent_fwd_inplace", &recurrent_fwd_inplace_cpu);
  m.impl("chunk_fwd_state", &chunk_fwd_state_cpu);
  m.impl("chunk_fwd_inplace", &chunk_fwd_inplace_cpu);
}

#ifdef GLA_WITH_CUDA
TORCH_LIBRARY_IMPL(gla_ext, CUDA, m) {
  m.impl("recurrent_fwd", &recurrent_fwd_cuda);
  m.impl("recurrent_bwd", &recurrent_bwd_cuda);
  m.impl("chunk_fwd", &chunk_fwd_cuda);
  m.impl("chunk_bwd", &chunk_bwd_cuda);
  m.impl("recurrent_fwd_state", &recurrent_fwd_state_cuda);
  m.impl("recurrent_fwd_inplace", &recurrent_fwd_inplace_cuda);
  m.impl("chunk_fwd_state", &chunk_fwd_state_cuda);
  m.impl("chunk_fwd_inplace", &chunk_fwd_inplace_cuda);
}
#endif

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gla_ext compiled kernels; the ops live under torch.ops.gla_ext";
  // One-off work (packing weights, measuring both engines once) frees large temporaries that
  // glibc keeps in its heap; giving them back keeps RSS at what the model really holds.
  m.def(
      "trim_heap",
      []() {
#if defined(__GLIBC__)
        return malloc_trim(0) != 0;
#else
        return false;
#endif
      },
      "return freed heap memory to the OS (glibc malloc_trim); True if any was released");
  gla::bind_cpu_linear(m);  // gla_ext._C.PackedLinear, linear_isa (csrc/cpu/linear_bindings.cpp)
  gla::bind_step_rows(m);   // gla_ext._C.StepRows (csrc/cpu/engine/step_rows.cpp)
  gla::bind_cpu_simd(m);    // cpu_features, cpu_isa, simd_eval (csrc/cpu/simd/simd_bindings.cpp)
  // The fused CPU engine of the GLA model (built and cached by gla_ext/cpu_engine.py).
  using OptList = std::vector<std::vector<std::optional<Tensor>>>;
  pybind11::class_<gla::CpuEngine, std::shared_ptr<gla::CpuEngine>>(m, "CpuEngine")
      .def(pybind11::init<const std::vector<std::optional<Tensor>>&, const OptList&, int64_t,
                          int64_t, double, double, double, const OptList&, const OptList&>(),
           pybind11::arg("globals"), pybind11::arg("layers"), pybind11::arg("num_heads"),
           pybind11::arg("head_dim"), pybind11::arg("gate_normalizer"), pybind11::arg("eps"),
           pybind11::arg("scale"), pybind11::arg("scales") = OptList{},
           pybind11::arg("offsets") = OptList{},
           "scales / offsets: per layer, per slot the float16 scales / int4 offsets of the "
           "quantized matrix whose qweight is in that slot (None elsewhere)")
      .def("status", &gla::CpuEngine::status, pybind11::arg("grad_enabled"),
           "0 ready, 1 stale (parameters changed since packing), 2 autograd needed")
      .def("step", &gla::CpuEngine::step, pybind11::arg("x"), pybind11::arg("states"),
           pybind11::arg("gemm") = 0, pybind11::call_guard<pybind11::gil_scoped_release>(),
           "x [B, E] or [B, 1, E], states: list of [B, H, D, D] (or []) -> (y, new_states); "
           "gemm: 0 measured (own kernels below 16 rows), 1 own kernels, 2 vendor GEMM")
      .def("step_pool", &gla::CpuEngine::step_pool, pybind11::arg("x"), pybind11::arg("pools"),
           pybind11::arg("slots"), pybind11::arg("gemm") = 0,
           pybind11::call_guard<pybind11::gil_scoped_release>(),
           "x [n, E] or [n, 1, E], pools: list of [P, H, D, D], slots [n] -> y; pools advanced "
           "in place (negative slot = padding row: zero output, no state touched)")
      .def("forward", &gla::CpuEngine::forward, pybind11::arg("x"), pybind11::arg("states"),
           pybind11::arg("return_state"), pybind11::arg("all_positions"),
           pybind11::arg("lengths") = std::nullopt, pybind11::arg("gemm") = 0,
           pybind11::call_guard<pybind11::gil_scoped_release>(),
           "x [B, T, E], states: list of [B, H, D, D] (or []), lengths: int [B] or None, "
           "gemm: 0 measured per shape, 1 own kernels, 2 vendor GEMM -> (y, new_states)")
      .def("threads_for", &gla::CpuEngine::threads_for, pybind11::arg("batch"))
      .def_readwrite("thread_limit", &gla::CpuEngine::thread_limit,
                     "0 = measured threading policy, n > 0 = at most n threads per step")
      .def_property("widen16", &gla::CpuEngine::widen16, &gla::CpuEngine::set_widen16,
                    "vendor GEMM of 16-bit weights: widened to float32 per block (True) or "
                    "in their dtype (False); setting it forgets the measured choices")
      .def("last_vendor", &gla::CpuEngine::last_vendor,
           "per matrix kind (in, proj, wo, w13, w2): whether the last forward used the vendor GEMM")
      .def("last_step_vendor", &gla::CpuEngine::last_step_vendor,
           "per matrix kind: whether the last step used the vendor GEMM")
      .def("choices", &gla::CpuEngine::choices,
           "measured window choices: [(rows bucket, threads, vendor GEMM per matrix kind)]")
      .def("step_choices", &gla::CpuEngine::step_choices,
           "measured step choices: [(rows bucket, threads, vendor GEMM per matrix kind)]")
      .def_property_readonly("packed_bytes", &gla::CpuEngine::packed_bytes,
                             "bytes of packed weight copies held now (any format)")
      .def_property_readonly("packed_float32_bytes", &gla::CpuEngine::packed_float32_bytes,
                             "bytes of float32 packed copies held now")
      .def_property_readonly("isa", &gla::CpuEngine::isa)
      .def_property_readonly("weight_bytes", &gla::CpuEngine::weight_bytes)
      .def_property_readonly("weight_format", &gla::CpuEngine::weight_format)
      .def_property_readonly("quantized", &gla::CpuEngine::quantized)
      .def_property_readonly("num_layers", &gla::CpuEngine::num_layers)
      .def_property_readonly("num_workspaces", &gla::CpuEngine::num_workspaces);
#ifdef GLA_WITH_CUDA
  m.def("cuda_chunk_max_k", [](int64_t device) {
        c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(device));
        return gla::chunk_cuda_max_k();
      }, pybind11::arg("device"),
        "widest K slice the chunked CUDA kernels take on this device (128, or 64 where the "
        "backward's shared memory does not fit)");
#endif
  m.def("build_info", []() {
    pybind11::dict info;
#ifdef GLA_WITH_CUDA
    // ops.py compares it with the device's opt-in shared memory per block (K slice 128 or 64)
    info["chunk_bwd_smem_bytes_k128"] = gla::kCudaChunkBwdSmemBytesK128;
#endif
#ifdef GLA_WITH_CUDA
    info["cuda"] = true;
#else
    info["cuda"] = false;
#endif
#ifdef _OPENMP
    info["openmp"] = true;
#else
    info["openmp"] = false;
#endif
    info["chunk_cpu"] = std::string(gla::chunk_cpu_description());
#ifdef GLA_WITH_CUDA
    info["chunk_cuda"] = std::string(
        "tensor-core chunked kernels for bf16/fp16 (K <= 128 per pass); float32: chunked "
        "tf32 forward and backward (K <= 128; wider K: fused recurrent kernels)");
#endif
    return info;
  });
}
