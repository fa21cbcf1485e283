// Which vector code path the CPU kernels run: CpuIsa and pick_cpu_isa() of the instruction-set
// layer (csrc/cpu/simd/cpu_features.h, the one place that reads GLA_EXT_CPU_ISA).
#pragma once

#include "cpu/simd/cpu_features.h"
