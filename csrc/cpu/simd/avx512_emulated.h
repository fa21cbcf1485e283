// Test-only build mode (setup.py: GLA_EXT_EMULATE_AVX512=1): the AVX-512 copy of every kernel
// is compiled for AVX2 with each _mm512_* intrinsic supplied by the SIMDe headers (Debian
// package libsimde-dev), which compute the same lanes in portable code. So a machine without
// AVX-512 (the AMD ones CI sometimes runs on) can run the AVX-512 kernel bodies, slowly, and
// check them against the generic path before an Intel machine runs them for the first time.
// Not a release mode: `python -m gla_ext info` says "avx512 (emulated)".
#pragma once

#if !defined(__x86_64__)
#error "GLA_EMULATE_AVX512 needs an x86-64 build"
#endif

#include <immintrin.h>  // first: SIMDe then keeps GCC's own __m512 / __m512i / __mmask types

// Only the AVX-512 names (and AVX-VNNI's one, at the end) become SIMDe calls; the rest of the
// AVX2 copy keeps the real instructions.
#define SIMDE_X86_AVX512F_ENABLE_NATIVE_ALIASES
#define SIMDE_X86_AVX512BW_ENABLE_NATIVE_ALIASES
#define SIMDE_X86_AVX512DQ_ENABLE_NATIVE_ALIASES
#define SIMDE_X86_AVX512VL_ENABLE_NATIVE_ALIASES
#define SIMDE_X86_AVX512VNNI_ENABLE_NATIVE_ALIASES  // _mm512_dpbusd_epi32 (the VNNI kernels)
#if __has_include(<simde/x86/avx512.h>)
#include <simde/x86/avx512.h>
#else
#error "GLA_EXT_EMULATE_AVX512=1 needs the SIMDe headers (apt-get install libsimde-dev)"
#endif

// SIMDe 0.7.4 declares this alias with the masked form's four parameters.
#undef _mm512_madd_epi16
#define _mm512_madd_epi16(a, b) simde_mm512_madd_epi16(a, b)

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>

// Lane-by-lane versions of the intrinsics the kernels use that SIMDe 0.7.4 lacks, with the
// instructions' documented semantics (Intel SDM); named gla_emu_* and mapped by macros below.
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")  // what the emulated copy may use natively
namespace gla_emu512 {
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef float f32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef int8_t i8x16 __attribute__((vector_size(16)));

inline __m512 cvtepi32_ps(__m512i a) {  // vcvtdq2ps: round to nearest even
  const i32x16 v = (i32x16)a;
  f32x16 r;
  for (int i = 0; i < 16; ++i) r[i] = (float)v[i];
  return (__m512)r;
}
inline __m512i cvtps_epi32(__m512 a) {  // vcvtps2dq: nearest even; NaN / out of range -> INT_MIN
  const f32x16 v = (f32x16)a;
  i32x16 r;
  for (int i = 0; i < 16; ++i) {
    const float x = v[i];
    const float n = std::nearbyint(x);
    r[i] = (x != x || n >= 2147483648.0f || n < -2147483648.0f) ? INT32_MIN : (int32_t)n;
  }
  return (__m512i)r;
}
inline __m128i cvtepi32_epi8(__m512i a) {  // vpmovdb: truncation to the low byte
  const i32x16 v = (i32x16)a;
  i8x16 r;
  for (int i = 0; i < 16; ++i) r[i] = (int8_t)(uint8_t)(uint32_t)v[i];
  return (__m128i)r;
}
inline int reduce_add_epi32(__m512i a) {  // wrapping 32-bit sum
  const i32x16 v = (i32x16)a;
  uint32_t s = 0;
  for (int i = 0; i < 16; ++i) s += (uint32_t)v[i];
  return (int)s;
}
inline __m512 cvtph_ps(__m256i a) {  // vcvtph2ps, through the F16C 8-lane form
  const __m256 lo = _mm256_cvtph_ps(_mm256_castsi256_si128(a));
  const __m256 hi = _mm256_cvtph_ps(_mm256_extracti128_si256(a, 1));
  f32x16 r;
  for (int i = 0; i < 8; ++i) { r[i] = lo[i]; r[i + 8] = hi[i]; }
  return (__m512)r;
}
inline __m512i cvtepu16_epi32(__m256i a) {  // vpmovzxwd
  const u16x16 v = (u16x16)a;
  i32x16 r;
  for (int i = 0; i < 16; ++i) r[i] = (int32_t)v[i];
  return (__m512i)r;
}
inline void stream_ps(float* p, __m512 a) {  // vmovntps faults unless 64-byte aligned
  if (reinterpret_cast<uintptr_t>(p) % 64 != 0) {
    std::fprintf(stderr, "gla_ext avx512 emulation: _mm512_stream_ps to unaligned %p\n",
                 static_cast<void*>(p));
    std::abort();
  }
  _mm512_storeu_ps(p, a);
}
}  // namespace gla_emu512
#pragma GCC pop_options

#define _mm512_cvtepi32_ps(a) ::gla_emu512::cvtepi32_ps(a)
#define _mm512_cvtps_epi32(a) ::gla_emu512::cvtps_epi32(a)
#define _mm512_cvtepi32_epi8(a) ::gla_emu512::cvtepi32_epi8(a)
#define _mm512_reduce_add_epi32(a) ::gla_emu512::reduce_add_epi32(a)
#define _mm512_cvtph_ps(a) ::gla_emu512::cvtph_ps(a)
#define _mm512_cvtepu16_epi32(a) ::gla_emu512::cvtepu16_epi32(a)
#define _mm512_stream_ps(p, a) ::gla_emu512::stream_ps(p, a)
#define _mm512_shuffle_f32x4(a, b, imm) simde_mm512_shuffle_f32x4(a, b, imm)
// AVX-VNNI's VEX vpdpbusd (the avx2 copy's VNNI kernels) computes what AVX512-VNNI's 256-bit
// form does (Intel SDM); SIMDe 0.7.4 has only the latter, on its own 256-bit type here (this
// header is read before the avx2 target is on), hence the copies. In this build the avx2
// copy's VNNI kernels run on SIMDe too (cpu_features.cpp: pick_cpu_vnni).
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace gla_emu512 {
inline __m256i dpbusd_avx(__m256i src, __m256i a, __m256i b) {
  simde__m256i s, x, y;
  __builtin_memcpy(&s, &src, 32);
  __builtin_memcpy(&x, &a, 32);
  __builtin_memcpy(&y, &b, 32);
  const simde__m256i r = simde_mm256_dpbusd_epi32(s, x, y);
  __m256i out;
  __builtin_memcpy(&out, &r, 32);
  return out;
}
}  // namespace gla_emu512
#pragma GCC pop_options
#define _mm256_dpbusd_avx_epi32(src, a, b) ::gla_emu512::dpbusd_avx(src, a, b)
