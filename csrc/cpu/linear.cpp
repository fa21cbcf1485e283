// Packed linear layers (see linear.h): packing, and the per-ISA copies of the kernel body
// in linear_impl.h (compiled per instruction set by cpu/simd/per_isa.h, picked at run time).
#include "linear.h"
#include "cpu/simd/cpu_features.h"
#include "cpu/simd/vnni_asm.h"   // the VNNI tiles' vpdpbusd (linear_qdot_tile.h)

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
  // quantized weights (linear_qdot_impl.h): the extra argument is the group size
  using QFn = void (*)(const void*, int64_t, int64_t, int64_t, const float*, const float*,
                       int64_t, int64_t, float*, int64_t, bool, int64_t, int64_t);
  QFn q8, q4;
  QFn q8_vnni, q4_vnni;   // the same with vpdpbusd (null where the copy has none: generic)
  int nr;
  const char* name;
};
}  // namespace gla

#define GLA_ISA_NS linear
#define GLA_ISA_BODY "cpu/linear_impl.h"
#include "cpu/simd/per_isa.h"

namespace gla {

namespace {

CpuIsa resolve_isa(int isa) { return isa < 0 ? pick_cpu_isa() : static_cast<CpuIsa>(isa); }

const LinearKernels& pick_kernels(int isa = -1) {
  return *GLA_ISA_PICK(resolve_isa(isa), linear, kKernels);
}

size_t elem_bytes(LinearWeight t) { return t == LinearWeight::kFloat32 ? 4 : 2; }

// Quantized panels (layout in linear_qdot_impl.h): per panel of nr rows and group of g
// columns, nr float16 scales (int4: + nr offsets), then round_up(g, 4) / 4 quads of 4 k:
// int8 nr * 4 bytes (row j's 4 bytes at 4 j), int4 nr * 2 bytes (row j in the low nibble of
// byte 4 (j % (nr / 2)) + t, rows j >= nr / 2 in the high one). Padding weights are 0.
int64_t q_quad_bytes(LinearWeight t, int64_t nr) { return t == LinearWeight::kInt8 ? nr * 4 : nr * 2; }
int64_t q_group_bytes(LinearWeight t, int64_t nr, int64_t g) {
  return (t == LinearWeight::kInt8 ? 1 : 2) * nr * 2 + (g + 3) / 4 * q_quad_bytes(t, nr);
}

void pack_quantized(const uint8_t* q, const uint16_t* scales, const uint16_t* offsets,
                    LinearWeight t, int64_t rows, int64_t cols, int64_t g, int64_t nr,
                    uint8_t* dst) {
  const int64_t panels = (rows + nr - 1) / nr, groups = cols / g, half = nr / 2;
  const int64_t gbytes = q_group_bytes(t, nr, g), qb = q_quad_bytes(t, nr);
  const int64_t qcols = t == LinearWeight::kInt8 ? cols : cols / 2;
  std::memset(dst, 0, static_cast<size_t>(panels * groups * gbytes));  // padding: all 0
  for (int64_t p = 0; p < panels; ++p)
    for (int64_t gi = 0; gi < groups; ++gi) {
      uint8_t* gp = dst + (p * groups + gi) * gbytes;
      uint16_t* hdr = reinterpret_cast<uint16_t*>(gp);
      uint8_t* quads = gp + (t == LinearWeight::kInt8 ? 1 : 2) * nr * 2;
      for (int64_t j = 0; j < nr; ++j) {
        const int64_t r = p * nr + j;
        if (r >= rows) continue;
        hdr[j] = scales[r * groups + gi];
        if (t == LinearWeight::kInt4) hdr[nr + j] = offsets[r * groups + gi];
        const uint8_t* src = q + r * qcols;
        for (int64_t kk = 0; kk < g; ++kk) {
          const int64_t k = gi * g + kk;
          uint8_t* quad = quads + kk / 4 * qb;
          if (t == LinearWeight::kInt8) {
            quad[4 * j + kk % 4] = src[k];
          } else {  // column 2i is the low nibble of source byte i
            const uint8_t v = (src[k / 2] >> (4 * (k % 2))) & 15;
            quad[4 * (j % half) + kk % 4] |= static_cast<uint8_t>(j < half ? v : v << 4);
          }
        }
      }
    }
}

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

void PackedMatrix::alloc_data(size_t bytes) {
  bytes_ = bytes;
  const size_t alloc = (bytes_ + 63) / 64 * 64 + 64;
  void* raw = std::aligned_alloc(64, alloc);
  if (!raw) throw std::bad_alloc();
  data_ = std::shared_ptr<void>(raw, [](void* p) { std::free(p); });
}

void PackedMatrix::set_bias(const float* bias) {
  if (bias) {
    bias_.assign(static_cast<size_t>(num_panels() * nr_), 0.f);
    std::memcpy(bias_.data(), bias, sizeof(float) * rows_);
  }
}

PackedMatrix::PackedMatrix(const void* q, const uint16_t* scales, const uint16_t* offsets,
                           LinearWeight type, int64_t rows, int64_t cols, int64_t group,
                           const float* bias, int isa)
    : kern_(&pick_kernels(isa)), type_(type), rows_(rows), cols_(cols), group_(group) {
  const bool int4 = type == LinearWeight::kInt4;
  // the VNNI kernels read the same panels: the choice is only which function runs
  // (pick_cpu_vnni first: it also checks GLA_EXT_CPU_VNNI on copies without VNNI kernels)
  vnni_ = pick_cpu_vnni(resolve_isa(isa)) && kern_->q8_vnni;
  if ((type != LinearWeight::kInt8 && !int4) || rows < 0 || cols < 1 || group < 1 ||
      cols % group || (int4 && (group % 2 || !offsets)) || !scales)
    throw std::invalid_argument("gla_ext PackedMatrix: bad quantized shape or format");
  nr_ = kern_->nr;
  alloc_data(static_cast<size_t>(num_panels() * (cols / group) * q_group_bytes(type, nr_, group)));
  pack_quantized(static_cast<const uint8_t*>(q), scales, offsets, type, rows, cols, group, nr_,
                 static_cast<uint8_t*>(data_.get()));
  set_bias(bias);
}

PackedMatrix::PackedMatrix(const void* w, LinearWeight type, int64_t rows, int64_t cols,
                           int64_t row_stride, const float* bias, int isa)
    : kern_(&pick_kernels(isa)), type_(type), rows_(rows), cols_(cols) {
  if (rows < 0 || cols < 0 || row_stride < cols || type == LinearWeight::kInt8 ||
      type == LinearWeight::kInt4)
    throw std::invalid_argument("gla_ext PackedMatrix: bad shape");
  nr_ = kern_->nr;
  const int64_t panels = num_panels();
  alloc_data(static_cast<size_t>(panels * nr_ * cols_) * elem_bytes(type));
  void* raw = data_.get();
  if (type == LinearWeight::kFloat32)
    pack_panels(static_cast<const float*>(w), rows, cols, row_stride, nr_,
                static_cast<float*>(raw));
  else  // bf16 and fp16 are moved as raw 16-bit patterns
    pack_panels(static_cast<const uint16_t*>(w), rows, cols, row_stride, nr_,
                static_cast<uint16_t*>(raw));
  set_bias(bias);
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
  if (type_ == LinearWeight::kInt8 || type_ == LinearWeight::kInt4) {
    const bool int8 = type_ == LinearWeight::kInt8;
    const LinearKernels::QFn fn = vnni_ ? (int8 ? kern_->q8_vnni : kern_->q4_vnni)
                                        : (int8 ? kern_->q8 : kern_->q4);
    fn(data_.get(), cols_, rows_, group_, b, x, ldx, n, y, ldy, accumulate, p0, p1);
    return;
  }
  const LinearKernels::Fn fn = type_ == LinearWeight::kFloat32    ? kern_->f32
                               : type_ == LinearWeight::kBFloat16 ? kern_->bf16
                                                                  : kern_->f16;
  fn(data_.get(), cols_, rows_, b, x, ldx, n, y, ldy, accumulate, p0, p1);
}

const char* PackedMatrix::isa() const { return kern_ ? kern_->name : "none"; }

const char* linear_isa_now() { return pick_kernels().name; }
bool linear_vnni_now() {
  const CpuIsa isa = pick_cpu_isa();
  return pick_cpu_vnni(isa) && GLA_ISA_PICK(isa, linear, kKernels)->q8_vnni;
}
std::string linear_qdot_now() {
  const CpuIsa isa = pick_cpu_isa();
  if (linear_vnni_now()) return std::string(cpu_isa_name(isa)) + " + " + cpu_vnni_name(isa) + " (vpdpbusd)";
  return std::string(cpu_isa_name(isa)) + (isa == CpuIsa::kGeneric ? " (plain int32 sums)"
                                                                   : " (vpmaddubsw + vpmaddwd)");
}
int64_t linear_panel_width_now() { return pick_kernels().nr; }

}  // namespace gla
