// The per-ISA include pattern: compiles one kernel body three times, for plain x86-64
// (SSE2; or the target's baseline off x86), AVX2+FMA+F16C and AVX-512, each copy in its own
// namespace gla::<NS>_generic / _avx2 / _avx512 under `#pragma GCC target`. The build uses
// no -march flag, so the copy is picked at run time (GLA_ISA_PICK with pick_cpu_isa()).
//
// Use, at global scope of a .cpp, after the includes the body needs:
//   #define GLA_ISA_NS chunk                 // namespace prefix
//   #define GLA_ISA_BODY "cpu/chunk_impl.h"  // the body (no include guard)
//   #include "cpu/simd/per_isa.h"
//   ... GLA_ISA_PICK(pick_cpu_isa(), chunk, kernel_table) ...
// Inside each copy the body sees GLA_VEC_BYTES (16, 32, 64), GLA_ISA_FMA (0/1), the
// constant kIsa and the SIMD vocabulary of simd/vec.h. No include guard on purpose; the two
// macros are undefined at the end so the next kernel file can set its own.
#if !defined(GLA_ISA_NS) || !defined(GLA_ISA_BODY)
#error "define GLA_ISA_NS and GLA_ISA_BODY before including cpu/simd/per_isa.h"
#endif

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif
#if GLA_EMULATE_AVX512
#include "cpu/simd/avx512_emulated.h"
#endif

#include "cpu/simd/cpu_features.h"

// Vector types wider than the baseline ABI only pass between inlined helpers here.
#pragma GCC diagnostic ignored "-Wpsabi"

#define GLA_ISA_CAT_(a, b) a##_##b
#define GLA_ISA_CAT(a, b) GLA_ISA_CAT_(a, b)

#ifndef GLA_ISA_PICK
// &<ns>_<isa>::sym for the CpuIsa value isa (a function or an object of the body).
#if GLA_MULTI_ISA
#define GLA_ISA_PICK(isa, ns, sym)                                     \
  ((isa) == ::gla::CpuIsa::kAvx512 ? &::gla::ns##_avx512::sym          \
   : (isa) == ::gla::CpuIsa::kAvx2 ? &::gla::ns##_avx2::sym            \
                                    : &::gla::ns##_generic::sym)
#else
#define GLA_ISA_PICK(isa, ns, sym) (&::gla::ns##_generic::sym)
#endif
#endif

namespace gla {

namespace GLA_ISA_CAT(GLA_ISA_NS, generic) {
#define GLA_VEC_BYTES 16
#define GLA_ISA_FMA 0
constexpr CpuIsa kIsa = CpuIsa::kGeneric;
#include "cpu/simd/vec.h"
#include GLA_ISA_BODY
#undef GLA_ISA_FMA
#undef GLA_VEC_BYTES
}  // namespace GLA_ISA_CAT(GLA_ISA_NS, generic)

#if GLA_MULTI_ISA
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace GLA_ISA_CAT(GLA_ISA_NS, avx2) {
#define GLA_VEC_BYTES 32
#define GLA_ISA_FMA 1
constexpr CpuIsa kIsa = CpuIsa::kAvx2;
#include "cpu/simd/vec.h"
#include GLA_ISA_BODY
#undef GLA_ISA_FMA
#undef GLA_VEC_BYTES
}  // namespace GLA_ISA_CAT(GLA_ISA_NS, avx2)
#pragma GCC pop_options

#pragma GCC push_options
#if GLA_EMULATE_AVX512  // the _mm512_* names are SIMDe's portable code (avx512_emulated.h)
#pragma GCC target("avx2,fma,f16c")
#else
#pragma GCC target("avx512f,avx512vl,avx512bw,avx512dq,avx2,fma,f16c")
#endif
// GCC 12 flags the deliberately undefined operand inside its own AVX-512 shuffle intrinsics.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace GLA_ISA_CAT(GLA_ISA_NS, avx512) {
#define GLA_VEC_BYTES 64
#define GLA_ISA_FMA 1
constexpr CpuIsa kIsa = CpuIsa::kAvx512;
#include "cpu/simd/vec.h"
#include GLA_ISA_BODY
#undef GLA_ISA_FMA
#undef GLA_VEC_BYTES
}  // namespace GLA_ISA_CAT(GLA_ISA_NS, avx512)
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif  // GLA_MULTI_ISA

}  // namespace gla

#undef GLA_ISA_BODY
#undef GLA_ISA_NS
