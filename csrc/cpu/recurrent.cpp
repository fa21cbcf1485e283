// Fused recurrent GLA on the CPU, forward and backward. The body (recurrent_impl.h) is
// compiled once per instruction set through cpu/simd/per_isa.h and picked at run time by
// pick_cpu_isa() (GLA_EXT_CPU_ISA overrides). One task per (sequence, head); each thread's
// share runs with denormals flushed to zero (decaying states would otherwise reach them).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_common.h"
#include "cpu/simd/denormals.h"
#include "gla.h"

#define GLA_ISA_NS recurrent
#define GLA_ISA_BODY "cpu/recurrent_impl.h"
#include "cpu/simd/per_isa.h"

namespace gla {
namespace {

template <typename Run>
void run_tasks(const GlaParams& p, Run run) {
  at::parallel_for(0, p.N * p.H, 1, [&](int64_t begin, int64_t end) {
    FlushDenormals flush;
    run(p, begin, end);
  });
}

}  // namespace

void recurrent_fwd_cpu(const GlaParams& p) {
  run_tasks(p, GLA_ISA_PICK(pick_cpu_isa(), recurrent, fwd_tasks));
}

void recurrent_bwd_cpu(const GlaParams& p) {
  run_tasks(p, GLA_ISA_PICK(pick_cpu_isa(), recurrent, bwd_tasks));
}

}  // namespace gla
