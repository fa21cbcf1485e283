// The chunked backward for float32 q/k/v on the tensor cores (tf32): the bf16 / fp16
// backward's structure (chunk_bwd.cu: math at its top) with float32 tiles, float32 states in
// the workspace and every product on mma.m16n8k8 tf32, one pass or 3xTF32 (kPasses, as the
// float32 forward: chunk_fwd_f32.cuh).
//
//   1. state scans, one launch: per (sequence, head, 64 V columns), z = 0 the forward scan
//      (k, v, h0: S0 of every chunk), z = 1 the gradient scan walking backwards (q, dO, dht:
//      dS_end of every chunk, then dh0). 4 warps of 16 V columns, the state in float32
//      registers, f32_state_update (the forward's update); the states go to the workspace in
//      float32 (twice the 16-bit backward's workspace, which rounds them to the input dtype).
//   2. chunk kernel: one block of 8 warps per (chunk, head), warp (rb, half) as in the 16-bit
//      kernel. q and k tiles float32; A from f32_scores (the forward's scores); a V loop in
//      tiles of 16 columns for dA, dv and the inter-chunk parts of dq and dk; then the
//      intra-chunk parts (off-diagonal blocks on the tensor cores with the gates folded into
//      both factors through a reference token, both exponents <= 0; diagonal blocks in
//      float32 FMA) and dg, with the 16-bit kernel's shared steps (chunk_bwd_common.cuh).
//
// Shared memory of the chunk kernel: q / k / gates / A tiles plus a region R that holds the
// V-loop tiles and later the q dq - k dk terms; k * exp2(b_last - b) (dv's second factor)
// lives where q was during the V loop, and q is reloaded after it. 159 KB at K = 128 (fits
// sm_80's 163 KB), 93 KB at K = 64 (sm_86/89's 99 KB), so the float32 backward takes the same
// K range as the float32 forward (chunk_cuda_max_k).
#pragma once

#include "chunk_bwd_common.cuh"
#include "chunk_fwd_f32.cuh"

namespace gla {
namespace {

constexpr int kF32TileV = 16;  // V columns per chunk-kernel tile

template <int KT>
struct F32BwdHead {
  static constexpr int kQKStride = KT + 4;        // q (k * exp2(b_last - b) in the V loop), k
  static constexpr int kBStride = KT + 8;         // cumulative gates
  static constexpr int kAStride = kC + 4;         // A, then dA over it
  static constexpr int kDAStride = kAStride;
  static constexpr int kVStride = kF32TileV + 4;  // v, dO tiles: [kC][.]
  static constexpr int kSStride = kF32TileV + 8;  // S0, dS tiles: [KT][.]
  static constexpr int kDStride = KT + 8;         // q dq - k dk (and the dq / dk exchange)
  static constexpr int kQOff = 0;
  static constexpr int kKOff = kQOff + kC * kQKStride * 4;
  static constexpr int kBOff = kKOff + kC * kQKStride * 4;
  static constexpr int kAOff = kBOff + kC * kBStride * 4;
  static constexpr int kROff = kAOff + kC * kAStride * 4;
  static constexpr int kDOff = kROff;  // region R after the loop: q dq - k dk
  static_assert(kKOff % 16 == 0 && kBOff % 16 == 0 && kAOff % 16 == 0,
                "tiles must start 16-byte aligned");
};
template <int KT>
struct F32BwdLayout : F32BwdHead<KT>,
                      BwdRegions<KT, F32BwdHead<KT>::kROff, F32BwdHead<KT>::kVStride,
                                 F32BwdHead<KT>::kSStride, 4, kC * F32BwdHead<KT>::kDStride * 4> {
};
static_assert(F32BwdLayout<128>::kBytes <= 163 * 1024, "K = 128 must fit sm_80 (163 KB)");
static_assert(F32BwdLayout<64>::kBytes <= 99 * 1024, "K = 64 must fit sm_86/sm_89 (99 KB)");

// ---- launch 1: the state scans --------------------------------------------------------
template <int KT>
struct F32ScanLayout {
  static constexpr int kXStride = KT + 4;      // gated key-side tile (k or q)
  static constexpr int kYStride = kF32BV + 4;  // value-side tile (v or dO)
  static constexpr int kBStride = KT + 8;      // cumulative gates, then the state staged
  static constexpr int kSStride = kF32BV + 4;  // the state over the gates: [KT][.]
  static constexpr int kXOff = 0;
  static constexpr int kYOff = kXOff + kC * kXStride * 4;
  static constexpr int kBOff = kYOff + kC * kYStride * 4;
  static constexpr int kLastOff = kBOff + kC * kBStride * 4;  // b_last: [KT]
  static constexpr int kTotOff = kLastOff + KT * 4;
  static constexpr int kBytes = kTotOff + gate_scratch_floats<KT>() * 4;
  static_assert(KT * kSStride <= kC * kBStride, "the state must fit where the gates were");
  static_assert(kYOff % 16 == 0 && kBOff % 16 == 0 && kLastOff % 16 == 0 &&
                    (kSStride * 4) % 16 == 0,
                "alignment");
};

// kGrad = false: x = k, y = v, from h0, stores S0 of every chunk into a.fstates, then the
//                final state into ht when ht is not null (the split forward,
//                chunk_fwd_f32_split.cuh: h0 / ht by pool rows and strides as the fused
//                kernel reads and writes them; a padding row runs no chunks).
// kGrad = true:  x = q, y = dO, backwards from dht, stores dS_end of every chunk into
//                a.fdstates, then dh0.
// S^T <- S^T * exp2(b_last) + y^T @ x~ with x~ = k * exp2(b_last - b) or q * exp2(b) * scale.
// The block covers key dims [k0, k0 + KT) (rows of the state are independent; the backward
// takes all K in one block, k0 = 0) and V columns [blockIdx.y * 64, + 64).
template <int KT, int kPasses, bool kGrad>
__device__ __forceinline__ void f32_state_scan(const ChunkArgs& a, int k0) {
  using L = F32ScanLayout<KT>;
  extern __shared__ __align__(16) unsigned char smem[];
  float* const sX = reinterpret_cast<float*>(smem + L::kXOff);
  float* const sY = reinterpret_cast<float*>(smem + L::kYOff);
  float* const sB = reinterpret_cast<float*>(smem + L::kBOff);
  float* const sS = sB;
  float* const sLast = reinterpret_cast<float*>(smem + L::kLastOff);
  float* const sTot = reinterpret_cast<float*>(smem + L::kTotOff);

  const int tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31;
  const int g8 = lane >> 2;
  const int H = a.H, K = a.K, V = a.V;
  const int h = static_cast<int>(blockIdx.x % static_cast<unsigned>(H));
  const int64_t n = blockIdx.x / static_cast<unsigned>(H);
  const int v0 = blockIdx.y * kF32BV;
  const int wc = 16 * warp;
  const int vc_lo = v0 + wc + g8;
  int64_t row, start, end;
  seq_range(a, n, &row, &start, &end);
  const StateRows rows = fused_state_rows(a, n, h);  // dense K-first rows for the backward
  if (!kGrad && rows.padding) end = start;
  const int64_t nchunks = num_chunks(start, end);
  const int64_t chunk0 = nchunks > 0 ? first_chunk(a, n) : 0;  // no offsets without tokens
  const int64_t state_base = (n * H + h) * static_cast<int64_t>(K) * V;  // dense, K-first

  float s[KT / 8][4];
#pragma unroll
  for (int nt = 0; nt < KT / 8; ++nt)
#pragma unroll
    for (int r = 0; r < 4; ++r) s[nt][r] = 0.0f;
  if constexpr (kGrad) {
    if (a.dht != nullptr)
      for_state_slice(s, k0, vc_lo, K, V, lane,
                      [&](float& x, int64_t off) { x = a.dht[state_base + off]; });
  } else if (a.h0 != nullptr && !rows.padding) {
    load_h0(s, a, rows.h0_base, vc_lo, lane, k0);
  }

  const float* const x = static_cast<const float*>(kGrad ? a.q : a.k);
  const float* const y = static_cast<const float*>(kGrad ? a.dout : a.v);
  float* const saved = kGrad ? a.fdstates : a.fstates;
  const int64_t qk_tok = static_cast<int64_t>(H) * K;
  const int64_t v_tok = static_cast<int64_t>(H) * V;
  // a warp whose 16 columns all lie past V skips its state update (warp-uniform)
  const bool warp_active = v0 + wc < V;

  for (int64_t ci = 0; ci < nchunks; ++ci) {
    const int64_t c = kGrad ? nchunks - 1 - ci : ci;
    const int64_t c0 = start + c * kC;
    const int len = static_cast<int>(end - c0 < kC ? end - c0 : kC);
    const int64_t qk_base = ((row * a.T + c0) * H + h) * static_cast<int64_t>(K);
    const int64_t v_base = ((row * a.T + c0) * H + h) * static_cast<int64_t>(V);
    load_tile<KT, L::kXStride, kF32Threads>(sX, x, qk_base, qk_tok, len, k0, K,
                                            (a.flags & kVecQK) != 0, tid);
    load_tile<KT, L::kBStride, kF32Threads>(sB, a.g, qk_base, qk_tok, len, k0, K,
                                            (a.flags & kVecG) != 0, tid);
    load_tile<kF32BV, L::kYStride, kF32Threads>(sY, y, v_base, v_tok, len, v0, V,
                                                (a.flags & kVecV) != 0, tid);
    cp_async_wait_all();
    __syncthreads();
    gate_cumsum<KT, L::kBStride, kF32Threads>(sB, sTot, tid);
    {
      const float* const blast = sB + (kC - 1) * L::kBStride;  // rows past len repeat it
      for (int e = tid; e < kC * KT; e += kF32Threads) {
        const int t = e / KT, kd = e % KT;
        const float b = sB[t * L::kBStride + kd];
        float* const xp = sX + t * L::kXStride + kd;
        *xp = kGrad ? *xp * exp2f(b) * a.scale : *xp * exp2f(blast[kd] - b);
      }
      for (int kd = tid; kd < KT; kd += kF32Threads) sLast[kd] = blast[kd];
    }
    __syncthreads();  // the gates are used up: the state is staged over them
    state_to_smem<KT / 8, L::kSStride>(s, sS, wc, lane);
    __syncthreads();
    if (chunk0 + c < a.ws_chunks) {  // always, for offsets the wrapper accepts
      float* const dst = saved + ((chunk0 + c) * H + h) * static_cast<int64_t>(K) * V +
                         static_cast<int64_t>(k0) * V;
      const int rows_here = K - k0 < KT ? K - k0 : KT;  // key dims of this block
      if (a.flags & kVecS) {  // V % 8 == 0: whole 4-float vectors are inside or outside
        constexpr int kPerRow = kF32BV / 4;
        const int vl = (tid % kPerRow) * 4;
        if (v0 + vl < V)
          for (int kd = tid / kPerRow; kd < rows_here; kd += kF32Threads / kPerRow)
            *reinterpret_cast<float4*>(dst + static_cast<int64_t>(kd) * V + v0 + vl) =
                *reinterpret_cast<const float4*>(sS + kd * L::kSStride + vl);
      } else {
        for (int i = tid; i < rows_here * kF32BV; i += kF32Threads) {
          const int kd = i / kF32BV, vl = i % kF32BV;
          if (v0 + vl < V) dst[static_cast<int64_t>(kd) * V + v0 + vl] = sS[kd * L::kSStride + vl];
        }
      }
    }
    if (warp_active)
      f32_state_update<KT, kPasses, L::kYStride, L::kXStride>(s, sY, sX, sLast, wc, lane);
    __syncthreads();  // the tiles and the staged state are refilled next chunk
  }
  if constexpr (kGrad)
    for_state_slice(s, k0, vc_lo, K, V, lane,
                    [&](float& x, int64_t off) { a.dh0[state_base + off] = x; });
  else if (a.ht != nullptr)
    store_ht(s, a, rows.ht_base, vc_lo, lane, rows.padding, k0);
}

// grid x = N * H, y = V tiles of kF32BV, z = 2 (forward scan, gradient scan): independent.
template <int KT, int kPasses>
__global__ void __launch_bounds__(kF32Threads, min_blocks_per_sm(F32ScanLayout<KT>::kBytes, 2))
    gla_chunk_state_scans_f32_kernel(const ChunkArgs a) {
  if (blockIdx.z == 0) {
    f32_state_scan<KT, kPasses, false>(a, 0);
  } else {
    f32_state_scan<KT, kPasses, true>(a, 0);
  }
}

// rowsum(S0 * dS) of this V tile added into sRow[key] (float32, fixed order): kTPR
// consecutive threads per key row, reduced by shuffles.
template <int KT, typename L>
__device__ __forceinline__ void add_state_rowsums_f32(const float* sS, const float* sDS,
                                                      float* sRow, int tid) {
  constexpr int kTPR = kBwdThreads / KT;      // 2 or 4
  constexpr int kCols = kF32TileV / kTPR;     // 8 or 4
  const int kd = tid / kTPR, cc = (tid % kTPR) * kCols;
  float dot = 0.0f;
#pragma unroll
  for (int j = 0; j < kCols; ++j)
    dot = fmaf(sS[kd * L::kSStride + cc + j], sDS[kd * L::kSStride + cc + j], dot);
#pragma unroll
  for (int m = kTPR / 2; m >= 1; m >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, m);
  if (tid % kTPR == 0) sRow[kd] += dot;
}

// The off-diagonal blocks of the intra-chunk dq or dk for one warp's rows r0.. and key dims
// kh0..: out += exp2(+-(b_row - b_ref)) * (the product of fa and fb over tokens
// [k_begin, k_end), warp_mma_tiles), the gates folded into both factors through the reference
// token ref so that both exponents are <= 0 (row_after_ref: rows after ref, i.e. dq).
// (A function, not a generic lambda: cicc 13.0 crashed on the lambda.)
template <int KT, int kPasses, typename L, typename FA, typename FB>
__device__ __forceinline__ void add_off_diagonal(float (&out)[KT / 16][4], const float* sB,
                                                 int ref, int k_begin, int k_end,
                                                 bool row_after_ref, int r0, int kh0, int lane,
                                                 FA&& fa, FB&& fb) {
  constexpr int kKN = KT / 16;
  const int g8 = lane >> 2, c4 = lane & 3;
  float tmp[kKN][4] = {};
  warp_mma_tiles<kPasses, kKN>(tmp, k_begin, k_end, lane, fa, fb);
  const float* const br = sB + ref * L::kBStride;
#pragma unroll
  for (int j = 0; j < kKN; ++j) {
    const int kd = kh0 + 8 * j + 2 * c4;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const float b = sB[(r0 + g8 + 8 * (r >> 1)) * L::kBStride + kd + (r & 1)];
      const float bref = br[kd + (r & 1)];
      out[j][r] += tmp[j][r] * exp2f(row_after_ref ? b - bref : bref - b);
    }
  }
}

// ---- launch 2: everything per chunk ------------------------------------------------------
// Grid: x = chunk index (over all sequences; blocks past the last chunk return), y = head.
template <int KT, int kPasses>
__global__ void __launch_bounds__(kBwdThreads, 1) gla_chunk_bwd_f32_kernel(const ChunkArgs a) {
  using L = F32BwdLayout<KT>;
  constexpr int kKH = KT / 2;   // key dims per warp half
  constexpr int kKN = kKH / 8;  // their 8-wide accumulator tiles
  extern __shared__ __align__(16) unsigned char smem[];
  float* const sQ = reinterpret_cast<float*>(smem + L::kQOff);
  float* const sKb = sQ;  // k * exp2(b_last - b) during the V loop
  float* const sK = reinterpret_cast<float*>(smem + L::kKOff);
  float* const sB = reinterpret_cast<float*>(smem + L::kBOff);
  float* const sA = reinterpret_cast<float*>(smem + L::kAOff);
  float* const sDA = sA;  // after the V loop
  float* const sV = reinterpret_cast<float*>(smem + L::kVOff);
  float* const sDO = reinterpret_cast<float*>(smem + L::kDOOff);
  float* const sS = reinterpret_cast<float*>(smem + L::kSOff);
  float* const sDS = reinterpret_cast<float*>(smem + L::kDSOff);
  float* const sD = reinterpret_cast<float*>(smem + L::kDOff);
  float* const sTot = reinterpret_cast<float*>(smem + L::kTotOff);
  float* const sRow = reinterpret_cast<float*>(smem + L::kRowOff);
  float* const sPart = reinterpret_cast<float*>(smem + L::kPartOff);

  const int tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31;
  const int rb = warp & 3;     // token rows [16 rb, 16 rb + 16)
  const int half = warp >> 2;  // key dims [half * KT/2, ...), dA tokens / dv columns by half
  const int g8 = lane >> 2, c4 = lane & 3;
  const int H = a.H, K = a.K, V = a.V;
  const int h = blockIdx.y;
  const float scale = a.scale;
  BwdChunk cp;
  if (!bwd_chunk(a, blockIdx.x, h, &cp)) return;  // past the last chunk
  const int len = cp.len;
  const int64_t qk_tok = static_cast<int64_t>(H) * K;
  const int64_t v_tok = static_cast<int64_t>(H) * V;
  const float* const q = static_cast<const float*>(a.q);
  const float* const k = static_cast<const float*>(a.k);
  const bool vec_qk = (a.flags & kVecQK) != 0;

  // ---- q, k, gates; cumulative gates; scores A; Kb = k * exp2(b_last - b) over q ----------
  load_tile<KT, L::kQKStride, kBwdThreads>(sQ, q, cp.qk_base, qk_tok, len, 0, K, vec_qk, tid);
  load_tile<KT, L::kQKStride, kBwdThreads>(sK, k, cp.qk_base, qk_tok, len, 0, K, vec_qk, tid);
  load_tile<KT, L::kBStride, kBwdThreads>(sB, a.g, cp.qk_base, qk_tok, len, 0, K,
                                          (a.flags & kVecG) != 0, tid);
  for (int i = tid; i < KT; i += kBwdThreads) sRow[i] = 0.0f;
  cp_async_wait_all();
  __syncthreads();
  gate_cumsum<KT, L::kBStride, kBwdThreads>(sB, sTot, tid);
  f32_scores<KT, kPasses, L, kBwdThreads>(sQ, sK, sB, sA, scale, tid, warp, lane);
  __syncthreads();  // raw q is read by the scores; Kb goes over it
  const float* const blast = sB + (kC - 1) * L::kBStride;  // rows past len repeat b_last
  for (int e = tid; e < kC * KT; e += kBwdThreads) {
    const int t = e / KT, kd = e % KT;
    sKb[t * L::kQKStride + kd] =
        sK[t * L::kQKStride + kd] * exp2f(blast[kd] - sB[t * L::kBStride + kd]);
  }

  // ---- V loop: dA, dv, and the inter-chunk parts of dq and dk ---------------------------
  float dA[4][4] = {};    // rows 16rb + g (+8), tokens 32 half + 8j + 2c (+1)
  float dq[kKN][4] = {};  // rows 16rb + g (+8), key dims kKH half + 8j + 2c (+1)
  float dk[kKN][4] = {};
  const int kh0 = kKH * half;
  const int r0 = 16 * rb;
  const float* const v = static_cast<const float*>(a.v);
  const float* const dout = static_cast<const float*>(a.dout);
  const bool vec_v = (a.flags & kVecV) != 0, vec_s = (a.flags & kVecS) != 0;
  for (int v0 = 0; v0 < V; v0 += kF32TileV) {
    load_tile<kF32TileV, L::kVStride, kBwdThreads>(sV, v, cp.v_base, v_tok, len, v0, V, vec_v,
                                                   tid);
    load_tile<kF32TileV, L::kVStride, kBwdThreads>(sDO, dout, cp.v_base, v_tok, len, v0, V,
                                                   vec_v, tid);
    // S0 and dS rows [0, KT) x columns [v0, v0 + 16) (zero outside K x V)
    load_tile<kF32TileV, L::kSStride, kBwdThreads, KT>(sS, a.fstates, cp.state_off, V, K, v0,
                                                       V, vec_s, tid);
    load_tile<kF32TileV, L::kSStride, kBwdThreads, KT>(sDS, a.fdstates, cp.state_off, V, K,
                                                       v0, V, vec_s, tid);
    cp_async_wait_all();
    __syncthreads();  // (the first time: Kb complete too)
    add_state_rowsums_f32<KT, L>(sS, sDS, sRow, tid);
    // dA += dO @ v^T for token blocks <= rb (causal; a warp whose tokens all lie after its
    // rows skips, warp-uniformly)
    if (2 * half <= rb)
      warp_mma_tiles<kPasses, 4>(
          dA, 0, kF32TileV, lane, [&](int i, int kk) { return sDO[(r0 + i) * L::kVStride + kk]; },
          [&](int kk, int j) { return sV[(32 * half + j) * L::kVStride + kk]; });
    // dq += dO @ S0^T, dk += v @ dS^T (this warp's key-dim half)
    warp_mma_tiles<kPasses, kKN>(
        dq, 0, kF32TileV, lane, [&](int i, int kk) { return sDO[(r0 + i) * L::kVStride + kk]; },
        [&](int kk, int j) { return sS[(kh0 + j) * L::kSStride + kk]; });
    warp_mma_tiles<kPasses, kKN>(
        dk, 0, kF32TileV, lane, [&](int i, int kk) { return sV[(r0 + i) * L::kVStride + kk]; },
        [&](int kk, int j) { return sDS[(kh0 + j) * L::kSStride + kk]; });
    // dv = A^T @ dO (tokens t >= s) + Kb @ dS: rows 16rb.., columns v0 + 8 half + [0, 8)
    {
      float acc[1][4] = {{0.0f, 0.0f, 0.0f, 0.0f}};
      warp_mma_tiles<kPasses, 1>(
          acc, r0, kC, lane, [&](int i, int kk) { return sA[kk * L::kAStride + r0 + i]; },
          [&](int kk, int j) { return sDO[kk * L::kVStride + 8 * half + j]; });
      warp_mma_tiles<kPasses, 1>(
          acc, 0, KT, lane, [&](int i, int kk) { return sKb[(r0 + i) * L::kQKStride + kk]; },
          [&](int kk, int j) { return sDS[kk * L::kSStride + 8 * half + j]; });
      float* const dvp = static_cast<float*>(a.dv) + cp.v_base;
      const int vc = v0 + 8 * half + 2 * c4;
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int t = r0 + g8 + 8 * hr;
        if (t >= len) continue;
        if (vc < V) dvp[t * v_tok + vc] = acc[0][2 * hr];
        if (vc + 1 < V) dvp[t * v_tok + vc + 1] = acc[0][2 * hr + 1];
      }
    }
    __syncthreads();  // tiles are reloaded (or the region reused) next
  }

  // ---- raw q back over Kb; gate the inter-chunk parts; dA -> sDA over A ------------------
  load_tile<KT, L::kQKStride, kBwdThreads>(sQ, q, cp.qk_base, qk_tok, len, 0, K, vec_qk, tid);
  bwd_gate_inter<float, KT, L>(dq, dk, dA, sB, sK, sPart, sDA, scale, rb, half, lane);
  cp_async_wait_all();
  __syncthreads();

  // ---- intra-chunk dq and dk, off-diagonal blocks, on the tensor cores ------------------
  const float* const bk = sB + kh0;  // this warp's key dims
  // dq_t += exp2(b_t - b_r) sum_{s < r} dA[t][s] (k_s exp2(b_r - b_s)), r = 16 rb
  if (rb > 0)
    add_off_diagonal<KT, kPasses, L>(
        dq, sB, r0, 0, r0, true, r0, kh0, lane,
        [&](int i, int kk) { return sDA[(r0 + i) * L::kDAStride + kk]; },
        [&](int kk, int j) {
          return sK[kk * L::kQKStride + kh0 + j] *
                 exp2f(bk[r0 * L::kBStride + j] - bk[kk * L::kBStride + j]);
        });
  // dk_s += exp2(b_r - b_s) sum_{t > r} dA[t][s] (q_t exp2(b_t - b_r)), r = 16 rb + 15
  if (rb < 3)
    add_off_diagonal<KT, kPasses, L>(
        dk, sB, r0 + 15, r0 + 16, kC, false, r0, kh0, lane,
        [&](int i, int kk) { return sDA[kk * L::kDAStride + r0 + i]; },
        [&](int kk, int j) {
          return sQ[kk * L::kQKStride + kh0 + j] *
                 exp2f(bk[kk * L::kBStride + j] - bk[(r0 + 15) * L::kBStride + j]);
        });

  // ---- diagonal blocks (dq, dk final); dq, dk out, q dq - k dk -> sD; dg ------------------
  bwd_diag_blocks<float, KT, L>(dq, dk, sQ, sK, sB, sDA, sD, tid, rb, half, lane);
  bwd_write_dq_dk<float, KT, L>(dq, dk, sQ, sK, sD, a, cp, rb, half, lane);
  bwd_dg<KT, L>(sD, sB, sRow, sPart, sTot, a, cp, tid);
}

}  // namespace
}  // namespace gla
