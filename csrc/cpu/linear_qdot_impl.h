// Kernel body of the quantized packed linear layers (int8 / int4 weights, see linear.h and
// docs/quantization.md): the activation quantization and the vector helpers, once per
// instruction set; the tiles are in linear_qdot_tile.h, included at the end once plain and,
// on AVX2 / AVX-512, once more with VNNI's vpdpbusd. No include guard on purpose:
// linear_impl.h includes it once per instruction set, in the same namespace, so W, NR, MB_MAX,
// vf, F16Weights and kPrefetchBytes are those of that ISA.
//
// Integer dot products. Each call first quantizes its activations per row and group of g
// input columns (ggml's Q8_0): d = max|x| / 127 (as amax * float(1/127)), xq = x * (1 / d)
// rounded half to even, in [-127, 127]. Per output row, group and batch row the kernel sums
// I = sum xq q in int32 (exact) and adds, in float32, (float(I) * d) * s (int4: then
// (d * float(sum xq)) * m, the offset term). So the result is the product with the
// dequantized weights of x rounded to 8 bits per group: ~0.5 % relative per product on
// N(0, 1) inputs (docs/quantization.md gives the measured bounds); the integer part and the
// activation rounding are bitwise the same on every ISA and with or without VNNI, only the
// float32 rounding of the per-group FMA may differ (generic has no FMA). Rows are quantized
// independently: a row's result does not depend on the other rows of the call.
//
// Why (measured, docs/quantization.md): widening every weight to float32 made the step
// compute-bound (convert + FMA per weight per batch row; int4's nibble unpacking cost as
// much as int8), 1.5x (int8) / 2.5x (int4) its weight-read time at batch 1 and 3.4x / 5.2x
// at batch 8 vs 1 (50M GLA, AMD AVX2). Integer products do 32 multiply-adds per
// vpmaddubsw + vpmaddwd pair per batch row (or per half a vpdpbusd); the scales cost one FMA
// per group.
//
// Packed layout (one panel = NR = 2W output rows, like the float panels): per group a header
// of NR float16 scales (int4: then NR float16 offsets), then g4 / 4 quads (g4 = g rounded up
// to 4, the padding weights are 0): 4 consecutive k of all NR rows, row j's 4 bytes together,
// so one 32-bit lane of a vector holds one row's 4 products (vpmaddubsw + vpmaddwd, or
// vpdpbusd, sum them in place). int8: bytes 4j..4j+3 = q[j, k..k+3] (NR * 4 bytes). int4:
// W * 4 bytes, byte 4j+t = q[j, k+t] in the low nibble, q[j+W, k+t] in the high one, so one
// load + mask / shift gives both vectors of a quad.

#ifndef GLA_VEC_BYTES
#error "define GLA_VEC_BYTES before including linear_qdot_impl.h"
#endif

#if GLA_VEC_BYTES == 64
using qv = __m512i;
inline qv q_load(const uint8_t* p) { return _mm512_loadu_si512(p); }
inline qv q_bcast(const void* p) { int32_t v; __builtin_memcpy(&v, p, 4); return _mm512_set1_epi32(v); }
// vpmaddubsw: 2 products per 16-bit lane; q_widen: the 16-bit pairs summed into 32-bit lanes.
inline qv q_dot16(qv a_u8, qv b_s8) { return _mm512_maddubs_epi16(a_u8, b_s8); }
inline qv q_add16(qv a, qv b) { return _mm512_add_epi16(a, b); }
inline qv q_widen(qv a) { return _mm512_madd_epi16(a, _mm512_set1_epi16(1)); }
inline qv q_add(qv a, qv b) { return _mm512_add_epi32(a, b); }
inline vf q_float(qv a) { return (vf)_mm512_cvtepi32_ps(a); }
#elif GLA_VEC_BYTES == 32
using qv = __m256i;
inline qv q_load(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline qv q_bcast(const void* p) { int32_t v; __builtin_memcpy(&v, p, 4); return _mm256_set1_epi32(v); }
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

#if GLA_VEC_BYTES >= 32
// One int4 quad-vector: the low nibbles (rows j < W) and the high ones (rows j + W).
inline void q4_unpack(const uint8_t* p, qv& a, qv& b) {
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
#endif

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
  const uint8_t* qu = nullptr;   // q + 128 as uint8 (biased_acts: the VNNI int8 kernel's)
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

// xa.qu = xa.q + 128 as unsigned bytes (q ^ 0x80), the unsigned operand of the VNNI int8
// kernel's vpdpbusd (linear_qdot_tile.h); padding (q = 0) becomes 128 against zero weights.
inline void biased_acts(QActs& xa, idx n) {
  static thread_local std::vector<uint8_t> buf;
  const idx bytes = n * xa.groups * xa.g4;
  buf.resize(static_cast<size_t>(bytes));
  for (idx i = 0; i < bytes; ++i) buf[i] = static_cast<uint8_t>(xa.q[i]) ^ 0x80u;
  xa.qu = buf.data();
}

// Bytes of one group (header + quads).
template <class QR>
inline idx q_group_bytes(idx g4) {
  return QR::kHeaders * NR * 2 + g4 / 4 * QR::kQuadBytes;
}

#define GLA_QDOT_VNNI 0
#include "linear_qdot_tile.h"
#undef GLA_QDOT_VNNI

// The VNNI copy of the tiles (namespace vnni, apply_q8 / apply_q4), picked per packed matrix
// by pick_cpu_vnni (csrc/cpu/simd/cpu_features.h). Compiled for AVX512-VNNI / AVX-VNNI on top
// of the copy's target; in the emulated test build SIMDe supplies vpdpbusd instead.
#if GLA_VEC_BYTES >= 32 && GLA_MULTI_ISA
#define GLA_QDOT_HAS_VNNI 1
#pragma GCC push_options
#if !GLA_EMULATE_AVX512 && GLA_VEC_BYTES == 64
#pragma GCC target("avx512vnni")
#elif !GLA_EMULATE_AVX512
#pragma GCC target("avxvnni")
#endif
namespace vnni {
#define GLA_QDOT_VNNI 1
#include "linear_qdot_tile.h"
#undef GLA_QDOT_VNNI
}  // namespace vnni
#pragma GCC pop_options
#else
#define GLA_QDOT_HAS_VNNI 0
#endif
