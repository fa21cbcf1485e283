// The per-ISA copies of the engine's loops (isa_body.h), and the pick of one copy.
#include "cpu/engine/engine.h"
#include "cpu/engine/engine_plan.h"

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <omp.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>

#include "cpu/cpu_common.h"
#include "gla.h"

#define GLA_ISA_NS engine
#define GLA_ISA_BODY "cpu/engine/isa_body.h"
#include "cpu/simd/per_isa.h"

namespace gla {

const EngineKernels* engine_kernels(int isa) {
  return GLA_ISA_PICK(static_cast<CpuIsa>(isa), engine, kKernels);
}

}  // namespace gla
