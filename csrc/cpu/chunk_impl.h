// Body of chunk.cpp's per-ISA copies (cpu/simd/per_isa.h): the chunked kernels' forward and
// backward. No include guard on purpose.

#include "cpu/chunk_fwd.h"
#include "cpu/chunk_bwd.h"
