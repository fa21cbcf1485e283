// Whether two tensors' memory may overlap: the byte ranges from their first to their last
// element (any non-negative strides; conservative for views with gaps), for the argument
// checks of the CPU bindings that write one tensor while reading others.
#pragma once

#include <ATen/ATen.h>

namespace gla {

inline bool spans_overlap(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  const auto span = [](const at::Tensor& t) {
    int64_t last = 0;
    for (int64_t d = 0; d < t.dim(); ++d) last += (t.size(d) - 1) * t.stride(d);
    const char* p = static_cast<const char*>(t.data_ptr());
    return std::make_pair(p, p + (last + 1) * t.element_size());
  };
  const auto [a0, a1] = span(a);
  const auto [b0, b1] = span(b);
  return a0 < b1 && b0 < a1;
}

}  // namespace gla
