// gla_ext._C.PackedLinear: a torch-facing wrapper of PackedMatrix (linear.h). Checks the
// tensors, packs once, and runs y = x W^T (+ b) with the panels split across threads only
// when there is enough work per thread to pay for waking them.
#include "linear_bindings.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <optional>

#include "linear.h"
#include "tensor_span.h"

namespace gla {
namespace {

const char* kOp = "gla_ext PackedLinear";

// Multiply-adds below which one call (or one thread's share) is not worth a thread wake-up.
constexpr int64_t kMinMacsPerThread = int64_t(1) << 18;

LinearWeight weight_type(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return LinearWeight::kFloat32;
    case at::kBFloat16: return LinearWeight::kBFloat16;
    case at::kHalf: return LinearWeight::kFloat16;
    default:
      TORCH_CHECK_VALUE(false, kOp, ": weight must be float32, bfloat16 or float16, got ", t);
  }
}

// The bias as contiguous float32 (undefined when absent).
at::Tensor checked_bias(const std::optional<at::Tensor>& bias, int64_t rows) {
  if (!bias || !bias->defined()) return at::Tensor();
  TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == rows && bias->device().is_cpu() &&
                        bias->is_floating_point(),
                    kOp, ": bias must be a floating CPU tensor [", rows, "], got ",
                    bias->scalar_type(), " ", bias->sizes(), " on ", bias->device());
  return bias->detach().to(at::kFloat).contiguous();
}

class TorchPackedLinear {
 public:
  TorchPackedLinear(const at::Tensor& weight, const std::optional<at::Tensor>& bias) {
    TORCH_CHECK_VALUE(weight.dim() == 2, kOp, ": weight must be 2-D [out, in], got shape ",
                      weight.sizes());
    TORCH_CHECK_VALUE(weight.device().is_cpu(), kOp, ": weight must be a CPU tensor, got ",
                      weight.device());
    dtype_ = weight.scalar_type();
    const LinearWeight type = weight_type(dtype_);
    const at::Tensor w = weight.detach().contiguous();
    const at::Tensor b = checked_bias(bias, w.size(0));
    m_ = PackedMatrix(w.data_ptr(), type, w.size(0), w.size(1), w.size(1),
                      b.defined() ? b.data_ptr<float>() : nullptr);
  }

  // Quantized weights as gla_ext.quantize.QuantizedLinear stores them (see linear.h).
  TorchPackedLinear(const at::Tensor& qweight, const at::Tensor& scales,
                    const std::optional<at::Tensor>& offsets, int64_t group,
                    const std::optional<at::Tensor>& bias) {
    const bool int4 = qweight.scalar_type() == at::kByte;
    TORCH_CHECK_VALUE(qweight.dim() == 2 && qweight.device().is_cpu() &&
                          (int4 || qweight.scalar_type() == at::kChar),
                      kOp, ": qweight must be a 2-D int8 (int8 format) or uint8 (int4 format) "
                      "CPU tensor, got ", qweight.scalar_type(), " ", qweight.sizes());
    const int64_t rows = qweight.size(0), cols = qweight.size(1) * (int4 ? 2 : 1);
    TORCH_CHECK_VALUE(group >= 1 && cols % group == 0 && (!int4 || group % 2 == 0), kOp,
                      ": group_size ", group, " must divide in_features ", cols,
                      int4 ? " and be even" : "");
    const auto check_groups = [&](const at::Tensor& t, const char* name) {
      TORCH_CHECK_VALUE(t.scalar_type() == at::kHalf && t.dim() == 2 && t.size(0) == rows &&
                            t.size(1) == cols / group && t.device().is_cpu(),
                        kOp, ": ", name, " must be a float16 CPU tensor [", rows, ", ",
                        cols / group, "], got ", t.scalar_type(), " ", t.sizes());
    };
    check_groups(scales, "scales");
    TORCH_CHECK_VALUE(int4 == (offsets && offsets->defined()), kOp,
                      ": offsets must be given for the int4 format and only for it");
    at::Tensor m;
    if (int4) {
      check_groups(*offsets, "offsets");
      m = offsets->contiguous();
    }
    const at::Tensor q = qweight.contiguous(), s = scales.contiguous();
    const at::Tensor b = checked_bias(bias, rows);
    dtype_ = qweight.scalar_type();
    m_ = PackedMatrix(q.data_ptr(), reinterpret_cast<const uint16_t*>(s.data_ptr()),
                      int4 ? reinterpret_cast<const uint16_t*>(m.data_ptr()) : nullptr,
                      int4 ? LinearWeight::kInt4 : LinearWeight::kInt8, rows, cols, group,
                      b.defined() ? b.data_ptr<float>() : nullptr);
  }

  // x's rows may be a column range of a wider matrix (any row stride, unit column stride);
  // accumulate: out += x W^T (+ b) instead of out =.
  at::Tensor forward(const at::Tensor& x, const std::optional<at::Tensor>& out,
                     bool accumulate) const {
    const int64_t in = m_.in_features(), nout = m_.out_features();
    TORCH_CHECK_VALUE(x.dim() == 2 && x.size(1) == in, kOp, ": x must be [n, ", in,
                      "], got shape ", x.sizes());
    const int64_t n = x.size(0);
    const bool rows_ok = (in <= 1 || x.stride(1) == 1) && (n <= 1 || x.stride(0) >= in);
    TORCH_CHECK_VALUE(x.scalar_type() == at::kFloat && x.device().is_cpu() && rows_ok,
                      kOp, ": x must be a float32 CPU tensor with contiguous rows, got ",
                      x.scalar_type(), " on ", x.device(), rows_ok ? "" : " (rows not contiguous)");
    TORCH_CHECK_VALUE(!accumulate || (out && out->defined()), kOp,
                      ": accumulate needs out (the matrix to add to)");
    at::Tensor y;
    if (out && out->defined()) {
      y = *out;
      TORCH_CHECK_VALUE(y.dim() == 2 && y.size(0) == n && y.size(1) == nout &&
                            y.scalar_type() == at::kFloat && y.device().is_cpu() &&
                            y.is_contiguous(),
                        kOp, ": out must be a contiguous float32 CPU tensor [", n, ", ", nout,
                        "], got ", y.scalar_type(), " ", y.sizes());
      TORCH_CHECK_VALUE(!spans_overlap(x, y), kOp, ": out must not overlap x");
    } else {
      y = at::empty({n, nout}, x.options());
    }
    if (n == 0 || nout == 0) return y;
    const float* xp = x.data_ptr<float>();
    const int64_t ldx = n > 1 ? x.stride(0) : in;
    float* yp = y.data_ptr<float>();
    const int64_t panels = m_.num_panels();
    const int64_t per_panel = std::max<int64_t>(1, n * std::max<int64_t>(in, 1) * m_.panel_width());
    const int64_t grain = std::max<int64_t>(1, kMinMacsPerThread / per_panel);
    const PackedMatrix& m = m_;
    {
      pybind11::gil_scoped_release no_gil;
      at::parallel_for(0, panels, grain, [&](int64_t p0, int64_t p1) {
        m.apply(xp, ldx, n, yp, nout, accumulate, p0, p1);
      });
    }
    return y;
  }

  int64_t in_features() const { return m_.in_features(); }
  int64_t out_features() const { return m_.out_features(); }
  bool has_bias() const { return m_.has_bias(); }
  std::string isa() const { return m_.isa(); }
  bool vnni() const { return m_.vnni(); }
  int64_t weight_bytes() const { return static_cast<int64_t>(m_.weight_bytes()); }
  int64_t panel_width() const { return m_.panel_width(); }
  at::ScalarType dtype() const { return dtype_; }
  std::string format() const {
    switch (m_.weight_type()) {
      case LinearWeight::kInt8: return "int8";
      case LinearWeight::kInt4: return "int4";
      default: return c10::toString(dtype_);
    }
  }
  int64_t group_size() const { return m_.group_size(); }

 private:
  PackedMatrix m_;
  at::ScalarType dtype_ = at::kFloat;
};

}  // namespace

void bind_cpu_linear(pybind11::module_& m) {
  pybind11::class_<TorchPackedLinear>(m, "PackedLinear")
      .def(pybind11::init<const at::Tensor&, const std::optional<at::Tensor>&>(),
           pybind11::arg("weight"), pybind11::arg("bias") = pybind11::none())
      .def(pybind11::init<const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                          int64_t, const std::optional<at::Tensor>&>(),
           pybind11::arg("qweight"), pybind11::arg("scales"), pybind11::arg("offsets"),
           pybind11::arg("group_size"), pybind11::arg("bias") = pybind11::none(),
           "quantized weights in gla_ext.quantize's layout (int8: offsets None)")
      .def("forward", &TorchPackedLinear::forward, pybind11::arg("x"),
           pybind11::arg("out") = pybind11::none(), pybind11::arg("accumulate") = false,
           "x [n, in] float32 with contiguous rows -> [n, out] float32 (into out when given; "
           "accumulate: added to out)")
      .def_property_readonly("in_features", &TorchPackedLinear::in_features)
      .def_property_readonly("out_features", &TorchPackedLinear::out_features)
      .def_property_readonly("has_bias", &TorchPackedLinear::has_bias)
      .def_property_readonly("isa", &TorchPackedLinear::isa)
      .def_property_readonly("vnni", &TorchPackedLinear::vnni,
                             "quantized weights: True when the VNNI (vpdpbusd) kernels run them")
      .def_property_readonly("weight_bytes", &TorchPackedLinear::weight_bytes)
      .def_property_readonly("panel_width", &TorchPackedLinear::panel_width)
      .def_property_readonly("weight_dtype", [](const TorchPackedLinear& self) {
        return std::string(c10::toString(self.dtype()));
      })
      .def_property_readonly("format", &TorchPackedLinear::format,
                             "float32 / BFloat16 / Half, or int8 / int4 (quantized)")
      .def_property_readonly("group_size", &TorchPackedLinear::group_size);
  m.def("linear_vnni", &linear_vnni_now,
        "whether quantized matrices packed now would run the VNNI kernels (GLA_EXT_CPU_VNNI)");
  m.def("linear_qdot_kernels", &linear_qdot_now,
        "the integer kernels quantized matrices packed now would run, e.g. 'avx512 + AVX512-VNNI "
        "(vpdpbusd)'");
  m.def("linear_isa", []() { return std::string(linear_isa_now()); },
        "instruction set a PackedLinear made now would use (GLA_EXT_CPU_ISA overrides)");
}

}  // namespace gla
