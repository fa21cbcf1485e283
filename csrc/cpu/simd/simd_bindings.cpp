// See simd_bindings.h.
#include "cpu/simd/simd_bindings.h"

#include <optional>
#include <stdexcept>
#include <string>

#include "cpu/simd/cpu_features.h"
#include "cpu/simd/denormals.h"

#define GLA_ISA_NS simd_check
#define GLA_ISA_BODY "cpu/simd/check_impl.h"
#include "cpu/simd/per_isa.h"

namespace gla {
namespace {

// Names of check_rows' functions, in its order.
const char* const kCheckFns[] = {"exp",     "log1p",     "logsigmoid", "sigmoid",
                                 "silu",    "rmsnorm",   "layernorm",  "row_sum"};

int check_fn(const std::string& name) {
  for (int i = 0; i < static_cast<int>(sizeof(kCheckFns) / sizeof(kCheckFns[0])); ++i)
    if (name == kCheckFns[i]) return i;
  TORCH_CHECK_VALUE(false, "simd_eval: fn='", name, "' is not a vocabulary function");
}

const float* optional_row(const std::optional<torch::Tensor>& t, int64_t n, const char* arg) {
  if (!t) return nullptr;
  TORCH_CHECK(t->dtype() == torch::kFloat32 && t->dim() == 1 && t->numel() == n &&
                  t->is_contiguous(), "simd_eval: ", arg, " must be a contiguous float32 [n]");
  return t->data_ptr<float>();
}

// fn applied row by row to x ([rows, n]) with the vocabulary of the ISA pick_cpu_isa()
// chooses now (GLA_EXT_CPU_ISA), under the kernels' denormal scope.
torch::Tensor simd_eval(const std::string& fn, const torch::Tensor& x,
                        const std::optional<torch::Tensor>& w,
                        const std::optional<torch::Tensor>& b, double eps) {
  const int f = check_fn(fn);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.device().is_cpu(),
              "simd_eval: x must be a contiguous CPU [rows, n] tensor");
  const CpuIsa isa = pick_cpu_isa();
  const int64_t rows = x.size(0), n = x.size(1);
  FlushDenormals flush;
  if (x.dtype() == torch::kFloat64) {
    TORCH_CHECK(fn == "exp", "simd_eval: float64 is only offered for fn='exp'");
    torch::Tensor y = torch::empty_like(x);
    GLA_ISA_PICK(isa, simd_check, check_exp_double)(x.data_ptr<double>(), y.data_ptr<double>(),
                                                     rows * n);
    return y;
  }
  TORCH_CHECK(x.dtype() == torch::kFloat32, "simd_eval: x must be float32 or float64");
  torch::Tensor y = fn == "row_sum" ? torch::empty({rows}, x.options()) : torch::empty_like(x);
  GLA_ISA_PICK(isa, simd_check, check_rows)(f, x.data_ptr<float>(), y.data_ptr<float>(), rows,
                                            n, optional_row(w, n, "w"), optional_row(b, n, "b"),
                                            static_cast<float>(eps));
  return y;
}

}  // namespace

void bind_cpu_simd(pybind11::module_& m) {
  m.def("cpu_features", []() {
    const CpuFeatures& f = cpu_features();
    pybind11::dict d;
    d["avx2"] = f.avx2; d["fma"] = f.fma; d["f16c"] = f.f16c;
    d["avx512f"] = f.avx512f; d["avx512bw"] = f.avx512bw; d["avx512vl"] = f.avx512vl;
    d["avx512dq"] = f.avx512dq; d["avx512_bf16"] = f.avx512_bf16;
    d["avx512_vnni"] = f.avx512_vnni; d["avx_vnni"] = f.avx_vnni;
    d["amx_tile"] = f.amx_tile; d["amx_bf16"] = f.amx_bf16; d["amx_int8"] = f.amx_int8;
    d["os_avx"] = f.os_avx; d["os_avx512"] = f.os_avx512; d["os_amx"] = f.os_amx;
    d["amx_permitted"] = f.amx_permitted;
    return d;
  }, "CPU features usable by this process (cpuid + xgetbv; AMX after the OS permission)");
  m.def("cpu_isa", []() { return std::string(cpu_isa_name(pick_cpu_isa())); },
        "vector code path the CPU kernels run now (generic|avx2|avx512; GLA_EXT_CPU_ISA)");
  m.def("cpu_best_isa", []() { return std::string(cpu_isa_name(best_cpu_isa())); },
        "widest vector code path this CPU runs");
  m.def("cpu_isa_summary", &cpu_isa_summary, "one line for `python -m gla_ext info`");
  m.def("cpu_avx512_emulated", []() { return bool(GLA_EMULATE_AVX512); },
        "True in the test build whose AVX-512 copy runs on SIMDe (simd/avx512_emulated.h)");
  m.def("simd_eval", &simd_eval, pybind11::arg("fn"), pybind11::arg("x"),
        pybind11::arg("w") = pybind11::none(), pybind11::arg("b") = pybind11::none(),
        pybind11::arg("eps") = 1e-5,
        "test hook: a SIMD vocabulary function on the rows of x under the current ISA");
}

}  // namespace gla
