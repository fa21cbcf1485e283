// The engine's loader (one validation of a model's parameters), its packed copies (made per
// kind on first own-kernel use, in the stored format) and what it reports (see engine.h).
#include "cpu/engine/engine.h"
#include "cpu/engine/engine_plan.h"
#include "cpu/simd/cpu_features.h"

#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>

#if defined(__GLIBC__)
#include <malloc.h>
#endif

namespace gla {

namespace {

const char* kOp = "gla_ext.CpuEngine";

int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

at::Tensor required(const std::optional<at::Tensor>& t, const char* name, int64_t layer) {
  TORCH_CHECK_VALUE(t.has_value() && t->defined(), kOp, ": ", name, " of layer ", layer,
                    " is missing");
  return *t;
}

bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

LinearWeight linear_type(at::ScalarType t) {
  return t == at::kBFloat16 ? LinearWeight::kBFloat16
         : t == at::kHalf   ? LinearWeight::kFloat16
                            : LinearWeight::kFloat32;
}

// t as float32, zero-padded to n values.
std::vector<float> padded(const at::Tensor& t, int64_t n) {
  const at::Tensor f = t.detach().to(at::kFloat).contiguous();
  std::vector<float> out(static_cast<size_t>(std::max<int64_t>(n, f.numel())), 0.f);
  std::copy(f.data_ptr<float>(), f.data_ptr<float>() + f.numel(), out.begin());
  return out;
}

// f (a list of tensors -> one tensor) applied to the same part of every matrix of `parts`
// (all float, or all of one quantized format and group size). Quantization groups run along
// a row's columns, so a row operation applied to every part alike keeps scales with weights.
template <class F>
EngineRows zip_rows(const std::vector<EngineRows>& parts, F f) {
  const EngineRows& first = parts.front();
  for (const EngineRows& r : parts)
    TORCH_CHECK_VALUE(r.group == first.group && r.w.scalar_type() == first.w.scalar_type(), kOp,
                      ": matrices packed together must share one format and group size");
  auto each = [&](at::Tensor EngineRows::*part) {
    if (!(first.*part).defined()) return at::Tensor();
    std::vector<at::Tensor> ts;
    for (const EngineRows& r : parts) ts.push_back(r.*part);
    return f(ts);
  };
  return {each(&EngineRows::w), each(&EngineRows::scales), each(&EngineRows::offsets), first.group};
}

// The own kernel's copy of m's rows for ISA `isa` (no bias: the loops add biases).
PackedMatrix pack(const EngineRows& m, int isa) {
  const at::Tensor c = m.w.contiguous();
  if (m.group == 0)
    return PackedMatrix(c.data_ptr(), linear_type(c.scalar_type()), c.size(0), c.size(1),
                        c.size(1), nullptr, isa);
  const bool int4 = c.scalar_type() == at::kByte;
  const at::Tensor s = m.scales.contiguous();
  const at::Tensor o = int4 ? m.offsets.contiguous() : at::Tensor();
  return PackedMatrix(c.data_ptr(), reinterpret_cast<const uint16_t*>(s.data_ptr()),
                      int4 ? reinterpret_cast<const uint16_t*>(o.data_ptr()) : nullptr,
                      int4 ? LinearWeight::kInt4 : LinearWeight::kInt8, c.size(0),
                      c.size(1) * (int4 ? 2 : 1), m.group, nullptr, isa);
}

}  // namespace

CpuEngine::CpuEngine(const std::vector<std::optional<at::Tensor>>& globals,
                     const std::vector<std::vector<std::optional<at::Tensor>>>& layers,
                     int64_t num_heads, int64_t head_dim, double gate_normalizer, double eps,
                     double scale,
                     const std::vector<std::vector<std::optional<at::Tensor>>>& scales,
                     const std::vector<std::vector<std::optional<at::Tensor>>>& offsets) {
  // What is kept is an ordinary tensor whatever mode the first call runs in.
  c10::InferenceMode not_inference(false);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  TORCH_CHECK_VALUE(globals.size() == kNumGlobalSlots, kOp, ": expected ", int(kNumGlobalSlots),
                    " model-level tensors, got ", globals.size());
  TORCH_CHECK_VALUE(!layers.empty(), kOp, ": the model has no layers");
  TORCH_CHECK_VALUE(num_heads >= 1 && head_dim >= 1, kOp, ": bad num_heads/head_dim");
  H_ = num_heads;
  D_ = head_dim;
  a_ = H_ * D_;
  normalizer_ = static_cast<float>(gate_normalizer);
  eps_ = static_cast<float>(eps);
  scale_ = static_cast<float>(scale);
  isa_ = static_cast<int>(pick_cpu_isa());
  kern_ = engine_kernels(isa_);
  nr_ = kern_->window_panel();
  TORCH_CHECK(nr_ == linear_panel_width_now(), kOp, ": panel widths of the window kernel (", nr_,
              ") and of the packed matrices (", linear_panel_width_now(), ") differ");

  // a float parameter: checked, watched, detached (what is built from it must not need grad)
  auto param = [&](const at::Tensor& t, const char* name, int64_t layer,
                   std::initializer_list<int64_t> shape) {
    TORCH_CHECK_VALUE(t.scalar_type() == wdtype_ && t.device().is_cpu(), kOp, ": ", name,
                      " of layer ", layer, " must be a ", wdtype_, " CPU tensor, got ",
                      t.scalar_type(), " on ", t.device());
    TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(shape), kOp, ": ", name, " of layer ", layer,
                      " must have shape ", at::IntArrayRef(shape), ", got ", t.sizes());
    watched_.watch(t, kOp);
    return t.detach();
  };

  const at::Tensor norm_w = required(globals[kNormW], "final norm weight", -1);
  wdtype_ = norm_w.scalar_type();
  TORCH_CHECK_VALUE(wdtype_ == at::kFloat || wdtype_ == at::kBFloat16 || wdtype_ == at::kHalf,
                    kOp, ": parameters must be float32, bfloat16 or float16, got ", wdtype_);
  d_ = norm_w.size(0);
  dp_ = round_up(d_, nr_);
  norm_w_ = padded(param(norm_w, "final norm weight", -1, {d_}), dp_);
  norm_b_ = padded(param(required(globals[kNormB], "final norm bias", -1), "final norm bias", -1,
                         {d_}), dp_);
  E_ = d_;
  if (present(globals[kInW])) {
    E_ = globals[kInW]->size(1);
    in_.parts = {EngineRows{param(*globals[kInW], "input projection weight", -1, {d_, E_})}};
    in_.cols = {0};
    if (present(globals[kInB]))
      in_b_ = padded(param(*globals[kInB], "input projection bias", -1, {d_}), dp_);
  }

  const auto& first = layers[0];
  TORCH_CHECK_VALUE(first.size() == kNumSlots, kOp, ": expected ", int(kNumSlots),
                    " tensors per layer, got ", first.size());
  use_gate_ = present(first[kWr]);
  use_norm_ = present(first[kRmsW]);
  const bool low_rank = present(first[kWg2]);
  rank_ = low_rank ? required(first[kWg], "gate weight", 0).size(0) : 0;
  f_ = required(first[kW1], "w1", 0).size(0);
  f_pad_ = round_up(f_, nr_ / 2);
  off_r_ = use_gate_ ? 3 * a_ : -1;
  off_gate_ = 3 * a_ + (use_gate_ ? a_ : 0);
  P_ = off_gate_ + (low_rank ? rank_ : a_);
  Pp_ = round_up(P_, nr_);
  for (const auto* parts : {&scales, &offsets}) {
    TORCH_CHECK_VALUE(parts->empty() || parts->size() == layers.size(), kOp, ": expected ",
                      layers.size(), " lists of scales / offsets (or none), got ", parts->size());
    for (const auto& per_layer : *parts)
      TORCH_CHECK_VALUE(per_layer.size() == kNumSlots, kOp, ": expected ", int(kNumSlots),
                        " scales / offsets per layer, got ", per_layer.size());
  }

  for (int64_t l = 0; l < static_cast<int64_t>(layers.size()); ++l) {
    const auto& p = layers[l];
    TORCH_CHECK_VALUE(p.size() == kNumSlots, kOp, ": expected ", int(kNumSlots),
                      " tensors per layer, got ", p.size(), " for layer ", l);
    TORCH_CHECK_VALUE(present(p[kWr]) == use_gate_ && present(p[kRmsW]) == use_norm_ &&
                          present(p[kWg2]) == low_rank,
                      kOp, ": every layer must use the same options (layer ", l, " differs)");
    auto get = [&](int slot, const char* name, std::initializer_list<int64_t> shape) {
      return param(required(p[slot], name, l), name, l, shape);
    };
    auto part = [&](const std::vector<std::vector<std::optional<at::Tensor>>>& parts, int slot) {
      return parts.empty() || !parts[l][slot] ? at::Tensor() : *parts[l][slot];
    };
    // A weight matrix [rows, cols]: float in the parameters' dtype, or quantized.
    auto matrix = [&](int slot, const char* name, int64_t rows, int64_t cols) -> EngineRows {
      const at::Tensor s = part(scales, slot), o = part(offsets, slot);
      if (!s.defined()) return EngineRows{get(slot, name, {rows, cols})};
      const at::Tensor q = required(p[slot], name, l);
      const bool int4 = q.scalar_type() == at::kByte;
      TORCH_CHECK_VALUE((int4 || q.scalar_type() == at::kChar) && q.device().is_cpu() &&
                            q.sizes() == at::IntArrayRef({rows, int4 ? cols / 2 : cols}),
                        kOp, ": quantized ", name, " of layer ", l, " must be an int8 [", rows,
                        ", ", cols, "] or uint8 (int4) [", rows, ", ", cols / 2,
                        "] CPU tensor, got ", q.scalar_type(), " ", q.sizes());
      const int64_t groups = s.dim() == 2 ? s.size(1) : 0;
      const int64_t group = groups > 0 && cols % groups == 0 ? cols / groups : 0;
      TORCH_CHECK_VALUE(group >= 1 && (!int4 || group % 2 == 0), kOp, ": scales of ", name,
                        " of layer ", l, " must have a number of columns dividing ", cols,
                        int4 ? " into even groups" : "", ", got ", s.sizes());
      TORCH_CHECK_VALUE(int4 == o.defined(), kOp, ": ", name, " of layer ", l,
                        ": offsets must be given for int4 weights and only for them");
      for (const at::Tensor& t : {s, o}) {
        if (!t.defined()) continue;
        TORCH_CHECK_VALUE(t.scalar_type() == at::kHalf && t.device().is_cpu() &&
                              t.sizes() == at::IntArrayRef({rows, groups}),
                          kOp, ": scales / offsets of ", name, " of layer ", l,
                          " must be float16 CPU tensors [", rows, ", ", groups, "], got ",
                          t.scalar_type(), " ", t.sizes());
        watched_.watch(t, kOp);
      }
      watched_.watch(q, kOp);
      quantized_ = true;
      return EngineRows{q.detach(), s.detach(), int4 ? o.detach() : at::Tensor(), group};
    };
    Layer L;
    L.ln1_w = padded(get(kLn1W, "attn_norm weight", {d_}), dp_);
    L.ln1_b = padded(get(kLn1B, "attn_norm bias", {d_}), dp_);
    L.proj.parts = {matrix(kWq, "q_proj weight", a_, d_), matrix(kWk, "k_proj weight", a_, d_),
                    matrix(kWv, "v_proj weight", a_, d_)};
    L.proj.cols = {0, a_, 2 * a_};
    if (use_gate_) {
      L.proj.parts.push_back(matrix(kWr, "g_proj weight", a_, d_));
      L.proj.cols.push_back(off_r_);
    }
    L.proj.parts.push_back(matrix(kWg, "gate weight", low_rank ? rank_ : a_, d_));
    L.proj.cols.push_back(off_gate_);
    if (low_rank) {
      L.gate2.parts = {matrix(kWg2, "low-rank gate weight", a_, rank_)};
      L.gate2.cols = {0};
    }
    L.gate_b = padded(get(kGateBias, "gate bias", {a_}), a_ + 16);
    if (use_norm_) L.rms_w = padded(get(kRmsW, "RMSNorm weight", {D_}), D_ + 16);
    L.wo.parts = {matrix(kWo, "o_proj weight", d_, a_)};
    L.wo.cols = {0};
    L.ln2_w = padded(get(kLn2W, "ffn_norm weight", {d_}), dp_);
    L.ln2_b = padded(get(kLn2B, "ffn_norm bias", {d_}), dp_);
    L.w13.parts = {matrix(kW1, "w1", f_, d_), matrix(kW3, "w3", f_, d_)};
    L.w13.cols = {0, f_pad_};
    L.w13.w13 = true;
    L.w2.parts = {matrix(kW2, "w2", d_, f_)};
    L.w2.cols = {0};
    layers_.push_back(std::move(L));
  }
}

std::vector<EngineProduct*> CpuEngine::products(int kind, int64_t l) {
  Layer& L = layers_[l];
  switch (kind) {
    case kMatIn: return {&in_};
    case kMatProj: return rank_ > 0 ? std::vector<EngineProduct*>{&L.proj, &L.gate2}
                                    : std::vector<EngineProduct*>{&L.proj};
    case kMatWo: return {&L.wo};
    case kMatW13: return {&L.w13};
    default: return {&L.w2};
  }
}

int64_t CpuEngine::kind_k(int kind) const {
  return kind == kMatIn ? E_ : kind == kMatWo ? a_ : kind == kMatW2 ? f_ : d_;
}

// Packs kind's products of every layer (a no-op where packed). Rows stacked: [Wq; Wk; Wv;
// Wr; Wg]; [W1 | W3] interleaved by half panels: panel i holds w1 rows [i*half, (i+1)*half)
// then the same w3 rows, so u1[j] and u3[j] come out of one panel (zero rows pad f; zero q,
// scales and offsets are zero weights in every format).
void CpuEngine::ensure_packed(int kind) {
  if (kind == kMatIn && in_.parts.empty()) return;
  if (!products(kind, 0)[0]->packed.empty()) return;
  c10::InferenceMode not_inference(false);
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  const int64_t f_pad = f_pad_, f = f_, half = nr_ / 2;
  const auto interleave = [f_pad, f, half](const std::vector<at::Tensor>& w13) {
    const int64_t n = w13[0].size(1);
    const at::Tensor pad = at::zeros({f_pad - f, n}, w13[0].options());
    const at::Tensor w1p = at::cat({w13[0], pad}, 0).view({f_pad / half, half, n});
    const at::Tensor w3p = at::cat({w13[1], pad}, 0).view({f_pad / half, half, n});
    return at::stack({w1p, w3p}, 1).reshape({2 * f_pad, n});
  };
  const auto cat0 = [](const std::vector<at::Tensor>& ts) { return at::cat(ts, 0); };
  for (int64_t l = 0; l < (kind == kMatIn ? 1 : num_layers()); ++l)
    for (EngineProduct* p : products(kind, l)) {
      const EngineRows rows = p->parts.size() == 1 ? p->parts[0]
                              : p->w13             ? zip_rows(p->parts, interleave)
                                                   : zip_rows(p->parts, cat0);
      p->packed = pack(rows, isa_);
    }
#if defined(__GLIBC__)
  malloc_trim(0);  // packing's temporaries (concatenated rows): glibc would keep that heap
#endif
}

// Drops the packed copies of kinds that no measured choice and no step runs on the own
// kernel (a float32 model prefilled on the vendor GEMM keeps no float32 copy).
void CpuEngine::release_unused() {
  for (int kind = 0; kind < kNumMatKinds; ++kind) {
    bool used = step_own_[kind] || quantized_;
    for (const auto* table : {&window_choices_, &step_choices_})
      for (const auto& [key, c] : *table) used = used || !c[kind];
    if (used || (kind == kMatIn && in_.parts.empty())) continue;
    for (int64_t l = 0; l < (kind == kMatIn ? 1 : num_layers()); ++l)
      for (EngineProduct* p : products(kind, l)) p->packed = PackedMatrix();
  }
}

std::string CpuEngine::isa() const { return cpu_isa_name(static_cast<CpuIsa>(isa_)); }

std::string CpuEngine::weight_format() const {
  if (!quantized_)
    return wdtype_ == at::kBFloat16 ? "bfloat16" : wdtype_ == at::kHalf ? "float16" : "float32";
  return layers_[0].proj.parts[0].w.scalar_type() == at::kByte ? "int4" : "int8";
}

int64_t CpuEngine::weight_bytes() const {
  // what the own kernels stream per step: the packed size of every product (computed from
  // the shapes, packed or not yet)
  auto bytes = [&](const EngineProduct& p) -> int64_t {
    if (p.parts.empty()) return 0;
    if (!p.packed.empty()) return static_cast<int64_t>(p.packed.weight_bytes());
    int64_t rows = 0;
    for (const EngineRows& r : p.parts) rows += r.w.size(0);
    if (p.w13) rows = 2 * f_pad_;
    const int64_t cols = p.parts[0].w.size(1) * (p.parts[0].w.scalar_type() == at::kByte ? 2 : 1);
    const int64_t padded_rows = round_up(rows, nr_);
    if (p.parts[0].group == 0) return padded_rows * cols * p.parts[0].w.element_size();
    const int64_t g = p.parts[0].group, int4 = p.parts[0].w.scalar_type() == at::kByte;
    const int64_t per_group = (int4 ? 2 : 1) * nr_ * 2 + (g + 3) / 4 * (int4 ? nr_ * 2 : nr_ * 4);
    return padded_rows / nr_ * (cols / g) * per_group;
  };
  int64_t total = bytes(in_);
  for (const Layer& L : layers_)
    total += bytes(L.proj) + bytes(L.gate2) + bytes(L.wo) + bytes(L.w13) + bytes(L.w2);
  return total;
}

int64_t CpuEngine::packed_bytes() const {
  std::lock_guard<std::mutex> lock(mutex_);
  int64_t total = in_.packed.empty() ? 0 : in_.packed.weight_bytes();
  for (const Layer& L : layers_)
    for (const EngineProduct* p : {&L.proj, &L.gate2, &L.wo, &L.w13, &L.w2})
      if (!p->packed.empty()) total += p->packed.weight_bytes();
  return total;
}

int64_t CpuEngine::packed_float32_bytes() const {
  return wdtype_ == at::kFloat && !quantized_ ? packed_bytes() : 0;
}

std::vector<bool> CpuEngine::last_vendor() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return std::vector<bool>(last_.begin(), last_.end());
}

std::vector<bool> CpuEngine::last_step_vendor() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return std::vector<bool>(last_step_.begin(), last_step_.end());
}

namespace {
CpuEngine::ChoiceList list(const std::map<std::pair<int64_t, int>, std::array<bool, kNumMatKinds>>& t) {
  CpuEngine::ChoiceList out;
  for (const auto& [key, c] : t)
    out.emplace_back(key.first, key.second, std::vector<bool>(c.begin(), c.end()));
  return out;
}
}  // namespace

CpuEngine::ChoiceList CpuEngine::choices() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return list(window_choices_);
}

CpuEngine::ChoiceList CpuEngine::step_choices() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return list(step_choices_);
}

void CpuEngine::check_gemm(int64_t gemm) const {
  TORCH_CHECK_VALUE(gemm >= kGemmAuto && gemm <= kGemmVendor, kOp,
                    ": gemm must be 0 (auto), 1 (own) or 2 (vendor), got ", gemm);
  TORCH_CHECK_VALUE(!(quantized_ && gemm == kGemmVendor), kOp,
                    ": quantized weights have no vendor GEMM route (gemm=2)");
}

void CpuEngine::check_states(const std::vector<at::Tensor>& states, int64_t B) const {
  const int64_t nl = num_layers();
  TORCH_CHECK_VALUE(states.empty() || static_cast<int64_t>(states.size()) == nl, kOp,
                    ": expected ", nl, " states (or none), got ", states.size());
  for (const auto& s : states)
    TORCH_CHECK_VALUE(s.scalar_type() == at::kFloat && s.device().is_cpu() &&
                          s.sizes() == at::IntArrayRef({B, H_, D_, D_}),
                      kOp, ": each state must be a float32 CPU tensor [", B, ", ", H_, ", ", D_,
                      ", ", D_, "], got ", s.scalar_type(), " ", s.sizes());
}

std::vector<EngineStage> engine_stages(int64_t num_layers, const bool* vendor, bool low_rank,
                                       bool window) {
  std::vector<EngineStage> s;
  s.push_back({kOpIn, 0, vendor[kMatIn]});
  for (int64_t l = 0; l < num_layers; ++l) {
    const bool vp = vendor[kMatProj], vw13 = vendor[kMatW13];
    if (window || vp) s.push_back({kOpLn1, l, false});
    s.push_back({kOpProj, l, vp});
    if (low_rank) s.push_back({kOpGate2, l, vp});
    if (window && vp) s.push_back({kOpGate, l, false});
    s.push_back({kOpAttn, l, false});
    s.push_back({kOpWo, l, vendor[kMatWo]});
    if (window || vw13) s.push_back({kOpLn2, l, false});
    s.push_back({kOpW13, l, vw13});
    if (vw13) s.push_back({kOpSwiGlu, l, false});
    s.push_back({kOpW2, l, vendor[kMatW2]});
  }
  s.push_back({kOpFinal, 0, false});
  return s;
}

}  // namespace gla
