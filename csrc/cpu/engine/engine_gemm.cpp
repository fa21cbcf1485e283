// The engine's matrix products outside its own kernels, shared by both loops: the vendor GEMM
// (at::mm_out / addmm_out on the parameter itself, MKL / oneDNN; in the weights' dtype, so
// bf16 reaches AMX / AVX512-BF16 where the CPU has them), the stage driver that runs vendor
// stages between parallel regions, and the measured choice between the two per kind.
//
// Which is faster depends on the rows (few rows stream the weights: own kernel; many rows
// are compute-bound: the vendor's cache blocking wins) and on the CPU, so it is measured at
// first use per (rows bucket, threads), per loop (the token step's own kernel is the GEMV of
// linear.h, the window's the chunk kernel's micro-kernel).
#include "cpu/engine/engine.h"

#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <chrono>
#include <ctime>

namespace gla {

namespace {

// Seconds for the measurement: this thread's CPU time when the call runs on one thread (time
// descheduled on a shared machine does not count), else wall time.
double now_seconds(bool thread_time) {
  if (thread_time) {
    timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return ts.tv_sec + 1e-9 * ts.tv_nsec;
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

int64_t bucket(int64_t n) {
  int64_t b = 1;
  while (b < n) b <<= 1;
  return b;
}

// A float32 view [rows, cols] with leading dimension ld of an engine buffer.
at::Tensor view(const float* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(const_cast<float*>(p), {rows, cols}, {ld, 1},
                       at::TensorOptions().dtype(at::kFloat));
}

// Float32 weight rows widened per block of the widened 16-bit route: 1 MB of scratch (256
// rows of a 1024-wide matrix; the block's GEMM keeps MKL's float32 rate), at least 256 rows
// (each block's GEMM re-reads all of A: 23-row blocks of an 11008-wide matrix ran 4.2x the
// float32 GEMM). The same numbers as gla_ext.matmul16's SCRATCH_FLOATS / MIN_BLOCK_ROWS.
constexpr int64_t kWidenFloats = int64_t{1} << 18, kWidenMinRows = 256;

// out (+)= A W^T for float32 W, straight into out (no copy).
void mm_into(at::Tensor out, const at::Tensor& A, const at::Tensor& W, bool accumulate) {
  if (accumulate)
    at::addmm_out(out, out, A, W.t());
  else
    at::mm_out(out, A, W.t());
}

// out (+)= A W^T. 16-bit weights: widened to float32 a block of rows at a time (widen), or A
// rounded to their dtype (as nn.Linear would) and the product widened.
void vendor_mm(const at::Tensor& out, const at::Tensor& A, const at::Tensor& W, bool accumulate,
               bool widen) {
  if (W.scalar_type() == at::kFloat) return mm_into(out, A, W, accumulate);
  if (widen) {
    const int64_t rows = W.size(0),
                  step = std::max(kWidenMinRows, kWidenFloats / std::max<int64_t>(1, W.size(1)));
    for (int64_t r0 = 0; r0 < rows; r0 += step) {
      const int64_t r1 = std::min(rows, r0 + step);
      mm_into(out.slice(1, r0, r1), A, W.slice(0, r0, r1).to(at::kFloat), accumulate);
    }
    return;
  }
  const at::Tensor r = at::mm(A.to(W.scalar_type()), W.t());
  if (accumulate)
    out.add_(r);
  else
    out.copy_(r);
}

// The input and output of kind's product (layer 0) in a call's buffers.
struct KindIO {
  const float* A;
  int64_t lda;
  float* out;
  int64_t ldo;
};
KindIO kind_io(int kind, const float* x, int64_t E, const EngineBufs& b, int64_t dp, int64_t a,
               int64_t f_pad) {
  switch (kind) {
    case kMatIn: return {x, E, b.h, dp};
    case kMatProj: return {b.xn, dp, b.proj, b.ldp};
    case kMatWo: return {b.o, a, b.h, dp};
    case kMatW13: return {b.xn, dp, b.u, 2 * f_pad};
    default: return {b.act, f_pad, b.h, dp};
  }
}

}  // namespace

void CpuEngine::vendor_product(const EngineProduct& p, const float* A, int64_t lda, int64_t M,
                               float* out, int64_t ldo, bool accumulate) const {
  for (size_t i = 0; i < p.parts.size(); ++i) {
    const at::Tensor& w = p.parts[i].w;
    vendor_mm(view(out + p.cols[i], M, w.size(0), ldo), view(A, M, w.size(1), lda), w, accumulate,
              widen16_);
  }
}

void CpuEngine::run_stages(const std::vector<EngineStage>& stages, const float* x, int64_t M,
                           const EngineBufs& b,
                           const std::function<void(size_t, size_t)>& region) const {
  for (size_t s0 = 0; s0 < stages.size();) {
    if (!stages[s0].vendor) {
      size_t s1 = s0;
      while (s1 < stages.size() && !stages[s1].vendor) ++s1;
      region(s0, s1);
      s0 = s1;
      continue;
    }
    at::AutoDispatchBelowAutograd below;
    const EngineStage& st = stages[s0++];
    const Layer& L = layers_[st.layer];
    switch (st.op) {
      case kOpIn:
        vendor_product(in_, x, E_, M, b.h, dp_, false);
        if (!in_b_.empty()) view(b.h, M, d_, dp_).add_(view(in_b_.data(), 1, d_, d_));
        break;
      case kOpProj: vendor_product(L.proj, b.xn, dp_, M, b.proj, b.ldp, false); break;
      case kOpGate2: {  // in float32: the [a, rank] weight widened costs nothing, and its
        // rank-wide input is not rounded to bf16 a second time
        const at::Tensor w = L.gate2.parts[0].w.to(at::kFloat);
        vendor_mm(view(b.proj + Pp_, M, a_, b.ldp), view(b.proj + off_gate_, M, rank_, b.ldp), w,
                  false, false);
        break;
      }
      case kOpWo: vendor_product(L.wo, b.o, a_, M, b.h, dp_, true); break;
      case kOpW13: vendor_product(L.w13, b.xn, dp_, M, b.u, 2 * f_pad_, false); break;
      default: vendor_product(L.w2, b.act, f_pad_, M, b.h, dp_, true); break;
    }
  }
}

void CpuEngine::set_widen16(bool widen) {
  std::lock_guard<std::mutex> lock(mutex_);
  if (widen == widen16_) return;
  widen16_ = widen;
  window_choices_.clear();
  step_choices_.clear();
}

// Per kind, layer 0's product (all_layers: every layer's, one after the other) on M rows
// with each engine, interleaved, best of at least 3
// pairs (more, up to 20, while a pair takes under 20 ms; one pair when each run takes over
// 50 ms and they differ by more than 1.5x, two otherwise). Before the vendor GEMM's first
// full run, one on 16 rows scaled up: a vendor GEMM far behind (bf16 without AMX /
// AVX512-BF16 runs at about 1 GFLOP/s) is not run on all rows. Inputs and outputs are the
// call's own buffers (inputs other than x filled with 0.5 first): a transient allocation of
// tens of MB here would stay in the process's heap after the call (glibc keeps freed heap
// below its trim threshold). all_layers is for the token step: its products are small, and
// one layer's weights repeated stay in the caches, where the GEMV kernels gain less from
// that than the vendor GEMM (measured: 50M float32 batch 64, layer 0 alone picked the vendor
// GEMM for proj and w13, the whole step then 111 ms against 90 ms on the own kernels).
CpuEngine::Choice CpuEngine::choose(ChoiceTable& table, int64_t M, int nt, int64_t gemm,
                                    const float* x, const EngineBufs& b, const OwnRun& own,
                                    bool all_layers) {
  Choice c{};
  if (quantized_) return c;  // no vendor route for quantized weights
  if (gemm == kGemmOwn || gemm == kGemmVendor) {
    c.fill(gemm == kGemmVendor);
    return c;
  }
  const auto key = std::make_pair(bucket(M), nt);
  auto it = table.find(key);
  if (it != table.end()) return it->second;
  const bool thread_time = nt == 1;
  const int64_t tiny = std::min<int64_t>(M, 16);
  for (int kind = 0; kind < kNumMatKinds; ++kind) {
    if (kind == kMatIn && in_.parts.empty()) continue;
    ensure_packed(kind);
    const int64_t layers = kind == kMatIn || !all_layers ? 1 : num_layers();
    const KindIO io = kind_io(kind, x, E_, b, dp_, a_, f_pad_);
    if (kind != kMatIn) view(io.A, M, kind_k(kind), io.lda).fill_(0.5f);
    auto t_own_run = [&] {
      const double t0 = now_seconds(thread_time);
      for (int64_t l = 0; l < layers; ++l)
        own(products(kind, l)[0]->packed, io.A, io.lda, M, io.out, io.ldo, nt);
      return now_seconds(thread_time) - t0;
    };
    auto vendor = [&](int64_t rows) {
      const double t0 = now_seconds(thread_time);
      for (int64_t l = 0; l < layers; ++l)
        vendor_product(*products(kind, l)[0], io.A, io.lda, rows, io.out, io.ldo, false);
      return now_seconds(thread_time) - t0;
    };
    double t_own = t_own_run();
    // the own kernel, without a full run (not for the widened route: its widening is a cost
    // per call, not per row, so a run on a few rows does not scale up)
    if (!widen16_ && vendor(tiny) * M / tiny > 3 * t_own) continue;
    double t_vendor = vendor(M);
    const bool slow = std::min(t_own, t_vendor) > 0.05;
    if (!(slow && std::max(t_own, t_vendor) > 1.5 * std::min(t_own, t_vendor))) {
      for (int reps = 1; reps < (slow ? 2 : 20); ++reps) {
        if (reps >= 3 && t_own + t_vendor > 0.02) break;
        t_own = std::min(t_own, t_own_run());
        t_vendor = std::min(t_vendor, vendor(M));
      }
    }
    c[kind] = t_vendor < t_own;
  }
  table.emplace(key, c);
  release_unused();
  return c;
}

std::vector<EngineLayerPtrs> CpuEngine::layer_ptrs() const {
  std::vector<EngineLayerPtrs> out;
  for (const Layer& L : layers_)
    out.push_back({L.ln1_w.data(), L.ln1_b.data(), L.gate_b.data(),
                   use_norm_ ? L.rms_w.data() : nullptr, L.ln2_w.data(), L.ln2_b.data(),
                   &L.proj.packed, rank_ ? &L.gate2.packed : nullptr, &L.wo.packed,
                   &L.w13.packed, &L.w2.packed});
  return out;
}

EngineModel CpuEngine::model(const std::vector<EngineLayerPtrs>& layers) const {
  EngineModel m;
  m.E = E_; m.d = d_; m.dp = dp_; m.H = H_; m.D = D_; m.a = a_; m.f = f_; m.f_pad = f_pad_;
  m.half = nr_ / 2; m.nr = nr_; m.P = P_; m.Pp = Pp_; m.nl = num_layers(); m.rank = rank_;
  m.off_r = off_r_; m.off_gate = off_gate_; m.g_col = rank_ ? Pp_ : off_gate_;
  m.use_norm = use_norm_; m.use_gate = use_gate_;
  m.inv_normalizer = 1.f / normalizer_; m.eps = eps_; m.scale = scale_;
  m.in = in_.parts.empty() ? nullptr : &in_.packed;
  m.in_b = in_b_.empty() ? nullptr : in_b_.data();
  m.norm_w = norm_w_.data(); m.norm_b = norm_b_.data();
  m.layers = layers.data();
  return m;
}

}  // namespace gla
