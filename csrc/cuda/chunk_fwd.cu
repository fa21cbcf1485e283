// Chunked GLA forward on tensor cores (bf16 / fp16 inputs, float32 state and accumulation).
// Torch-free: raw pointers and a stream.
//
// Math (docs/design.md "The math"), per sequence n and head h, state S is K x V in float32:
//   S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,   o_t = scale * q_t S_t
// Inside a chunk of C tokens that starts from state S0, with b_t = cumulative sum of g over
// the chunk's tokens up to and including t (one value per key dimension):
//   o_t   = scale * (q_t * exp(b_t)) S0 + sum_{s <= t} A[t][s] v_s
//   A[t][s] = scale * sum_k q_t[k] k_s[k] exp(b_t[k] - b_s[k])            (s <= t)
//   S_end = diag(exp(b_last)) S0 + sum_s (k_s * exp(b_last - b_s))^T v_s
// Every exponent above is <= 0 for gates g <= 0, so nothing can overflow; g is clamped at
// kGateFloor per token first, so g = -inf gives exact zeros (never -inf - -inf = NaN).
//
// Work split, fused path: one thread block (4 warps) per (sequence n, head h, tile of
// kBV = 64 columns of V); the block walks the sequence's chunks of kC = 64 tokens in order.
// Split path (few sequences x heads, see the launcher): the state scan of chunk_scan.cuh
// first stores every chunk's start state, then one block per (chunk, head, V tile) runs the
// steps below once, starting from that state and skipping step 6. Per chunk:
//   1. q, k (C x KT), g (C x KT, float) and v (C x 64) tiles -> shared memory (cp.async),
//      rows past the sequence end and key dims past K are zero (g = 0 there).
//   2. b = cumulative sum of max(g, floor) * log2(e) down each key column (exp2 domain).
//   3. Scores A (C x C, stored as the input dtype) by sub-blocks of 16 tokens (the paper's
//      secondary chunking):
//        off-diagonal pairs (row block i > column block j) on tensor cores, with the gates
//        folded into both factors relative to r = last token of block j:
//        q_t * exp2(b_t - b_r) and k_s * exp2(b_r - b_s), both exponents <= 0;
//        diagonal 16 x 16 blocks on tensor cores too, by dyadic levels of 8, 4, 2, 1 tokens
//        (chunk_common.cuh: diag_block_scores), every exponent <= 0.
//   4. In place: q <- q * exp2(b) * scale, k <- k * exp2(b_last - b) (input dtype).
//   5. Warp w owns V columns [16w, 16w + 16) of the tile and keeps S^T for them in mma
//      accumulators (float32, never rounded between chunks). It computes
//        o = q~ @ S (S fed to the tensor cores rounded to the input dtype) + A @ v,
//      writes o, then S^T <- S^T * exp2(b_last) + v^T @ k~ on the tensor cores.
// Tensor-core instruction: mma.sync.aligned.m16n8k16 (row.col, f32 accumulate), operands
// loaded with ldmatrix (.trans where the operand is stored the other way round).
//
// Numerics: the state is float32 across chunks and every product accumulates in float32;
// the tensor-core operands are rounded to the input dtype: the gated q and k, the scores A,
// and the state S for o = q~ @ S. Against the float64 recurrence (CPU emulation, random
// inputs) that gives relative errors of about 2.5e-3 for bf16 (o) and 3e-4 for fp16,
// within docs/design.md's 1e-2 / 5e-3; rounding k~ to bf16 puts ~1e-3 on the final state. With
// fp16 a state entry beyond 65504 would overflow its operand (o itself is fp16 too).
//
// GLA_CHUNK_EMULATE: tests/cuda_emu includes this file in a host program that supplies the
// CUDA types and runs each block's threads as fibers, with the warp-level primitives
// (ldmatrix, mma, cp.async) emulated from the PTX ISA's definitions. Only the primitives
// and the CUDA runtime calls below are swapped out; the kernel body is compiled as is.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "chunk_common.cuh"
#include "chunk_fwd_f32.cuh"
#include "chunk_fwd_f32_split.cuh"
#include "chunk_scan.cuh"
#include "gla.h"

namespace gla {
namespace {

constexpr int kBV = 64;         // V columns per thread block
constexpr int kWarps = 4;       // warp w owns V columns [16w, 16w + 16) of the tile
constexpr int kThreads = 32 * kWarps;

// Shared memory layout of one block. Rows are padded by 8 elements so that the 8 rows an
// ldmatrix (or a fragment load) touches fall in different banks, and rows stay 16-byte
// aligned for cp.async and ldmatrix.
template <int KT>
struct SmemLayout {
  static constexpr int kQKStride = KT + 8;   // q, k tiles: [kC][kQKStride] 16-bit
  static constexpr int kBStride = KT + 8;    // cumulative gates: [kC][kBStride] float
  static constexpr int kVStride = kBV + 8;   // v tile: [kC][kVStride] 16-bit
  static constexpr int kAStride = kC + 8;    // scores: [kC][kAStride] 16-bit
  static constexpr int kQOff = 0;
  static constexpr int kKOff = kQOff + kC * kQKStride * 2;
  static constexpr int kBOff = kKOff + kC * kQKStride * 2;
  static constexpr int kVOff = kBOff + kC * kBStride * 4;
  static constexpr int kAOff = kVOff + kC * kVStride * 2;
  static constexpr int kTotOff = kAOff + kC * kAStride * 2;  // gate scan scratch (float)
  static constexpr int kBytes = kTotOff + gate_scratch_floats<KT>() * 4;
  static_assert(kKOff % 16 == 0 && kBOff % 16 == 0 && kVOff % 16 == 0 && kAOff % 16 == 0,
                "tiles must start 16-byte aligned");
  static_assert((kQKStride * 2) % 16 == 0 && (kBStride * 4) % 16 == 0 &&
                (kVStride * 2) % 16 == 0 && (kAStride * 2) % 16 == 0,
                "rows must stay 16-byte aligned");
};
static_assert(SmemLayout<128>::kBytes <= 99 * 1024, "shared memory over the 99 KB opt-in limit");

// ---- the kernel ----------------------------------------------------------------------
// Fragment conventions: see chunk_common.cuh.
// kFromStates = false (fused): grid x = N * H, y = V tiles; the block walks all chunks of its
//   sequence carrying the state in registers, and writes the final state.
// kFromStates = true (split): grid x = workspace chunk (an upper bound), y = H; the block does
//   one chunk, all V tiles, starting from the states the scan stored for it.
// Minimum blocks per SM: 3 at K=64 and 2 at K=128 where shared memory lets them fit (sm_90:
// 55 KB and 88 KB per block), fewer where it does not (sm_80: 2 and 1; min_blocks_per_sm);
// without a bound ptxas capped registers low and spilled (sass_stats.py).
template <typename T, int KT, bool kFromStates>
__global__ void __launch_bounds__(kThreads, min_blocks_per_sm(SmemLayout<KT>::kBytes,
                                                              KT <= 64 ? 3 : 2))
    gla_chunk_fwd_kernel(const ChunkArgs a) {
  using E = Elem<T>;
  using L = SmemLayout<KT>;
  constexpr int kNT = KT / 8;  // 8-wide key-dim tiles of the state

  extern __shared__ __align__(16) unsigned char smem[];
  uint16_t* const sQ = reinterpret_cast<uint16_t*>(smem + L::kQOff);
  uint16_t* const sK = reinterpret_cast<uint16_t*>(smem + L::kKOff);
  float* const sB = reinterpret_cast<float*>(smem + L::kBOff);
  uint16_t* const sV = reinterpret_cast<uint16_t*>(smem + L::kVOff);
  uint16_t* const sA = reinterpret_cast<uint16_t*>(smem + L::kAOff);
  float* const sTot = reinterpret_cast<float*>(smem + L::kTotOff);

  const int tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31;
  const int g8 = lane >> 2, c4 = lane & 3;
  // ldmatrix row/column of this lane inside a 16x16 tile (see the conventions above)
  const int lm_row = (lane & 7) + ((lane >> 3) & 1) * 8;
  const int lm_col = (lane >> 4) * 8;

  const int H = a.H, K = a.K, V = a.V;
  const float scale = a.scale;
  int64_t n = 0, row = 0, start = 0, end = 0, chunk = 0;
  int h = 0, v_first = 0;
  if constexpr (kFromStates) {
    int64_t c = 0;
    chunk = blockIdx.x;
    if (!locate_chunk(a, chunk, &n, &c)) return;  // past the last chunk (the grid is a bound)
    h = blockIdx.y;
    seq_range(a, n, &row, &start, &end);
    start += c * kC;  // just this chunk
    if (end > start + kC) end = start + kC;
  } else {
    h = static_cast<int>(blockIdx.x % static_cast<unsigned>(H));
    n = blockIdx.x / static_cast<unsigned>(H);
    v_first = blockIdx.y * kBV;
    seq_range(a, n, &row, &start, &end);
  }
  // V tiles of this block: the fused path has one (blockIdx.y); the split path loops over all
  // of them, so the scores are computed once per chunk.
  const int v_end = kFromStates ? V : v_first + 1;

  // S^T for this warp's 16 V columns: s[nt] is the m16n8 accumulator tile with rows = V
  // columns v0 + 16*warp + {g, g+8} and columns = key dims 8*nt + 2c + {0, 1}.
  float s[kNT][4];
  // pool rows (fused_state_rows): a padding row runs no tokens
  const StateRows rows = fused_state_rows(a, n, h);
  const bool padding = rows.padding;
  if (padding) end = start;
  const uint16_t* const saved =
      kFromStates ? a.states + (chunk * H + h) * static_cast<int64_t>(K) * V : nullptr;
  auto init_state = [&](int v0) {
    for (int nt = 0; nt < kNT; ++nt)
      for (int r = 0; r < 4; ++r) s[nt][r] = 0.0f;
    const int vc_lo = v0 + 16 * warp + g8;  // V column of s[.][0..1]; s[.][2..3] is +8
    if constexpr (kFromStates) {  // stored rounded to T: the operand the fused path uses
      for_state_slice(s, 0, vc_lo, K, V, lane,
                      [&](float& x, int64_t off) { x = E::to_float(saved[off]); });
    } else if (a.h0 != nullptr && !padding) {
      load_h0(s, a, rows.h0_base, vc_lo, lane);
    }
  };
  if constexpr (!kFromStates) init_state(v_first);

  const uint16_t* const v = static_cast<const uint16_t*>(a.v);
  const int64_t v_tok = static_cast<int64_t>(H) * V;  // elements between tokens in v/o

  for (int64_t c0 = start; c0 < end; c0 += kC) {
    const ChunkPos cp = chunk_pos(a, row, h, c0, end);
    const int len = cp.len;
    const int64_t v_base = cp.v_base;

    // ---- 1. tiles -> shared memory; 2. cumulative gates, exp2 domain ------------------------
    stage_chunk<KT, kBV, L::kQKStride, L::kBStride, L::kVStride, kThreads>(sQ, sK, sB, sV, sTot,
                                                                          a, cp, v_first, tid);

    // ---- 3. intra-chunk scores A -> sA (input dtype) ----------------------------------------
    chunk_scores<T, KT, kWarps, L>(sQ, sK, sB, sA, scale, warp, lane);
    __syncthreads();  // raw q, k are read by every warp above; transformed in place below

    // ---- 4. q <- q * exp2(b) * scale, k <- k * exp2(b_last - b) --------------------------
    {
      constexpr int kPerRow = KT / 8;
      const float* const blast = sB + (kC - 1) * L::kBStride;  // rows past len repeat b_last
      for (int i = tid; i < kC * kPerRow; i += kThreads) {
        const int t = i / kPerRow, kb = (i % kPerRow) * 8;
        uint4* const qp = reinterpret_cast<uint4*>(sQ + t * L::kQKStride + kb);
        uint4* const kp = reinterpret_cast<uint4*>(sK + t * L::kQKStride + kb);
        const float* const bt = sB + t * L::kBStride + kb;
        uint4 qv = *qp, kv = *kp;
        uint32_t* const qw = reinterpret_cast<uint32_t*>(&qv);
        uint32_t* const kw = reinterpret_cast<uint32_t*>(&kv);
#pragma unroll
        for (int x = 0; x < 4; ++x) {
          const float2 b = *reinterpret_cast<const float2*>(bt + 2 * x);
          const float2 bl = *reinterpret_cast<const float2*>(blast + kb + 2 * x);
          float q0, q1, k0, k1;
          E::unpack2(qw[x], q0, q1);
          E::unpack2(kw[x], k0, k1);
          qw[x] = E::pack2(q0 * exp2f(b.x) * scale, q1 * exp2f(b.y) * scale);
          if constexpr (!kFromStates)  // k~ only feeds the state update
            kw[x] = E::pack2(k0 * exp2f(bl.x - b.x), k1 * exp2f(bl.y - b.y));
        }
        *qp = qv;
        if constexpr (!kFromStates) *kp = kv;
      }
    }
    __syncthreads();

    for (int v0 = v_first; v0 < v_end; v0 += kBV) {
      if constexpr (kFromStates) {
        if (v0 != v_first) {  // the first V tile came with q, k, g
          load_tile<kBV, L::kVStride, kThreads>(sV, v, v_base, v_tok, len, v0, V,
                                                (a.flags & kVecV) != 0, tid);
          cp_async_wait_all();
          __syncthreads();
        }
        init_state(v0);
      }

      // ---- 5. o = q~ @ S + A @ v for this warp's 16 V columns ------------------------------
      {
        float o[4][2][4];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int nh = 0; nh < 2; ++nh)
#pragma unroll
            for (int r = 0; r < 4; ++r) o[i][nh][r] = 0.0f;

        // inter-chunk: B[k][n] = S[key dim][V column]; s holds S^T, so the B fragment
        // (rows 2c.., col g) of key dims [16kk, 16kk+16) is s[2kk][0..1], s[2kk+1][0..1]
        // for V columns 16w + g, and s[..][2..3] for V columns 16w + 8 + g.
#pragma unroll
        for (int kk = 0; kk < KT / 16; ++kk) {
          const uint32_t b00 = E::pack2(s[2 * kk][0], s[2 * kk][1]);
          const uint32_t b01 = E::pack2(s[2 * kk + 1][0], s[2 * kk + 1][1]);
          const uint32_t b10 = E::pack2(s[2 * kk][2], s[2 * kk][3]);
          const uint32_t b11 = E::pack2(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            uint32_t af[4];
            ldsm_x4(af, sQ + (16 * i + lm_row) * L::kQKStride + 16 * kk + lm_col);
            E::mma(o[i][0], af, b00, b01);
            E::mma(o[i][1], af, b10, b11);
          }
        }

        // v fragments of this warp's columns, token block j: {vf[j][0], vf[j][1]} is the B
        // fragment for columns 16w..16w+7, {vf[j][2], vf[j][3]} for 16w+8..16w+15.
        uint32_t vf[4][4];
#pragma unroll
        for (int j = 0; j < 4; ++j)
          ldsm_x4_trans(vf[j], sV + (16 * j + lm_row) * L::kVStride + 16 * warp + lm_col);

        // intra-chunk: causal, so row block i only needs token blocks j <= i
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int j = 0; j <= i; ++j) {
            uint32_t af[4];
            ldsm_x4(af, sA + (16 * i + lm_row) * L::kAStride + 16 * j + lm_col);
            E::mma(o[i][0], af, vf[j][0], vf[j][1]);
            E::mma(o[i][1], af, vf[j][2], vf[j][3]);
          }
        }

        // write o: rows 16i + g (+8), V columns v0 + 16w + 8nh + 2c (+1)
        T* const out = static_cast<T*>(a.o);
        const bool vec_o = (a.flags & kVecO) != 0;
        if (vec_o && len == kC && v0 + 16 * warp + 16 <= V) {  // the usual case: no tests
          uint16_t* const dst0 = reinterpret_cast<uint16_t*>(out) + v_base + g8 * v_tok +
                                 v0 + 16 * warp + 2 * c4;
#pragma unroll
          for (int i = 0; i < 4; ++i)
#pragma unroll
            for (int nh = 0; nh < 2; ++nh)
#pragma unroll
              for (int hr = 0; hr < 2; ++hr)
                *reinterpret_cast<uint32_t*>(dst0 + (16 * i + 8 * hr) * v_tok + 8 * nh) =
                    E::pack2(o[i][nh][2 * hr], o[i][nh][2 * hr + 1]);
        } else {  // a partial chunk, odd V or V columns past the end
  #pragma unroll
          for (int i = 0; i < 4; ++i) {
  #pragma unroll
            for (int nh = 0; nh < 2; ++nh) {
              const int vc = v0 + 16 * warp + 8 * nh + 2 * c4;
  #pragma unroll
              for (int hr = 0; hr < 2; ++hr) {
                const int t = 16 * i + g8 + 8 * hr;
                if (t >= len || vc >= V) continue;
                const float x0 = o[i][nh][2 * hr], x1 = o[i][nh][2 * hr + 1];
                uint16_t* const dst = reinterpret_cast<uint16_t*>(out) + v_base + t * v_tok + vc;
                if (vec_o) {  // V even, so vc even < V implies vc + 1 < V
                  *reinterpret_cast<uint32_t*>(dst) = E::pack2(x0, x1);
                } else {
                  dst[0] = E::from_float(x0);
                  if (vc + 1 < V) dst[1] = E::from_float(x1);
                }
              }
            }
          }
        }

        // ---- 6. S^T <- S^T * exp2(b_last) + v^T @ k~ --------------------------------------
        if constexpr (!kFromStates)
          state_update<T, KT, L::kQKStride>(s, vf, sK, sB + (kC - 1) * L::kBStride, lane);
      }
      if constexpr (kFromStates) __syncthreads();  // sV is refilled for the next V tile
    }
    __syncthreads();  // every warp is done with this chunk's tiles before they are reloaded
  }

  if constexpr (!kFromStates)  // final state (the split path's scan writes it)
    store_ht(s, a, rows.ht_base, v_first + 16 * warp + g8, lane, padding);
}

// ---- launcher ------------------------------------------------------------------------
// Two ways to run the same arithmetic (bitwise the same o and final state):
//   fused: one block per (sequence, head, V tile) walks every chunk with the state in
//     registers; reads each input once, but has only N * H * ceil(V / 64) blocks.
//   split: the state scan (chunk_scan.cuh, also used by the backward) stores the state each
//     chunk starts from in a workspace (rounded to the input dtype, as the fused path rounds
//     it for the tensor cores), then one block per (chunk, head, V tile).
//     Costs the workspace traffic, but fills the GPU when there are few sequences and heads.
struct FwdGrid {
  bool split = false;
  bool empty = false;           // nothing to launch at all
  unsigned fused_x = 0, fused_y = 0;
  unsigned scan_x = 0, scan_y = 0, scan_z = 0;
  unsigned chunk_x = 0, chunk_y = 0, chunk_z = 0;
};

// The fraction of the GPU's block slots (SMs x resident blocks per SM) that `blocks` fill over
// the waves they take: 1.0 when the last wave is full, low when few blocks leave SMs idle.
double wave_fill(int64_t blocks, int64_t slots) {
  if (blocks <= 0 || slots <= 0) return 1.0;
  const int64_t waves = (blocks + slots - 1) / slots;
  return static_cast<double>(blocks) / static_cast<double>(waves * slots);
}

// float32: split when the fused grid fills less than this share of the block slots. From the
// modelled H200 times (benchmarks/results/gpu_model.md, docs/cuda_float32.md): the fused
// kernel's time over the split path's is about 0.7 ("high") to 0.9 ("highest") divided by
// the fill, so 0.8 picks the faster path in 5 of the 6 modelled (shape, precision) cells and
// costs 5% in the sixth. A first GPU run (bench_gpu_f32.py times both paths) should set it.
constexpr double kF32SplitBelowFill = 0.8;

// The split path's choice: GLA_EXT_CHUNK_FWD=fused|split forces it ("auto" or unset: the rule).
// Both need sequences spanning at least two chunks on average (one chunk has nothing to
// split). 16-bit: split when the fused grid (N * H * ceil(V / 64) blocks) has fewer than two
// blocks per SM (a first guess, to be tuned on a GPU: benchmarks/bench_gpu.py times both).
// float32: split when the fused grid fills under kF32SplitBelowFill of the SMs' block slots,
// with f32_blocks_per_sm resident fused float32 blocks per SM (the launcher asks the CUDA
// occupancy API: 1 at K = 128, 2 at K <= 64 on sm_90). -1: the variable holds something else.
int want_split(const GlaParams& p, int sm_count, int f32_blocks_per_sm) {
  if (const char* force = std::getenv("GLA_EXT_CHUNK_FWD")) {
    if (std::strcmp(force, "split") == 0) return p.T > 0 ? 1 : 0;
    if (std::strcmp(force, "fused") == 0) return 0;
    if (force[0] != '\0' && std::strcmp(force, "auto") != 0) return -1;
  }
  if (p.T <= 0 || p.N * p.H == 0) return 0;
  static_assert(kF32BV == kBV, "both fused grids have N * H * ceil(V / 64) blocks");
  const int64_t fused_blocks = p.N * p.H * ((p.V + kBV - 1) / kBV);
  const int64_t per_row = (p.T + kC - 1) / kC;  // chunks per row; N rows share it with varlen
  const bool long_enough = p.cu_seqlens != nullptr ? per_row >= 2 * p.N : per_row >= 2;
  if (!long_enough) return 0;
  if (p.dtype == DType::kFloat32)
    return wave_fill(fused_blocks, static_cast<int64_t>(sm_count) * f32_blocks_per_sm) <
                   kF32SplitBelowFill
               ? 1 : 0;
  return fused_blocks < 2 * static_cast<int64_t>(sm_count) ? 1 : 0;
}

// Checks p and fills the kernel arguments and grids; split: p.workspace holds the chunk
// states. Returns an error message, or nullptr.
const char* prepare(const GlaParams& p, bool split, ChunkArgs* args, FwdGrid* grid) {
  *grid = FwdGrid{};
  if (const char* err = check_chunk_params(p, "chunk_fwd_cuda")) return err;
  if (p.N * p.H == 0) {  // no sequences or no heads: nothing to write
    grid->empty = true;
    return nullptr;
  }
  if (p.ht == nullptr) return "chunk_fwd_cuda: ht (final state) must not be null";
  if (p.T > 0 && (p.q == nullptr || p.k == nullptr || p.v == nullptr || p.g == nullptr ||
                  p.o == nullptr))
    return "chunk_fwd_cuda: q, k, v, g and o must not be null";
  if (split && (p.T == 0 || p.workspace == nullptr))
    return "chunk_fwd_cuda: the split path needs tokens and a workspace";

  *args = common_args(p);
  args->o = p.o;
  args->ht = static_cast<float*>(p.ht);
  if (split) {  // workspace: [chunk offsets (varlen)] [states]
    args->chunk_offsets =
        p.cu_seqlens != nullptr ? reinterpret_cast<int64_t*>(p.workspace) : nullptr;
    args->states = reinterpret_cast<uint16_t*>(p.workspace + offsets_floats(p));
  }
  if (p.V % 2 == 0 && aligned(p.o, 4)) args->flags |= kVecO;
  if (split && p.V % 8 == 0 && aligned(p.workspace, 16)) args->flags |= kVecS;
  const unsigned vtiles = static_cast<unsigned>((p.V + kBV - 1) / kBV);
  grid->split = split;
  grid->fused_x = static_cast<unsigned>(p.N * p.H);
  grid->fused_y = vtiles;
  grid->scan_x = static_cast<unsigned>(p.N * p.H);
  grid->scan_y = static_cast<unsigned>((p.V + kScanV - 1) / kScanV);
  grid->scan_z = static_cast<unsigned>((p.K + kScanK - 1) / kScanK);
  grid->chunk_x = static_cast<unsigned>(max_chunks(p));
  grid->chunk_y = static_cast<unsigned>(p.H);
  grid->chunk_z = 1;  // the split kernel loops over the V tiles
  return nullptr;
}

// prepare for float32 inputs (chunk_fwd_f32.cuh, chunk_fwd_f32_split.cuh): split exactly
// when p.workspace is set (split_workspace_floats: [chunk offsets (varlen)] [S0: chunks x H x
// K x V float32]). The split grids: scan N * H x V tiles x key tiles of kF32ScanKT; chunk
// kernel chunks x H, looping over the V tiles.
const char* prepare_f32_grid(const GlaParams& p, ChunkArgs* args, FwdGrid* grid) {
  *grid = FwdGrid{};
  if (const char* err = prepare_f32(p, args, &grid->fused_x, &grid->fused_y, &grid->empty))
    return err;
  if (grid->empty || p.workspace == nullptr) return nullptr;
  if (p.T == 0) return "chunk_fwd_f32_cuda: the split path needs tokens";
  grid->split = true;
  args->chunk_offsets =
      p.cu_seqlens != nullptr ? reinterpret_cast<int64_t*>(p.workspace) : nullptr;
  args->fstates = p.workspace + offsets_floats(p);
  if (p.V % 8 == 0 && aligned(p.workspace, 16)) args->flags |= kVecS;
  grid->scan_x = grid->fused_x;
  grid->scan_y = grid->fused_y;
  grid->scan_z = static_cast<unsigned>((p.K + kF32ScanKT - 1) / kF32ScanKT);
  grid->chunk_x = static_cast<unsigned>(max_chunks(p));
  grid->chunk_y = static_cast<unsigned>(p.H);
  grid->chunk_z = 1;
  return nullptr;
}

// Workspace floats of the split path: [chunk offsets (varlen)] [chunk start states], 16-bit
// (two per float) or float32.
int64_t split_workspace_floats(const GlaParams& p) {
  const int64_t chunks = max_chunks(p);
  return offsets_floats(p) + (p.dtype == DType::kFloat32
                                  ? f32_state_floats(chunks, p.H, p.K, p.V)
                                  : (state_elems(chunks, p.H, p.K, p.V) + 1) / 2);
}

#ifndef GLA_CHUNK_EMULATE
constexpr const char* kOp = "chunk_fwd_cuda";

// The split path's first launch with cu_seqlens: each sequence's first workspace chunk.
const char* launch_offsets(const ChunkArgs& args, cudaStream_t stream, const char* op) {
  if (args.chunk_offsets == nullptr) return nullptr;
  return launch_chunk_kernel(gla_chunk_offsets_kernel, dim3(1), kOffsetThreads, kOffsetSmem,
                             stream, args, op, "gla_chunk_offsets_kernel");
}

template <typename T, int KT>
const char* launch_all(const ChunkArgs& args, const FwdGrid& grid, cudaStream_t stream) {
  constexpr int kSmem = SmemLayout<KT>::kBytes;
  if (!grid.split)
    return launch_chunk_kernel(gla_chunk_fwd_kernel<T, KT, false>,
                               dim3(grid.fused_x, grid.fused_y), kThreads, kSmem, stream, args,
                               kOp, "gla_chunk_fwd_kernel (fused)");
  if (const char* e = launch_offsets(args, stream, kOp)) return e;
  if (const char* e = launch_chunk_kernel(
          scan_vec(args) ? gla_chunk_state_scan_kernel<T, false, true>
                         : gla_chunk_state_scan_kernel<T, false, false>,
          dim3(grid.scan_x, grid.scan_y, grid.scan_z),
          kScanThreads, ScanLayout::kBytes, stream, args, kOp, "gla_chunk_state_scan_kernel"))
    return e;
  return launch_chunk_kernel(gla_chunk_fwd_kernel<T, KT, true>,
                             dim3(grid.chunk_x, grid.chunk_y, grid.chunk_z), kThreads, kSmem,
                             stream, args, kOp, "gla_chunk_fwd_kernel (split)");
}
#endif  // GLA_CHUNK_EMULATE

}  // namespace

#ifndef GLA_CHUNK_EMULATE
namespace {
// Resident fused float32 blocks per SM (want_split's float32 rule), from the occupancy API for
// the 3xTF32 instantiation: the passes are not known here, and both instantiations hold the
// same number (benchmarks/results/sass_stats.md, sm_90a: 2 at K <= 64, 1 at K = 128, set by
// shared memory). 1 if the query fails: the launch then reports the error.
int f32_fused_blocks_per_sm(const GlaParams& p) {
  if (p.dtype != DType::kFloat32) return 1;
  int blocks = 0;
  const cudaError_t err =
      p.K <= 64 ? resident_blocks_once(reinterpret_cast<const void*>(
                                           gla_chunk_fwd_f32_kernel<64, 3>),
                                       kF32Threads, F32Layout<64>::kBytes, &blocks)
                : resident_blocks_once(reinterpret_cast<const void*>(
                                           gla_chunk_fwd_f32_kernel<128, 3>),
                                       kF32Threads, F32Layout<128>::kBytes, &blocks);
  if (err != cudaSuccess) (void)cudaGetLastError();
  return err == cudaSuccess && blocks > 0 ? blocks : 1;
}
}  // namespace

int64_t chunk_fwd_cuda_workspace_floats(const GlaParams& p) {
  int sm_count = 0;
  if (check_device(kOp, &sm_count) != nullptr) return 0;  // chunk_fwd_cuda reports it
  const int split = want_split(p, sm_count, f32_fused_blocks_per_sm(p));
  if (split < 0) return -1;
  return split ? split_workspace_floats(p) : 0;
}

// Runs split exactly when the caller passed the workspace chunk_fwd_cuda_workspace_floats
// asked for (the policy lives there only).
const char* chunk_fwd_cuda(const GlaParams& p, void* stream_ptr) {
  int sm_count = 0;
  if (const char* err = check_device(kOp, &sm_count)) return err;
  ChunkArgs args;
  FwdGrid grid;
  const bool split = p.workspace != nullptr;
  if (const char* err = prepare(p, split, &args, &grid)) return err;
  if (grid.empty) return nullptr;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const bool bf16 = p.dtype == DType::kBFloat16;
  if (p.K <= 64)
    return bf16 ? launch_all<__nv_bfloat16, 64>(args, grid, stream)
                : launch_all<__half, 64>(args, grid, stream);
  return bf16 ? launch_all<__nv_bfloat16, 128>(args, grid, stream)
              : launch_all<__half, 128>(args, grid, stream);
}

template <int KT, int kPasses>
const char* launch_f32(const ChunkArgs& args, const FwdGrid& grid, cudaStream_t stream) {
  constexpr const char* op = "chunk_fwd_f32_cuda";
  if (!grid.split)
    return launch_chunk_kernel(gla_chunk_fwd_f32_kernel<KT, kPasses>,
                               dim3(grid.fused_x, grid.fused_y), kF32Threads,
                               F32Layout<KT>::kBytes, stream, args, op,
                               "gla_chunk_fwd_f32_kernel");
  if (const char* e = launch_offsets(args, stream, op)) return e;
  if (const char* e = launch_chunk_kernel(gla_chunk_state_scan_f32_kernel<kPasses>,
                                          dim3(grid.scan_x, grid.scan_y, grid.scan_z),
                                          kF32Threads, F32ScanLayout<kF32ScanKT>::kBytes,
                                          stream, args, op, "gla_chunk_state_scan_f32_kernel"))
    return e;
  return launch_chunk_kernel(gla_chunk_fwd_f32_split_kernel<KT, kPasses>,
                             dim3(grid.chunk_x, grid.chunk_y),
                             kF32Threads, F32Layout<KT>::kBytes, stream, args, op,
                             "gla_chunk_fwd_f32_split_kernel");
}

const char* chunk_fwd_f32_cuda(const GlaParams& p, int passes, void* stream_ptr) {
  int sm_count = 0;
  if (const char* err = check_device("chunk_fwd_f32_cuda", &sm_count)) return err;
  if (passes != 1 && passes != 3) return "chunk_fwd_f32_cuda: passes must be 1 or 3";
  ChunkArgs args;
  FwdGrid grid;
  if (const char* err = prepare_f32_grid(p, &args, &grid)) return err;
  if (grid.empty) return nullptr;
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (p.K <= 64)
    return passes == 1 ? launch_f32<64, 1>(args, grid, stream)
                       : launch_f32<64, 3>(args, grid, stream);
  return passes == 1 ? launch_f32<128, 1>(args, grid, stream)
                     : launch_f32<128, 3>(args, grid, stream);
}
#endif  // GLA_CHUNK_EMULATE

}  // namespace gla
