// int8 tiles of the quantized linear layers on AVX2 / AVX-512BW (included by
// linear_qdot_impl.h when GLA_VEC_BYTES >= 32; int8 quad layout there: per half of W rows,
// the (k, k+1) pairs of its W rows, then the (k+2, k+3) pairs).
//
// Why int16 (measured on AMD Zen 3, issue 18): vpsignb, vpabsb, vpmaddubsw and vpmaddwd all
// issue on the same two vector pipes. The former sign trick (|x| as vpmaddubsw's unsigned
// operand, w with x's sign as the signed one, then a widening vpmaddwd) spent 3.5 of them per
// 32 weights per batch row. Here the weights are sign-extended to int16 once per load
// (vpmovsxbw, shared by the tile's batch rows) and multiplied with x's int16 pairs by
// vpmaddwd: 2 multiply-pipe ops per 32 weights per row, no sign work, no widening, and each
// row's sum stays in its own 32-bit lane. The int32 group sums are exact, so the results are
// those of the generic path's integer sums followed by the same float32 operations.

#if GLA_VEC_BYTES == 64
inline qv i16_load(const uint8_t* p) {   // W int8 pairs -> W int16 pairs
  return _mm512_cvtepi8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline qv i16_pair(const int16_t* p) { int32_t v; __builtin_memcpy(&v, p, 4); return _mm512_set1_epi32(v); }
inline qv i16_madd(qv a, qv b) { return _mm512_madd_epi16(a, b); }
#else
inline qv i16_load(const uint8_t* p) {
  return _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline qv i16_pair(const int16_t* p) { int32_t v; __builtin_memcpy(&v, p, 4); return _mm256_set1_epi32(v); }
inline qv i16_madd(qv a, qv b) { return _mm256_madd_epi16(a, b); }
#endif

// The int16 copy of the quantized activations (the vpmaddwd operand), [n][groups][g4].
inline const int16_t* acts_int16(const QActs& xa, idx n) {
  static thread_local std::vector<int16_t> buf;
  const idx len = n * xa.groups * xa.g4;
  buf.resize(static_cast<size_t>(len));
  for (idx i = 0; i < len; ++i) buf[i] = xa.q[i];
  return buf.data();
}

// MB batch rows (from row r0) times NH halves (from half h0) of one panel wp: per group the
// exact int32 sums, then c += (float(I) * d) * s, as qtile.
template <int MB, int NH>
inline void q8tile(const uint8_t* __restrict wp, const QActs& xa, const int16_t* x16, idx r0,
                   int h0, float* __restrict y, idx ldy, idx cols, const float* __restrict bias,
                   bool accumulate) {
  constexpr idx kQuad = NR * 4, kHalf = 4 * W;
  vf c[MB][NH];
#pragma GCC unroll 8
  for (int b = 0; b < MB; ++b)
#pragma GCC unroll 2
    for (int h = 0; h < NH; ++h) c[b][h] = vf{};
  const idx gbytes = q_group_bytes<Q8Quads>(xa.g4), quads = xa.g4 / 4, ldq = xa.groups * xa.g4;
  for (idx gi = 0; gi < xa.groups; ++gi) {
    const uint8_t* gq = wp + gi * gbytes + NR * 2;   // the group's first quad
    const int16_t* xr[MB];
    qv a[MB][NH];
#pragma GCC unroll 8
    for (int b = 0; b < MB; ++b) {
      xr[b] = x16 + (r0 + b) * ldq + gi * xa.g4;
#pragma GCC unroll 2
      for (int h = 0; h < NH; ++h) a[b][h] = q_zero();
    }
    for (idx qi = 0; qi < quads; ++qi) {
      const uint8_t* p = gq + qi * kQuad;
      if (h0 == 0)   // the first pass over a panel streams it: prefetch its quads' lines
        for (idx line = 0; line < kQuad; line += 64)
          __builtin_prefetch(p + line + kPrefetchBytes, 0, GLA_LINEAR_PF_LOCALITY);
      qv e[NH], o[NH];   // the half's (k, k+1) and (k+2, k+3) pairs as int16
#pragma GCC unroll 2
      for (int h = 0; h < NH; ++h) {
        e[h] = i16_load(p + (h0 + h) * kHalf);
        o[h] = i16_load(p + (h0 + h) * kHalf + 2 * W);
      }
#pragma GCC unroll 8
      for (int b = 0; b < MB; ++b) {
        const qv x01 = i16_pair(xr[b] + 4 * qi), x23 = i16_pair(xr[b] + 4 * qi + 2);
#pragma GCC unroll 2
        for (int h = 0; h < NH; ++h)
          a[b][h] = q_add(a[b][h], q_add(i16_madd(e[h], x01), i16_madd(o[h], x23)));
      }
    }
    const uint16_t* hdr = reinterpret_cast<const uint16_t*>(wp + gi * gbytes);
#pragma GCC unroll 2
    for (int h = 0; h < NH; ++h) {
      const vf s = F16Weights::widen(hdr + (h0 + h) * W);
#pragma GCC unroll 8
      for (int b = 0; b < MB; ++b)
        c[b][h] += (q_float(a[b][h]) * xa.d[(r0 + b) * xa.groups + gi]) * s;
    }
  }
#pragma GCC unroll 8
  for (int b = 0; b < MB; ++b)
#pragma GCC unroll 2
    for (int h = 0; h < NH; ++h) {
      const idx hc = cols - h * W;   // valid outputs of this half
      if (hc <= 0) break;
      vf r = c[b][h];
      if (bias) r += vload(bias + h * W);
      float* yr = y + b * ldy + h * W;
      if (hc >= W) {
        if (accumulate) r += vload(yr);
        vstore(yr, r);
      } else {
        float tmp[W];
        vstore(tmp, r);
        for (idx j = 0; j < hc; ++j) yr[j] = accumulate ? yr[j] + tmp[j] : tmp[j];
      }
    }
}

template <int MB, int NH>
inline void q8tile_rows(idx rest, const uint8_t* wp, const QActs& xa, const int16_t* x16, idx r0,
                        int h0, float* y, idx ldy, idx cols, const float* bias, bool acc) {
  if constexpr (MB > 0) {
    if (rest == MB) q8tile<MB, NH>(wp, xa, x16, r0, h0, y, ldy, cols, bias, acc);
    else q8tile_rows<MB - 1, NH>(rest, wp, xa, x16, r0, h0, y, ldy, cols, bias, acc);
  }
}

// Panels [p0, p1) for all n rows. Per panel: blocks of MB_MAX rows one half at a time (2 * MB
// accumulators + 4 weight / activation vectors fit the register file), then the last rows:
// up to 2 with both halves at once (one pass over the panel), more one half at a time.
inline void apply_q8_i16(const uint8_t* base, idx pb, const QActs& xa, const int16_t* x16, idx out,
                         const float* bias, idx n, float* y, idx ldy, bool acc, idx p0, idx p1) {
  for (idx p = p0; p < p1; ++p) {
    const uint8_t* wp = base + p * pb;
    const idx c0 = p * NR, pcols = out - c0 < NR ? out - c0 : NR;
    const float* bp = bias ? bias + c0 : nullptr;
    idx b = 0;
    for (; b + MB_MAX <= n; b += MB_MAX)
      for (int h = 0; h < 2 && h * W < pcols; ++h)
        q8tile<MB_MAX, 1>(wp, xa, x16, b, h, y + b * ldy + c0 + h * W, ldy, pcols - h * W,
                          bp ? bp + h * W : nullptr, acc);
    const idx rest = n - b;
    if (rest == 0) continue;
    if (rest <= 2) {
      q8tile_rows<2, 2>(rest, wp, xa, x16, b, 0, y + b * ldy + c0, ldy, pcols, bp, acc);
    } else {
      for (int h = 0; h < 2 && h * W < pcols; ++h)
        q8tile_rows<MB_MAX - 1, 1>(rest, wp, xa, x16, b, h, y + b * ldy + c0 + h * W, ldy,
                                   pcols - h * W, bp ? bp + h * W : nullptr, acc);
    }
  }
}
