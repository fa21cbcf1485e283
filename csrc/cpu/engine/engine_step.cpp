// The engine's token step (GLA.step, StatePool.step), see engine.h. Per token and layer:
//   xn   = LayerNorm(h)
//   proj = xn [Wq; Wk; Wv; (Wr); (Wg | Wg1)]^T           one product
//   gate = proj[:, gate1] Wg2^T                           low-rank gate only
//   per (row, head): state update fused with the output, RMSNorm, swish gate (step_impl.h)
//   h   += o Wo^T
//   xn   = LayerNorm(h); u = xn [W1 | W3]^T; act = silu(u1) * u3
//   h   += act W2^T
// then y = LayerNorm(h). All buffers live in a per-batch-size workspace; a step allocates
// only its outputs (y and, for step(), the new states; step_pool() writes the pool in place).
//
// Matrix products: the own GEMV kernels of linear.h below kStepVendorRows rows (decode batch
// 1..8 streams the weights: nothing to gain from a vendor GEMM), above it the measured
// per-kind choice of engine_gemm.cpp (e.g. a 256-row pool step).
//
// Threading policy (threads_for), measured rather than guessed, per batch size: the first
// kProbeSteps steps run on one thread, the next (up to) kProbeSteps on all of
// at::get_num_threads(); the faster median wins (all threads only if >= 10% faster),
// re-measured every kRechooseSteps steps. Why measured at run time: on idle cores two threads
// beat one (2-core Xeon VM, best-of: batch 1 0.45 vs 0.67 ms, batch 32 3.1 vs 7.8 ms), but
// with the cores shared (that VM under load average 8) a threaded step waits at every
// barrier for a descheduled partner (median batch 1 4.6 ms vs 0.8 ms on one thread). Models
// below kMinThreadBytes of weights always run on one thread.
#include "cpu/engine/engine.h"
#include "cpu/simd/denormals.h"

#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <chrono>
#include <cstring>
#include <unordered_set>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace gla {

namespace {

const char* kOp = "gla_ext.CpuEngine";
constexpr int64_t kStepVendorRows = 16;
constexpr size_t kProbeSteps = 5;
constexpr int64_t kRechooseSteps = 4096;
constexpr int64_t kMinThreadBytes = int64_t(1) << 20;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

// Rows (rows[i], or i) of src (float32, bf16 or fp16; row stride ld) as float32 into dst.
void rows_to_float(const at::Tensor& src, const int64_t* rows, int64_t n, int64_t E, float* dst) {
  const int64_t ld = src.stride(0), cs = src.stride(-1);
  auto copy = [&](auto* p) {
    for (int64_t i = 0; i < n; ++i) {
      const auto* r = p + (rows ? rows[i] : i) * ld;
      for (int64_t j = 0; j < E; ++j) dst[i * E + j] = static_cast<float>(r[j * cs]);
    }
  };
  switch (src.scalar_type()) {
    case at::kFloat: copy(src.data_ptr<float>()); break;
    case at::kBFloat16: copy(src.data_ptr<c10::BFloat16>()); break;
    case at::kHalf: copy(src.data_ptr<c10::Half>()); break;
    default: TORCH_CHECK_VALUE(false, kOp, ": unsupported x dtype ", src.scalar_type());
  }
}

// Writes n rows of float32 y (row i to output row rows[i], or i) into out's dtype.
void rows_from_float(const float* y, const int64_t* rows, int64_t n, int64_t d, at::Tensor& out) {
  auto copy = [&](auto* p) {
    using T = std::remove_pointer_t<decltype(p)>;
    for (int64_t i = 0; i < n; ++i) {
      T* r = p + (rows ? rows[i] : i) * d;
      for (int64_t j = 0; j < d; ++j) r[j] = static_cast<T>(y[i * d + j]);
    }
  };
  switch (out.scalar_type()) {
    case at::kFloat: copy(out.data_ptr<float>()); break;
    case at::kBFloat16: copy(out.data_ptr<c10::BFloat16>()); break;
    case at::kHalf: copy(out.data_ptr<c10::Half>()); break;
    default: TORCH_CHECK_VALUE(false, kOp, ": unsupported output dtype");
  }
}

// Runs fn(t, T) on T threads (one OpenMP region), or on this thread when T == 1.
template <class F>
void on_threads(int T, F fn) {
#ifdef _OPENMP
  if (T > 1) {
#pragma omp parallel num_threads(T)
    {
      FlushDenormals flush;
      fn(omp_get_thread_num(), omp_get_num_threads());
    }
    return;
  }
#endif
  FlushDenormals flush;
  fn(0, 1);
}

}  // namespace

int64_t CpuEngine::threads_for(int64_t B) const {
  const int64_t avail = at::get_num_threads();
  if (thread_limit > 0) return std::min(thread_limit, avail);
  if (avail <= 1 || weight_bytes() < kMinThreadBytes) return 1;
  const auto it = workspaces_.find(B);
  if (it == workspaces_.end()) return 1;
  const Workspace& ws = it->second;
  if (ws.chosen > 0) return std::min(ws.chosen, avail);
  return ws.probe_one.size() < kProbeSteps ? 1 : avail;
}

void CpuEngine::record_step_time(Workspace& ws, int T, double seconds) {
  if (thread_limit > 0 || at::get_num_threads() <= 1) return;
  if (ws.chosen > 0) {
    if (++ws.steps_since_choice >= kRechooseSteps) ws.chosen = 0;  // measure again
    return;
  }
  if (T <= 1) {
    ws.probe_one.push_back(seconds);
    return;
  }
  ws.probe_all.push_back(seconds);
  const double one = median(ws.probe_one);
  // A threaded step far slower than one thread: the cores are busy, stop measuring now.
  const bool hopeless = seconds > 3 * one;
  if (hopeless || ws.probe_all.size() >= kProbeSteps) {
    ws.chosen = !hopeless && median(ws.probe_all) < 0.9 * one ? T : 1;
    ws.steps_since_choice = 0;
    ws.probe_one.clear();
    ws.probe_all.clear();
  }
}

CpuEngine::Workspace& CpuEngine::workspace(int64_t B) {
  auto it = workspaces_.find(B);
  if (it != workspaces_.end()) return it->second;
  if (workspaces_.size() >= 8) workspaces_.clear();  // many batch sizes: keep memory bounded
  const int64_t T = std::max<int64_t>(1, at::get_num_threads());
  const int64_t ldp = Pp_ + (rank_ ? (a_ + nr_ - 1) / nr_ * nr_ : 0);
  Workspace ws;
  ws.x.resize(B * E_);
  ws.h.resize(B * dp_);
  ws.xn.resize(B * dp_);
  ws.xn_threads.resize(T * B * dp_);
  ws.proj.resize(B * ldp);
  ws.o.resize(B * a_);
  ws.u.resize(B * 2 * f_pad_);
  ws.act.resize(B * f_pad_);
  ws.scratch.resize(T * (a_ + 16));
  ws.y.resize(B * d_);
  ws.old_states.resize(num_layers() * B);
  ws.new_states.resize(num_layers() * B);
  return workspaces_.emplace(B, std::move(ws)).first->second;
}

void CpuEngine::run_step(int64_t B, Workspace& ws, const float* x, float* y, int64_t gemm) {
  const int T = static_cast<int>(threads_for(B));
  if (ws.xn_threads.size() < static_cast<size_t>(T * B * dp_)) {  // more threads than at creation
    ws.xn_threads.resize(T * B * dp_);
    ws.scratch.resize(T * (a_ + 16));
  }
  const int64_t ldp = static_cast<int64_t>(ws.proj.size()) / B;
  const EngineBufs bufs{ws.h.data(), ws.xn.data(), ws.proj.data(), ws.o.data(),
                        ws.u.data(), ws.act.data(), ldp};
  // the step's own kernel alone on one product (the choice's measurement), panels split
  const OwnRun own = [](const PackedMatrix& w, const float* A, int64_t lda, int64_t M, float* out,
                        int64_t ldo, int nt) {
    on_threads(nt, [&](int t, int n) {
      const int64_t np = w.num_panels();
      w.apply(A, lda, M, out, ldo, false, np * t / n, np * (t + 1) / n);
    });
  };
  const Choice vendor = gemm == kGemmAuto && (B < kStepVendorRows || quantized_)
                            ? Choice{}
                            : choose(step_choices_, B, T, gemm, x, bufs, own, true);
  for (int kind = 0; kind < kNumMatKinds; ++kind)
    if (!vendor[kind]) {
      ensure_packed(kind);
      step_own_[kind] = true;
    }
  last_step_ = vendor;
  const std::vector<EngineStage> stages = engine_stages(num_layers(), vendor.data(), rank_ > 0, false);
  const std::vector<EngineLayerPtrs> lp = layer_ptrs();
  StepPlan plan;
  plan.m = model(lp);
  plan.b = bufs;
  plan.B = B;
  plan.x = x;
  plan.old_states = ws.old_states.data();
  plan.new_states = ws.new_states.data();
  plan.y = y;
  plan.xn_threads = ws.xn_threads.data();
  plan.scratch = ws.scratch.data();
  plan.stages = stages.data();
  const auto t0 = std::chrono::steady_clock::now();
  int used = 1;
  run_stages(stages, x, B, bufs, [&](size_t s0, size_t s1) {
    on_threads(T, [&](int t, int n) {
      if (t == 0) used = n;
      kern_->step_thread(plan, s0, s1, t, n);
    });
  });
  record_step_time(ws, used, seconds_since(t0));
}

// A [B, H, D, D] float32 tensor for a new state. Its storage is one handed out by an earlier
// step that no tensor uses any more (our reference is the only one left), else a new one: fresh
// multi-megabyte allocations are page-faulted in on every step (at batch 32 that was most of
// the step's time). The tensor itself is always new (own TensorImpl, version counter, mode).
at::Tensor CpuEngine::fresh_state(Workspace& ws, int64_t B) {
  const size_t bytes = sizeof(float) * B * H_ * D_ * D_;
  c10::Storage storage;
  for (const c10::Storage& s : ws.spare) {
    if (s.use_count() == 1 && s.nbytes() == bytes) {
      storage = s;
      break;
    }
  }
  if (!storage) {
    storage = at::empty({B, H_, D_, D_}, at::TensorOptions().dtype(at::kFloat)).storage();
    if (ws.spare.size() < static_cast<size_t>(4 * num_layers())) ws.spare.push_back(storage);
  }
  at::Tensor t = at::detail::make_tensor<c10::TensorImpl>(
      std::move(storage), c10::DispatchKeySet(c10::DispatchKey::CPU),
      caffe2::TypeMeta::Make<float>());
  t.unsafeGetTensorImpl()->set_sizes_contiguous({B, H_, D_, D_});
  return t;
}

void CpuEngine::check_x(const at::Tensor& x) const {
  TORCH_CHECK_VALUE(x.scalar_type() == wdtype_ && x.device().is_cpu(), kOp, ": x must be a ",
                    wdtype_, " CPU tensor (the weights' dtype), got ", x.scalar_type(), " on ",
                    x.device());
  TORCH_CHECK_VALUE((x.dim() == 2 || (x.dim() == 3 && x.size(1) == 1)) && x.size(-1) == E_ &&
                        x.size(0) >= 1,
                    kOp, ": x must be [batch, ", E_, "] or [batch, 1, ", E_, "], got ", x.sizes());
}

// Float32 rows [B, E] of x (or of its rows `rows`): x itself when it already is one.
const float* CpuEngine::load_x(const at::Tensor& x, Workspace& ws, const int64_t* rows,
                               int64_t B) const {
  const at::Tensor x2 = x.dim() == 3 ? x.select(1, 0) : x;
  if (!rows && x2.scalar_type() == at::kFloat && x2.is_contiguous()) return x2.data_ptr<float>();
  rows_to_float(x2, rows, B, E_, ws.x.data());
  return ws.x.data();
}

std::tuple<at::Tensor, std::vector<at::Tensor>> CpuEngine::step(
    const at::Tensor& x, const std::vector<at::Tensor>& states, int64_t gemm) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_x(x);
  check_gemm(gemm);
  const int64_t B = x.size(0), nl = num_layers();
  check_states(states, B);

  // Outputs are allocated in the caller's mode (inference tensors under inference_mode, like
  // the generic path); everything below writes into buffers without autograd bookkeeping.
  at::Tensor y = at::empty({B, d_}, at::TensorOptions().dtype(wdtype_));
  std::vector<at::Tensor> new_states;
  new_states.reserve(nl);
  Workspace& ws = workspace(B);
  for (int64_t l = 0; l < nl; ++l) new_states.push_back(fresh_state(ws, B));

  at::AutoDispatchBelowADInplaceOrView below_autograd;
  std::vector<at::Tensor> olds;  // contiguous views (copies only if the caller's are not)
  olds.reserve(states.size());
  const int64_t per_row = H_ * D_ * D_;
  for (int64_t l = 0; l < nl; ++l) {
    const float* old = nullptr;
    if (!states.empty()) {
      olds.push_back(states[l].contiguous());
      old = olds.back().data_ptr<float>();
    }
    float* fresh = new_states[l].data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      ws.old_states[l * B + b] = old ? old + b * per_row : nullptr;
      ws.new_states[l * B + b] = fresh + b * per_row;
    }
  }
  const float* xp = load_x(x, ws, nullptr, B);
  if (wdtype_ == at::kFloat) {
    run_step(B, ws, xp, y.data_ptr<float>(), gemm);
  } else {
    run_step(B, ws, xp, ws.y.data(), gemm);
    rows_from_float(ws.y.data(), nullptr, B, d_, y);
  }
  return {y, new_states};
}

at::Tensor CpuEngine::step_pool(const at::Tensor& x, const std::vector<at::Tensor>& pools,
                                const at::Tensor& slots, int64_t gemm) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_x(x);
  check_gemm(gemm);
  const int64_t n = x.size(0), nl = num_layers();
  TORCH_CHECK_VALUE(static_cast<int64_t>(pools.size()) == nl, kOp, ": expected ", nl,
                    " pool tensors (one per layer), got ", pools.size());
  TORCH_CHECK_VALUE(pools[0].dim() == 4, kOp, ": pools must be [P, ", H_, ", ", D_, ", ", D_,
                    "], got ", pools[0].sizes());
  const int64_t cap = pools[0].size(0);
  for (const auto& s : pools)
    TORCH_CHECK_VALUE(s.scalar_type() == at::kFloat && s.device().is_cpu() && s.is_contiguous() &&
                          s.sizes() == at::IntArrayRef({cap, H_, D_, D_}),
                      kOp, ": each pool must be a contiguous float32 CPU tensor [", cap, ", ",
                      H_, ", ", D_, ", ", D_, "], got ", s.scalar_type(), " ", s.sizes());
  TORCH_CHECK_VALUE(slots.dim() == 1 && slots.size(0) == n && slots.device().is_cpu() &&
                        (slots.scalar_type() == at::kLong || slots.scalar_type() == at::kInt),
                    kOp, ": slots must be an int32/int64 CPU tensor [", n, "], got ",
                    slots.scalar_type(), " ", slots.sizes());
  const at::Tensor sl = slots.to(at::kLong).contiguous();
  const int64_t* sp = sl.data_ptr<int64_t>();
  std::vector<int64_t> rows, slot_of;
  rows.reserve(n);
  slot_of.reserve(n);
  std::unordered_set<int64_t> seen;
  for (int64_t i = 0; i < n; ++i) {
    if (sp[i] < 0) continue;
    TORCH_CHECK_VALUE(sp[i] < cap, kOp, ": slots[", i, "] = ", sp[i],
                      " is out of range for a pool of ", cap, " rows");
    TORCH_CHECK_VALUE(seen.insert(sp[i]).second, kOp, ": slot ", sp[i], " appears twice in slots");
    rows.push_back(i);
    slot_of.push_back(sp[i]);
  }
  at::Tensor y = at::zeros({n, d_}, at::TensorOptions().dtype(wdtype_));
  const int64_t B = static_cast<int64_t>(rows.size());
  if (B == 0) return y;

  at::AutoDispatchBelowADInplaceOrView below_autograd;
  Workspace& ws = workspace(B);
  const int64_t per_row = H_ * D_ * D_;
  for (int64_t l = 0; l < nl; ++l) {
    float* base = pools[l].data_ptr<float>();
    for (int64_t b = 0; b < B; ++b) {
      ws.old_states[l * B + b] = base + slot_of[b] * per_row;
      ws.new_states[l * B + b] = base + slot_of[b] * per_row;
    }
  }
  const bool all_rows = B == n;
  const float* xp = load_x(x, ws, all_rows ? nullptr : rows.data(), B);
  if (all_rows && wdtype_ == at::kFloat) {
    run_step(B, ws, xp, y.data_ptr<float>(), gemm);
  } else {
    run_step(B, ws, xp, ws.y.data(), gemm);
    rows_from_float(ws.y.data(), rows.data(), B, d_, y);
  }
  for (const auto& s : pools)  // written in place, like an in-place op (inference tensors
    if (!s.is_inference()) s.unsafeGetTensorImpl()->bump_version();  // have no counter)
  return y;
}

}  // namespace gla
