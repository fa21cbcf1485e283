// Packed linear layers (see linear.h): packing, and the per-ISA copies of the kernel body
// in linear_impl.h (compiled per instruction set by cpu/simd/per_isa.h, picked at run time).
#include "linear.h"
#include "cpu/simd/cpu_features.h"

#include <c10/util/Half.h>

#include <algorithm>

#include <cstdlib>
#include <cstring>
#include <stdexcept>
#include <string>

namespace gla {
// The per-ISA tables of kernels, defined by linear_impl.h in each copy.
struct LinearKernels {
  using Fn = void (*)(const void*, int64_t, int64_t, const float*, const float*, int64_t,
                      int64_t, float*, int64_t, bool, int64_t, int64_t);
  Fn f32, bf16, f16;
  int nr;
  const char* name;
};
}  // namespace gla

#define GLA_ISA_NS linear
#define GLA_ISA_BODY "cpu/linear_impl.h"
#include "cpu/simd/per_isa.h"

namespace gla {

namespace {

const LinearKernels& pick_kernels() { return *GLA_ISA_PICK(pick_cpu_isa(), linear, kKernels); }

size_t elem_bytes(LinearWeight t) { return t == LinearWeight::kFloat32 ? 4 : 2; }

// Panel p, row k, lane j of the packed matrix <- W[p * nr + j, k] (zero past the last row).
template <typename T>
void pack_panels(const T* w, int64_t rows, int64_t cols, int64_t ld, int64_t nr, T* dst) {
  const int64_t panels = (rows + nr - 1) / nr;
  for (int64_t p = 0; p < panels; ++p) {
    T* d = dst + p * cols * nr;
    for (int64_t j = 0; j < nr; ++j) {
      const int64_t r = p * nr + j;
      if (r < rows) {
        const T* src = w + r * ld;
        for (int64_t k = 0; k < cols; ++k) d[k * nr + j] = src[k];
      } else {
        for (int64_t k = 0; k < cols; ++k) d[k * nr + j] = T(0);
      }
    }
  }
}

}  // namespace

PackedMatrix::PackedMatrix(const void* w, LinearWeight type, int64_t rows, int64_t cols,
                           int64_t row_stride, const float* bias)
    : kern_(&pick_kernels()), type_(type), rows_(rows), cols_(cols) {
  if (rows < 0 || cols < 0 || row_stride < cols)
    throw std::invalid_argument("gla_ext PackedMatrix: bad shape");
  nr_ = kern_->nr;
  const int64_t panels = num_panels();
  bytes_ = static_cast<size_t>(panels * nr_ * cols_) * elem_bytes(type);
  const size_t alloc = (bytes_ + 63) / 64 * 64 + 64;
  void* raw = std::aligned_alloc(64, alloc);
  if (!raw) throw std::bad_alloc();
  data_ = std::shared_ptr<void>(raw, [](void* p) { std::free(p); });
  if (type == LinearWeight::kFloat32)
    pack_panels(static_cast<const float*>(w), rows, cols, row_stride, nr_,
                static_cast<float*>(raw));
  else  // bf16 and fp16 are moved as raw 16-bit patterns
    pack_panels(static_cast<const uint16_t*>(w), rows, cols, row_stride, nr_,
                static_cast<uint16_t*>(raw));
  if (bias) {
    bias_.assign(static_cast<size_t>(panels * nr_), 0.f);
    std::memcpy(bias_.data(), bias, sizeof(float) * rows);
  }
}

void PackedMatrix::apply(const float* x, int64_t ldx, int64_t n, float* y, int64_t ldy,
                         bool accumulate, int64_t p0, int64_t p1) const {
  if (p1 < 0) p1 = num_panels();
  if (!kern_ || n <= 0 || p0 >= p1) return;
  if (cols_ == 0) {  // an empty sum: bias (or zeros) only
    for (int64_t r = 0; r < n; ++r)
      for (int64_t c = p0 * nr_; c < std::min(p1 * nr_, rows_); ++c)
        y[r * ldy + c] = (accumulate ? y[r * ldy + c] : 0.f) + (bias_.empty() ? 0.f : bias_[c]);
    return;
  }
  const float* b = bias_.empty() ? nullptr : bias_.data();
  const LinearKernels::Fn fn = type_ == LinearWeight::kFloat32    ? kern_->f32
                               : type_ == LinearWeight::kBFloat16 ? kern_->bf16
                                                                  : kern_->f16;
  fn(data_.get(), cols_, rows_, b, x, ldx, n, y, ldy, accumulate, p0, p1);
}

const char* PackedMatrix::isa() const { return kern_ ? kern_->name : "none"; }

const char* linear_isa_now() { return pick_kernels().name; }
int64_t linear_panel_width_now() { return pick_kernels().nr; }

}  // namespace gla
