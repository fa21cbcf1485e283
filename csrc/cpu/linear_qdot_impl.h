// Kernel body of the quantized packed linear layers (int8 / int4 weights, see linear.h and
// docs/quantization.md). No include guard on purpose: linear_impl.h includes it once per
// instruction set, in the same namespace, so W, NR, MB_MAX, vf, F16Weights and
// kPrefetchBytes are those of that ISA.
//
// Integer dot products. Each call first quantizes its activations per row and group of g
// input columns (ggml's Q8_0): d = max|x| / 127 (as amax * float(1/127)), xq = x * (1 / d)
// rounded half to even, in [-127, 127]. Per output row, group and batch row the kernel sums
// I = sum xq q in int32 (exact) and adds, in float32, (float(I) * d) * s (int4: then
// (d * float(sum xq)) * m, the offset term). So the result is the product with the
// dequantized weights of x rounded to 8 bits per group: ~0.5 % relative per product on
// N(0, 1) inputs (docs/quantization.md gives the measured bounds); the integer part and the
// activation rounding are bitwise the same on every ISA, only the float32 rounding of the
// per-group FMA may differ (generic has no FMA). Rows are quantized independently: a row's
// result does not depend on the other rows of the call.
//
// Why (measured, docs/quantization.md): widening every weight to float32 made the step
// compute-bound (convert + FMA per weight per batch row; int4's nibble unpacking cost as
// much as int8), 1.5x (int8) / 2.5x (int4) its weight-read time at batch 1 and 3.4x / 5.2x
// at batch 8 vs 1 (50M GLA, AMD AVX2). Integer products do 32 multiply-adds per
// vpmaddubsw + vpmaddwd pair per batch row; the scales cost one FMA per group.
//
// Packed layout (one panel = NR = 2W output rows, like the float panels): per group a header
// of NR float16 scales (int4: then NR float16 offsets), then g4 / 4 quads (g4 = g rounded up
// to 4, the padding weights are 0): 4 consecutive k of all NR rows, row j's 4 bytes together,
// so one 32-bit lane of a vector holds one row's 4 products (vpmaddubsw + vpmaddwd, or
// vpdpbusd, sum them in place). int8: bytes 4j..4j+3 = q[j, k..k+3] (NR * 4 bytes). int4:
// W * 4 bytes, byte 4j+t = q[j, k+t] in the low nibble, q[j+W, k+t] in the high one, so one
// load + mask / shift gives both vectors of a quad.
//
// AVX2 / AVX-512BW: int8 uses the sign trick (|x| as the unsigned operand of vpmaddubsw, the
// weight with x's sign as the signed one): |products| <= 127 * 127, two per 16-bit lane, no
// saturation. int4 weights are unsigned already (q in [0, 15]). The generic path does the
// same sums in plain int32 code.

#ifndef GLA_VEC_BYTES
#error "define GLA_VEC_BYTES before including linear_qdot_impl.h"
#endif

#if GLA_VEC_BYTES == 64
using qv = __m512i;
inline qv q_load(const uint8_t* p) { return _mm512_loadu_si512(p); }
inline qv q_bcast(const int8_t* p) { int32_t v; __builtin_memcpy(&v, p, 4); return _mm512_set1_epi32(v); }
// vpmaddubsw: 2 products per 16-bit lane; q_widen: the 16-bit pairs summed into 32-bit lanes.
inline qv q_dot16(qv a_u8, qv b_s8) { return _mm512_maddubs_epi16(a_u8, b_s8); }
inline qv q_add16(qv a, qv b) { return _mm512_add_epi16(a, b); }
inline qv q_widen(qv a) { return _mm512_madd_epi16(a, _mm512_set1_epi16(1)); }
inline qv q_add(qv a, qv b) { return _mm512_add_epi32(a, b); }
inline vf q_float(qv a) { return (vf)_mm512_cvtepi32_ps(a); }
#elif GLA_VEC_BYTES == 32
using qv = __m256i;
inline qv q_load(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline qv q_bcast(const int8_t* p) { int32_t v; __builtin_memcpy(&v, p, 4); return _mm256_set1_epi32(v); }
inline qv q_dot16(qv a_u8, qv b_s8) { return _mm256_maddubs_epi16(a_u8, b_s8); }
inline qv q_add16(qv a, qv b) { return _mm256_add_epi16(a, b); }
inline qv q_widen(qv a) { return _mm256_madd_epi16(a, _mm256_set1_epi16(1)); }
inline qv q_add(qv a, qv b) { return _mm256_add_epi32(a, b); }
inline vf q_float(qv a) { return (vf)_mm256_cvtepi32_ps(a); }
#else
// Generic: a "vector" of W int32 sums and the raw bytes of a quad-vector.
struct qv { int32_t s[W]; };
struct qbytes { uint8_t b[4 * W]; };
inline vf q_float(const qv& a) {
  vf r;
  for (int j = 0; j < W; ++j) r[j] = static_cast<float>(a.s[j]);
  return r;
}
#endif

// One quad of x (4 int8 of one batch row, broadcast) and its per-ISA helpers.
struct QX {
#if GLA_VEC_BYTES == 64
  qv x, ax;
  __mmask64 neg;
  explicit QX(const int8_t* p) : x(q_bcast(p)), ax(_mm512_abs_epi8(x)), neg(_mm512_movepi8_mask(x)) {}
#elif GLA_VEC_BYTES == 32
  qv x, ax;
  explicit QX(const int8_t* p) : x(q_bcast(p)), ax(_mm256_abs_epi8(x)) {}
#else
  int8_t x[4];
  explicit QX(const int8_t* p) { __builtin_memcpy(x, p, 4); }
#endif
};

// int8 quads: NR * 4 bytes, two vectors of W rows.
// dot(): the quad's products of one batch row, in 16-bit pairs (AVX2 / AVX-512) or 32-bit
// sums (generic); kQuads16: how many quads' 16-bit results add up without overflow before
// q_widen (int8: 2 * 127 * 127 per lane leaves room for one).
struct Q8Quads {
  static constexpr idx kQuadBytes = NR * 4;
  static constexpr int kHeaders = 1;   // scales
  static constexpr idx kQuads16 = 1;
#if GLA_VEC_BYTES >= 32
  using WV = qv;
  static inline void load(const uint8_t* p, WV& a, WV& b) {
    a = q_load(p);
    b = q_load(p + GLA_VEC_BYTES);
  }
  static inline qv dot(const QX& x, WV w) {   // the sign trick, see the top
#if GLA_VEC_BYTES == 64
    return q_dot16(x.ax, _mm512_mask_sub_epi8(w, x.neg, _mm512_setzero_si512(), w));
#else
    return q_dot16(x.ax, _mm256_sign_epi8(w, x.x));
#endif
  }
#else
  using WV = const uint8_t*;
  static inline void load(const uint8_t* p, WV& a, WV& b) { a = p; b = p + 4 * W; }
  static inline qv dot(const QX& x, WV w) {
    qv r;
    for (int j = 0; j < W; ++j) {
      int32_t s = 0;
      for (int t = 0; t < 4; ++t) s += static_cast<int8_t>(w[4 * j + t]) * x.x[t];
      r.s[j] = s;
    }
    return r;
  }
#endif
};

// int4 quads: W * 4 bytes of nibble pairs (rows j and j + W).
struct Q4Quads {
  static constexpr idx kQuadBytes = NR * 2;
  static constexpr int kHeaders = 2;   // scales, offsets
  static constexpr idx kQuads16 = 8;   // 8 * 2 * 15 * 127 = 30480 < 2^15
#if GLA_VEC_BYTES >= 32
  using WV = qv;
  static inline void load(const uint8_t* p, WV& a, WV& b) {
#if GLA_VEC_BYTES == 64
    const qv v = q_load(p), m = _mm512_set1_epi8(15);
    a = _mm512_and_si512(v, m);
    b = _mm512_and_si512(_mm512_srli_epi16(v, 4), m);
#else
    const qv v = q_load(p), m = _mm256_set1_epi8(15);
    a = _mm256_and_si256(v, m);
    b = _mm256_and_si256(_mm256_srli_epi16(v, 4), m);
#endif
  }
  static inline qv dot(const QX& x, WV w) { return q_dot16(w, x.x); }   // q in [0, 15]
#else
  using WV = qbytes;
  static inline void load(const uint8_t* p, WV& a, WV& b) {
    for (int i = 0; i < 4 * W; ++i) {
      a.b[i] = p[i] & 15;
      b.b[i] = p[i] >> 4;
    }
  }
  static inline qv dot(const QX& x, const WV& w) {
    qv r;
    for (int j = 0; j < W; ++j) {
      int32_t s = 0;
      for (int t = 0; t < 4; ++t) s += w.b[4 * j + t] * x.x[t];
      r.s[j] = s;
    }
    return r;
  }
#endif
};

inline qv q_zero() {
#if GLA_VEC_BYTES == 64
  return _mm512_setzero_si512();
#elif GLA_VEC_BYTES == 32
  return _mm256_setzero_si256();
#else
  return qv{};
#endif
}
#if GLA_VEC_BYTES < 32
inline qv q_add(const qv& a, const qv& b) {
  qv r;
  for (int j = 0; j < W; ++j) r.s[j] = a.s[j] + b.s[j];
  return r;
}
inline qv q_add16(const qv& a, const qv& b) { return q_add(a, b); }   // generic: int32 already
inline qv q_widen(const qv& a) { return a; }
#endif

// The activations of one call, quantized per row and group (see the top).
struct QActs {
  const int8_t* q;     // [n][groups][g4], zero past g in each group
  const float* d;      // [n][groups] scales d (NaN where the group holds a NaN / inf)
  const float* dsum;   // [n][groups] d * float(sum of the group's xq) (the int4 offset term)
  idx groups, g4;
};

inline QActs quantize_acts(const float* x, idx ldx, idx n, idx in, idx group) {
  struct Buf { std::vector<int8_t> q; std::vector<float> d; };
  static thread_local Buf buf;
  const idx groups = in / group, g4 = round_up(group, 4);
  buf.q.resize(static_cast<size_t>(n * groups * g4));
  buf.d.resize(static_cast<size_t>(2 * n * groups));
  constexpr float kInv127 = 1.f / 127.f;
  for (idx r = 0; r < n; ++r)
    for (idx gi = 0; gi < groups; ++gi) {
      const float* xs = x + r * ldx + gi * group;
      int8_t* qd = buf.q.data() + (r * groups + gi) * g4;
      // NaN / inf are found from the exponent bits (-ffast-math may fold x - x to 0)
      vf vmax{};
      vi vbad{};
      idx k = 0;
      for (; k + W <= group; k += W) {
        const vf v = vload(xs + k);
        const vf a = v < 0 ? -v : v;
        vmax = a > vmax ? a : vmax;
        vi bits;
        __builtin_memcpy(&bits, &v, sizeof(v));
        vbad |= (bits & 0x7f800000) == 0x7f800000;
      }
      float amax = 0.f;
      int32_t bad = 0;
      for (int j = 0; j < W; ++j) {
        amax = vmax[j] > amax ? vmax[j] : amax;
        bad |= vbad[j];
      }
      for (; k < group; ++k) {
        const float a = xs[k] < 0 ? -xs[k] : xs[k];
        amax = a > amax ? a : amax;
        uint32_t bits;
        __builtin_memcpy(&bits, xs + k, 4);
        bad |= (bits & 0x7f800000u) == 0x7f800000u;
      }
      // opaque: -ffast-math must not refold 1 / (amax * (1/127)) into 127 / amax (an ulp
      // apart, which moves a near-tie x * id to the other int8 value)
      const float d = opaque(amax * kInv127);
      const float id = opaque(d > 0.f ? 1.f / d : 0.f);   // d may flush to 0 (FTZ)
      int32_t qsum = 0;
      k = 0;
#if GLA_VEC_BYTES == 64
      for (; k + W <= group; k += W) {   // cvtps rounds half to even (the default MXCSR)
        const __m512i qi = _mm512_cvtps_epi32((__m512)(vload(xs + k) * id));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(qd + k), _mm512_cvtepi32_epi8(qi));
        qsum += _mm512_reduce_add_epi32(qi);
      }
#elif GLA_VEC_BYTES == 32
      for (; k + W <= group; k += W) {
        const __m256i qi = _mm256_cvtps_epi32((__m256)(vload(xs + k) * id));
        int32_t t[W];
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(t), qi);
        for (int j = 0; j < W; ++j) {
          qd[k + j] = static_cast<int8_t>(t[j]);
          qsum += t[j];
        }
      }
#endif
      for (; k < group; ++k) {
        const int32_t v = static_cast<int32_t>(std::nearbyint(xs[k] * id));
        qd[k] = static_cast<int8_t>(v);
        qsum += v;
      }
      for (; k < g4; ++k) qd[k] = 0;
      const float dd = bad ? __builtin_nanf("") : d;
      buf.d[r * groups + gi] = dd;
      buf.d[n * groups + r * groups + gi] = dd * static_cast<float>(qsum);
    }
  return QActs{buf.q.data(), buf.d.data(), buf.d.data() + n * groups, groups, g4};
}

// Bytes of one group (header + quads).
template <class QR>
inline idx q_group_bytes(idx g4) {
  return QR::kHeaders * NR * 2 + g4 / 4 * QR::kQuadBytes;
}

// The products of quad qi of NP panels' groups (gp) with MB batch rows of x (xg, rows ldq
// bytes apart): t[q][b][h] = QR::dot (16-bit pairs, or int32 sums on generic).
template <class QR, int MB, int NP>
inline void quad_dots(const uint8_t* const* gp, const int8_t* xg, idx ldq, idx qi,
                      qv (&t)[NP][MB][2]) {
  typename QR::WV w[NP][2];
#pragma GCC unroll 2
  for (int q = 0; q < NP; ++q) {
    const uint8_t* p = gp[q] + QR::kHeaders * NR * 2 + qi * QR::kQuadBytes;
    __builtin_prefetch(p + kPrefetchBytes, 0, GLA_LINEAR_PF_LOCALITY);
    QR::load(p, w[q][0], w[q][1]);
  }
#pragma GCC unroll 8
  for (int b = 0; b < MB; ++b) {
    const QX xb(xg + b * ldq + 4 * qi);
#pragma GCC unroll 2
    for (int q = 0; q < NP; ++q) {
      t[q][b][0] = QR::dot(xb, w[q][0]);
      t[q][b][1] = QR::dot(xb, w[q][1]);
    }
  }
}

// MB batch rows (from row r0 of xa) times NP panels, as tile() in linear_impl.h: per group
// the quads' int32 sums, then c += (float(I) * d) * s (+ dsum * m) once per group.
template <class QR, int MB, int NP>
inline void qtile(const uint8_t* __restrict wp, idx panel_bytes, const QActs& xa, idx r0,
                  float* __restrict y, idx ldy, idx cols, const float* __restrict bias,
                  bool accumulate) {
  constexpr bool kOffsets = QR::kHeaders == 2;
  vf c[NP][MB][2];
#pragma GCC unroll 8
  for (int q = 0; q < NP; ++q)
#pragma GCC unroll 8
    for (int b = 0; b < MB; ++b) c[q][b][0] = c[q][b][1] = vf{};
  const idx gbytes = q_group_bytes<QR>(xa.g4), quads = xa.g4 / 4;
  for (idx gi = 0; gi < xa.groups; ++gi) {
    const uint8_t* gp[NP];
    qv a[NP][MB][2];
#pragma GCC unroll 2
    for (int q = 0; q < NP; ++q) {
      gp[q] = wp + q * panel_bytes + gi * gbytes;
#pragma GCC unroll 8
      for (int b = 0; b < MB; ++b) a[q][b][0] = a[q][b][1] = q_zero();
    }
    const int8_t* xg = xa.q + (r0 * xa.groups + gi) * xa.g4;
    if constexpr (QR::kQuads16 == 1) {   // widen every quad's 16-bit pairs
      for (idx qi = 0; qi < quads; ++qi) {
        qv t[NP][MB][2];
        quad_dots<QR, MB, NP>(gp, xg, xa.groups * xa.g4, qi, t);
#pragma GCC unroll 2
        for (int q = 0; q < NP; ++q)
#pragma GCC unroll 8
          for (int b = 0; b < MB; ++b)
#pragma GCC unroll 2
            for (int h = 0; h < 2; ++h) a[q][b][h] = q_add(a[q][b][h], q_widen(t[q][b][h]));
      }
    } else {   // add up to kQuads16 quads in 16 bits, then widen
      for (idx q0 = 0; q0 < quads; q0 += QR::kQuads16) {
        qv a16[NP][MB][2], t[NP][MB][2];
        quad_dots<QR, MB, NP>(gp, xg, xa.groups * xa.g4, q0, a16);
        for (idx qi = q0 + 1; qi < imin(quads, q0 + QR::kQuads16); ++qi) {
          quad_dots<QR, MB, NP>(gp, xg, xa.groups * xa.g4, qi, t);
#pragma GCC unroll 2
          for (int q = 0; q < NP; ++q)
#pragma GCC unroll 8
            for (int b = 0; b < MB; ++b)
#pragma GCC unroll 2
              for (int h = 0; h < 2; ++h) a16[q][b][h] = q_add16(a16[q][b][h], t[q][b][h]);
        }
#pragma GCC unroll 2
        for (int q = 0; q < NP; ++q)
#pragma GCC unroll 8
          for (int b = 0; b < MB; ++b)
#pragma GCC unroll 2
            for (int h = 0; h < 2; ++h) a[q][b][h] = q_add(a[q][b][h], q_widen(a16[q][b][h]));
      }
    }
#pragma GCC unroll 2
    for (int q = 0; q < NP; ++q) {
      const uint16_t* hdr = reinterpret_cast<const uint16_t*>(gp[q]);
      const vf s0 = F16Weights::widen(hdr), s1 = F16Weights::widen(hdr + W);
#pragma GCC unroll 8
      for (int b = 0; b < MB; ++b) {
        const float d = xa.d[(r0 + b) * xa.groups + gi];
        // opaque: one order of operations in every MB instantiation (under -ffast-math GCC
        // reassociated some of them), so a row's result does not depend on its batch
        c[q][b][0] = opaque(c[q][b][0] + opaque(q_float(a[q][b][0]) * d) * s0);
        c[q][b][1] = opaque(c[q][b][1] + opaque(q_float(a[q][b][1]) * d) * s1);
      }
      if constexpr (kOffsets) {
        const vf m0 = F16Weights::widen(hdr + NR), m1 = F16Weights::widen(hdr + NR + W);
#pragma GCC unroll 8
        for (int b = 0; b < MB; ++b) {
          const float ds = xa.dsum[(r0 + b) * xa.groups + gi];
          c[q][b][0] = opaque(c[q][b][0] + ds * m0);
          c[q][b][1] = opaque(c[q][b][1] + ds * m1);
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
      vf r0v = c[q][b][0], r1v = c[q][b][1];
      if (bias) {
        r0v += vload(bias + q * NR);
        r1v += vload(bias + q * NR + W);
      }
      vstore(tmp, r0v);
      vstore(tmp + W, r1v);
      float* yr = y + b * ldy + q * NR;
      for (idx j = 0; j < qcols; ++j) yr[j] = accumulate ? yr[j] + tmp[j] : tmp[j];
    }
  }
}

template <class QR, int MB, int NP>
inline void qrows_tail(idx rest, const uint8_t* wp, idx pb, const QActs& xa, idx r0, float* y,
                       idx ldy, idx cols, const float* bias, bool acc) {
  if constexpr (MB > 0) {
    if (rest == MB) qtile<QR, MB, NP>(wp, pb, xa, r0, y, ldy, cols, bias, acc);
    else qrows_tail<QR, MB - 1, NP>(rest, wp, pb, xa, r0, y, ldy, cols, bias, acc);
  }
}

// Panels [p0, p1) for all n rows (the order of apply_panels in linear_impl.h). Each call
// quantizes x itself (threads splitting the panels each do it: n * in work against the
// panels' in * NR * (p1 - p0) products).
template <class QR>
void apply_q(const void* w, idx in, idx out, idx group, const float* bias, const float* x,
             idx ldx, idx n, float* y, idx ldy, bool acc, idx p0, idx p1) {
  const auto* base = static_cast<const uint8_t*>(w);
  const QActs xa = quantize_acts(x, ldx, n, in, group);
  const idx pb = xa.groups * q_group_bytes<QR>(xa.g4);
  for (idx p = p0; p < p1; p += 2) {
    const int np = p + 1 < p1 ? 2 : 1;
    for (int q = 0; q < np; ++q) {
      const idx c0 = (p + q) * NR, cols = out - c0 < NR ? out - c0 : NR;
      const float* bp = bias ? bias + c0 : nullptr;
      for (idx b = 0; b + MB_MAX <= n; b += MB_MAX)
        qtile<QR, MB_MAX, 1>(base + (p + q) * pb, pb, xa, b, y + b * ldy + c0, ldy, cols, bp,
                             acc);
    }
    const idx b = n / MB_MAX * MB_MAX, rest = n - b;
    if (rest == 0) continue;
    const idx c0 = p * NR;
    const float* bp = bias ? bias + c0 : nullptr;
    if (np == 2 && rest <= 2) {
      const idx cols = out - c0 - NR < NR ? out - c0 - NR : NR;
      qrows_tail<QR, 2, 2>(rest, base + p * pb, pb, xa, b, y + b * ldy + c0, ldy, cols, bp,
                           acc);
    } else {
      for (int q = 0; q < np; ++q) {
        const idx cq = c0 + q * NR, cols = out - cq < NR ? out - cq : NR;
        qrows_tail<QR, MB_MAX - 1, 1>(rest, base + (p + q) * pb, pb, xa, b, y + b * ldy + cq,
                                      ldy, cols, bp ? bp + q * NR : nullptr, acc);
      }
    }
  }
}

inline void apply_q8(const void* w, idx in, idx out, idx group, const float* bias,
                     const float* x, idx ldx, idx n, float* y, idx ldy, bool acc, idx p0,
                     idx p1) {
  apply_q<Q8Quads>(w, in, out, group, bias, x, ldx, n, y, ldy, acc, p0, p1);
}
inline void apply_q4(const void* w, idx in, idx out, idx group, const float* bias,
                     const float* x, idx ldx, idx n, float* y, idx ldy, bool acc, idx p0,
                     idx p1) {
  apply_q<Q4Quads>(w, in, out, group, bias, x, ldx, n, y, ldy, acc, p0, p1);
}
