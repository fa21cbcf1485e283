// Kernel body of the packed linear layers (see linear.h). No include guard on purpose:
// linear.cpp compiles it once per instruction set through cpu/simd/per_isa.h (vf, W, vload
// and vstore come from the SIMD vocabulary, cpu/simd/vec.h). The math is written with GCC
// vector extensions; only the widening of 16-bit weights uses intrinsics (one shift for
// bf16, F16C's vcvtph2ps for fp16) where the ISA has them.

constexpr int NR = 2 * W;              // panel width: two vectors of outputs
// Batch rows per register tile: 2 * MB accumulators + 2 weight vectors + 1 broadcast must fit
// the register file (32 vectors with AVX-512, 16 otherwise).
constexpr int MB_MAX = GLA_VEC_BYTES == 64 ? 8 : 4;

#ifndef GLA_LINEAR_PREFETCH
#define GLA_LINEAR_PREFETCH 2048
#endif
#ifndef GLA_LINEAR_PF_LOCALITY
#define GLA_LINEAR_PF_LOCALITY 3
#endif
constexpr idx kPrefetchBytes = GLA_LINEAR_PREFETCH;

// Two vectors of weights (one panel row) widened to float32.
struct F32Weights {
  using T = float;
  static inline void load(const float* p, vf& a, vf& b) {
    a = vload(p);
    b = vload(p + W);
  }
};

struct BF16Weights {
  using T = uint16_t;
  static inline vf widen(const uint16_t* p) {
#if GLA_VEC_BYTES == 64
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    return (vf)_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
#elif GLA_VEC_BYTES == 32
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return (vf)_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
#else
    uint32_t u[W];
    for (int j = 0; j < W; ++j) u[j] = static_cast<uint32_t>(p[j]) << 16;  // bf16 = high half
    vf v;
    __builtin_memcpy(&v, u, sizeof(v));
    return v;
#endif
  }
  static inline void load(const uint16_t* p, vf& a, vf& b) {
    a = widen(p);
    b = widen(p + W);
  }
};

struct F16Weights {
  using T = uint16_t;
  static inline vf widen(const uint16_t* p) {
#if GLA_VEC_BYTES == 64
    return (vf)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
#elif GLA_VEC_BYTES == 32
    return (vf)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
#else
    float f[W];
    for (int j = 0; j < W; ++j) f[j] = c10::detail::fp16_ieee_to_fp32_value(p[j]);
    return vload(f);
#endif
  }
  static inline void load(const uint16_t* p, vf& a, vf& b) {
    a = widen(p);
    b = widen(p + W);
  }
};

// MB batch rows times NP panels (NP * NR outputs; `cols` valid in the last panel) over the
// whole of k. Every output is one sequential float32 sum over k whatever the tile shape, so a
// row's result does not depend on the other rows of the call. One or two batch rows have too
// few FMA chains per panel to hide the FMA latency; they take two panels at once (NP = 2).
template <class WP, int MB, int NP>
inline void tile(const typename WP::T* __restrict wp, idx in, const float* __restrict x,
                 idx ldx, float* __restrict y, idx ldy, idx cols,
                 const float* __restrict bias, bool accumulate) {
  vf c[NP][MB][2];
#pragma GCC unroll 8
  for (int q = 0; q < NP; ++q)
#pragma GCC unroll 8
    for (int b = 0; b < MB; ++b) c[q][b][0] = c[q][b][1] = vf{};
  constexpr idx kRowBytes = NR * sizeof(typename WP::T);
  // Software prefetch kPrefetchBytes ahead in each panel stream: with several batch rows the
  // FMAs alone keep the core busy, and the hardware prefetcher does not run far enough ahead
  // to overlap them with the weight stream from L3/DRAM.
  constexpr idx kAhead = (kPrefetchBytes + kRowBytes - 1) / kRowBytes;
  for (idx k = 0; k < in; ++k) {
    vf w[NP][2];
#pragma GCC unroll 2
    for (int q = 0; q < NP; ++q) {
      const char* pf = reinterpret_cast<const char*>(wp + (q * in + k + kAhead) * NR);
#pragma GCC unroll 2
      for (idx line = 0; line < kRowBytes; line += 64) __builtin_prefetch(pf + line, 0, GLA_LINEAR_PF_LOCALITY);
      WP::load(wp + (q * in + k) * NR, w[q][0], w[q][1]);
    }
#pragma GCC unroll 8
    for (int b = 0; b < MB; ++b) {
      const float xb = x[b * ldx + k];
#pragma GCC unroll 2
      for (int q = 0; q < NP; ++q) {
        c[q][b][0] += xb * w[q][0];
        c[q][b][1] += xb * w[q][1];
      }
    }
  }
#pragma GCC unroll 2
  for (int q = 0; q < NP; ++q) {
    const idx qcols = q + 1 < NP ? NR : cols;
#pragma GCC unroll 8
    for (int b = 0; b < MB; ++b) {
      vf r0 = c[q][b][0], r1 = c[q][b][1];
      if (bias) {
        r0 += vload(bias + q * NR);
        r1 += vload(bias + q * NR + W);
      }
      float* yr = y + b * ldy + q * NR;
      if (qcols == NR) {
        if (accumulate) {
          r0 += vload(yr);
          r1 += vload(yr + W);
        }
        vstore(yr, r0);
        vstore(yr + W, r1);
      } else {
        float tmp[NR];
        vstore(tmp, r0);
        vstore(tmp + W, r1);
        for (idx j = 0; j < qcols; ++j) yr[j] = accumulate ? yr[j] + tmp[j] : tmp[j];
      }
    }
  }
}

// rest (< MB) batch rows, NP panels.
template <class WP, int MB, int NP>
inline void rows_tail(idx rest, const typename WP::T* wp, idx in, const float* x, idx ldx,
                      float* y, idx ldy, idx cols, const float* bias, bool accumulate) {
  if constexpr (MB > 0) {
    if (rest == MB) tile<WP, MB, NP>(wp, in, x, ldx, y, ldy, cols, bias, accumulate);
    else rows_tail<WP, MB - 1, NP>(rest, wp, in, x, ldx, y, ldy, cols, bias, accumulate);
  }
}

// Panels [p0, p1) for all n rows, two panels at a time: panels outer, batch tiles inner, so a
// panel is read from memory once and re-read from L1/L2 by the other batch tiles.
template <class WP>
void apply_panels(const void* w, idx in, idx out, const float* bias, const float* x, idx ldx,
                  idx n, float* y, idx ldy, bool accumulate, idx p0, idx p1) {
  const auto* base = static_cast<const typename WP::T*>(w);
  for (idx p = p0; p < p1; p += 2) {
    const int np = p + 1 < p1 ? 2 : 1;
    for (int q = 0; q < np; ++q) {  // full batch tiles, one panel at a time
      const idx c0 = (p + q) * NR, cols = out - c0 < NR ? out - c0 : NR;
      const auto* wp = base + (p + q) * in * NR;
      const float* bp = bias ? bias + c0 : nullptr;
      for (idx b = 0; b + MB_MAX <= n; b += MB_MAX)
        tile<WP, MB_MAX, 1>(wp, in, x + b * ldx, ldx, y + b * ldy + c0, ldy, cols, bp,
                            accumulate);
    }
    const idx b = n / MB_MAX * MB_MAX, rest = n - b;
    if (rest == 0) continue;
    const idx c0 = p * NR;
    const auto* wp = base + p * in * NR;
    const float* bp = bias ? bias + c0 : nullptr;
    if (np == 2 && rest <= 2) {
      const idx cols = out - c0 - NR < NR ? out - c0 - NR : NR;
      rows_tail<WP, 2, 2>(rest, wp, in, x + b * ldx, ldx, y + b * ldy + c0, ldy, cols, bp,
                          accumulate);
    } else {
      for (int q = 0; q < np; ++q) {
        const idx cq = c0 + q * NR, cols = out - cq < NR ? out - cq : NR;
        rows_tail<WP, MB_MAX - 1, 1>(rest, wp + q * in * NR, in, x + b * ldx, ldx,
                                     y + b * ldy + cq, ldy, cols, bp ? bp + q * NR : nullptr,
                                     accumulate);
      }
    }
  }
}

inline void apply_f32(const void* w, idx in, idx out, const float* bias, const float* x,
                      idx ldx, idx n, float* y, idx ldy, bool acc, idx p0, idx p1) {
  apply_panels<F32Weights>(w, in, out, bias, x, ldx, n, y, ldy, acc, p0, p1);
}
inline void apply_bf16(const void* w, idx in, idx out, const float* bias, const float* x,
                       idx ldx, idx n, float* y, idx ldy, bool acc, idx p0, idx p1) {
  apply_panels<BF16Weights>(w, in, out, bias, x, ldx, n, y, ldy, acc, p0, p1);
}
inline void apply_f16(const void* w, idx in, idx out, const float* bias, const float* x,
                      idx ldx, idx n, float* y, idx ldy, bool acc, idx p0, idx p1) {
  apply_panels<F16Weights>(w, in, out, bias, x, ldx, n, y, ldy, acc, p0, p1);
}

#include "linear_qdot_impl.h"  // int8 / int4 weights: apply_q8, apply_q4 (+ vnni::) for this ISA

const LinearKernels kKernels{
    &apply_f32, &apply_bf16, &apply_f16, &apply_q8, &apply_q4,
#if GLA_QDOT_HAS_VNNI
    &vnni::apply_q8, &vnni::apply_q4,
#else
    nullptr, nullptr,
#endif
    NR, kIsa == CpuIsa::kAvx512 ? "avx512" : kIsa == CpuIsa::kAvx2 ? "avx2" : "generic"};
#undef GLA_QDOT_HAS_VNNI
