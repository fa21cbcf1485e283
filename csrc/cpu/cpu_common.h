// Small helpers shared by the CPU kernels: accumulation types, dtype dispatch, tensor offsets.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>

#include "gla.h"

namespace gla {

// float for float32/float16/bfloat16 inputs, double for float64 inputs.
template <typename scalar_t> struct AccType { using type = float; };
template <> struct AccType<double> { using type = double; };
template <typename scalar_t> using acc_type_t = typename AccType<scalar_t>::type;

// Calls fn(scalar_t{}) with the C++ type of dtype.
template <typename Fn>
void dispatch_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32: fn(float{}); break;
    case DType::kFloat64: fn(double{}); break;
    case DType::kFloat16: fn(c10::Half{}); break;
    case DType::kBFloat16: fn(c10::BFloat16{}); break;
    default: throw std::invalid_argument("gla_ext: unsupported dtype");
  }
}

// Element offsets into the contiguous [B, T, H, K] / [B, T, H, V] / [N, H, K, V] tensors.
struct Layout {
  int64_t T, H, K, V;
  explicit Layout(const GlaParams& p) : T(p.T), H(p.H), K(p.K), V(p.V) {}
  int64_t qk(int64_t b, int64_t t, int64_t h) const { return ((b * T + t) * H + h) * K; }
  int64_t v(int64_t b, int64_t t, int64_t h) const { return ((b * T + t) * H + h) * V; }
  int64_t state(int64_t n, int64_t h) const { return (n * H + h) * K * V; }
};

// dst = src, or zeros when src is null.
template <typename acc_t>
inline void init_state(acc_t* dst, const acc_t* src, int64_t count) {
  if (src) std::memcpy(dst, src, sizeof(acc_t) * count);
  else std::memset(dst, 0, sizeof(acc_t) * count);
}

}  // namespace gla
