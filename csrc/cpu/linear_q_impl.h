// Kernel body of the quantized packed linear layers (int8 / int4 weights, see linear.h and
// docs/quantization.md). No include guard on purpose: linear.cpp includes it after
// linear_impl.h once per instruction set, in the same namespace, so W, NR, MB_MAX, vf,
// vload/vstore, F16Weights and kPrefetchBytes are those of that ISA.
//
// Packed layout (one panel = NR output rows, like the float panels): for each group of g
// input columns, a header of NR float16 scales (int4: then NR float16 offsets), then g
// k-rows of NR int8 weights (int4: NR / 2 bytes, byte j = lane j in the low nibble and lane
// j + W in the high one, so one load + mask / shift gives the two vectors of a k-row).
//
// Why the weights are widened in registers and the activations stay float32 (no per-block
// int8 activations with vpmaddubsw / VNNI): a decode step is bound by the weight stream, and
// widening one k-row (load, sign/zero extend, convert) is shared by every batch row of the
// tile, so the per-row work stays one FMA per weight, as for float weights; the group's
// scale (and offset, times the group's sum of x) is applied once per group. A first version
// that multiplied every widened weight by its scale in the k-loop ran 1.46x the bf16
// kernel's CPU time at batch 1 on AVX2 (compute-bound); see docs/quantization.md.
// Measured: benchmarks/results/bench_lm_quick_t1.md, docs/quantization.md (AMD EPYC, AVX2).

#ifndef GLA_VEC_BYTES
#error "define GLA_VEC_BYTES before including linear_q_impl.h"
#endif

// int8 k-row -> two float vectors (lanes 0..W-1, W..2W-1).
struct Q8Rows {
  static constexpr idx kRowBytes = NR;
  static constexpr int kHeaders = 1;   // scales
  static inline void widen(const uint8_t* p, vf& a, vf& b) {
#if GLA_VEC_BYTES == 64
    a = (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
    b = (vf)_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + W))));
#elif GLA_VEC_BYTES == 32
    // two 8-byte loads folded into the sign extensions (no shuffle for the upper half)
    a = (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
    b = (vf)_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p + W))));
#else
    float f[NR];
    for (int j = 0; j < NR; ++j) f[j] = static_cast<float>(static_cast<int8_t>(p[j]));
    a = vload(f);
    b = vload(f + W);
#endif
  }
};

// int4 k-row (NR / 2 bytes) -> two float vectors of q in [0, 15].
struct Q4Rows {
  static constexpr idx kRowBytes = NR / 2;
  static constexpr int kHeaders = 2;   // scales, offsets
  static inline void widen(const uint8_t* p, vf& a, vf& b) {
#if GLA_VEC_BYTES == 64
    const __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    a = (vf)_mm512_cvtepi32_ps(_mm512_and_si512(u, _mm512_set1_epi32(15)));
    b = (vf)_mm512_cvtepi32_ps(_mm512_srli_epi32(u, 4));
#elif GLA_VEC_BYTES == 32
    const __m256i u = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
    a = (vf)_mm256_cvtepi32_ps(_mm256_and_si256(u, _mm256_set1_epi32(15)));
    b = (vf)_mm256_cvtepi32_ps(_mm256_srli_epi32(u, 4));
#else
    float f[NR];
    for (int j = 0; j < W; ++j) {
      f[j] = static_cast<float>(p[j] & 15);
      f[j + W] = static_cast<float>(p[j] >> 4);
    }
    a = vload(f);
    b = vload(f + W);
#endif
  }
};

// Bytes of one group (header + g k-rows) and of one panel.
template <class QR>
inline idx q_group_bytes(idx group) {
  return QR::kHeaders * NR * 2 + group * QR::kRowBytes;
}

// As tile() in linear_impl.h, for quantized panels of `panel_bytes` bytes. Per group the
// k-loop sums x * q in its own accumulators (no scale in the inner loop: the same work per
// weight as a bf16 panel); at the group's end c += s * sum(x q) (+ m * sum(x), int4).
template <class QR, int MB, int NP>
inline void qtile(const uint8_t* __restrict wp, idx panel_bytes, idx in, idx group,
                  const float* __restrict x, idx ldx, float* __restrict y, idx ldy, idx cols,
                  const float* __restrict bias, bool accumulate) {
  constexpr bool kOffsets = QR::kHeaders == 2;
  vf c[NP][MB][2];
#pragma GCC unroll 8
  for (int q = 0; q < NP; ++q)
#pragma GCC unroll 8
    for (int b = 0; b < MB; ++b) c[q][b][0] = c[q][b][1] = vf{};
  const idx gbytes = q_group_bytes<QR>(group);
  for (idx g0 = 0; g0 < in; g0 += group) {
    const uint8_t* gp[NP];
    vf a[NP][MB][2];
    float xs[MB];
#pragma GCC unroll 2
    for (int q = 0; q < NP; ++q) {
      gp[q] = wp + q * panel_bytes + (g0 / group) * gbytes;
#pragma GCC unroll 8
      for (int b = 0; b < MB; ++b) a[q][b][0] = a[q][b][1] = vf{};
    }
#pragma GCC unroll 8
    for (int b = 0; b < MB; ++b) xs[b] = 0.f;
    for (idx kk = 0; kk < group; ++kk) {
      vf w[NP][2];
#pragma GCC unroll 2
      for (int q = 0; q < NP; ++q) {
        const uint8_t* p = gp[q] + QR::kHeaders * NR * 2 + kk * QR::kRowBytes;
        __builtin_prefetch(p + kPrefetchBytes, 0, GLA_LINEAR_PF_LOCALITY);
        QR::widen(p, w[q][0], w[q][1]);
      }
      const idx k = g0 + kk;
#pragma GCC unroll 8
      for (int b = 0; b < MB; ++b) {
        const float xb = x[b * ldx + k];
        if constexpr (kOffsets) xs[b] += xb;
#pragma GCC unroll 2
        for (int q = 0; q < NP; ++q) {
          a[q][b][0] += xb * w[q][0];
          a[q][b][1] += xb * w[q][1];
        }
      }
    }
#pragma GCC unroll 2
    for (int q = 0; q < NP; ++q) {
      const uint16_t* hdr = reinterpret_cast<const uint16_t*>(gp[q]);
      const vf s0 = F16Weights::widen(hdr), s1 = F16Weights::widen(hdr + W);
#pragma GCC unroll 8
      for (int b = 0; b < MB; ++b) {
        c[q][b][0] += a[q][b][0] * s0;
        c[q][b][1] += a[q][b][1] * s1;
      }
      if constexpr (kOffsets) {
        const vf m0 = F16Weights::widen(hdr + NR), m1 = F16Weights::widen(hdr + NR + W);
#pragma GCC unroll 8
        for (int b = 0; b < MB; ++b) {
          c[q][b][0] += xs[b] * m0;
          c[q][b][1] += xs[b] * m1;
        }
      }
    }
  }
#pragma GCC unroll 2
  for (int q = 0; q < NP; ++q) {
    const idx qcols = q + 1 < NP ? NR : cols;
#pragma GCC unroll 8
    for (int b = 0; b < MB; ++b) {
      float tmp[NR];
      vf r0 = c[q][b][0], r1 = c[q][b][1];
      if (bias) {
        r0 += vload(bias + q * NR);
        r1 += vload(bias + q * NR + W);
      }
      vstore(tmp, r0);
      vstore(tmp + W, r1);
      float* yr = y + b * ldy + q * NR;
      for (idx j = 0; j < qcols; ++j) yr[j] = accumulate ? yr[j] + tmp[j] : tmp[j];
    }
  }
}

template <class QR, int MB, int NP>
inline void qrows_tail(idx rest, const uint8_t* wp, idx pb, idx in, idx group, const float* x,
                       idx ldx, float* y, idx ldy, idx cols, const float* bias, bool acc) {
  if constexpr (MB > 0) {
    if (rest == MB) qtile<QR, MB, NP>(wp, pb, in, group, x, ldx, y, ldy, cols, bias, acc);
    else qrows_tail<QR, MB - 1, NP>(rest, wp, pb, in, group, x, ldx, y, ldy, cols, bias, acc);
  }
}

// Panels [p0, p1) for all n rows (the order of apply_panels in linear_impl.h).
template <class QR>
void apply_q(const void* w, idx in, idx out, idx group, const float* bias, const float* x,
             idx ldx, idx n, float* y, idx ldy, bool acc, idx p0, idx p1) {
  const auto* base = static_cast<const uint8_t*>(w);
  const idx pb = (in / group) * q_group_bytes<QR>(group);
  for (idx p = p0; p < p1; p += 2) {
    const int np = p + 1 < p1 ? 2 : 1;
    for (int q = 0; q < np; ++q) {
      const idx c0 = (p + q) * NR, cols = out - c0 < NR ? out - c0 : NR;
      const float* bp = bias ? bias + c0 : nullptr;
      for (idx b = 0; b + MB_MAX <= n; b += MB_MAX)
        qtile<QR, MB_MAX, 1>(base + (p + q) * pb, pb, in, group, x + b * ldx, ldx,
                             y + b * ldy + c0, ldy, cols, bp, acc);
    }
    const idx b = n / MB_MAX * MB_MAX, rest = n - b;
    if (rest == 0) continue;
    const idx c0 = p * NR;
    const float* bp = bias ? bias + c0 : nullptr;
    if (np == 2 && rest <= 2) {
      const idx cols = out - c0 - NR < NR ? out - c0 - NR : NR;
      qrows_tail<QR, 2, 2>(rest, base + p * pb, pb, in, group, x + b * ldx, ldx,
                           y + b * ldy + c0, ldy, cols, bp, acc);
    } else {
      for (int q = 0; q < np; ++q) {
        const idx cq = c0 + q * NR, cols = out - cq < NR ? out - cq : NR;
        qrows_tail<QR, MB_MAX - 1, 1>(rest, base + (p + q) * pb, pb, in, group, x + b * ldx,
                                      ldx, y + b * ldy + cq, ldy, cols,
                                      bp ? bp + q * NR : nullptr, acc);
      }
    }
  }
}

inline void apply_q8(const void* w, idx in, idx out, idx group, const float* bias,
                     const float* x, idx ldx, idx n, float* y, idx ldy, bool acc, idx p0,
                     idx p1) {
  apply_q<Q8Rows>(w, in, out, group, bias, x, ldx, n, y, ldy, acc, p0, p1);
}
inline void apply_q4(const void* w, idx in, idx out, idx group, const float* bias,
                     const float* x, idx ldx, idx n, float* y, idx ldy, bool acc, idx p0,
                     idx p1) {
  apply_q<Q4Rows>(w, in, out, group, bias, x, ldx, n, y, ldy, acc, p0, p1);
}
