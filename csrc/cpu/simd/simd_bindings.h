// Python bindings of the CPU instruction-set layer: gla_ext._C.cpu_features / cpu_isa /
// cpu_isa_summary (for `python -m gla_ext info`) and simd_eval (the test hook of the SIMD
// vocabulary, tests/test_cpu_simd.py). Called from the module definition in bindings.cpp.
#pragma once

#include <torch/extension.h>

namespace gla {
void bind_cpu_simd(pybind11::module_& m);
}  // namespace gla
