// gla_ext._C.StepRows: the engine's per-ISA row math (math_impl.h, step_impl.h) for a token
// step whose model layout the engine does not hold: fla's GLA language models
// (gla_ext/integrations/fla_decode.py), whose step is otherwise ~50 small torch ops per layer
// around the packed products (about 3 ms per token at 12 layers, one thread of an AMD EPYC).
// Three calls per layer replace them: RMSNorm of rows, the attention core (gate decay, state
// update in place, GQA outputs, per-head RMSNorm, swish output gate), SwiGLU of rows. The
// instruction set is picked when the object is made, like a PackedLinear's.
#include "cpu/engine/step_rows.h"

#include <ATen/Parallel.h>

#include <cmath>
#include <optional>
#include <string>

#include "cpu/engine/engine.h"
#include "cpu/simd/cpu_features.h"
#include "cpu/tensor_span.h"

namespace gla {
namespace {

const char* kOp = "gla_ext StepRows";

// A float32 CPU matrix [rows, cols] whose rows are contiguous (any row stride).
void check_rows(const at::Tensor& t, const char* name, int64_t rows, int64_t cols) {
  TORCH_CHECK_VALUE(t.dim() == 2 && t.scalar_type() == at::kFloat && t.device().is_cpu() &&
                        (t.size(1) <= 1 || t.stride(1) == 1) && t.stride(0) >= t.size(1),
                    kOp, ": ", name, " must be a float32 CPU tensor [rows, n] with contiguous "
                    "rows, got ", t.scalar_type(), " ", t.sizes(), " strides ", t.strides(),
                    " on ", t.device());
  TORCH_CHECK_VALUE((rows < 0 || t.size(0) == rows) && (cols < 0 || t.size(1) == cols), kOp,
                    ": ", name, " must be [", rows, ", ", cols, "], got ", t.sizes());
}

void check_vector(const at::Tensor& t, const char* name, int64_t n) {
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == n && t.scalar_type() == at::kFloat &&
                        t.device().is_cpu() && t.is_contiguous(),
                    kOp, ": ", name, " must be a contiguous float32 CPU tensor [", n, "], got ",
                    t.scalar_type(), " ", t.sizes());
}

class StepRows {
 public:
  StepRows() : isa_(static_cast<int>(pick_cpu_isa())), k_(engine_kernels(isa_)) {}

  // out = RMSNorm(x) * w per row (out may be x).
  void rms_norm(const at::Tensor& x, const std::optional<at::Tensor>& w, double eps,
                const at::Tensor& out) const {
    check_rows(x, "x", -1, -1);
    const int64_t rows = x.size(0), n = x.size(1);
    check_rows(out, "out", rows, n);
    if (w) check_vector(*w, "weight", n);
    TORCH_CHECK_VALUE(out.is_same(x) || !spans_overlap(out, x), kOp,
                      ": out must be x itself or not overlap it");
    k_->rms_norm_rows(x.data_ptr<float>(), x.stride(0), out.data_ptr<float>(), out.stride(0),
                      w ? w->data_ptr<float>() : nullptr, rows, n, static_cast<float>(eps));
  }

  // out = silu(u[:, :f]) * u[:, f:] for u [rows, 2 f].
  void swiglu(const at::Tensor& u, const at::Tensor& out) const {
    check_rows(u, "u", -1, -1);
    TORCH_CHECK_VALUE(u.size(1) % 2 == 0, kOp, ": u must be [rows, 2 f], got ", u.sizes());
    const int64_t rows = u.size(0), f = u.size(1) / 2;
    check_rows(out, "out", rows, f);
    TORCH_CHECK_VALUE(u.stride(0) == 2 * f && out.stride(0) == f, kOp,
                      ": u and out must be contiguous");
    TORCH_CHECK_VALUE(!spans_overlap(out, u), kOp, ": out must not overlap u");
    k_->swiglu_rows(u.data_ptr<float>(), out.data_ptr<float>(), 0, rows, f, f);
  }

  // The attention core of one token (AttnRowsPlan, engine_plan.h): states [rows, Hkv, K, V]
  // advanced in place, o [rows, H * V] written.
  void attention(const at::Tensor& proj, const at::Tensor& gk, const at::Tensor& states,
                 const at::Tensor& o, int64_t q_col, int64_t k_col, int64_t v_col, int64_t r_col,
                 int64_t num_heads, const std::optional<at::Tensor>& norm_weight,
                 double gate_normalizer, std::optional<double> clamp_min, double scale,
                 double eps) const {
    TORCH_CHECK_VALUE(states.dim() == 4 && states.scalar_type() == at::kFloat &&
                          states.device().is_cpu() && states.is_contiguous(),
                      kOp, ": states must be a contiguous float32 CPU tensor [rows, Hkv, K, V], "
                      "got ", states.scalar_type(), " ", states.sizes());
    const int64_t rows = states.size(0), Hkv = states.size(1), K = states.size(2),
                  V = states.size(3), H = num_heads;
    TORCH_CHECK_VALUE(Hkv >= 1 && H >= Hkv && H % Hkv == 0, kOp, ": num_heads ", H,
                      " must be a multiple of the states' key/value heads ", Hkv);
    TORCH_CHECK_VALUE(K >= 1 && V >= 1, kOp, ": states must have K, V >= 1, got ",
                      states.sizes());
    check_rows(proj, "proj", rows, -1);
    check_rows(gk, "gk", rows, Hkv * K);
    check_rows(o, "o", rows, H * V);
    const int64_t width = proj.size(1);
    const auto in_proj = [&](int64_t col, int64_t n, const char* name) {
      TORCH_CHECK_VALUE(col >= 0 && col + n <= width, kOp, ": ", name, " columns [", col, ", ",
                        col + n, ") must lie in proj's ", width);
    };
    in_proj(q_col, H * K, "q");
    in_proj(k_col, Hkv * K, "k");
    in_proj(v_col, Hkv * V, "v");
    if (r_col >= 0) in_proj(r_col, H * V, "the output gate's");
    if (norm_weight) check_vector(*norm_weight, "norm_weight", V);
    TORCH_CHECK_VALUE(gate_normalizer > 0, kOp, ": gate_normalizer must be > 0, got ",
                      gate_normalizer);
    // written (o, states) while read (proj, gk, states) by parallel tasks: no shared bytes
    const std::pair<const at::Tensor*, const char*> written[] = {{&o, "o"}, {&states, "states"}};
    for (const auto& [t, name] : written)
      for (const auto& [u, other] : {std::make_pair(&proj, "proj"), std::make_pair(&gk, "gk"),
                                     std::make_pair(&states, "states")})
        TORCH_CHECK_VALUE(t == u || !spans_overlap(*t, *u), kOp, ": ", name,
                          " must not overlap ", other);
    AttnRowsPlan p{};
    p.proj = proj.data_ptr<float>();
    p.ldp = proj.stride(0);
    p.q_col = q_col; p.k_col = k_col; p.v_col = v_col; p.r_col = r_col;
    p.gk = gk.data_ptr<float>();
    p.ldg = gk.stride(0);
    p.states = states.data_ptr<float>();
    p.o = o.data_ptr<float>();
    p.ldo = o.stride(0);
    p.rms_w = norm_weight ? norm_weight->data_ptr<float>() : nullptr;
    p.rows = rows; p.H = H; p.Hkv = Hkv; p.K = K; p.V = V;
    p.inv_normalizer = static_cast<float>(1.0 / gate_normalizer);
    p.clamp = clamp_min.has_value();
    p.clamp_min = static_cast<float>(clamp_min.value_or(0.0));
    p.scale = static_cast<float>(scale);
    p.eps = static_cast<float>(eps);
    // a task streams one state [K, V]; threads only where there are several of ~64 K floats
    const int64_t tasks = rows * Hkv, grain = std::max<int64_t>(1, (int64_t{1} << 16) / (K * V));
    pybind11::gil_scoped_release no_gil;
    at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) { k_->attn_rows(p, t0, t1); });
  }

  std::string isa() const { return cpu_isa_name(static_cast<CpuIsa>(isa_)); }

 private:
  int isa_;
  const EngineKernels* k_;
};

}  // namespace

void bind_step_rows(pybind11::module_& m) {
  pybind11::class_<StepRows>(m, "StepRows",
                             "the engine's row math for token steps outside it (fla decode)")
      .def(pybind11::init<>())
      .def("rms_norm", &StepRows::rms_norm, pybind11::arg("x"), pybind11::arg("weight"),
           pybind11::arg("eps"), pybind11::arg("out"),
           "out = RMSNorm(x) * weight per row (float32 [rows, n]; out may be x)")
      .def("swiglu", &StepRows::swiglu, pybind11::arg("u"), pybind11::arg("out"),
           "out = silu(u[:, :f]) * u[:, f:] (u [rows, 2 f], out [rows, f], float32)")
      .def("attention", &StepRows::attention, pybind11::arg("proj"), pybind11::arg("gk"),
           pybind11::arg("states"), pybind11::arg("o"), pybind11::arg("q_col"),
           pybind11::arg("k_col"), pybind11::arg("v_col"), pybind11::arg("r_col"),
           pybind11::arg("num_heads"), pybind11::arg("norm_weight"),
           pybind11::arg("gate_normalizer"), pybind11::arg("clamp_min"), pybind11::arg("scale"),
           pybind11::arg("eps"),
           "one token's attention core: per row and key/value head, decay = exp(max("
           "logsigmoid(gk) / gate_normalizer, clamp_min)), S = diag(decay) S + k^T v in "
           "place, o = RMSNorm(scale q S) * norm_weight * silu(r) per query head (norm_weight "
           "None: RMSNorm without a weight; r_col < 0: no output gate)")
      .def_property_readonly("isa", &StepRows::isa);
}

}  // namespace gla
