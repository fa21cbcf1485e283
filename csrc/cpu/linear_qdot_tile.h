// The tiles of the quantized packed linear layers: per output panel, group and batch row the
// exact int32 sum I = sum xq q, then the per-group float32 scale step (see
// linear_qdot_impl.h, which includes this file twice per vector ISA). No include guard on
// purpose. GLA_QDOT_VNNI selects the integer instructions:
//
// 0: AVX2 / AVX-512BW. int8 uses the sign trick (|x| as the unsigned operand of vpmaddubsw,
//    the weight with x's sign as the signed one): |products| <= 127 * 127, two per 16-bit
//    lane, no saturation, then vpmaddwd by ones into int32. int4 weights are unsigned already
//    (q in [0, 15]): vpmaddubsw(q, x), 8 quads added in 16 bits before one vpmaddwd. The
//    generic path does the same sums in plain int32 code.
// 1: VNNI (namespace vnni; AVX512-VNNI in the avx512 copy, AVX-VNNI in the avx2 one).
//    vpdpbusd adds the 4 u8 x s8 products of each 32-bit lane to an int32 accumulator: no
//    16-bit step, no saturation (that is vpdpbusds). int4: vpdpbusd(acc, q, xq) directly.
//    int8, the offset trick: vpdpbusd(acc, xq + 128, q) sums (xq + 128) q, and
//    sum xq q = that - 128 sum q, with sum q taken per call by one more vpdpbusd(ones, q)
//    per weight vector, shared by the tile's batch rows. Per quad of one panel (2 weight
//    vectors) and MB rows: 2 MB + 2 vpdpbusd (and MB broadcasts, which are loads). The sign
//    trick would take 6 MB vector ops (per row a vpabsb and a sign mask, per row and vector
//    a masked vpsubb + vpdpbusd): per 32 products per row (zmm) 1.5 against 0.5 + 0.5 / MB,
//    i.e. 1.0 vs 1.5 at MB = 1, 0.56 at MB = 8 (docs/quantization.md). Both sums are exact
//    in int32 (|(xq + 128) q| <= 255 * 127 per product, <= 64 products per group: < 2^21),
//    so the integer sums, and with them the outputs, are bitwise those of the
//    GLA_QDOT_VNNI 0 tiles.

// The calls below are written (f<...>)(args): the copy in namespace vnni takes the enclosing
// namespace's QActs, and the parentheses keep argument-dependent lookup from also finding
// the enclosing namespace's (non-VNNI) tiles.

#if GLA_QDOT_VNNI
// vpdpbusd: acc + the 4 products u8 x s8 of each 32-bit lane, in int32.
// Inline asm, not the intrinsic, in real builds: around the intrinsic's tied accumulator GCC
// 12 copies every accumulator of the quad loop into another register and back (2 moves per
// vpdpbusd; 42 in the 8-row avx512 tile's loop, tools/qdot_loops/loop_stats.py); "+v" keeps
// it in place. The asm text and its operand order: cpu/simd/vnni_asm.h (checked against
// GCC's encoding of the intrinsics by tests/test_quantize_simde.py). The emulated test build
// keeps the intrinsics (SIMDe's code).
inline qv q_dpbusd(qv acc, qv u8, qv s8) {
#if GLA_EMULATE_AVX512 && GLA_VEC_BYTES == 64
  return _mm512_dpbusd_epi32(acc, u8, s8);
#elif GLA_EMULATE_AVX512
  return _mm256_dpbusd_avx_epi32(acc, u8, s8);
#elif GLA_VEC_BYTES == 64
  asm(GLA_ASM_VPDPBUSD : "+v"(acc) : "v"(u8), "vm"(s8));
  return acc;
#else
  asm(GLA_ASM_VPDPBUSD_VEX : "+x"(acc) : "x"(u8), "xm"(s8));
  return acc;
#endif
}
#if GLA_VEC_BYTES == 64
inline qv q_sub_x128(qv a, qv s) { return _mm512_sub_epi32(a, _mm512_slli_epi32(s, 7)); }
#else
inline qv q_sub_x128(qv a, qv s) { return _mm256_sub_epi32(a, _mm256_slli_epi32(s, 7)); }
#endif

// int8 quads: NR * 4 bytes, two vectors of W rows; x enters as xq + 128 (QActs::qu).
struct Q8Quads {
  static constexpr idx kQuadBytes = NR * 4;
  static constexpr int kHeaders = 1;   // scales
  static constexpr bool kBiasedX = true;
  static inline void load(const uint8_t* p, qv& a, qv& b) {
    a = q_load(p);
    b = q_load(p + GLA_VEC_BYTES);
  }
  static inline qv dot(qv acc, qv xu, qv w) { return q_dpbusd(acc, xu, w); }
};

// int4 quads: W * 4 bytes of nibble pairs (rows j and j + W); x enters as xq.
struct Q4Quads {
  static constexpr idx kQuadBytes = NR * 2;
  static constexpr int kHeaders = 2;   // scales, offsets
  static constexpr bool kBiasedX = false;
  static inline void load(const uint8_t* p, qv& a, qv& b) { q4_unpack(p, a, b); }
  static inline qv dot(qv acc, qv x, qv w) { return q_dpbusd(acc, w, x); }   // q in [0, 15]
};

// Quad qi of NP panels' groups (gp) times MB batch rows of x (xg, rows ldq bytes apart) added
// into a[q][b][h]; int8: the quad's weight sums into ws[q][h].
template <class QR, int MB, int NP>
inline void quad_dpbusd(const uint8_t* const* gp, const uint8_t* xg, idx ldq, idx qi,
                        qv (&a)[NP][MB][2], qv (&ws)[NP][2]) {
  qv w[NP][2];
#pragma GCC unroll 2
  for (int q = 0; q < NP; ++q) {
    const uint8_t* p = gp[q] + QR::kHeaders * NR * 2 + qi * QR::kQuadBytes;
    __builtin_prefetch(p + kPrefetchBytes, 0, GLA_LINEAR_PF_LOCALITY);
    QR::load(p, w[q][0], w[q][1]);
    if constexpr (QR::kBiasedX) {
      const qv ones = q_bcast("\1\1\1\1");
      ws[q][0] = q_dpbusd(ws[q][0], ones, w[q][0]);
      ws[q][1] = q_dpbusd(ws[q][1], ones, w[q][1]);
    }
  }
#pragma GCC unroll 8
  for (int b = 0; b < MB; ++b) {
    const qv xb = q_bcast(xg + b * ldq + 4 * qi);
#pragma GCC unroll 2
    for (int q = 0; q < NP; ++q) {
      a[q][b][0] = QR::dot(a[q][b][0], xb, w[q][0]);
      a[q][b][1] = QR::dot(a[q][b][1], xb, w[q][1]);
    }
  }
}

// The int32 sums of group gi: a[q][b][h] = sum over the group of xq q.
template <class QR, int MB, int NP>
inline void group_sums(const uint8_t* const* gp, const QActs& xa, idx r0, idx gi,
                       qv (&a)[NP][MB][2]) {
  const idx ldq = xa.groups * xa.g4, off = (r0 * xa.groups + gi) * xa.g4;
  const uint8_t* xg = QR::kBiasedX ? xa.qu + off : reinterpret_cast<const uint8_t*>(xa.q) + off;
  qv ws[NP][2];
#pragma GCC unroll 2
  for (int q = 0; q < NP; ++q) ws[q][0] = ws[q][1] = q_zero();
  for (idx qi = 0; qi < xa.g4 / 4; ++qi) quad_dpbusd<QR, MB, NP>(gp, xg, ldq, qi, a, ws);
  if constexpr (QR::kBiasedX) {
#pragma GCC unroll 2
    for (int q = 0; q < NP; ++q)
#pragma GCC unroll 8
      for (int b = 0; b < MB; ++b)
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) a[q][b][h] = q_sub_x128(a[q][b][h], ws[q][h]);
  }
}

#else  // !GLA_QDOT_VNNI

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
  static inline void load(const uint8_t* p, WV& a, WV& b) { q4_unpack(p, a, b); }
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

// The int32 sums of group gi: a[q][b][h] = sum over the group of xq q.
template <class QR, int MB, int NP>
inline void group_sums(const uint8_t* const* gp, const QActs& xa, idx r0, idx gi,
                       qv (&a)[NP][MB][2]) {
  const int8_t* xg = xa.q + (r0 * xa.groups + gi) * xa.g4;
  const idx quads = xa.g4 / 4, ldq = xa.groups * xa.g4;
  if constexpr (QR::kQuads16 == 1) {   // widen every quad's 16-bit pairs
    for (idx qi = 0; qi < quads; ++qi) {
      qv t[NP][MB][2];
      quad_dots<QR, MB, NP>(gp, xg, ldq, qi, t);
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
      quad_dots<QR, MB, NP>(gp, xg, ldq, q0, a16);
      for (idx qi = q0 + 1; qi < imin(quads, q0 + QR::kQuads16); ++qi) {
        quad_dots<QR, MB, NP>(gp, xg, ldq, qi, t);
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
}

#endif  // GLA_QDOT_VNNI

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
  const idx gbytes = q_group_bytes<QR>(xa.g4);
  for (idx gi = 0; gi < xa.groups; ++gi) {
    const uint8_t* gp[NP];
    qv a[NP][MB][2];
#pragma GCC unroll 2
    for (int q = 0; q < NP; ++q) {
      gp[q] = wp + q * panel_bytes + gi * gbytes;
#pragma GCC unroll 8
      for (int b = 0; b < MB; ++b) a[q][b][0] = a[q][b][1] = q_zero();
    }
    (group_sums<QR, MB, NP>)(gp, xa, r0, gi, a);
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
    if (rest == MB) (qtile<QR, MB, NP>)(wp, pb, xa, r0, y, ldy, cols, bias, acc);
    else (qrows_tail<QR, MB - 1, NP>)(rest, wp, pb, xa, r0, y, ldy, cols, bias, acc);
  }
}

// Panels [p0, p1) for all n rows (the order of apply_panels in linear_impl.h). Each call
// quantizes x itself (threads splitting the panels each do it: n * in work against the
// panels' in * NR * (p1 - p0) products).
template <class QR>
void apply_q(const void* w, idx in, idx out, idx group, const float* bias, const float* x,
             idx ldx, idx n, float* y, idx ldy, bool acc, idx p0, idx p1) {
  const auto* base = static_cast<const uint8_t*>(w);
  QActs xa = quantize_acts(x, ldx, n, in, group);
#if GLA_QDOT_VNNI
  if constexpr (QR::kBiasedX) biased_acts(xa, n);
#endif
  const idx pb = xa.groups * q_group_bytes<QR>(xa.g4);
  for (idx p = p0; p < p1; p += 2) {
    const int np = p + 1 < p1 ? 2 : 1;
    for (int q = 0; q < np; ++q) {
      const idx c0 = (p + q) * NR, cols = out - c0 < NR ? out - c0 : NR;
      const float* bp = bias ? bias + c0 : nullptr;
      for (idx b = 0; b + MB_MAX <= n; b += MB_MAX)
        (qtile<QR, MB_MAX, 1>)(base + (p + q) * pb, pb, xa, b, y + b * ldy + c0, ldy, cols, bp,
                             acc);
    }
    const idx b = n / MB_MAX * MB_MAX, rest = n - b;
    if (rest == 0) continue;
    const idx c0 = p * NR;
    const float* bp = bias ? bias + c0 : nullptr;
    if (np == 2 && rest <= 2) {
      const idx cols = out - c0 - NR < NR ? out - c0 - NR : NR;
      (qrows_tail<QR, 2, 2>)(rest, base + p * pb, pb, xa, b, y + b * ldy + c0, ldy, cols, bp,
                           acc);
    } else {
      for (int q = 0; q < np; ++q) {
        const idx cq = c0 + q * NR, cols = out - cq < NR ? out - cq : NR;
        (qrows_tail<QR, MB_MAX - 1, 1>)(rest, base + (p + q) * pb, pb, xa, b, y + b * ldy + cq,
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
