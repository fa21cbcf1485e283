// Whole-model decode step on the CPU (see decode.h). Per token and layer:
//   xn   = LayerNorm(h)                                  own loop (per thread, B rows)
//   proj = xn @ [Wq; Wk; Wv; (Wr); (Wg | Wg1)]^T + b      one packed product (gate bias in b)
//   gate = proj[:, z] @ Wg2^T + bg                        low-rank gate only
//   per (row, head): g = logsigmoid(gate) / normalizer; S' = exp(g) S + k^T v; o = scale q S';
//                    o = RMSNorm(o) * w; o *= silu(r)    vectorized, one pass over the state
//   h   += o @ Wo^T                                       accumulated in place
//   xn   = LayerNorm(h); u = xn @ [W1 | W3]^T; act = silu(u1) * u3   (per panel)
//   h   += act @ W2^T
// then y = LayerNorm(h). Products: PackedMatrix (linear.h). All buffers live in a
// per-batch-size workspace; a step allocates only its outputs (y and, for step(), the new
// states; step_pool() writes the pool in place).
//
// Threading policy (threads_for), measured rather than guessed, per batch size: the first
// kProbeSteps steps run on one thread, the next (up to) kProbeSteps on all of
// at::get_num_threads(); the faster median wins (all threads only if >= 10%
// faster), re-measured every kRechooseSteps steps. Why measured at run time: on idle cores
// two threads beat one (2-core Xeon VM, best-of: batch 1 0.45 vs 0.67 ms, batch 32 3.1 vs
// 7.8 ms), but with the cores shared (that VM under load average 8) a threaded step waits
// at every barrier for a descheduled partner (median batch 1 4.6 ms vs 0.8 ms on one
// thread). Models below kMinThreadBytes of weights always run on one thread.
#include "decode.h"
#include "cpu/simd/denormals.h"

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>
#include <unordered_set>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace gla {

// The per-ISA parts of the step (decode_core_impl.h); the copy matches the packed matrices'
// instruction set (core_for).
struct DecodeCoreKernels {
  void (*core_heads)(const float*, const float*, const float*, const float*, const float*,
                     const float*, const float*, float*, float*, int64_t, int64_t, int64_t,
                     float, float, float, float*);
  void (*swiglu)(const float*, const float*, float*, int64_t);
  void (*layer_norm_rows)(const float*, float*, const float*, const float*, int64_t, int64_t,
                          float);
};

}  // namespace gla

#define GLA_ISA_NS decode
#define GLA_ISA_BODY "cpu/decode_core_impl.h"
#include "cpu/simd/per_isa.h"

namespace gla {

namespace {

const char* kOp = "gla_ext.CpuDecoder";

// The core kernels of the ISA the packed matrices use (linear_isa_now at packing time).
const DecodeCoreKernels* core_for(const std::string& isa) {
  const CpuIsa c = isa == "avx512" ? CpuIsa::kAvx512
                   : isa == "avx2" ? CpuIsa::kAvx2
                                   : CpuIsa::kGeneric;
  return GLA_ISA_PICK(c, decode, kCore);
}

at::Tensor required(const std::optional<at::Tensor>& t, const char* name, int64_t layer) {
  TORCH_CHECK(t.has_value() && t->defined(), kOp, ": ", name, " of layer ", layer,
              " is missing");
  return *t;
}

LinearWeight linear_type(at::ScalarType t) {
  return t == at::kBFloat16 ? LinearWeight::kBFloat16
         : t == at::kHalf   ? LinearWeight::kFloat16
                            : LinearWeight::kFloat32;
}

// One weight matrix before packing: float rows in the decoder's dtype (group 0), or the
// parts of a quantized one (q: int8 [rows, cols] or int4 nibbles uint8 [rows, cols / 2];
// float16 scales and, int4, offsets [rows, cols / group]). Quantization groups run along
// the input columns of one row, so a row operation (concatenate, pad, interleave) applied to
// every part alike keeps each row's scales with its weights.
struct Rows {
  at::Tensor w, scales, offsets;
  int64_t group = 0;
};

// f (a list of tensors -> one tensor) applied to the same part of every matrix of `parts`
// (all float, or all of one quantized format and group size).
template <class F>
Rows zip_rows(const std::vector<Rows>& parts, F f) {
  const Rows& first = parts.front();
  for (const Rows& r : parts)
    TORCH_CHECK(r.group == first.group && r.w.scalar_type() == first.w.scalar_type(), kOp,
                ": matrices packed together must share one format and group size");
  auto each = [&](at::Tensor Rows::*part) {
    if (!(first.*part).defined()) return at::Tensor();
    std::vector<at::Tensor> ts;
    for (const Rows& r : parts) ts.push_back(r.*part);
    return f(ts);
  };
  return {each(&Rows::w), each(&Rows::scales), each(&Rows::offsets), first.group};
}

// A packed matrix of the rows of m (bias: one float per row, or null).
PackedMatrix pack(const Rows& m, const std::vector<float>* bias = nullptr) {
  const at::Tensor c = m.w.contiguous();
  const float* b = bias ? bias->data() : nullptr;
  if (m.group == 0)
    return PackedMatrix(c.data_ptr(), linear_type(c.scalar_type()), c.size(0), c.size(1),
                        c.size(1), b);
  const bool int4 = c.scalar_type() == at::kByte;
  const at::Tensor s = m.scales.contiguous();
  const at::Tensor o = int4 ? m.offsets.contiguous() : at::Tensor();
  return PackedMatrix(c.data_ptr(), reinterpret_cast<const uint16_t*>(s.data_ptr()),
                      int4 ? reinterpret_cast<const uint16_t*>(o.data_ptr()) : nullptr,
                      int4 ? LinearWeight::kInt4 : LinearWeight::kInt8, c.size(0),
                      c.size(1) * (int4 ? 2 : 1), m.group, b);
}

std::vector<float> to_floats(const at::Tensor& t) {
  const at::Tensor f = t.detach().to(at::kFloat).contiguous();
  return std::vector<float>(f.data_ptr<float>(), f.data_ptr<float>() + f.numel());
}

// Rows [r0, r0 + n) of src (float32, bf16 or fp16; row stride ld) as float32 into dst.
void rows_to_float(const at::Tensor& src, const int64_t* rows, int64_t n, int64_t E,
                   float* dst) {
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
    default: TORCH_CHECK(false, kOp, ": unsupported x dtype ", src.scalar_type());
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
    default: TORCH_CHECK(false, kOp, ": unsupported output dtype");
  }
}

inline void split(int64_t n, int t, int T, int64_t* b, int64_t* e) {
  *b = n * t / T;
  *e = n * (t + 1) / T;
}

}  // namespace

CpuDecoder::CpuDecoder(const std::vector<std::optional<at::Tensor>>& globals,
                       const std::vector<std::vector<std::optional<at::Tensor>>>& layers,
                       int64_t num_heads, int64_t head_dim, double gate_normalizer, double eps,
                       double scale,
                       const std::vector<std::vector<std::optional<at::Tensor>>>& scales,
                       const std::vector<std::vector<std::optional<at::Tensor>>>& offsets) {
  // Packed weights are ordinary tensors whatever mode the first step runs in.
  c10::InferenceMode not_inference(false);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  TORCH_CHECK(globals.size() == kNumGlobalSlots, kOp, ": expected ", int(kNumGlobalSlots),
              " model-level tensors, got ", globals.size());
  TORCH_CHECK(!layers.empty(), kOp, ": the model has no layers");
  TORCH_CHECK(num_heads >= 1 && head_dim >= 1, kOp, ": bad num_heads/head_dim");
  H_ = num_heads;
  D_ = head_dim;
  a_ = H_ * D_;
  normalizer_ = static_cast<float>(gate_normalizer);
  eps_ = static_cast<float>(eps);
  scale_ = static_cast<float>(scale);
  core_ = core_for(linear_isa_now());
  const int64_t nr = linear_panel_width_now();
  half_ = nr / 2;

  auto watch = [&](const at::Tensor& t) {
    watched_.watch(t, kOp);
  };
  auto check_param = [&](const at::Tensor& t, const char* name, int64_t layer,
                         std::initializer_list<int64_t> shape) {
    TORCH_CHECK(t.scalar_type() == wdtype_ && t.device().is_cpu(), kOp, ": ", name,
                " of layer ", layer, " must be a ", wdtype_, " CPU tensor, got ",
                t.scalar_type(), " on ", t.device());
    TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), kOp, ": ", name, " of layer ", layer,
                " must have shape ", at::IntArrayRef(shape), ", got ", t.sizes());
  };

  const at::Tensor norm_w = required(globals[kNormW], "final norm weight", -1);
  wdtype_ = norm_w.scalar_type();
  TORCH_CHECK(wdtype_ == at::kFloat || wdtype_ == at::kBFloat16 || wdtype_ == at::kHalf, kOp,
              ": parameters must be float32, bfloat16 or float16, got ", wdtype_);
  d_ = norm_w.size(0);
  check_param(norm_w, "final norm weight", -1, {d_});
  norm_w_ = to_floats(norm_w);
  watch(norm_w);
  const at::Tensor norm_b = required(globals[kNormB], "final norm bias", -1);
  check_param(norm_b, "final norm bias", -1, {d_});
  norm_b_ = to_floats(norm_b);
  watch(norm_b);
  if (globals[kInW] && globals[kInW]->defined()) {
    const at::Tensor& w = *globals[kInW];
    E_ = w.size(1);
    check_param(w, "input projection weight", -1, {d_, E_});
    watch(w);
    std::vector<float> b;
    if (globals[kInB] && globals[kInB]->defined()) {
      check_param(*globals[kInB], "input projection bias", -1, {d_});
      b = to_floats(*globals[kInB]);
      watch(*globals[kInB]);
    }
    in_proj_ = pack(Rows{w.detach()}, b.empty() ? nullptr : &b);
  } else {
    E_ = d_;
  }

  const auto& first = layers[0];
  TORCH_CHECK(first.size() == kNumSlots, kOp, ": expected ", int(kNumSlots),
              " tensors per layer, got ", first.size());
  use_gate_ = first[kWr].has_value() && first[kWr]->defined();
  use_norm_ = first[kRmsW].has_value() && first[kRmsW]->defined();
  const bool low_rank = first[kWg2].has_value() && first[kWg2]->defined();
  rank_ = low_rank ? required(first[kWg], "gate weight", 0).size(0) : 0;
  f_ = required(first[kW1], "w1", 0).size(0);
  f_pad_ = (f_ + half_ - 1) / half_ * half_;
  off_r_ = use_gate_ ? 3 * a_ : -1;
  off_gate_ = 3 * a_ + (use_gate_ ? a_ : 0);
  P_ = off_gate_ + (low_rank ? rank_ : a_);
  for (const auto* parts : {&scales, &offsets}) {
    TORCH_CHECK(parts->empty() || parts->size() == layers.size(), kOp, ": expected ",
                layers.size(), " lists of scales / offsets (or none), got ", parts->size());
    for (const auto& per_layer : *parts)
      TORCH_CHECK(per_layer.size() == kNumSlots, kOp, ": expected ", int(kNumSlots),
                  " scales / offsets per layer, got ", per_layer.size());
  }

  for (int64_t l = 0; l < static_cast<int64_t>(layers.size()); ++l) {
    const auto& p = layers[l];
    TORCH_CHECK(p.size() == kNumSlots, kOp, ": expected ", int(kNumSlots),
                " tensors per layer, got ", p.size(), " for layer ", l);
    auto get = [&](int slot, const char* name, std::initializer_list<int64_t> shape) {
      at::Tensor t = required(p[slot], name, l);
      check_param(t, name, l, shape);
      watch(t);
      return t.detach();  // what is built from it must not require grad
    };
    auto present = [&](int slot) { return p[slot].has_value() && p[slot]->defined(); };
    auto part = [&](const std::vector<std::vector<std::optional<at::Tensor>>>& parts,
                    int slot) {
      return parts.empty() || !parts[l][slot] ? at::Tensor() : *parts[l][slot];
    };
    // A weight matrix [rows, cols]: float in the decoder's dtype, or quantized (see decode.h).
    auto matrix = [&](int slot, const char* name, int64_t rows, int64_t cols) -> Rows {
      const at::Tensor s = part(scales, slot), o = part(offsets, slot);
      if (!s.defined()) return Rows{get(slot, name, {rows, cols})};
      const at::Tensor q = required(p[slot], name, l);
      const bool int4 = q.scalar_type() == at::kByte;
      TORCH_CHECK((int4 || q.scalar_type() == at::kChar) && q.device().is_cpu() &&
                      q.sizes() == at::IntArrayRef({rows, int4 ? cols / 2 : cols}),
                  kOp, ": quantized ", name, " of layer ", l, " must be an int8 [", rows, ", ",
                  cols, "] or uint8 (int4) [", rows, ", ", cols / 2, "] CPU tensor, got ",
                  q.scalar_type(), " ", q.sizes());
      const int64_t groups = s.dim() == 2 ? s.size(1) : 0;
      const int64_t group = groups > 0 && cols % groups == 0 ? cols / groups : 0;
      TORCH_CHECK(group >= 1 && (!int4 || group % 2 == 0), kOp, ": scales of ", name,
                  " of layer ", l, " must have a number of columns dividing ", cols,
                  int4 ? " into even groups" : "", ", got ", s.sizes());
      TORCH_CHECK(int4 == o.defined(), kOp, ": ", name, " of layer ", l,
                  ": offsets must be given for int4 weights and only for them");
      for (const at::Tensor& t : {s, o}) {
        if (!t.defined()) continue;
        TORCH_CHECK(t.scalar_type() == at::kHalf && t.device().is_cpu() &&
                        t.sizes() == at::IntArrayRef({rows, groups}),
                    kOp, ": scales / offsets of ", name, " of layer ", l,
                    " must be float16 CPU tensors [", rows, ", ", groups, "], got ",
                    t.scalar_type(), " ", t.sizes());
        watch(t);
      }
      watch(q);
      return Rows{q.detach(), s.detach(), int4 ? o.detach() : at::Tensor(), group};
    };
    const auto cat0 = [](const std::vector<at::Tensor>& ts) { return at::cat(ts, 0); };
    TORCH_CHECK(present(kWr) == use_gate_ && present(kRmsW) == use_norm_ &&
                    present(kWg2) == low_rank,
                kOp, ": every layer must use the same options (layer ", l, " differs)");
    Layer L;
    L.ln1_w = to_floats(get(kLn1W, "attn_norm weight", {d_}));
    L.ln1_b = to_floats(get(kLn1B, "attn_norm bias", {d_}));
    std::vector<Rows> rows = {matrix(kWq, "q_proj weight", a_, d_),
                              matrix(kWk, "k_proj weight", a_, d_),
                              matrix(kWv, "v_proj weight", a_, d_)};
    if (use_gate_) rows.push_back(matrix(kWr, "g_proj weight", a_, d_));
    rows.push_back(matrix(kWg, "gate weight", low_rank ? rank_ : a_, d_));
    const std::vector<float> gate_b = to_floats(get(kGateBias, "gate bias", {a_}));
    if (low_rank) {
      L.proj = pack(zip_rows(rows, cat0));
      L.gate2 = pack(matrix(kWg2, "low-rank gate weight", a_, rank_), &gate_b);
    } else {  // the gate bias becomes the bias of the gate rows of the packed projection
      std::vector<float> bias(static_cast<size_t>(P_), 0.f);
      std::copy(gate_b.begin(), gate_b.end(), bias.begin() + off_gate_);
      L.proj = pack(zip_rows(rows, cat0), &bias);
    }
    if (use_norm_) L.rms_w = to_floats(get(kRmsW, "RMSNorm weight", {D_}));
    L.wo = pack(matrix(kWo, "o_proj weight", d_, a_));
    L.ln2_w = to_floats(get(kLn2W, "ffn_norm weight", {d_}));
    L.ln2_b = to_floats(get(kLn2B, "ffn_norm bias", {d_}));
    // [W1 | W3] interleaved by half panels: panel i holds w1 rows [i*half, (i+1)*half) then
    // the same w3 rows, so u1[j] and u3[j] come out of the same panel (zero rows pad f).
    // Zero rows (quantized: zero q, scales and offsets) are zero weights in every format.
    const int64_t f_pad = f_pad_, f = f_, half = half_;
    const auto interleave = [f_pad, f, half](const std::vector<at::Tensor>& w13) {
      const int64_t n = w13[0].size(1);
      const at::Tensor pad = at::zeros({f_pad - f, n}, w13[0].options());
      const at::Tensor w1p = at::cat({w13[0], pad}, 0).view({f_pad / half, half, n});
      const at::Tensor w3p = at::cat({w13[1], pad}, 0).view({f_pad / half, half, n});
      return at::stack({w1p, w3p}, 1).reshape({2 * f_pad, n});
    };
    L.w13 = pack(zip_rows({matrix(kW1, "w1", f_, d_), matrix(kW3, "w3", f_, d_)}, interleave));
    TORCH_CHECK(L.w13.panel_width() == 2 * half_, kOp, ": GLA_EXT_CPU_ISA changed while packing");
    L.w2 = pack(matrix(kW2, "w2", d_, f_));
    layers_.push_back(std::move(L));
  }
}

int64_t CpuDecoder::status(bool grad_enabled) const { return watched_.status(grad_enabled); }

std::string CpuDecoder::weight_format() const {
  if (layers_.empty()) return "none";
  switch (layers_[0].proj.weight_type()) {
    case LinearWeight::kInt8: return "int8";
    case LinearWeight::kInt4: return "int4";
    case LinearWeight::kBFloat16: return "bfloat16";
    case LinearWeight::kFloat16: return "float16";
    default: return "float32";
  }
}

std::string CpuDecoder::isa() const { return layers_.empty() ? "none" : layers_[0].proj.isa(); }

int64_t CpuDecoder::weight_bytes() const {
  size_t bytes = in_proj_.empty() ? 0 : in_proj_.weight_bytes();
  for (const Layer& L : layers_) {
    bytes += L.proj.weight_bytes() + L.wo.weight_bytes() + L.w13.weight_bytes() +
             L.w2.weight_bytes() + (L.gate2.empty() ? 0 : L.gate2.weight_bytes());
  }
  return static_cast<int64_t>(bytes);
}

namespace {
constexpr size_t kProbeSteps = 5;
constexpr int64_t kRechooseSteps = 4096;
constexpr int64_t kMinThreadBytes = int64_t(1) << 20;

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}
}  // namespace

int64_t CpuDecoder::threads_for(int64_t B) const {
  const int64_t avail = at::get_num_threads();
  if (thread_limit > 0) return std::min(thread_limit, avail);
  if (avail <= 1 || weight_bytes() < kMinThreadBytes) return 1;
  const auto it = workspaces_.find(B);
  if (it == workspaces_.end()) return 1;
  const Workspace& ws = it->second;
  if (ws.chosen > 0) return std::min(ws.chosen, avail);
  return ws.probe_one.size() < kProbeSteps ? 1 : avail;
}

void CpuDecoder::record_step_time(Workspace& ws, int T, double seconds) {
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

CpuDecoder::Workspace& CpuDecoder::workspace(int64_t B) {
  auto it = workspaces_.find(B);
  if (it != workspaces_.end()) return it->second;
  if (workspaces_.size() >= 8) workspaces_.clear();  // many batch sizes: keep memory bounded
  const size_t T = static_cast<size_t>(std::max<int64_t>(1, at::get_num_threads()));
  Workspace ws;
  ws.x.resize(B * E_);
  ws.h.resize(B * d_);
  ws.xn.resize(T * B * d_);
  ws.proj.resize(B * P_);
  if (rank_ > 0) ws.gate.resize(B * a_);
  ws.o.resize(B * a_);
  ws.u.resize(B * 2 * f_pad_);
  ws.act.resize(B * f_pad_);
  ws.scratch.resize(T * a_);
  ws.y.resize(B * d_);
  ws.old_states.resize(num_layers() * B);
  ws.new_states.resize(num_layers() * B);
  return workspaces_.emplace(B, std::move(ws)).first->second;
}

void CpuDecoder::run_thread(int64_t B, Workspace& ws, const float* x, float* y, int t, int T) {
  FlushDenormals flush;
  // Between stages every thread must see the others' results.
  auto sync = [T]() {
    if (T > 1) {
#pragma omp barrier
    }
  };
  const int64_t d = d_, a = a_, P = P_, H = H_;
  float* h = ws.h.data();
  float* xn = ws.xn.data() + t * B * d;
  float* proj = ws.proj.data();
  float* o = ws.o.data();
  float* u = ws.u.data();
  float* act = ws.act.data();
  float* scratch = ws.scratch.data() + t * a;
  const float inv_norm = 1.f / normalizer_;
  int64_t p0, p1;

  if (!in_proj_.empty()) {
    split(in_proj_.num_panels(), t, T, &p0, &p1);
    in_proj_.apply(x, E_, B, h, d, false, p0, p1);
  } else if (t == 0) {
    std::memcpy(h, x, sizeof(float) * B * d);
  }
  sync();
  const int64_t nl = num_layers();
  for (int64_t l = 0; l < nl; ++l) {
    const Layer& L = layers_[l];
    core_->layer_norm_rows(h, xn, L.ln1_w.data(), L.ln1_b.data(), B, d, eps_);
    split(L.proj.num_panels(), t, T, &p0, &p1);
    L.proj.apply(xn, d, B, proj, P, false, p0, p1);
    sync();
    if (rank_ > 0) {
      split(L.gate2.num_panels(), t, T, &p0, &p1);
      L.gate2.apply(proj + off_gate_, P, B, ws.gate.data(), a, false, p0, p1);
      sync();
    }
    // (row, head) tasks; consecutive heads of one row go to the core together.
    int64_t k0, k1;
    split(B * H, t, T, &k0, &k1);
    for (int64_t task = k0; task < k1;) {
      const int64_t b = task / H, h0 = task % H;
      const int64_t h1 = std::min(H, h0 + (k1 - task));
      const float* row = proj + b * P;
      const float* g = rank_ > 0 ? ws.gate.data() + b * a : row + off_gate_;
      core_->core_heads(row, row + a, row + 2 * a, g, use_gate_ ? row + off_r_ : nullptr,
                        use_norm_ ? L.rms_w.data() : nullptr, ws.old_states[l * B + b],
                        ws.new_states[l * B + b], o + b * a, h0, h1, D_, inv_norm, scale_, eps_,
                        scratch);
      task += h1 - h0;
    }
    sync();
    split(L.wo.num_panels(), t, T, &p0, &p1);
    L.wo.apply(o, a, B, h, d, true, p0, p1);
    sync();
    core_->layer_norm_rows(h, xn, L.ln2_w.data(), L.ln2_b.data(), B, d, eps_);
    split(L.w13.num_panels(), t, T, &p0, &p1);
    L.w13.apply(xn, d, B, u, 2 * f_pad_, false, p0, p1);
    for (int64_t p = p0; p < p1; ++p) {  // SwiGLU of this thread's own panels
      const int64_t j0 = p * half_, n = std::min(half_, f_ - j0);
      if (n <= 0) continue;
      for (int64_t b = 0; b < B; ++b) {
        const float* ub = u + b * 2 * f_pad_ + 2 * j0;
        core_->swiglu(ub, ub + half_, act + b * f_pad_ + j0, n);
      }
    }
    sync();
    split(L.w2.num_panels(), t, T, &p0, &p1);
    L.w2.apply(act, f_pad_, B, h, d, true, p0, p1);
    sync();
  }
  int64_t r0, r1;
  split(B, t, T, &r0, &r1);
  core_->layer_norm_rows(h + r0 * d, y + r0 * d, norm_w_.data(), norm_b_.data(), r1 - r0, d,
                         eps_);
}

void CpuDecoder::run(int64_t B, Workspace& ws, const float* x, float* y) {
  const int T = static_cast<int>(threads_for(B));
  if (ws.xn.size() < static_cast<size_t>(T * B * d_)) {  // more threads than at creation
    ws.xn.resize(T * B * d_);
    ws.scratch.resize(T * a_);
  }
#ifdef _OPENMP
  if (T > 1) {
    const auto t0 = std::chrono::steady_clock::now();
#pragma omp parallel num_threads(T)
    run_thread(B, ws, x, y, omp_get_thread_num(), omp_get_num_threads());
    record_step_time(ws, T, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    return;
  }
#endif
  const auto t0 = std::chrono::steady_clock::now();
  run_thread(B, ws, x, y, 0, 1);
  record_step_time(ws, 1, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
}

// A [B, H, D, D] float32 tensor for a new state. Its storage is one handed out by an earlier
// step that no tensor uses any more (our reference is the only one left), else a new one: fresh
// multi-megabyte allocations are page-faulted in on every step (at batch 32 that was most of
// the step's time). The tensor itself is always new (own TensorImpl, version counter, mode).
at::Tensor CpuDecoder::fresh_state(Workspace& ws, int64_t B) {
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

void CpuDecoder::check_x(const at::Tensor& x) const {
  TORCH_CHECK(x.scalar_type() == wdtype_ && x.device().is_cpu(), kOp, ": x must be a ",
              wdtype_, " CPU tensor (the weights' dtype), got ", x.scalar_type(), " on ",
              x.device());
  TORCH_CHECK((x.dim() == 2 || (x.dim() == 3 && x.size(1) == 1)) && x.size(-1) == E_ &&
                  x.size(0) >= 1,
              kOp, ": x must be [batch, ", E_, "] or [batch, 1, ", E_, "], got ", x.sizes());
}

// Float32 rows [B, E] of x (or of its rows `rows`): x itself when it already is one.
const float* CpuDecoder::load_x(const at::Tensor& x, Workspace& ws, const int64_t* rows,
                                int64_t B) const {
  const at::Tensor x2 = x.dim() == 3 ? x.select(1, 0) : x;
  if (!rows && x2.scalar_type() == at::kFloat && x2.is_contiguous())
    return x2.data_ptr<float>();
  rows_to_float(x2, rows, B, E_, ws.x.data());
  return ws.x.data();
}

std::tuple<at::Tensor, std::vector<at::Tensor>> CpuDecoder::step(
    const at::Tensor& x, const std::vector<at::Tensor>& states) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_x(x);
  const int64_t B = x.size(0), nl = num_layers();
  TORCH_CHECK(states.empty() || static_cast<int64_t>(states.size()) == nl, kOp,
              ": expected ", nl, " states (or none), got ", states.size());
  for (const auto& s : states)
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.device().is_cpu() &&
                    s.sizes() == at::IntArrayRef({B, H_, D_, D_}),
                kOp, ": each state must be a float32 CPU tensor [", B, ", ", H_, ", ", D_, ", ",
                D_, "], got ", s.scalar_type(), " ", s.sizes());

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
    run(B, ws, xp, y.data_ptr<float>());
  } else {
    run(B, ws, xp, ws.y.data());
    rows_from_float(ws.y.data(), nullptr, B, d_, y);
  }
  return {y, new_states};
}

at::Tensor CpuDecoder::step_pool(const at::Tensor& x, const std::vector<at::Tensor>& pools,
                                 const at::Tensor& slots) {
  std::lock_guard<std::mutex> lock(mutex_);
  check_x(x);
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
    TORCH_CHECK_VALUE(seen.insert(sp[i]).second, kOp, ": slot ", sp[i],
                      " appears twice in slots");
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
    run(B, ws, xp, y.data_ptr<float>());
  } else {
    run(B, ws, xp, ws.y.data());
    rows_from_float(ws.y.data(), rows.data(), B, d_, y);
  }
  for (const auto& s : pools)  // written in place, like an in-place op (inference tensors
    if (!s.is_inference()) s.unsafeGetTensorImpl()->bump_version();  // have no counter)
  return y;
}

}  // namespace gla
