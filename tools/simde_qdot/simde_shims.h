// Fixes for SIMDe 0.7.4 (Debian libsimde-dev) as used by harness.cpp: its native alias of
// _mm512_madd_epi16 takes the masked form's 4 arguments, and it lacks the conversions
// below. Each shim is the instruction's documented per-lane behaviour, written plainly.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

#undef _mm512_madd_epi16
#define _mm512_madd_epi16(a, b) simde_mm512_madd_epi16(a, b)

namespace simde_shim {
template <class To, class From> inline To bits(const From& v) {
  static_assert(sizeof(To) == sizeof(From));
  To r;
  std::memcpy(&r, &v, sizeof(r));
  return r;
}
struct F16 { uint16_t v[16]; };
struct F32 { float v[16]; };
struct I32 { int32_t v[16]; };
struct U16 { uint16_t v[16]; };
struct I8 { int8_t v[16]; };

// vcvtph2ps: 16 float16 -> float32 (exact)
inline simde__m512 cvtph_ps(simde__m256i h) {
  const F16 a = bits<F16>(h);
  F32 r;
  for (int i = 0; i < 16; ++i) r.v[i] = c10::detail::fp16_ieee_to_fp32_value(a.v[i]);
  return bits<simde__m512>(r);
}
// vcvtdq2ps: int32 -> float32, round to nearest even
inline simde__m512 cvtepi32_ps(simde__m512i a) {
  const I32 x = bits<I32>(a);
  F32 r;
  for (int i = 0; i < 16; ++i) r.v[i] = static_cast<float>(x.v[i]);
  return bits<simde__m512>(r);
}
// vcvtps2dq: float32 -> int32 in the current rounding mode (nearest even by default);
// NaN and out-of-range give the "integer indefinite" 0x80000000
inline simde__m512i cvtps_epi32(simde__m512 a) {
  const F32 x = bits<F32>(a);
  I32 r;
  for (int i = 0; i < 16; ++i) {
    const float v = std::nearbyint(x.v[i]);
    r.v[i] = (v >= -2147483648.f && v < 2147483648.f) ? static_cast<int32_t>(v) : INT32_MIN;
  }
  return bits<simde__m512i>(r);
}
// vpmovdb: int32 -> int8 by TRUNCATION (the saturating form is vpmovsdb)
inline simde__m128i cvtepi32_epi8(simde__m512i a) {
  const I32 x = bits<I32>(a);
  I8 r;
  for (int i = 0; i < 16; ++i) r.v[i] = static_cast<int8_t>(static_cast<uint32_t>(x.v[i]) & 0xff);
  return bits<simde__m128i>(r);
}
inline int32_t reduce_add_epi32(simde__m512i a) {
  const I32 x = bits<I32>(a);
  uint32_t s = 0;
  for (int i = 0; i < 16; ++i) s += static_cast<uint32_t>(x.v[i]);
  return static_cast<int32_t>(s);
}
// vpmovzxwd: 16 uint16 -> int32
inline simde__m512i cvtepu16_epi32(simde__m256i a) {
  const U16 x = bits<U16>(a);
  I32 r;
  for (int i = 0; i < 16; ++i) r.v[i] = x.v[i];
  return bits<simde__m512i>(r);
}
}  // namespace simde_shim

#define _mm512_cvtph_ps(a) simde_shim::cvtph_ps(a)
#define _mm512_cvtepi32_ps(a) simde_shim::cvtepi32_ps(a)
#define _mm512_cvtps_epi32(a) simde_shim::cvtps_epi32(a)
#define _mm512_cvtepi32_epi8(a) simde_shim::cvtepi32_epi8(a)
#define _mm512_reduce_add_epi32(a) simde_shim::reduce_add_epi32(a)
#define _mm512_cvtepu16_epi32(a) simde_shim::cvtepu16_epi32(a)
