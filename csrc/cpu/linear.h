// Our own matrix-vector / skinny-matrix kernels for CPU inference (issue 10): y = x W^T (+ b)
// for a few rows of x (decode: the batch, 1..32; prefill: a window of tokens), with W packed
// once into the layout the kernels stream best. No vendor BLAS: the speed of a decode step
// must not depend on whose CPU it runs on (MKL's small-matrix paths differ between vendors).
//
// Layout: W [out, in] is cut into panels of `panel_width()` output rows (two SIMD vectors:
// 8 floats generic/SSE, 16 AVX2, 32 AVX-512); a panel is stored k-major, [in][panel_width],
// so a kernel streams one contiguous block per panel, loads two vectors of weights per k and
// feeds them to up to 8 batch rows (broadcast x[b, k], FMA). The tail panel is zero-padded.
// float32, bfloat16 and float16 weights are kept as given (half the bytes for the 16-bit
// types) and widened to float32 in registers; accumulation is float32.
//
// The instruction set is picked when a matrix is packed (the panel width depends on it):
// AVX-512 > AVX2+FMA(+F16C) > generic, or what GLA_EXT_CPU_ISA=generic|avx2|avx512 asks for
// (falls back to the best available, like the chunk kernels). No -march flag is needed.
#pragma once

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

namespace gla {

// kInt8 / kInt4: quantized weights (gla_ext.quantize, docs/quantization.md), packed by the
// second constructor below; the kernels are in linear_qdot_impl.h (they round x to int8 per
// group and sum integer products: apply() below then holds up to that rounding).
enum class LinearWeight : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kInt8 = 3, kInt4 = 4 };

// The kernel set one packed matrix uses (one per instruction set).
struct LinearKernels;

class PackedMatrix {
 public:
  PackedMatrix() = default;
  // w: rows x cols elements of `type` (row r at w + r * row_stride elements); bias: `rows`
  // floats or null. Copies everything: the caller's buffers are not kept.
  // isa: a CpuIsa value (cpu/simd/cpu_features.h) to pack for, -1 = pick_cpu_isa() now.
  PackedMatrix(const void* w, LinearWeight type, int64_t rows, int64_t cols, int64_t row_stride,
               const float* bias, int isa = -1);
  // Quantized weights in gla_ext.quantize's layout: q int8 [rows, cols] (kInt8) or uint8
  // [rows, cols / 2] with column 2j in the low nibble (kInt4); scales (and, int4, offsets)
  // float16 bit patterns [rows, cols / group]. W[r, c] = scale * q (+ offset), exactly.
  PackedMatrix(const void* q, const uint16_t* scales, const uint16_t* offsets, LinearWeight type,
               int64_t rows, int64_t cols, int64_t group, const float* bias, int isa = -1);

  // y[r, c] = (accumulate ? y[r, c] : 0) + bias[c] + sum_k x[r, k] W[c, k] for r < n and the
  // columns of panels [p0, p1) (p1 < 0: all). Single-threaded; callers split panels.
  void apply(const float* x, int64_t ldx, int64_t n, float* y, int64_t ldy, bool accumulate,
             int64_t p0 = 0, int64_t p1 = -1) const;

  int64_t out_features() const { return rows_; }
  int64_t in_features() const { return cols_; }
  int64_t panel_width() const { return nr_; }
  int64_t num_panels() const { return rows_ == 0 ? 0 : (rows_ + nr_ - 1) / nr_; }
  LinearWeight weight_type() const { return type_; }
  bool has_bias() const { return !bias_.empty(); }
  const char* isa() const;
  // Quantized weights: whether the VNNI (vpdpbusd) kernels run them, picked at packing time
  // (pick_cpu_vnni in cpu/simd/cpu_features.h; GLA_EXT_CPU_VNNI=off turns them off).
  bool vnni() const { return vnni_; }
  // Bytes of packed weights a call streams (padding included).
  size_t weight_bytes() const { return bytes_; }
  bool empty() const { return kern_ == nullptr; }
  int64_t group_size() const { return group_; }
  // The packed panels (float32 / 16-bit: panel p, row k, lane j at (p * cols + k) * nr + j),
  // for kernels that read the same layout (the CPU engine's window products).
  const void* data() const { return data_.get(); }

 private:
  std::shared_ptr<void> data_;  // 64-byte aligned panels
  std::vector<float> bias_;     // padded to a whole number of panels
  const LinearKernels* kern_ = nullptr;
  LinearWeight type_ = LinearWeight::kFloat32;
  int64_t rows_ = 0, cols_ = 0, nr_ = 0, group_ = 0;
  bool vnni_ = false;
  void alloc_data(size_t bytes);
  void set_bias(const float* bias);
  size_t bytes_ = 0;
};

// The instruction set a matrix packed now would use ("avx512", "avx2" or "generic"), and
// its panel width.
const char* linear_isa_now();
int64_t linear_panel_width_now();
// Whether quantized matrices packed now would run the VNNI kernels, and which integer
// kernels they would run, e.g. "avx512 + AVX512-VNNI (vpdpbusd)" (`python -m gla_ext info`).
bool linear_vnni_now();
std::string linear_qdot_now();

}  // namespace gla
