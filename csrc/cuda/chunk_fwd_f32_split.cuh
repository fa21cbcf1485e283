// The split float32 forward (tf32 tensor cores), for long sequences with few sequences x heads
// (where the fused kernel of chunk_fwd_f32.cuh has too few blocks to fill the GPU; the
// launcher's want_split decides by the fused grid's wave fill):
//   1. state scan: the float32 backward's forward scan (f32_state_scan, chunk_bwd_f32.cuh)
//      walks each sequence's chunks from h0 and stores the state every chunk starts from in a
//      float32 workspace, then the final state (pools, V-first, in place: as the fused kernel
//      writes it). Grid N * H x 64 V columns x 64 key dims: the state's rows are independent,
//      so K = 128 takes two blocks (twice the blocks of the fused grid, half the work each).
//   2. chunk kernel: one block per (chunk, head) computes o from the stored state with the
//      fused kernel's per-chunk steps (stage_chunk, f32_scores, f32_gate_tiles,
//      f32_chunk_output), looping over the V tiles so the scores are computed once.
// The scan's update is the fused kernel's (f32_state_update, same operands and order) and the
// stored states are float32, so o and the final state are bitwise the fused path's.
#pragma once

#include "chunk_bwd_f32.cuh"
#include "chunk_fwd_f32.cuh"

namespace gla {
namespace {

constexpr int kF32ScanKT = 64;  // key dims per scan block

// grid x = N * H, y = V tiles of kF32BV, z = key tiles of kF32ScanKT.
template <int kPasses>
__global__ void __launch_bounds__(kF32Threads,
                                  min_blocks_per_sm(F32ScanLayout<kF32ScanKT>::kBytes, 2))
    gla_chunk_state_scan_f32_kernel(const ChunkArgs a) {
  f32_state_scan<kF32ScanKT, kPasses, false>(a, static_cast<int>(blockIdx.z) * kF32ScanKT);
}

// grid x = workspace chunk (an upper bound with cu_seqlens), y = head.
template <int KT, int kPasses>
__global__ void __launch_bounds__(kF32Threads, 1)
    gla_chunk_fwd_f32_split_kernel(const ChunkArgs a) {
  using L = F32Layout<KT>;
  extern __shared__ __align__(16) unsigned char smem[];
  const F32Tiles<KT> tiles(smem);
  float *const sQ = tiles.q, *const sK = tiles.k, *const sB = tiles.b, *const sV = tiles.v;
  float *const sA = tiles.a, *const sTot = tiles.tot;
  float* const sS = sB;  // the state, once the gates are used up

  const int tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31;
  const int H = a.H, K = a.K, V = a.V;
  const int64_t chunk = blockIdx.x;
  const int h = blockIdx.y;
  int64_t n = 0, c = 0;
  if (!locate_chunk(a, chunk, &n, &c)) return;  // past the last chunk
  // a padding pool row runs no tokens (o stays zero; the scan stored no states for it)
  if (fused_state_rows(a, n, h).padding) return;
  int64_t row, start, end;
  seq_range(a, n, &row, &start, &end);
  const ChunkPos cp = chunk_pos(a, row, h, start + c * kC, end);
  const int64_t v_tok = static_cast<int64_t>(H) * V;

  stage_chunk<KT, kF32BV, L::kQKStride, L::kBStride, L::kVStride, kF32Threads>(
      sQ, sK, sB, sV, sTot, a, cp, 0, tid);
  f32_scores<KT, kPasses, L>(sQ, sK, sB, sA, a.scale, tid, warp, lane);
  __syncthreads();  // raw q and the gates are read above; q is gated in place below
  f32_gate_tiles<KT, L, false>(sQ, sK, sB, nullptr, a.scale, tid);  // k~ feeds no update here
  __syncthreads();  // the gates are used up: the states go over them

  const float* const v = static_cast<const float*>(a.v);
  const int64_t state_off = (chunk * H + h) * static_cast<int64_t>(K) * V;
  const bool vec_s = (a.flags & kVecS) != 0;
  for (int v0 = 0; v0 < V; v0 += kF32BV) {
    if (v0 > 0) {  // the first V tile came with q, k, g
      load_tile<kF32BV, L::kVStride, kF32Threads>(sV, v, cp.v_base, v_tok, cp.len, v0, V,
                                                  (a.flags & kVecV) != 0, tid);
    }
    // S0 rows [0, KT) x columns [v0, v0 + 64), zero outside K x V
    load_tile<kF32BV, L::kSStride, kF32Threads, KT>(sS, a.fstates, state_off, V, K, v0, V,
                                                    vec_s, tid);
    cp_async_wait_all();
    __syncthreads();
    f32_chunk_output<KT, kPasses, L>(sQ, sA, sS, sV, static_cast<float*>(a.o) + cp.v_base,
                                     cp.len, v0, V, v_tok, 16 * warp, lane);
    __syncthreads();  // sV and sS are refilled for the next V tile
  }
}

}  // namespace
}  // namespace gla
