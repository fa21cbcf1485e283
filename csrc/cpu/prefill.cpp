// Fused CPU prefill (see prefill.h and prefill_impl.h). The body is compiled per instruction
// set through cpu/simd/per_isa.h (prefill_impl.h includes the chunk kernel's forward), and
// pick_cpu_isa() chooses at run time. No
// vendor BLAS: every product runs the chunk kernel's register-blocked micro-kernel on weights
// packed once into column panels.
#include "prefill.h"

#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
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
  void (*run)(const PrefillPlan&, int, int);
  int64_t (*phases)(int64_t);
};
#define GLA_PREFILL_FNS(ns) \
  IsaFns { &ns::panel_width, &ns::attention_workspace_bytes, &ns::run_thread, &ns::prefill_phases }

IsaFns isa_fns(int isa) {
#if GLA_MULTI_ISA
  if (isa == static_cast<int>(CpuIsa::kAvx512)) return GLA_PREFILL_FNS(prefill_avx512);
  if (isa == static_cast<int>(CpuIsa::kAvx2)) return GLA_PREFILL_FNS(prefill_avx2);
#endif
  (void)isa;
  return GLA_PREFILL_FNS(prefill_generic);
}

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// dst[p][k][c] = W[p*np + c][k] for the n rows of W [n, K] (row-major), zeros past n.
void pack_panels(const float* W, int64_t n, int64_t K, int64_t np, float* dst) {
  const int64_t panels = (n + np - 1) / np;
  for (int64_t p = 0; p < panels; ++p)
    for (int64_t k = 0; k < K; ++k)
      for (int64_t c = 0; c < np; ++c) {
        const int64_t r = p * np + c;
        dst[(p * K + k) * np + c] = r < n ? W[r * K + k] : 0.f;
      }
}

at::Tensor packed(const at::Tensor& W, int64_t np) {
  const at::Tensor w = W.to(at::kFloat).contiguous();
  const int64_t n = w.size(0), K = w.size(1);
  at::Tensor out = at::empty({round_up(n, np) * K}, w.options());
  pack_panels(w.data_ptr<float>(), n, K, np, out.data_ptr<float>());
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
    return t.detach();
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

void CpuPrefill::pack(int isa) {
  c10::InferenceMode not_inference(false);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t np = isa_fns(isa).panel();
  const int64_t dp = round_up(d_, np), fp = round_up(f_, np);
  packed_.clear();
  for (const Src& s : src_) {
    Packed k;
    k.ln1_w = padded(s.ln1_w, dp);
    k.ln1_b = padded(s.ln1_b, dp);
    std::vector<at::Tensor> rows = {s.wq, s.wk, s.wv};
    if (use_gate_) rows.push_back(s.wr);
    rows.push_back(s.wg);
    k.proj = packed(at::cat(rows, 0), np);  // (packed() converts to float32)
    k.gate_b = padded(s.gate_b, a_ + 16);
    if (use_norm_) k.rms_w = padded(s.rms_w, D_ + 16);
    k.wo = packed(s.wo, np);
    k.ln2_w = padded(s.ln2_w, dp);
    k.ln2_b = padded(s.ln2_b, dp);
    // W1 panel j, then W3 panel j: one thread computes both halves of act's panel j
    const auto f32 = s.w1.options().dtype(at::kFloat);
    const at::Tensor w1 = at::cat({s.w1.to(at::kFloat), at::zeros({fp - f_, d_}, f32)}, 0);
    const at::Tensor w3 = at::cat({s.w3.to(at::kFloat), at::zeros({fp - f_, d_}, f32)}, 0);
    k.w13 = packed(at::stack({w1.view({fp / np, np, d_}), w3.view({fp / np, np, d_})}, 1)
                       .reshape({2 * fp, d_}),
                   np);
    k.w2 = packed(s.w2, np);
    packed_.push_back(std::move(k));
  }
  if (in_w_.defined()) {
    p_in_w_ = packed(in_w_, np);
    p_in_b_ = padded(in_b_, dp);
  }
  p_norm_w_ = padded(norm_w_, dp);
  p_norm_b_ = padded(norm_b_, dp);
  np_ = np;
  packed_isa_ = isa;
}

std::tuple<at::Tensor, std::vector<at::Tensor>> CpuPrefill::forward(
    const at::Tensor& x_in, const std::vector<at::Tensor>& states, bool return_state,
    bool all_positions) {
  std::lock_guard<std::mutex> lock(mutex_);
  TORCH_CHECK(x_in.scalar_type() == dtype_ && x_in.device().is_cpu(), kOp, ": x must be a ",
              dtype_, " CPU tensor (the parameters' dtype), got ", x_in.scalar_type(), " on ",
              x_in.device());
  TORCH_CHECK(x_in.dim() == 3 && x_in.size(2) == E_ && x_in.size(0) >= 1 && x_in.size(1) >= 1,
              kOp, ": x must be [batch, seq_len, ", E_, "], got ", x_in.sizes());
  const int64_t B = x_in.size(0), T = x_in.size(1), M = B * T, nl = num_layers();
  TORCH_CHECK(states.empty() || static_cast<int64_t>(states.size()) == nl, kOp, ": expected ",
              nl, " states (or none), got ", states.size());
  for (const auto& s : states)
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.device().is_cpu() &&
                    s.sizes() == at::IntArrayRef({B, H_, D_, D_}),
                kOp, ": each state must be a float32 CPU tensor [", B, ", ", H_, ", ", D_, ", ",
                D_, "], got ", s.scalar_type(), " ", s.sizes());

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

  const int nt = omp_in_parallel() ? 1 : std::max(1, at::get_num_threads());
  const size_t ws_bytes = fns.ws(C, D_);
  if (static_cast<int>(thread_ws_.size()) < nt) thread_ws_.resize(nt);
  std::vector<char*> ws(nt);
  for (int i = 0; i < nt; ++i) {
    if (thread_ws_[i].size() < ws_bytes) thread_ws_[i].assign(ws_bytes, 0);
    ws[i] = thread_ws_[i].data();
  }

  std::vector<PrefillLayerPtrs> lp;
  for (const Packed& k : packed_)
    lp.push_back({k.ln1_w.data_ptr<float>(), k.ln1_b.data_ptr<float>(), k.proj.data_ptr<float>(),
                  k.gate_b.data_ptr<float>(), use_norm_ ? k.rms_w.data_ptr<float>() : nullptr,
                  k.wo.data_ptr<float>(), k.ln2_w.data_ptr<float>(), k.ln2_b.data_ptr<float>(),
                  k.w13.data_ptr<float>(), k.w2.data_ptr<float>()});
  PrefillPlan pl;
  pl.E = E_; pl.d = d_; pl.dp = dp; pl.H = H_; pl.D = D_; pl.a = a_; pl.f = f_; pl.fp = fp;
  pl.P = P_; pl.Pp = Pp; pl.off_r = off_r_; pl.off_gate = off_gate_; pl.nl = nl;
  pl.use_norm = use_norm_; pl.use_gate = use_gate_;
  pl.inv_normalizer = 1.f / normalizer_; pl.eps = eps_; pl.scale = scale_;
  pl.in_w = in_w_.defined() ? p_in_w_.data_ptr<float>() : nullptr;
  pl.in_b = in_w_.defined() ? p_in_b_.data_ptr<float>() : nullptr;
  pl.norm_w = p_norm_w_.data_ptr<float>();
  pl.norm_b = p_norm_b_.data_ptr<float>();
  pl.layers = lp.data();
  pl.B = B; pl.T = T; pl.C = C;
  pl.x = x.data_ptr<float>();
  pl.h0 = h0.empty() ? nullptr : h0.data();
  pl.ht = ht.empty() ? nullptr : ht.data();
  pl.y = y.data_ptr<float>();
  pl.all_positions = all_positions;
  pl.h = bufs[0]; pl.xn = bufs[1]; pl.proj = bufs[2]; pl.o = bufs[3]; pl.u = bufs[4];
  pl.act = bufs[5];
  pl.ws = ws.data();
  std::vector<std::atomic<int64_t>> counters(fns.phases(nl));
  for (auto& c : counters) c.store(0, std::memory_order_relaxed);
  pl.counters = counters.data();
  PrefillBarrier barrier;
  pl.barrier = &barrier;

#pragma omp parallel num_threads(nt)
  {
#pragma omp single
    barrier.threads = omp_get_num_threads();  // (the single's implicit barrier publishes it)
    FlushDenormals ftz;
    fns.run(pl, omp_get_thread_num(), omp_get_num_threads());
  }
  if (dtype_ != at::kFloat) {
    at::AutoDispatchBelowAutograd below;
    y = y.to(dtype_);
  }
  return {y, new_states};
}

}  // namespace gla
