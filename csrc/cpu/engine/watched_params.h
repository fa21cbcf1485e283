// The parameters a packed CPU model (CpuEngine) was packed from, and whether the
// packed copy still matches them: a parameter written in place (version counter), re-pointed
// (data pointer) or changed dtype/device makes it stale. Each tensor keeps the dtype it was
// packed from (quantized weights mix int8 / uint8 data with float16 scales).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

namespace gla {

class WatchedParams {
 public:
  enum Status : int64_t { kReady = 0, kStale = 1, kNeedsAutograd = 2 };

  // Remembers t's version and address; `op` names the caller in the error.
  void watch(const at::Tensor& t, const char* op) {
    TORCH_CHECK(!t.is_inference(), op, ": inference-mode parameters cannot be watched");
    tensors_.push_back(t);
    versions_.push_back(t._version());
    dtypes_.push_back(t.scalar_type());
    pointers_.push_back(t.data_ptr());
    aliases_.push_back(t.detach());  // keeps the storage, so its address is not reused
  }

  // kStale when a parameter changed since packing; kNeedsAutograd when grad_enabled and some
  // parameter requires grad; otherwise kReady.
  int64_t status(bool grad_enabled) const {
    bool needs_grad = false;
    for (size_t i = 0; i < tensors_.size(); ++i) {
      const at::Tensor& t = tensors_[i];
      if (t.scalar_type() != dtypes_[i] || !t.device().is_cpu() || t.is_inference() ||
          t._version() != versions_[i] || t.data_ptr() != pointers_[i])
        return kStale;
      needs_grad = needs_grad || t.requires_grad();
    }
    return grad_enabled && needs_grad ? kNeedsAutograd : kReady;
  }

 private:
  std::vector<at::Tensor> tensors_;
  std::vector<int64_t> versions_;
  std::vector<at::ScalarType> dtypes_;
  std::vector<const void*> pointers_;
  std::vector<at::Tensor> aliases_;
};

}  // namespace gla
