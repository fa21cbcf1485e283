// Which vector code path the CPU kernels run: the best the CPU supports, or the one named by
// GLA_EXT_CPU_ISA=generic|avx2|avx512 (read on every call, so tests and benchmarks can switch;
// asking for one the CPU lacks gives the best available). Shared by the chunked kernels
// (chunk.cpp) and the fused prefill (prefill.cpp).
#pragma once

namespace gla {

enum class CpuIsa { kGeneric = 0, kAvx2 = 1, kAvx512 = 2 };

// Defined in chunk.cpp.
CpuIsa pick_cpu_isa();

}  // namespace gla
