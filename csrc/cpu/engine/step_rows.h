// Python binding of the engine's row math for token steps outside the engine:
// gla_ext._C.StepRows (used by gla_ext/integrations/fla_decode.py). Called from the module
// definition in bindings.cpp.
#pragma once

#include <torch/extension.h>

namespace gla {
void bind_step_rows(pybind11::module_& m);
}  // namespace gla
