// The CPU instruction-set layer, host side: what the CPU (and the OS) lets this process run,
// and which compiled copy of the vector kernels to use. This is the only place that reads
// GLA_EXT_CPU_ISA and GLA_EXT_CPU_VNNI. See docs/cpu_isa.md.
#pragma once

#include <string>

// Whether the per-ISA copies (simd/per_isa.h) exist in this build: x86 with GCC, whose
// `#pragma GCC target` compiles AVX2 / AVX-512 code without a -march flag.
#if (defined(__x86_64__) || defined(__i386__)) && defined(__GNUC__) && !defined(__clang__)
#define GLA_MULTI_ISA 1
#else
#define GLA_MULTI_ISA 0
#endif

// 1 only in the test build whose AVX-512 copy runs on SIMDe (setup.py GLA_EXT_EMULATE_AVX512,
// simd/avx512_emulated.h, tools/avx512_emulated_check.sh).
#ifndef GLA_EMULATE_AVX512
#define GLA_EMULATE_AVX512 0
#endif
#if GLA_EMULATE_AVX512 && !GLA_MULTI_ISA
#error "GLA_EMULATE_AVX512 needs the per-ISA build (x86-64, GCC)"
#endif

namespace gla {

// Each flag means "usable by this process": the CPU reports it (cpuid) and the OS saves the
// register state it needs (xgetbv XCR0). AMX additionally needs Linux's per-process
// permission for the tile data state, requested once during detection.
struct CpuFeatures {
  bool avx2 = false, fma = false, f16c = false;
  bool avx512f = false, avx512bw = false, avx512vl = false, avx512dq = false;
  bool avx512_bf16 = false, avx512_vnni = false, avx_vnni = false;
  bool amx_tile = false, amx_bf16 = false, amx_int8 = false;
  bool os_avx = false, os_avx512 = false, os_amx = false;  // XCR0 state bits
  bool amx_permitted = false;                               // arch_prctl(ARCH_REQ_XCOMP_PERM)
};

// Detected once (thread-safe static).
const CpuFeatures& cpu_features();

// The compiled vector code paths, narrowest first.
enum class CpuIsa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

// The widest copy this CPU runs: avx512 needs AVX-512 F/BW/VL/DQ plus the avx2 level;
// avx2 needs AVX2, FMA and F16C.
CpuIsa best_cpu_isa();

// The copy to run now: best_cpu_isa(), or the one GLA_EXT_CPU_ISA=generic|avx2|avx512
// names (auto or unset: the best). Read on every call, so tests and benchmarks can switch.
// Asking for one the CPU lacks gives the best available; any other value throws
// c10::ValueError (ValueError in Python) naming the variable.
CpuIsa pick_cpu_isa();

const char* cpu_isa_name(CpuIsa isa);

// Whether copy `isa`'s quantized integer kernels use VNNI's vpdpbusd (csrc/cpu/
// linear_qdot_tile.h): avx512 where the CPU has AVX512-VNNI, avx2 where it has AVX-VNNI,
// generic never. GLA_EXT_CPU_VNNI=off turns it off (auto or unset: on where present); any
// other value throws c10::ValueError naming the variable. Read on every call, like
// GLA_EXT_CPU_ISA. The emulated test build (GLA_EMULATE_AVX512) emulates both with SIMDe,
// so there they count as present and the VNNI kernels run on any AVX2 CPU.
bool pick_cpu_vnni(CpuIsa isa);

// The name of the VNNI extension copy `isa` would use ("AVX512-VNNI", "AVX-VNNI"), or null.
const char* cpu_vnni_name(CpuIsa isa);

// One line for `python -m gla_ext info`, e.g. "avx2 (best avx2; AVX2 FMA F16C)".
std::string cpu_isa_summary();

}  // namespace gla
