// PLACEHOLDER until the chunked CPU kernel lands (issue 3): runs the fused recurrence.
#include "gla.h"
namespace gla {
void chunk_fwd_cpu(const GlaParams& p) { recurrent_fwd_cpu(p); }
void chunk_bwd_cpu(const GlaParams& p) { recurrent_bwd_cpu(p); }
const char* chunk_cpu_description() { return "C++ fused recurrent kernel (chunked kernel pending)"; }
}  // namespace gla
