// Whole-model decode step on the CPU (see decode.h). Per token and layer:
//   xn   = LayerNorm(h)                                  own loop
//   proj = xn @ [Wq; Wk; Wv; (Wr); (Wg | Wg1)]^T          one GEMM (at::mm_out)
//   gate = proj[:, z] @ Wg2^T + bg                        low-rank gate only (at::addmm_out)
//   per (row, head): g = logsigmoid(gate) / normalizer; S' = exp(g) S + k^T v; o = scale q S';
//                    o = RMSNorm(o) * w; o *= silu(r)    own loop, one pass over the state
//   h   += o @ Wo^T                                       at::addmm_out into h
//   xn   = LayerNorm(h); u = xn @ [W1; W3]^T              own loop, one GEMM
//   h   += (silu(u1) * u3) @ W2^T                         own loop, at::addmm_out into h
// then y = LayerNorm(h). All buffers live in a per-batch-size workspace; a step allocates only
// its outputs (y and the new states).
#include "decode.h"

#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <c10/core/InferenceMode.h>

#include <algorithm>
#include <cmath>
#include <cstring>

namespace gla {
namespace {

const char* kOp = "gla_ext.CpuDecoder";

// y = (x - mean) / sqrt(var + eps) * w + b over each of the B rows of length n.
void layer_norm_rows(const float* x, float* y, const float* w, const float* b, int64_t B,
                     int64_t n, float eps) {
  for (int64_t row = 0; row < B; ++row) {
    const float* xr = x + row * n;
    float* yr = y + row * n;
    double sum = 0;
    for (int64_t i = 0; i < n; ++i) sum += xr[i];
    const double mean = sum / n;
    double sq = 0;
    for (int64_t i = 0; i < n; ++i) {
      const double c = xr[i] - mean;
      sq += c * c;
    }
    const float rstd = static_cast<float>(1.0 / std::sqrt(sq / n + eps));
    const float m = static_cast<float>(mean);
    for (int64_t i = 0; i < n; ++i) yr[i] = (xr[i] - m) * rstd * w[i] + b[i];
  }
}

inline float silu(float x) { return x / (1.f + std::exp(-x)); }

// torch's log_sigmoid: min(x, 0) - log1p(exp(-|x|)).
inline float log_sigmoid(float x) { return std::min(x, 0.f) - std::log1p(std::exp(-std::abs(x))); }

at::Tensor required(const std::optional<at::Tensor>& t, const char* name, int64_t layer) {
  TORCH_CHECK(t.has_value() && t->defined(), kOp, ": ", name, " of layer ", layer,
              " is missing");
  return *t;
}

void check_param(const at::Tensor& t, const char* name, int64_t layer,
                 std::initializer_list<int64_t> shape) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.device().is_cpu(), kOp, ": ", name,
              " of layer ", layer, " must be a float32 CPU tensor, got ", t.scalar_type(), " on ",
              t.device());
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape), kOp, ": ", name, " of layer ", layer,
              " must have shape ", at::IntArrayRef(shape), ", got ", t.sizes());
}

// A contiguous copy (packed weights) or alias (vectors) that never requires grad.
at::Tensor plain(const at::Tensor& t) { return t.detach().contiguous(); }

}  // namespace

CpuDecoder::CpuDecoder(const std::vector<std::optional<at::Tensor>>& globals,
                       const std::vector<std::vector<std::optional<at::Tensor>>>& layers,
                       int64_t num_heads, int64_t head_dim, double gate_normalizer, double eps,
                       double scale) {
  // Packed weights are ordinary tensors whatever mode the first step runs in.
  c10::InferenceMode not_inference(false);
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

  auto watch = [&](const at::Tensor& t) {
    TORCH_CHECK(!t.is_inference(), kOp, ": inference-mode parameters cannot be watched");
    watched_.push_back(t);
    versions_.push_back(t._version());
    pointers_.push_back(t.data_ptr());
    aliases_.push_back(t.detach());  // keeps the storage, so its address is not reused
  };

  const at::Tensor norm_w = required(globals[kNormW], "final norm weight", -1);
  d_ = norm_w.size(0);
  check_param(norm_w, "final norm weight", -1, {d_});
  norm_w_ = plain(norm_w);
  watch(norm_w);
  const at::Tensor norm_b = required(globals[kNormB], "final norm bias", -1);
  check_param(norm_b, "final norm bias", -1, {d_});
  norm_b_ = plain(norm_b);
  watch(norm_b);
  if (globals[kInW] && globals[kInW]->defined()) {
    const at::Tensor& w = *globals[kInW];
    E_ = w.size(1);
    check_param(w, "input projection weight", -1, {d_, E_});
    in_w_t_ = plain(w).t();
    watch(w);
    if (globals[kInB] && globals[kInB]->defined()) {
      check_param(*globals[kInB], "input projection bias", -1, {d_});
      in_b_ = plain(*globals[kInB]);
      watch(*globals[kInB]);
    }
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
  off_r_ = use_gate_ ? 3 * a_ : -1;
  off_gate_ = 3 * a_ + (use_gate_ ? a_ : 0);
  P_ = off_gate_ + (low_rank ? rank_ : a_);

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
    TORCH_CHECK(present(kWr) == use_gate_ && present(kRmsW) == use_norm_ &&
                    present(kWg2) == low_rank,
                kOp, ": every layer must use the same options (layer ", l, " differs)");
    Layer L;
    L.ln1_w = plain(get(kLn1W, "attn_norm weight", {d_}));
    L.ln1_b = plain(get(kLn1B, "attn_norm bias", {d_}));
    std::vector<at::Tensor> rows = {get(kWq, "q_proj weight", {a_, d_}),
                                    get(kWk, "k_proj weight", {a_, d_}),
                                    get(kWv, "v_proj weight", {a_, d_})};
    if (use_gate_) rows.push_back(get(kWr, "g_proj weight", {a_, d_}));
    rows.push_back(get(kWg, "gate weight", {low_rank ? rank_ : a_, d_}));
    L.proj_t = at::cat(rows, 0).t();  // [d, P] view of a fresh [P, d] tensor
    if (low_rank) L.gate2_t = plain(get(kWg2, "low-rank gate weight", {a_, rank_})).t();
    L.gate_b = plain(get(kGateBias, "gate bias", {a_}));
    if (use_norm_) L.rms_w = plain(get(kRmsW, "RMSNorm weight", {D_}));
    L.wo_t = plain(get(kWo, "o_proj weight", {d_, a_})).t();
    L.ln2_w = plain(get(kLn2W, "ffn_norm weight", {d_}));
    L.ln2_b = plain(get(kLn2B, "ffn_norm bias", {d_}));
    L.w13_t = at::cat({get(kW1, "w1", {f_, d_}), get(kW3, "w3", {f_, d_})}, 0).t();
    L.w2_t = plain(get(kW2, "w2", {d_, f_})).t();
    layers_.push_back(std::move(L));
  }
}

int64_t CpuDecoder::status(bool grad_enabled) const {
  bool needs_grad = false;
  for (size_t i = 0; i < watched_.size(); ++i) {
    const at::Tensor& t = watched_[i];
    if (t.scalar_type() != at::kFloat || !t.device().is_cpu() || t.is_inference() ||
        t._version() != versions_[i] || t.data_ptr() != pointers_[i])
      return kStale;
    needs_grad = needs_grad || t.requires_grad();
  }
  return grad_enabled && needs_grad ? kNeedsAutograd : kReady;
}

CpuDecoder::Workspace& CpuDecoder::workspace(int64_t B) {
  auto it = workspaces_.find(B);
  if (it != workspaces_.end()) return it->second;
  if (workspaces_.size() >= 8) workspaces_.clear();  // many batch sizes: keep memory bounded
  c10::InferenceMode not_inference(false);
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  Workspace ws;
  ws.h = at::empty({B, d_}, opts);
  ws.xn = at::empty({B, d_}, opts);
  ws.proj = at::empty({B, P_}, opts);
  if (rank_ > 0) {
    ws.z = ws.proj.narrow(1, off_gate_, rank_);
    ws.gate = at::empty({B, a_}, opts);
  }
  ws.o = at::empty({B, a_}, opts);
  ws.u = at::empty({B, 2 * f_}, opts);
  ws.act = at::empty({B, f_}, opts);
  return workspaces_.emplace(B, std::move(ws)).first->second;
}

// Gates, state update fused with the output, RMSNorm and swish gate for every (row, head).
// Reads ws.proj (and ws.gate for a low-rank gate), writes ws.o and new_state.
void CpuDecoder::attention_core(const Layer& L, const Workspace& ws, int64_t B,
                                const float* old_state, float* new_state) const {
  const int64_t H = H_, D = D_, a = a_, P = P_;
  const float* proj = ws.proj.data_ptr<float>();
  const float* gate_full = proj + off_gate_;
  const float* gate_low = rank_ > 0 ? ws.gate.data_ptr<float>() : nullptr;
  const float* gate_b = L.gate_b.data_ptr<float>();
  const float* rms_w = use_norm_ ? L.rms_w.data_ptr<float>() : nullptr;
  float* out = ws.o.data_ptr<float>();
  const float inv_norm = 1.f / normalizer_, scale = scale_, eps = eps_;
  const bool use_gate = use_gate_;
  const int64_t off_r = off_r_;
  // Small problems run inline: waking threads costs more than a few 64x64 states.
  const int64_t grain = std::max<int64_t>(1, 32768 / (D * D));

  at::parallel_for(0, B * H, grain, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / H, h = task % H;
      const float* row = proj + b * P;
      const float* q = row + h * D;
      const float* k = row + a + h * D;
      const float* v = row + 2 * a + h * D;
      // Full gate: raw logits in proj plus the bias; low-rank: the addmm already added it.
      const float* g = gate_low ? gate_low + b * a + h * D : gate_full + b * P + h * D;
      const float* gb = gate_low ? nullptr : gate_b + h * D;
      const float* S0 = old_state ? old_state + task * D * D : nullptr;
      float* S = new_state + task * D * D;
      float* o = out + b * a + h * D;
      for (int64_t j = 0; j < D; ++j) o[j] = 0.f;
      for (int64_t i = 0; i < D; ++i) {
        const float logit = gb ? g[i] + gb[i] : g[i];
        const float decay = std::exp(log_sigmoid(logit) * inv_norm);
        const float ki = k[i], qi = q[i] * scale;
        float* Si = S + i * D;
        if (S0) {
          const float* S0i = S0 + i * D;
          for (int64_t j = 0; j < D; ++j) {
            const float s = decay * S0i[j] + ki * v[j];
            Si[j] = s;
            o[j] += qi * s;
          }
        } else {
          for (int64_t j = 0; j < D; ++j) {
            const float s = ki * v[j];
            Si[j] = s;
            o[j] += qi * s;
          }
        }
      }
      if (rms_w) {
        float sq = 0.f;
        for (int64_t j = 0; j < D; ++j) sq += o[j] * o[j];
        const float r = 1.f / std::sqrt(sq / D + eps);
        for (int64_t j = 0; j < D; ++j) o[j] = o[j] * r * rms_w[j];
      }
      if (use_gate) {
        const float* rg = row + off_r + h * D;
        for (int64_t j = 0; j < D; ++j) o[j] *= silu(rg[j]);
      }
    }
  });
}

std::tuple<at::Tensor, std::vector<at::Tensor>> CpuDecoder::step(
    const at::Tensor& x_in, const std::vector<at::Tensor>& states) {
  std::lock_guard<std::mutex> lock(mutex_);
  TORCH_CHECK(x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(), kOp,
              ": x must be a float32 CPU tensor, got ", x_in.scalar_type(), " on ",
              x_in.device());
  TORCH_CHECK((x_in.dim() == 2 || (x_in.dim() == 3 && x_in.size(1) == 1)) &&
                  x_in.size(-1) == E_ && x_in.size(0) >= 1,
              kOp, ": x must be [batch, ", E_, "] or [batch, 1, ", E_, "], got ", x_in.sizes());
  const int64_t B = x_in.size(0), nl = num_layers();
  TORCH_CHECK(states.empty() || static_cast<int64_t>(states.size()) == nl, kOp,
              ": expected ", nl, " states (or none), got ", states.size());
  for (const auto& s : states)
    TORCH_CHECK(s.scalar_type() == at::kFloat && s.device().is_cpu() &&
                    s.sizes() == at::IntArrayRef({B, H_, D_, D_}),
                kOp, ": each state must be a float32 CPU tensor [", B, ", ", H_, ", ", D_, ", ",
                D_, "], got ", s.scalar_type(), " ", s.sizes());

  // Outputs are allocated in the caller's mode (inference tensors under inference_mode, like
  // the generic path); everything below writes into buffers without autograd bookkeeping.
  const auto opts = at::TensorOptions().dtype(at::kFloat);
  at::Tensor y = at::empty({B, d_}, opts);
  std::vector<at::Tensor> new_states;
  new_states.reserve(nl);
  for (int64_t l = 0; l < nl; ++l) new_states.push_back(at::empty({B, H_, D_, D_}, opts));

  at::AutoDispatchBelowADInplaceOrView below_autograd;
  Workspace& ws = workspace(B);
  const at::Tensor x = x_in.reshape({B, E_}).contiguous();
  if (in_w_t_.defined()) {
    if (in_b_.defined()) at::addmm_out(ws.h, in_b_, x, in_w_t_);
    else at::mm_out(ws.h, x, in_w_t_);
  } else {
    std::memcpy(ws.h.data_ptr<float>(), x.data_ptr<float>(), sizeof(float) * B * d_);
  }
  float* h = ws.h.data_ptr<float>();
  float* xn = ws.xn.data_ptr<float>();

  for (int64_t l = 0; l < nl; ++l) {
    const Layer& L = layers_[l];
    layer_norm_rows(h, xn, L.ln1_w.data_ptr<float>(), L.ln1_b.data_ptr<float>(), B, d_, eps_);
    at::mm_out(ws.proj, ws.xn, L.proj_t);
    if (rank_ > 0) at::addmm_out(ws.gate, L.gate_b, ws.z, L.gate2_t);
    at::Tensor old_state = states.empty() ? at::Tensor() : states[l].contiguous();
    attention_core(L, ws, B, old_state.defined() ? old_state.data_ptr<float>() : nullptr,
                   new_states[l].data_ptr<float>());
    at::addmm_out(ws.h, ws.h, ws.o, L.wo_t);  // h += o Wo^T

    layer_norm_rows(h, xn, L.ln2_w.data_ptr<float>(), L.ln2_b.data_ptr<float>(), B, d_, eps_);
    at::mm_out(ws.u, ws.xn, L.w13_t);
    const float* u = ws.u.data_ptr<float>();
    float* act = ws.act.data_ptr<float>();
    const int64_t f = f_;
    for (int64_t b = 0; b < B; ++b)
      for (int64_t j = 0; j < f; ++j)
        act[b * f + j] = silu(u[b * 2 * f + j]) * u[b * 2 * f + f + j];
    at::addmm_out(ws.h, ws.h, ws.act, L.w2_t);  // h += act W2^T
  }
  layer_norm_rows(h, y.data_ptr<float>(), norm_w_.data_ptr<float>(), norm_b_.data_ptr<float>(),
                  B, d_, eps_);
  return {y, new_states};
}

}  // namespace gla
