// The engine's window loop (GLA.forward over B*T rows: full, right-padded by `lengths`; the
// pool prefill gathers its slots' states and runs this), see engine.h and window_impl.h. The
// stages between two vendor products run in one parallel region of the engine's threads;
// a vendor product runs on the calling thread (it uses torch's own thread pool).
#include "cpu/engine/engine.h"
#include "cpu/simd/denormals.h"

#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <chrono>

namespace gla {

namespace {

const char* kOp = "gla_ext.CpuEngine";

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

}  // namespace

std::tuple<at::Tensor, std::vector<at::Tensor>> CpuEngine::forward(
    const at::Tensor& x_in, const std::vector<at::Tensor>& states, bool return_state,
    bool all_positions, const std::optional<at::Tensor>& lengths_in, int64_t gemm) {
  std::lock_guard<std::mutex> lock(mutex_);
  TORCH_CHECK_VALUE(!quantized_, kOp, ": the window loop runs float weights only (this model's are ",
                    weight_format(), ")");
  TORCH_CHECK_VALUE(x_in.scalar_type() == wdtype_ && x_in.device().is_cpu(), kOp,
                    ": x must be a ", wdtype_, " CPU tensor (the parameters' dtype), got ",
                    x_in.scalar_type(), " on ", x_in.device());
  TORCH_CHECK_VALUE(x_in.dim() == 3 && x_in.size(2) == E_ && x_in.size(0) >= 1 && x_in.size(1) >= 1,
                    kOp, ": x must be [batch, seq_len, ", E_, "], got ", x_in.sizes());
  check_gemm(gemm);
  const int64_t B = x_in.size(0), T = x_in.size(1), M = B * T, nl = num_layers();
  check_states(states, B);
  at::Tensor lengths;
  if (lengths_in && lengths_in->defined()) {
    TORCH_CHECK_VALUE(!all_positions, kOp, ": lengths cannot be combined with all positions");
    TORCH_CHECK_VALUE(lengths_in->device().is_cpu() && lengths_in->sizes() == at::IntArrayRef({B}) &&
                          !at::isFloatingType(lengths_in->scalar_type()),
                      kOp, ": lengths must be an integer CPU tensor [", B, "], got ",
                      lengths_in->scalar_type(), " ", lengths_in->sizes());
    lengths = lengths_in->to(at::kLong).contiguous();
    const int64_t lo = lengths.min().item<int64_t>(), hi = lengths.max().item<int64_t>();
    TORCH_CHECK_VALUE(lo >= 1 && hi <= T, kOp, ": lengths must be in [1, seq_len=", T,
                      "], got values in [", lo, ", ", hi, "]");
  }

  // computed in float32 whatever the parameters' dtype (states are float32 anyway); y gets
  // the parameters' dtype at the end, like the generic path's output
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor y = all_positions ? at::empty({B, T, d_}, opts) : at::empty({B, d_}, opts);
  std::vector<at::Tensor> new_states;
  if (return_state)
    for (int64_t l = 0; l < nl; ++l) new_states.push_back(at::empty({B, H_, D_, D_}, opts));

  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t C = T <= 64 ? round_up(T, 16) : 64;
  const int nt = omp_in_parallel() ? 1 : std::max(1, at::get_num_threads());
  const size_t ws_bytes = kern_->window_ws(C, D_);
  if (static_cast<int>(thread_ws_.size()) < nt) thread_ws_.resize(nt);
  std::vector<char*> ws(nt);
  for (int i = 0; i < nt; ++i) {
    if (thread_ws_[i].size() < ws_bytes) thread_ws_[i].assign(ws_bytes, 0);
    ws[i] = thread_ws_[i].data();
  }
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  std::vector<at::Tensor> h0_keep;
  std::vector<const float*> h0;
  std::vector<float*> ht;
  for (const auto& s : states) {
    h0_keep.push_back(s.contiguous());
    h0.push_back(h0_keep.back().data_ptr<float>());
  }
  for (auto& s : new_states) ht.push_back(s.data_ptr<float>());

  // activations: one buffer per call, not kept: a large window's activations (about the
  // size of the weights at [4, 512]) go back to the system when the call returns
  const int64_t ldp = Pp_ + (rank_ ? round_up(a_, nr_) : 0);
  const int64_t sizes[6] = {M * dp_, M * dp_, M * ldp, M * a_, M * 2 * f_pad_, M * f_pad_};
  int64_t total = 0;
  for (int64_t s : sizes) total += round_up(s, 16);
  const at::Tensor scratch = at::empty({total}, opts);
  float* base = scratch.data_ptr<float>();
  float* p[6];
  for (int i = 0; i < 6; ++i) {
    p[i] = base;
    base += round_up(sizes[i], 16);
  }
  const EngineBufs bufs{p[0], p[1], p[2], p[3], p[4], p[5], ldp};

  // the window's own kernel alone on one product (the choice's measurement): the input
  // projection's stage of a one-product model
  const EngineKernels* kern = kern_;
  const OwnRun own = [&](const PackedMatrix& w, const float* A, int64_t lda, int64_t rows,
                         float* out, int64_t ldo, int threads) {
    EngineModel m{};
    m.E = lda;
    m.d = m.dp = ldo;
    m.D = D_;
    m.in = &w;
    WindowPlan pl{};
    pl.m = m;
    pl.b.h = out;
    pl.B = rows;
    pl.T = 1;
    pl.C = C;
    pl.x = A;
    pl.ws = ws.data();
    const EngineStage in{kOpIn, 0, false};
    pl.stages = &in;
    std::atomic<int64_t> counter{0};
    pl.counters = &counter;
#pragma omp parallel num_threads(threads)
    {
      FlushDenormals ftz;
      kern->window_run(pl, 0, 1);
    }
  };
  const Choice vendor =
      choose(window_choices_, M, nt, gemm, x.data_ptr<float>(), bufs, own, false);
  for (int kind = 0; kind < kNumMatKinds; ++kind)
    if (!vendor[kind]) ensure_packed(kind);
  last_ = vendor;

  const std::vector<EngineLayerPtrs> lp = layer_ptrs();
  const std::vector<EngineStage> stages = engine_stages(nl, vendor.data(), rank_ > 0, true);
  WindowPlan pl;
  pl.m = model(lp);
  pl.b = bufs;
  pl.B = B;
  pl.T = T;
  pl.C = C;
  pl.x = x.data_ptr<float>();
  pl.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  pl.h0 = h0.empty() ? nullptr : h0.data();
  pl.ht = ht.empty() ? nullptr : ht.data();
  pl.y = y.data_ptr<float>();
  pl.all_positions = all_positions;
  pl.ws = ws.data();
  pl.stages = stages.data();
  std::vector<std::atomic<int64_t>> counters(stages.size());
  for (auto& c : counters) c.store(0, std::memory_order_relaxed);
  pl.counters = counters.data();
  EngineBarrier barrier;
  pl.barrier = &barrier;
  run_stages(stages, pl.x, M, bufs, [&](size_t s0, size_t s1) {
#pragma omp parallel num_threads(nt)
    {
#pragma omp single
      barrier.threads = omp_get_num_threads();  // (the single's implicit barrier publishes it)
      FlushDenormals ftz;
      kern->window_run(pl, static_cast<int64_t>(s0), static_cast<int64_t>(s1));
    }
  });
  if (wdtype_ != at::kFloat) {
    at::AutoDispatchBelowAutograd below;
    y = y.to(wdtype_);
  }
  return {y, new_states};
}

}  // namespace gla
