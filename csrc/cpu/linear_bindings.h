// Python binding of the packed linear layers: gla_ext._C.PackedLinear (used by
// gla_ext/cpu_linear.py). Called from the module definition in bindings.cpp.
#pragma once

#include <torch/extension.h>

namespace gla {
void bind_cpu_linear(pybind11::module_& m);
}  // namespace gla
