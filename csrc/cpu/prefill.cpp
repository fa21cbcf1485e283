// Fused CPU prefill (see prefill.h and prefill_impl.h). The body is compiled per instruction
// set through cpu/simd/per_isa.h (prefill_impl.h includes the chunk kernel's forward), and
// pick_cpu_isa() chooses at run time.
//
// Matrix engine, per kind of product (input projection, q/k/v/r/gate, output, W1|W3, W2) and
// per shape: the own kernel (the chunk kernel's register-blocked micro-kernel on column
// panels: float32 weights packed once, 16-bit weights widened per K block, never copied) or
// the vendor GEMM (at::mm_out / at::addmm_out on the model's own weight, MKL / oneDNN; in the
// weights' dtype, so bf16 reaches AMX / AVX512-BF16 where the CPU has them). Which is faster
// depends on the rows (few rows stream the weights: own kernel; many rows are compute-bound:
// the vendor's cache blocking wins) and on the CPU, so it is measured at first use per (rows
// bucket, threads), like the decoder's thread policy. A vendor GEMM runs on the calling
// thread between two parallel regions (it uses torch's own thread pool); the steps between
// two vendor GEMMs run in one region of the engine's threads.
#include "prefill.h"

#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <ctime>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define GLA_PREFILL_X86 1
#else
#define GLA_PREFILL_X86 0
#endif

#include "cpu_common.h"
#include "cpu/simd/denormals.h"
#include "gla.h"
#include "prefill_plan.h"

#define GLA_ISA_NS prefill
#define GLA_ISA_BODY "cpu/prefill_impl.h"
#include "cpu/simd/per_isa.h"

namespace gla {

namespace {

const char* kOp = "gla_ext.CpuPrefill";

struct IsaFns {
  int64_t (*panel)();
  size_t (*ws)(int64_t, int64_t);
  void (*run)(const PrefillPlan&, int64_t, int64_t);
  void (*gemm_all)(int64_t, int64_t, const float*, int64_t, const PrefillMat&, int64_t, float*,
                   int64_t, std::atomic<int64_t>*, char*, int64_t, int64_t);
};
#define GLA_PREFILL_FNS(ns)                                                           \
  IsaFns {                                                                            \
    &ns::panel_width, &ns::thread_workspace_bytes, &ns::run_steps, &ns::gemm_all_panels \
  }

IsaFns isa_fns(int isa) {
#if GLA_MULTI_ISA
  if (isa == static_cast<int>(CpuIsa::kAvx512)) return GLA_PREFILL_FNS(prefill_avx512);
  if (isa == static_cast<int>(CpuIsa::kAvx2)) return GLA_PREFILL_FNS(prefill_avx2);
#endif
  (void)isa;
  return GLA_PREFILL_FNS(prefill_generic);
}

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// dst[p][k][c] = row (p*np + c) of a float32 matrix at k (zeros for null rows): the own
// kernel's panels, read through the row pointers of CpuPrefill::panel_rows.
at::Tensor pack_panels(const std::vector<const void*>& rows, int64_t K, int64_t np) {
  const int64_t panels = static_cast<int64_t>(rows.size()) / np;
  at::Tensor out = at::empty({panels * K * np}, at::kFloat);
  float* dst = out.data_ptr<float>();
  for (int64_t p = 0; p < panels; ++p)
    for (int64_t c = 0; c < np; ++c) {
      const float* src = static_cast<const float*>(rows[p * np + c]);
      float* d = dst + p * K * np + c;
      for (int64_t k = 0; k < K; ++k) d[k * np] = src ? src[k] : 0.f;
    }
  return out;
}

at::Tensor padded(const at::Tensor& v, int64_t n) {
  at::Tensor out = at::zeros({n}, v.options().dtype(at::kFloat));
  out.narrow(0, 0, v.numel()).copy_(v);
  return out;
}

at::Tensor required(const std::optional<at::Tensor>& t, const char* name, int64_t layer) {
  TORCH_CHECK(t.has_value() && t->defined(), kOp, ": ", name, " of layer ", layer, " is missing");
  return *t;
}

bool weight_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf;
}

void check_param(const at::Tensor& t, const char* name, int64_t layer,
                 std::initializer_list<int64_t> shape, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype && t.device().is_cpu(), kOp, ": ", name, " of layer ",
              layer, " must be a ", dtype, " CPU tensor like the other parameters, got ",
              t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), kOp, ": ", name, " of layer ", layer,
              " must have shape ", at::IntArrayRef(shape), ", got ", t.sizes());
}

}  // namespace

CpuPrefill::CpuPrefill(const std::vector<std::optional<at::Tensor>>& globals,
                       const std::vector<std::vector<std::optional<at::Tensor>>>& layers,
                       int64_t num_heads, int64_t head_dim, double gate_normalizer, double eps,
                       double scale) {
  c10::InferenceMode not_inference(false);
  TORCH_CHECK(globals.size() == kPfNumGlobalSlots, kOp, ": expected ", int(kPfNumGlobalSlots),
              " model-level tensors, got ", globals.size());
  TORCH_CHECK(!layers.empty(), kOp, ": the model has no layers");
  TORCH_CHECK(num_heads >= 1 && head_dim >= 1, kOp, ": bad num_heads/head_dim");
  H_ = num_heads;
  D_ = head_dim;
  a_ = H_ * D_;
  normalizer_ = static_cast<float>(gate_normalizer);
  eps_ = static_cast<float>(eps);
  scale_ = static_cast<float>(scale);
  auto watch = [&](const at::Tensor& t) {
    watched_.watch(t, kOp);
    return t.detach().contiguous();  // (a view of the parameter when it is contiguous)
  };
  const at::Tensor norm_w = required(globals[kPfNormW], "final norm weight", -1);
  d_ = norm_w.size(0);
  dtype_ = norm_w.scalar_type();
  TORCH_CHECK(weight_dtype(dtype_), kOp, ": parameters must be float32, bfloat16 or float16, got ",
              dtype_);
  check_param(norm_w, "final norm weight", -1, {d_}, dtype_);
  norm_w_ = watch(norm_w);
  const at::Tensor norm_b = required(globals[kPfNormB], "final norm bias", -1);
  check_param(norm_b, "final norm bias", -1, {d_}, dtype_);
  norm_b_ = watch(norm_b);
  E_ = d_;
  if (globals[kPfInW] && globals[kPfInW]->defined()) {
    const at::Tensor& w = *globals[kPfInW];
    E_ = w.size(1);
    check_param(w, "input projection weight", -1, {d_, E_}, dtype_);
    in_w_ = watch(w);
    const at::Tensor b = required(globals[kPfInB], "input projection bias", -1);
    check_param(b, "input projection bias", -1, {d_}, dtype_);
    in_b_ = watch(b);
  }
  const auto& first = layers[0];
  TORCH_CHECK(first.size() == kPfNumSlots, kOp, ": expected ", int(kPfNumSlots),
              " tensors per layer, got ", first.size());
  use_gate_ = first[kPfWr].has_value() && first[kPfWr]->defined();
  use_norm_ = first[kPfRmsW].has_value() && first[kPfRmsW]->defined();
  f_ = required(first[kPfW1], "w1", 0).size(0);
  off_r_ = use_gate_ ? 3 * a_ : -1;
  off_gate_ = 3 * a_ + (use_gate_ ? a_ : 0);
  P_ = off_gate_ + a_;
  for (int64_t l = 0; l < static_cast<int64_t>(layers.size()); ++l) {
    const auto& p = layers[l];
    TORCH_CHECK(p.size() == kPfNumSlots, kOp, ": expected ", int(kPfNumSlots),
                " tensors per layer, got ", p.size(), " for layer ", l);
    auto present = [&](int slot) { return p[slot].has_value() && p[slot]->defined(); };
    TORCH_CHECK(present(kPfWr) == use_gate_ && present(kPfRmsW) == use_norm_, kOp,
                ": every layer must use the same options (layer ", l, " differs)");
    auto get = [&](int slot, const char* name, std::initializer_list<int64_t> shape) {
      at::Tensor t = required(p[slot], name, l);
      check_param(t, name, l, shape, dtype_);
      return watch(t);
    };
    Src s;
    s.ln1_w = get(kPfLn1W, "attn_norm weight", {d_});
    s.ln1_b = get(kPfLn1B, "attn_norm bias", {d_});
    s.wq = get(kPfWq, "q_proj weight", {a_, d_});
    s.wk = get(kPfWk, "k_proj weight", {a_, d_});
    s.wv = get(kPfWv, "v_proj weight", {a_, d_});
    if (use_gate_) s.wr = get(kPfWr, "g_proj weight", {a_, d_});
    s.wg = get(kPfWg, "gate weight", {a_, d_});
    s.gate_b = get(kPfGateB, "gate bias", {a_});
    if (use_norm_) s.rms_w = get(kPfRmsW, "RMSNorm weight", {D_});
    s.wo = get(kPfWo, "o_proj weight", {d_, a_});
    s.ln2_w = get(kPfLn2W, "ffn_norm weight", {d_});
    s.ln2_b = get(kPfLn2B, "ffn_norm bias", {d_});
    s.w1 = get(kPfW1, "w1", {f_, d_});
    s.w3 = get(kPfW3, "w3", {f_, d_});
    s.w2 = get(kPfW2, "w2", {d_, f_});
    src_.push_back(std::move(s));
  }
}

int64_t CpuPrefill::status(bool grad_enabled) const {
  return watched_.status(grad_enabled);
}

namespace {

// Seconds for the engine choice's measurement: this thread's CPU time when the call runs on
// one thread (time descheduled on a shared machine does not count), else wall time.
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
at::Tensor view(float* p, int64_t rows, int64_t cols, int64_t ld) {
  return at::from_blob(p, {rows, cols}, {ld, 1}, at::TensorOptions().dtype(at::kFloat));
}

// out (+)= A W^T with the vendor GEMM in W's dtype: float32 straight into out (no copy);
// 16-bit weights take A rounded to their dtype (as nn.Linear would) and the product widened.
void vendor_mm(const at::Tensor& out, const at::Tensor& A, const at::Tensor& W, bool accumulate) {
  if (W.scalar_type() == at::kFloat) {
    at::Tensor o = out;
    if (accumulate)
      at::addmm_out(o, out, A, W.t());
    else
      at::mm_out(o, A, W.t());
    return;
  }
  const at::Tensor r = at::mm(A.to(W.scalar_type()), W.t());
  if (accumulate)
    out.add_(r);
  else
    out.copy_(r);
}

}  // namespace

std::vector<const void*> CpuPrefill::panel_rows(int64_t l, int kind, int64_t np) const {
  const Src& s = src_[l];
  auto row = [](const at::Tensor& t, int64_t r) -> const void* {
    return static_cast<const char*>(t.data_ptr()) + r * t.stride(0) * t.element_size();
  };
  std::vector<const void*> out;
  if (kind == kMatW13) {  // W1 panel j, then W3 panel j
    const int64_t fp = round_up(f_, np);
    for (int64_t j = 0; j < fp / np; ++j)
      for (const at::Tensor* w : {&s.w1, &s.w3})
        for (int64_t c = 0; c < np; ++c) out.push_back(j * np + c < f_ ? row(*w, j * np + c) : nullptr);
    return out;
  }
  for (const at::Tensor& w : vendor_weights(l, kind))
    for (int64_t r = 0; r < w.size(0); ++r) out.push_back(row(w, r));
  out.resize(round_up(static_cast<int64_t>(out.size()), np), nullptr);
  return out;
}

std::vector<at::Tensor> CpuPrefill::vendor_weights(int64_t l, int kind) const {
  const Src& s = src_[l];
  switch (kind) {
    case kMatIn: return {in_w_};
    case kMatProj:
      return use_gate_ ? std::vector<at::Tensor>{s.wq, s.wk, s.wv, s.wr, s.wg}
                       : std::vector<at::Tensor>{s.wq, s.wk, s.wv, s.wg};
    case kMatWo: return {s.wo};
    case kMatW13: return {s.w1, s.w3};
    default: return {s.w2};
  }
}

int64_t CpuPrefill::kind_k(int kind) const {
  return kind == kMatIn ? E_ : kind == kMatWo ? a_ : kind == kMatW2 ? f_ : d_;
}

int64_t CpuPrefill::kind_cols(int kind) const {
  const int64_t np = np_;
  return kind == kMatProj ? round_up(P_, np) : kind == kMatW13 ? 2 * round_up(f_, np)
                                                               : round_up(d_, np);
}

void CpuPrefill::pack(int isa) {
  c10::InferenceMode not_inference(false);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t np = isa_fns(isa).panel();
  const int64_t dp = round_up(d_, np);
  packed_.clear();
  choices_.clear();  // measured with the other ISA's kernels
  np_ = np;
  for (int64_t l = 0; l < num_layers(); ++l) {
    const Src& s = src_[l];
    Packed k;
    k.ln1_w = padded(s.ln1_w, dp);
    k.ln1_b = padded(s.ln1_b, dp);
    k.gate_b = padded(s.gate_b, a_ + 16);
    if (use_norm_) k.rms_w = padded(s.rms_w, D_ + 16);
    k.ln2_w = padded(s.ln2_w, dp);
    k.ln2_b = padded(s.ln2_b, dp);
    if (dtype_ != at::kFloat)  // 16-bit weights: row pointers only, no copy
      for (int kind = 0; kind < kNumMatKinds; ++kind) {
        if (!has_kind(kind) || (kind == kMatIn && l > 0)) continue;
        for (const void* r : panel_rows(l, kind, np))
          k.rows[kind].push_back(static_cast<const uint16_t*>(r));
      }
    packed_.push_back(std::move(k));
  }
  if (in_w_.defined()) p_in_b_ = padded(in_b_, dp);
  p_norm_w_ = padded(norm_w_, dp);
  p_norm_b_ = padded(norm_b_, dp);
  packed_isa_ = isa;
}

void CpuPrefill::pack_kind(int kind) {
  if (dtype_ != at::kFloat || packed_[0].panels[kind].defined()) return;
  c10::InferenceMode not_inference(false);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  for (int64_t l = 0; l < (kind == kMatIn ? 1 : num_layers()); ++l)
    packed_[l].panels[kind] = pack_panels(panel_rows(l, kind, np_), kind_k(kind), np_);
}

void CpuPrefill::release_unused_panels() {
  for (int kind = 0; kind < kNumMatKinds; ++kind) {
    bool used = false;
    for (const auto& [key, c] : choices_) used = used || !c[kind];
    if (!used)
      for (Packed& k : packed_) k.panels[kind] = at::Tensor();
  }
}

PrefillMat CpuPrefill::mat(int64_t l, int kind) const {
  const Packed& k = packed_[kind == kMatIn ? 0 : l];
  PrefillMat m;
  if (k.panels[kind].defined()) m.panels = k.panels[kind].data_ptr<float>();
  if (!k.rows[kind].empty()) m.rows = k.rows[kind].data();
  m.f16 = dtype_ == at::kHalf;
  return m;
}

int64_t CpuPrefill::packed_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  int64_t bytes = 0;
  for (const Packed& k : packed_)
    for (const at::Tensor& t : k.panels)
      if (t.defined()) bytes += t.nbytes();
  return bytes;
}

std::vector<bool> CpuPrefill::last_vendor() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return std::vector<bool>(last_.begin(), last_.end());
}

std::vector<std::tuple<int64_t, int64_t, std::vector<bool>>> CpuPrefill::choices() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::vector<std::tuple<int64_t, int64_t, std::vector<bool>>> out;
  for (const auto& [key, c] : choices_)
    out.emplace_back(key.first, key.second, std::vector<bool>(c.begin(), c.end()));
  return out;
}

CpuPrefill::Choice CpuPrefill::choose(int64_t M, int nt, int64_t gemm, const float* x,
                                      float* const* bufs) {
  Choice c{};
  if (gemm == kGemmOwn || gemm == kGemmVendor) {
    c.fill(gemm == kGemmVendor);
    return c;
  }
  const auto key = std::make_pair(bucket(M), nt);
  auto it = choices_.find(key);
  if (it == choices_.end()) {
    it = choices_.emplace(key, measure(M, nt, x, bufs)).first;
    release_unused_panels();
  }
  return it->second;
}

// Per kind, layer 0's product on M rows with each engine, interleaved, best of at least 3
// pairs (more, up to 20, while a pair takes under 20 ms; one pair when each run takes over
// 50 ms and they differ by more than 1.5x, two otherwise). Before the vendor GEMM's first
// full run, one on 16 rows scaled up: a vendor GEMM far behind (bf16 without AMX /
// AVX512-BF16 runs at about 1 GFLOP/s) is not run on all rows. Inputs and outputs are the
// call's own buffers (inputs other than x filled with 0.5 first): a transient allocation of
// tens of MB here would stay in the process's heap after the call (glibc keeps freed heap
// below its trim threshold; measured: RSS +0.4x of a bf16 50M model's parameter bytes).
CpuPrefill::Choice CpuPrefill::measure(int64_t M, int nt, const float* x, float* const* bufs) {
  Choice c{};
  const IsaFns fns = isa_fns(packed_isa_);
  const bool thread_time = nt == 1;
  std::vector<char*> ws;
  for (int i = 0; i < nt; ++i) ws.push_back(thread_ws_[i].data());
  const int64_t C = 16, tiny = std::min<int64_t>(M, 16);
  for (int kind = 0; kind < kNumMatKinds; ++kind) {
    if (!has_kind(kind)) continue;
    pack_kind(kind);
    const int64_t K = kind_k(kind), cols = kind_cols(kind), panels = cols / np_;
    const int64_t dp = round_up(d_, np_), fp = round_up(f_, np_);
    // (input, its leading dimension, output buffer) as the call uses them
    const float* a_ptr = kind == kMatIn ? x : kind == kMatWo ? bufs[3] : kind == kMatW2 ? bufs[5]
                                                                                      : bufs[1];
    const int64_t lda = kind == kMatIn ? E_ : kind == kMatWo ? a_ : kind == kMatW2 ? fp : dp;
    float* out_ptr = kind == kMatProj ? bufs[2] : kind == kMatW13 ? bufs[4] : bufs[0];
    const at::Tensor A = view(const_cast<float*>(a_ptr), M, K, lda);
    if (kind != kMatIn) A.fill_(0.5f);
    const at::Tensor out = view(out_ptr, M, cols, cols);
    const PrefillMat m = mat(0, kind);
    const std::vector<at::Tensor> ws_w = vendor_weights(0, kind);
    auto own = [&] {
      const double t0 = now_seconds(thread_time);
      std::atomic<int64_t> next{0};
#pragma omp parallel num_threads(nt)
      {
        FlushDenormals ftz;
        fns.gemm_all(M, K, a_ptr, lda, m, panels, out_ptr, cols, &next,
                     ws[omp_get_thread_num()], C, D_);
      }
      return now_seconds(thread_time) - t0;
    };
    auto vendor = [&](int64_t rows) {
      const double t0 = now_seconds(thread_time);
      int64_t col = 0;
      for (const at::Tensor& w : ws_w) {
        vendor_mm(out.narrow(0, 0, rows).narrow(1, col, w.size(0)), A.narrow(0, 0, rows), w, false);
        col += w.size(0);
      }
      return now_seconds(thread_time) - t0;
    };
    double t_own = own();
    if (vendor(tiny) * M / tiny > 3 * t_own) continue;  // the own kernel, without a full run
    double t_vendor = vendor(M);
    const bool slow = std::min(t_own, t_vendor) > 0.05;
    if (!(slow && std::max(t_own, t_vendor) > 1.5 * std::min(t_own, t_vendor))) {
      for (int reps = 1; reps < (slow ? 2 : 20); ++reps) {
        if (reps >= 3 && t_own + t_vendor > 0.02) break;
        t_own = std::min(t_own, own());
        t_vendor = std::min(t_vendor, vendor(M));
      }
    }
    c[kind] = t_vendor < t_own;
  }
  return c;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> CpuPrefill::forward(
    const at::Tensor& x_in, const std::vector<at::Tensor>& states, bool return_state,
    bool all_positions, const std::optional<at::Tensor>& lengths_in, int64_t gemm) {
  std::lock_guard<std::mutex> lock(mutex_);
  TORCH_CHECK(x_in.scalar_type() == dtype_ && x_in.device().is_cpu(), kOp, ": x must be a ",
              dtype_, " CPU tensor (the parameters' dtype), got ", x_in.scalar_type(), " on ",
              x_in.device());
  TORCH_CHECK(x_in.dim() == 3 && x_in.size(2) == E_ && x_in.size(0) >= 1 && x_in.size(1) >= 1,
              kOp, ": x must be [batch, seq_len, ", E_, "], got ", x_in.sizes());
  TORCH_CHECK(gemm >= kGemmAuto && gemm <= kGemmVendor, kOp, ": gemm must be 0 (auto), 1 (own) ",
              "or 2 (vendor), got ", gemm);
  const int64_t B = x_in.size(0), T = x_in.size(1), M = B * T, nl = num_layers();
  TORCH_CHECK(states.empty() || static_cast<int64_t>(states.size()) == nl, kOp, ": expected ",
              nl, " states (or none), got ", states.size());
  for (const auto& s : states)
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.device().is_cpu() &&
                    s.sizes() == at::IntArrayRef({B, H_, D_, D_}),
                kOp, ": each state must be a float32 CPU tensor [", B, ", ", H_, ", ", D_, ", ",
                D_, "], got ", s.scalar_type(), " ", s.sizes());
  at::Tensor lengths;
  if (lengths_in && lengths_in->defined()) {
    TORCH_CHECK(!all_positions, kOp, ": lengths cannot be combined with all positions");
    TORCH_CHECK(lengths_in->device().is_cpu() && lengths_in->sizes() == at::IntArrayRef({B}) &&
                    !at::isFloatingType(lengths_in->scalar_type()),
                kOp, ": lengths must be an integer CPU tensor [", B, "], got ",
                lengths_in->scalar_type(), " ", lengths_in->sizes());
    lengths = lengths_in->to(at::kLong).contiguous();
    const int64_t lo = lengths.min().item<int64_t>(), hi = lengths.max().item<int64_t>();
    TORCH_CHECK(lo >= 1 && hi <= T, kOp, ": lengths must be in [1, seq_len=", T, "], got values in [",
                lo, ", ", hi, "]");
  }

  // computed in float32 whatever the parameters' dtype (states are float32 anyway); y gets
  // the parameters' dtype at the end, like the generic path's output
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor y = all_positions ? at::empty({B, T, d_}, opts) : at::empty({B, d_}, opts);
  std::vector<at::Tensor> new_states;
  if (return_state)
    for (int64_t l = 0; l < nl; ++l) new_states.push_back(at::empty({B, H_, D_, D_}, opts));

  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int isa = static_cast<int>(pick_cpu_isa());
  if (isa != packed_isa_) pack(isa);
  const IsaFns fns = isa_fns(isa);
  const int64_t np = np_, dp = round_up(d_, np), fp = round_up(f_, np), Pp = round_up(P_, np);
  const int64_t C = T <= 64 ? round_up(T, 16) : 64;

  const int nt = omp_in_parallel() ? 1 : std::max(1, at::get_num_threads());
  const size_t ws_bytes = std::max(fns.ws(C, D_), fns.ws(16, D_));  // (measure() uses C = 16)
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
  const int64_t sizes[6] = {M * dp, M * dp, M * Pp, M * a_, M * 2 * fp, M * fp};
  int64_t total = 0;
  for (int64_t s : sizes) total += round_up(s, 16);
  const at::Tensor scratch = at::empty({total}, opts);
  float* base = scratch.data_ptr<float>();
  float* bufs[6];
  for (int i = 0; i < 6; ++i) {
    bufs[i] = base;
    base += round_up(sizes[i], 16);
  }
  const Choice vendor = choose(M, nt, gemm, x.data_ptr<float>(), bufs);
  for (int kind = 0; kind < kNumMatKinds; ++kind)
    if (!vendor[kind] && has_kind(kind)) pack_kind(kind);
  last_ = vendor;
  if (dp > d_) view(bufs[0], M, dp, dp).narrow(1, d_, dp - d_).zero_();  // h's padding

  std::vector<PrefillLayerPtrs> lp;
  for (int64_t l = 0; l < nl; ++l) {
    const Packed& k = packed_[l];
    lp.push_back({k.ln1_w.data_ptr<float>(), k.ln1_b.data_ptr<float>(), k.gate_b.data_ptr<float>(),
                  use_norm_ ? k.rms_w.data_ptr<float>() : nullptr, k.ln2_w.data_ptr<float>(),
                  k.ln2_b.data_ptr<float>(), mat(l, kMatProj), mat(l, kMatWo), mat(l, kMatW13),
                  mat(l, kMatW2)});
  }
  PrefillPlan pl;
  pl.E = E_; pl.d = d_; pl.dp = dp; pl.H = H_; pl.D = D_; pl.a = a_; pl.f = f_; pl.fp = fp;
  pl.P = P_; pl.Pp = Pp; pl.off_r = off_r_; pl.off_gate = off_gate_; pl.nl = nl;
  pl.use_norm = use_norm_; pl.use_gate = use_gate_;
  pl.inv_normalizer = 1.f / normalizer_; pl.eps = eps_; pl.scale = scale_;
  pl.has_in = in_w_.defined();
  if (pl.has_in) {
    pl.in_w = mat(0, kMatIn);
    pl.in_b = p_in_b_.data_ptr<float>();
  }
  pl.norm_w = p_norm_w_.data_ptr<float>();
  pl.norm_b = p_norm_b_.data_ptr<float>();
  pl.layers = lp.data();
  pl.B = B; pl.T = T; pl.C = C;
  pl.x = x.data_ptr<float>();
  pl.lengths = lengths.defined() ? lengths.data_ptr<int64_t>() : nullptr;
  pl.h0 = h0.empty() ? nullptr : h0.data();
  pl.ht = ht.empty() ? nullptr : ht.data();
  pl.y = y.data_ptr<float>();
  pl.all_positions = all_positions;
  pl.h = bufs[0]; pl.xn = bufs[1]; pl.proj = bufs[2]; pl.o = bufs[3]; pl.u = bufs[4];
  pl.act = bufs[5];
  pl.ws = ws.data();

  // the steps; a vendor product's fused elementwise part becomes a step of its own
  std::vector<PrefillStep> steps;
  steps.push_back({kOpIn, 0, pl.has_in && vendor[kMatIn]});
  for (int64_t l = 0; l < nl; ++l) {
    steps.push_back({kOpLn1, l, false});
    steps.push_back({kOpProj, l, vendor[kMatProj]});
    if (vendor[kMatProj]) steps.push_back({kOpGate, l, false});
    steps.push_back({kOpAttn, l, false});
    steps.push_back({kOpWo, l, vendor[kMatWo]});
    steps.push_back({kOpLn2, l, false});
    steps.push_back({kOpW13, l, vendor[kMatW13]});
    if (vendor[kMatW13]) steps.push_back({kOpSwiGlu, l, false});
    steps.push_back({kOpW2, l, vendor[kMatW2]});
  }
  steps.push_back({kOpFinal, 0, false});
  pl.steps = steps.data();
  std::vector<std::atomic<int64_t>> counters(steps.size());
  for (auto& c : counters) c.store(0, std::memory_order_relaxed);
  pl.counters = counters.data();
  PrefillBarrier barrier;
  pl.barrier = &barrier;

  const at::Tensor h = view(pl.h, M, d_, dp);
  auto run_vendor = [&](const PrefillStep& st) {
    at::AutoDispatchBelowAutograd below;
    const Src& s = src_[st.layer];
    switch (st.op) {
      case kOpIn:
        vendor_mm(h, x.view({M, E_}), in_w_, false);
        h.add_(in_b_);
        break;
      case kOpProj: {
        const at::Tensor xn = view(pl.xn, M, d_, dp);
        int64_t col = 0;
        for (const at::Tensor& w : vendor_weights(st.layer, kMatProj)) {
          vendor_mm(view(pl.proj + col, M, a_, Pp), xn, w, false);
          col += a_;
        }
        break;
      }
      case kOpWo: vendor_mm(h, view(pl.o, M, a_, a_), s.wo, true); break;
      case kOpW13: {
        const at::Tensor xn = view(pl.xn, M, d_, dp);
        vendor_mm(view(pl.u, M, f_, 2 * fp), xn, s.w1, false);
        vendor_mm(view(pl.u + fp, M, f_, 2 * fp), xn, s.w3, false);
        break;
      }
      default: vendor_mm(h, view(pl.act, M, f_, fp), s.w2, true); break;
    }
  };
  for (size_t s0 = 0; s0 < steps.size();) {
    if (steps[s0].vendor) {
      run_vendor(steps[s0++]);
      continue;
    }
    size_t s1 = s0;
    while (s1 < steps.size() && !steps[s1].vendor) ++s1;
#pragma omp parallel num_threads(nt)
    {
#pragma omp single
      barrier.threads = omp_get_num_threads();  // (the single's implicit barrier publishes it)
      FlushDenormals ftz;
      fns.run(pl, static_cast<int64_t>(s0), static_cast<int64_t>(s1));
    }
    s0 = s1;
  }
  if (dtype_ != at::kFloat) {
    at::AutoDispatchBelowAutograd below;
    y = y.to(dtype_);
  }
  return {y, new_states};
}

}  // namespace gla
