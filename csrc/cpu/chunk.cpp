// Chunked GLA on the CPU, forward and backward (the math and the numerics are described at
// the top of chunk_common.h).
//
// The kernel body (chunk_fwd.h, chunk_bwd.h) is compiled once per instruction set through
// cpu/simd/per_isa.h and picked at run time by pick_cpu_isa() (GLA_EXT_CPU_ISA overrides).
//
// Parallelism: at::parallel_for over (sequence, head) tasks; the forward also splits V into
// column tiles when there are fewer (sequence, head) pairs than threads (columns of the
// state are independent; the scores are recomputed per tile). Each thread keeps its scratch
// buffer between calls and runs with denormals flushed to zero (restored afterwards). Output
// rows are written with streaming stores where aligned (AVX2/AVX-512, float32).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>

#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define GLA_CHUNK_X86 1
#else
#define GLA_CHUNK_X86 0
#endif

#include "cpu_common.h"
#include "cpu/simd/denormals.h"
#include "gla.h"

#define GLA_ISA_NS chunk
#define GLA_ISA_BODY "cpu/chunk_impl.h"
#include "cpu/simd/per_isa.h"

namespace gla {

namespace {

using idx = int64_t;

struct ChunkKernels {
  size_t (*fwd_ws)(DType, idx, idx, idx);
  void (*fwd)(const GlaParams&, idx, idx, idx, idx, idx, void*);
  size_t (*bwd_ws)(DType, idx, idx, idx, idx);
  void (*bwd)(const GlaParams&, idx, idx, idx, idx, void*);
};

ChunkKernels pick_kernels() {
  const CpuIsa isa = pick_cpu_isa();
  return ChunkKernels{GLA_ISA_PICK(isa, chunk, fwd_workspace_bytes), GLA_ISA_PICK(isa, chunk, fwd_task),
                      GLA_ISA_PICK(isa, chunk, bwd_workspace_bytes), GLA_ISA_PICK(isa, chunk, bwd_task)};
}

// Scope of one thread's share of a kernel: denormals flushed to zero meanwhile, and a store
// fence at the end so the streaming stores of the output rows are ordered before the results
// are used (the fence runs before the member restores MXCSR).
struct ThreadScope {
  FlushDenormals flush;
#if GLA_CHUNK_X86
  ~ThreadScope() { _mm_sfence(); }
#endif
};

// Per-thread scratch, kept between calls (the OpenMP threads persist) so that the pages are
// not mapped and faulted in again on every call. Requests above kKeepBytes are served by a
// one-off allocation instead of growing the kept buffer.
class Workspace {
 public:
  static void* get(size_t bytes, std::unique_ptr<char[]>& oneoff) {
    constexpr size_t kKeepBytes = size_t(64) << 20;
    if (bytes > kKeepBytes) {
      oneoff.reset(new char[bytes]);
      return oneoff.get();
    }
    thread_local std::unique_ptr<char[]> kept;
    thread_local size_t kept_size = 0;
    if (bytes > kept_size) {
      kept.reset(new char[bytes]);
      kept_size = bytes;
    }
    return kept.get();
  }
};

idx chunk_len(const GlaParams& p) {
  constexpr idx kDefault = 64, kMax = 1024;
  if (p.chunk_size <= 0) return kDefault;
  return p.chunk_size < kMax ? p.chunk_size : kMax;
}

}  // namespace

void chunk_fwd_cpu(const GlaParams& p) {
  const ChunkKernels kern = pick_kernels();
  const idx C = chunk_len(p), NH = p.N * p.H;
  if (NH == 0) return;
  // Column tiles of V when (sequence, head) pairs alone cannot keep the threads busy.
  const idx threads = at::get_num_threads();
  idx tiles = 1;
  if (NH < threads) {
    tiles = (threads + NH - 1) / NH;
    const idx max_tiles = p.V / 32 > 1 ? p.V / 32 : 1;
    tiles = tiles < max_tiles ? tiles : max_tiles;
  }
  const idx tile_w = (((p.V + tiles - 1) / tiles) + 15) / 16 * 16;
  tiles = (p.V + tile_w - 1) / tile_w;
  const size_t ws_bytes = kern.fwd_ws(p.dtype, C, p.K, tile_w);
  at::parallel_for(0, NH * tiles, 1, [&](int64_t begin, int64_t end) {
    ThreadScope scope;
    std::unique_ptr<char[]> oneoff;
    void* buf = Workspace::get(ws_bytes, oneoff);
    for (int64_t task = begin; task < end; ++task) {
      const idx nh = task / tiles, tile = task % tiles;
      const idx v0 = tile * tile_w, v1 = v0 + tile_w < p.V ? v0 + tile_w : p.V;
      kern.fwd(p, nh / p.H, nh % p.H, v0, v1, C, buf);
    }
  });
}

void chunk_bwd_cpu(const GlaParams& p) {
  const ChunkKernels kern = pick_kernels();
  const idx C = chunk_len(p), NH = p.N * p.H;
  if (NH == 0) return;
  idx max_len = 0;
  for (idx n = 0; n < p.N; ++n) {
    int64_t row, start, stop;
    sequence_bounds(p, n, &row, &start, &stop);
    max_len = stop - start > max_len ? stop - start : max_len;
  }
  const idx max_chunks = (max_len + C - 1) / C;
  const size_t ws_bytes = kern.bwd_ws(p.dtype, C, p.K, p.V, max_chunks);
  at::parallel_for(0, NH, 1, [&](int64_t begin, int64_t end) {
    ThreadScope scope;
    std::unique_ptr<char[]> oneoff;
    void* buf = Workspace::get(ws_bytes, oneoff);
    for (int64_t task = begin; task < end; ++task) kern.bwd(p, task / p.H, task % p.H, C, max_chunks, buf);
  });
}

const char* chunk_cpu_description() {
  return "C++ chunked kernel (64-token chunks; AVX-512 / AVX2+FMA / generic micro-kernel "
         "picked at run time, GLA_EXT_CPU_ISA overrides)";
}

}  // namespace gla
