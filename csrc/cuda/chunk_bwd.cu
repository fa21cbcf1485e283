// Chunked GLA backward on tensor cores (bf16 / fp16 inputs, float32 states and accumulation).
// Torch-free: raw pointers and a stream.
//
// Per sequence and head, chunks of kC = 64 tokens; chunk c starts from state S0 (K x V) and
// dS is the gradient arriving on its end state; b = in-chunk cumulative gates (exp2 domain
// here), b_last its last row, A the scores of chunk_common.cuh (scale included).
//   dA[t][s] = dO_t . v_s                                        (s <= t)
//   dv       = A^T dO + (k * exp2(b_last - b)) dS
//   dq_t     = scale exp2(b_t) * (dO_t S0^T) + scale sum_{s<=t} dA[t][s] k_s exp2(b_t - b_s)
//   dk_s     = exp2(b_last - b_s) * (v_s dS^T) + scale sum_{t>=s} dA[t][s] q_t exp2(b_t - b_s)
//   dg_t     = sum_{t' >= t in the chunk} (q dq - k dk)_{t'} + rowsum(S_end * dS)
// The last term is the reverse cumulative sum of (q dq - k dk) over all later chunks plus the
// final-state term, collapsed onto this chunk's end state (scaling S_end is the same as
// shifting every later log-gate), and computed from what the chunk has:
//   rowsum(S_end * dS) = exp2(b_last) * rowsum(S0 * dS) + sum_s k_s * exp2(b_last - b_s)(v_s dS^T).
// So dg needs nothing from other chunks and no cancellation builds up along the sequence.
//
// Two launches (three with cu_seqlens: gla_chunk_offsets_kernel first numbers the chunks):
//   1. state scans (chunk_scan.cuh), per (sequence, head, 128 V columns, 64 key dims), both in
//      one grid: forward, walking the chunks in order and storing S0 of every chunk (input
//      dtype) into the workspace (the forward's state recurrence without the outputs); gradient,
//      walking backwards with q and dO: dS_start = exp2(b_last) * dS_end +
//      (scale q exp2(b))^T dO, storing dS_end of every chunk, starting from dht (or 0); what
//      is left at the start is dh0.
//   2. chunk kernel: one block (8 warps) per (chunk, head), every chunk in parallel. Warp
//      (r, h2) = (warp % 4, warp / 4) owns token rows [16r, 16r + 16) and half h2 of the key
//      dims (or of the 64-column V tile). It loops over V in tiles of 64 for dA, dv and the
//      inter-chunk parts of dq and dk, then adds the intra-chunk parts by sub-blocks of 16
//      tokens: off-diagonal blocks on tensor cores with the gates folded into both factors
//      relative to a token between them (both exponents <= 0), diagonal blocks in float32.
// Every matrix product runs on mma.sync m16n8k16 with float32 accumulation; the operands are
// rounded to the input dtype (states, dA, gated q/k), as in the forward kernel.
//
// Memory: the workspace holds two states per chunk and head in the input dtype (half of what
// flash-linear-attention's backward keeps in float32); nothing else is kept between launches.
// The rowsum(S0 * dS) term of dg therefore uses the rounded states (float32 products).
//
// GLA_CHUNK_EMULATE: tests/cuda_emu/chunk_bwd_emu.cpp runs these kernels on a CPU.
#include <cstdint>
#include <cstdio>
#include <cstring>

#include "chunk_bwd_common.cuh"
#include "chunk_bwd_f32.cuh"
#include "chunk_common.cuh"
#include "chunk_scan.cuh"
#include "gla.h"

namespace gla {
namespace {

constexpr int kTileV = 64;                // V columns per chunk-kernel tile

// Shared memory of the chunk kernel. Region R holds the V-loop tiles (v, dO, S0, dS as the
// input dtype), and after the loop is reused for dA (float) and the dg terms (float).
template <int KT>
struct BwdHead {
  static constexpr int kQKStride = KT + 8;    // q, k, k * exp2(b_last - b): 16-bit
  static constexpr int kBStride = KT + 8;     // cumulative gates: float
  static constexpr int kAStride = kC + 8;     // scores A: 16-bit
  static constexpr int kVStride = kTileV + 8; // v, dO tiles: [kC][kVStride] 16-bit
  static constexpr int kSStride = kTileV + 8; // S0, dS tiles: [KT][kSStride] 16-bit
  static constexpr int kDAStride = kC + 8;    // dA: float (+8: conflict-free float2 reads)
  static constexpr int kDStride = KT + 8;     // q dq - k dk: float
  static constexpr int kQOff = 0;
  static constexpr int kKOff = kQOff + kC * kQKStride * 2;
  static constexpr int kKbOff = kKOff + kC * kQKStride * 2;
  static constexpr int kBOff = kKbOff + kC * kQKStride * 2;
  static constexpr int kAOff = kBOff + kC * kBStride * 4;
  static constexpr int kROff = kAOff + kC * kAStride * 2;
  // region R after the loop: dA, then q dq - k dk
  static constexpr int kDAOff = kROff;
  static constexpr int kDOff = kDAOff + kC * kDAStride * 4;
  static constexpr int kAfter = kC * kDAStride * 4 + kC * kDStride * 4;
  static_assert(kKOff % 16 == 0 && kKbOff % 16 == 0 && kBOff % 16 == 0 && kAOff % 16 == 0 &&
                    kDOff % 16 == 0,
                "tiles must start 16-byte aligned");
};
template <int KT>
struct BwdLayout : BwdHead<KT>,
                   BwdRegions<KT, BwdHead<KT>::kROff, BwdHead<KT>::kVStride,
                              BwdHead<KT>::kSStride, 2, BwdHead<KT>::kAfter> {
};
// sm_80 allows 163 KB per block with the opt-in, sm_90 227 KB.
static_assert(BwdLayout<128>::kBytes <= 163 * 1024, "chunk backward shared memory too large");
static_assert(BwdLayout<128>::kBytes == kCudaChunkBwdSmemBytesK128, "update gla.h");
static_assert(BwdLayout<64>::kBytes <= 99 * 1024, "K=64 must fit sm_86/sm_89 (99 KB per block)");

// Adds rowsum(S0 * dS) over this V tile into sRow[key] (float32 products and sums of the
// 16-bit tiles, in a fixed order): kTPR threads per key row, reduced by shuffles.
template <typename T, int KT, typename L>
__device__ __forceinline__ void add_state_rowsums(const uint16_t* sS, const uint16_t* sDS,
                                                  float* sRow, int tid) {
  using E = Elem<T>;
  constexpr int kTPR = kBwdThreads / KT;  // 2 or 4, consecutive lanes
  constexpr int kCols = kTileV / kTPR;    // 32 or 16
  static_assert(kBwdThreads % KT == 0 && kCols % 8 == 0, "row split");
  const int kd = tid / kTPR, c0 = (tid % kTPR) * kCols;
  float dot = 0.0f;
#pragma unroll
  for (int cc = 0; cc < kCols; cc += 8) {
    const uint4 sv = *reinterpret_cast<const uint4*>(sS + kd * L::kSStride + c0 + cc);
    const uint4 dv = *reinterpret_cast<const uint4*>(sDS + kd * L::kSStride + c0 + cc);
    const uint32_t* const sw = reinterpret_cast<const uint32_t*>(&sv);
    const uint32_t* const dw = reinterpret_cast<const uint32_t*>(&dv);
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      float s0, s1, d0, d1;
      E::unpack2(sw[e], s0, s1);
      E::unpack2(dw[e], d0, d1);
      dot = fmaf(s0, d0, dot);
      dot = fmaf(s1, d1, dot);
    }
  }
#pragma unroll
  for (int m = kTPR / 2; m >= 1; m >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, m);
  if (tid % kTPR == 0) sRow[kd] += dot;  // one writer per row
}

// ---- launch 2: everything per chunk ------------------------------------------------------
// Grid: x = chunk index (over all sequences; blocks past the last chunk return), y = head.
template <typename T, int KT>
__global__ void __launch_bounds__(kBwdThreads)
    gla_chunk_bwd_kernel(const ChunkArgs a) {
  using E = Elem<T>;
  using L = BwdLayout<KT>;
  constexpr int kKH = KT / 2;      // key dims per warp half
  constexpr int kKN = kKH / 8;     // their 8-wide accumulator tiles
  extern __shared__ __align__(16) unsigned char smem[];
  uint16_t* const sQ = reinterpret_cast<uint16_t*>(smem + L::kQOff);
  uint16_t* const sK = reinterpret_cast<uint16_t*>(smem + L::kKOff);
  uint16_t* const sKb = reinterpret_cast<uint16_t*>(smem + L::kKbOff);
  float* const sB = reinterpret_cast<float*>(smem + L::kBOff);
  uint16_t* const sA = reinterpret_cast<uint16_t*>(smem + L::kAOff);
  uint16_t* const sV = reinterpret_cast<uint16_t*>(smem + L::kVOff);
  uint16_t* const sDO = reinterpret_cast<uint16_t*>(smem + L::kDOOff);
  uint16_t* const sS = reinterpret_cast<uint16_t*>(smem + L::kSOff);
  uint16_t* const sDS = reinterpret_cast<uint16_t*>(smem + L::kDSOff);
  float* const sDA = reinterpret_cast<float*>(smem + L::kDAOff);
  float* const sD = reinterpret_cast<float*>(smem + L::kDOff);
  float* const sTot = reinterpret_cast<float*>(smem + L::kTotOff);
  float* const sRow = reinterpret_cast<float*>(smem + L::kRowOff);
  float* const sPart = reinterpret_cast<float*>(smem + L::kPartOff);

  const int tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31;
  const int rb = warp & 3;      // token rows [16 rb, 16 rb + 16)
  const int half = warp >> 2;   // key dims [half * KT/2, ...) or V columns [32 half, ...)
  const int g8 = lane >> 2, c4 = lane & 3;
  const int lm_row = (lane & 7) + ((lane >> 3) & 1) * 8;
  const int lm_col = (lane >> 4) * 8;
  const int H = a.H, K = a.K, V = a.V;
  const int h = blockIdx.y;
  const float scale = a.scale;

  // which sequence and chunk this block is
  const int64_t gc = blockIdx.x;
  BwdChunk cp;
  if (!bwd_chunk(a, gc, h, &cp)) return;  // past the last chunk (the grid is a bound)
  const int len = cp.len;
  const int64_t qk_tok = static_cast<int64_t>(H) * K;
  const int64_t v_tok = static_cast<int64_t>(H) * V;
  const int64_t qk_base = cp.qk_base, v_base = cp.v_base, state_off = cp.state_off;

  // ---- q, k, gates; cumulative gates; scores A; k * exp2(b_last - b) ----------------------
  const uint16_t* const q = static_cast<const uint16_t*>(a.q);
  const uint16_t* const k = static_cast<const uint16_t*>(a.k);
  load_tile<KT, L::kQKStride, kBwdThreads>(sQ, q, qk_base, qk_tok, len, 0, K,
                                             (a.flags & kVecQK) != 0, tid);
  load_tile<KT, L::kQKStride, kBwdThreads>(sK, k, qk_base, qk_tok, len, 0, K,
                                             (a.flags & kVecQK) != 0, tid);
  load_tile<KT, L::kBStride, kBwdThreads>(sB, a.g, qk_base, qk_tok, len, 0, K,
                                            (a.flags & kVecG) != 0, tid);
  cp_async_commit();
  // The first V tile's v, dO, S0, dS (region R is free until the V loop) load while the
  // scores are computed.
  const uint16_t* const v = static_cast<const uint16_t*>(a.v);
  const uint16_t* const dout = static_cast<const uint16_t*>(a.dout);
  auto load_v_tile = [&](int v0) {
    load_tile<kTileV, L::kVStride, kBwdThreads>(sV, v, v_base, v_tok, len, v0, V,
                                                  (a.flags & kVecV) != 0, tid);
    load_tile<kTileV, L::kVStride, kBwdThreads>(sDO, dout, v_base, v_tok, len, v0, V,
                                                  (a.flags & kVecV) != 0, tid);
    // S0 and dS rows [0, KT) x columns [v0, v0 + 64) (zero outside K x V)
    load_tile<kTileV, L::kSStride, kBwdThreads, KT>(sS, a.states, state_off, V, K, v0, V,
                                                      (a.flags & kVecS) != 0, tid);
    load_tile<kTileV, L::kSStride, kBwdThreads, KT>(sDS, a.dstates, state_off, V, K, v0, V,
                                                      (a.flags & kVecS) != 0, tid);
    cp_async_commit();
  };
  load_v_tile(0);
  for (int i = tid; i < KT; i += kBwdThreads) sRow[i] = 0.0f;
  cp_async_wait_group<1>();  // q, k, g have landed; the V tile may still be in flight
  __syncthreads();
  gate_cumsum<KT, L::kBStride, kBwdThreads>(sB, sTot, tid);
  chunk_scores<T, KT, kBwdWarps, L>(sQ, sK, sB, sA, scale, warp, lane);
  const float* const blast = sB + (kC - 1) * L::kBStride;  // rows past len repeat b_last
  {
    constexpr int kPerRow = KT / 8;
    for (int i = tid; i < kC * kPerRow; i += kBwdThreads) {
      const int t = i / kPerRow, kb = (i % kPerRow) * 8;
      const uint4 kv = *reinterpret_cast<const uint4*>(sK + t * L::kQKStride + kb);
      const uint32_t* const kw = reinterpret_cast<const uint32_t*>(&kv);
      uint4 out;
      uint32_t* const ow = reinterpret_cast<uint32_t*>(&out);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float2 b = *reinterpret_cast<const float2*>(sB + t * L::kBStride + kb + 2 * e);
        const float2 bl = *reinterpret_cast<const float2*>(blast + kb + 2 * e);
        float k0, k1;
        E::unpack2(kw[e], k0, k1);
        ow[e] = E::pack2(k0 * exp2f(bl.x - b.x), k1 * exp2f(bl.y - b.y));
      }
      *reinterpret_cast<uint4*>(sKb + t * L::kQKStride + kb) = out;
    }
  }
  __syncthreads();

  // ---- V loop: dA, dv, and the inter-chunk parts of dq and dk ---------------------------
  float dA[4][4] = {};    // rows 16rb + g (+8), tokens 32 half + 8j + 2c (+1)
  float dq[kKN][4] = {};  // rows 16rb + g (+8), key dims kKH half + 8j + 2c (+1)
  float dk[kKN][4] = {};

  const int kh0 = kKH * half;  // first key dim of this warp's half
  for (int v0 = 0; v0 < V; v0 += kTileV) {
    if (v0 > 0) load_v_tile(v0);  // the first was issued with q, k, g
    cp_async_wait_all();
    __syncthreads();
    add_state_rowsums<T, KT, L>(sS, sDS, sRow, tid);

#pragma unroll
    for (int kk = 0; kk < kTileV / 16; ++kk) {  // 16 V columns at a time
      uint32_t fdo[4], fv[4];
      ldsm_x4(fdo, sDO + (16 * rb + lm_row) * L::kVStride + 16 * kk + lm_col);
      ldsm_x4(fv, sV + (16 * rb + lm_row) * L::kVStride + 16 * kk + lm_col);
      // dA += dO @ v^T: B[vcol][token] = v[token][vcol], read untransposed;
      // {r0, r2} are tokens 0..7 of the block, {r1, r3} tokens 8..15.
#pragma unroll
      for (int jj = 0; jj < 2; ++jj) {
        const int j = 2 * half + jj;  // token block
        if (j > rb) continue;         // causal: blocks after the row block are never used
        uint32_t bv[4];
        ldsm_x4(bv, sV + (16 * j + lm_row) * L::kVStride + 16 * kk + lm_col);
        E::mma(dA[2 * jj], fdo, bv[0], bv[2]);
        E::mma(dA[2 * jj + 1], fdo, bv[1], bv[3]);
      }
      // dq += dO @ S0^T and dk += v @ dS^T: B[vcol][key] = S[key][vcol], untransposed
#pragma unroll
      for (int kb = 0; kb < kKH; kb += 16) {
        uint32_t bs[4], bd[4];
        ldsm_x4(bs, sS + (kh0 + kb + lm_row) * L::kSStride + 16 * kk + lm_col);
        ldsm_x4(bd, sDS + (kh0 + kb + lm_row) * L::kSStride + 16 * kk + lm_col);
        E::mma(dq[kb / 8], fdo, bs[0], bs[2]);
        E::mma(dq[kb / 8 + 1], fdo, bs[1], bs[3]);
        E::mma(dk[kb / 8], fv, bd[0], bd[2]);
        E::mma(dk[kb / 8 + 1], fv, bd[1], bd[3]);
      }
    }

    // dv = A^T @ dO + kbar @ dS for rows 16rb.., V columns v0 + 32 half + [0, 32)
    {
      float acc[4][4];
#pragma unroll
      for (int j = 0; j < 4; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[j][r] = 0.0f;
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // token blocks t >= s only
        if (i < rb) continue;
        uint32_t at[4];
        // A^T rows s, cols t: the transposed read of A's tile (t rows, s cols) is this
        // fragment in the order {r0, r2, r1, r3}
        ldsm_x4_trans(at, sA + (16 * i + lm_row) * L::kAStride + 16 * rb + lm_col);
        const uint32_t af[4] = {at[0], at[2], at[1], at[3]};
#pragma unroll
        for (int nb = 0; nb < 2; ++nb) {  // 16 V columns at a time
          uint32_t bo[4];
          ldsm_x4_trans(bo, sDO + (16 * i + lm_row) * L::kVStride + 32 * half + 16 * nb + lm_col);
          E::mma(acc[2 * nb], af, bo[0], bo[1]);
          E::mma(acc[2 * nb + 1], af, bo[2], bo[3]);
        }
      }
#pragma unroll
      for (int kb = 0; kb < KT; kb += 16) {
        uint32_t af[4];
        ldsm_x4(af, sKb + (16 * rb + lm_row) * L::kQKStride + kb + lm_col);
#pragma unroll
        for (int nb = 0; nb < 2; ++nb) {
          uint32_t bd[4];
          ldsm_x4_trans(bd, sDS + (kb + lm_row) * L::kSStride + 32 * half + 16 * nb + lm_col);
          E::mma(acc[2 * nb], af, bd[0], bd[1]);
          E::mma(acc[2 * nb + 1], af, bd[2], bd[3]);
        }
      }
      uint16_t* const dvp = static_cast<uint16_t*>(a.dv) + v_base;
      const bool pair = (a.flags & kPairV) != 0;
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int vc = v0 + 32 * half + 8 * j + 2 * c4;
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          const int t = 16 * rb + g8 + 8 * hr;
          if (t >= len || vc >= V) continue;
          uint16_t* const dst = dvp + t * v_tok + vc;
          if (pair) {
            *reinterpret_cast<uint32_t*>(dst) = E::pack2(acc[j][2 * hr], acc[j][2 * hr + 1]);
          } else {
            dst[0] = E::from_float(acc[j][2 * hr]);
            if (vc + 1 < V) dst[1] = E::from_float(acc[j][2 * hr + 1]);
          }
        }
      }
    }
    __syncthreads();  // tiles are reloaded (or the region reused) next
  }

  // ---- gate the inter-chunk parts; partial sums for the dg carry; dA -> sDA ---------------
  bwd_gate_inter<T, KT, L>(dq, dk, dA, sB, sK, sPart, sDA, scale, rb, half, lane);
  __syncthreads();

  // ---- intra-chunk dq: row block i = rb ----------------------------------------------------
  //   off-diagonal (blocks j < i) on tensor cores relative to r = 16i, the first token of the
  //   block: dq_t += exp2(b_t - b_r) * sum_s dA[t][s] * (k_s * exp2(b_r - b_s)).
  //   (diagonal blocks: below, together with dk's)
  {
    const int i = rb;
    if (i > 0) {
      const int ref = 16 * i;
      float tmp[kKN][4];
#pragma unroll
      for (int j = 0; j < kKN; ++j)
#pragma unroll
        for (int r = 0; r < 4; ++r) tmp[j][r] = 0.0f;
      for (int j = 0; j < i; ++j) {
        uint32_t af[4];  // dA rows 16i + g (+8), cols 16j + 2c (+1) (+8)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int t = 16 * i + g8 + 8 * (e & 1);
          const int s = 16 * j + 2 * c4 + 8 * (e >> 1);
          const float2 x = *reinterpret_cast<const float2*>(sDA + t * L::kDAStride + s);
          af[e] = E::pack2(x.x, x.y);
        }
#pragma unroll
        for (int kb = 0; kb < kKH; kb += 16) {
          uint32_t bk[4];  // k rows s (tokens), cols key dims, read transposed
          ldsm_x4_trans(bk, sK + (16 * j + lm_row) * L::kQKStride + kh0 + kb + lm_col);
          // bk[m]: tokens 16j + 2c (+1) (+8 for m odd), key dim kh0 + kb + g (+8 for m >= 2)
#pragma unroll
          for (int m = 0; m < 4; ++m) {
            const int s = 16 * j + 2 * c4 + 8 * (m & 1);
            const int kd = kh0 + kb + g8 + 8 * (m >> 1);
            const float br = sB[ref * L::kBStride + kd];
            float x0, x1;
            E::unpack2(bk[m], x0, x1);
            bk[m] = E::pack2(x0 * exp2f(br - sB[s * L::kBStride + kd]),
                             x1 * exp2f(br - sB[(s + 1) * L::kBStride + kd]));
          }
          E::mma(tmp[kb / 8], af, bk[0], bk[1]);
          E::mma(tmp[kb / 8 + 1], af, bk[2], bk[3]);
        }
      }
#pragma unroll
      for (int j = 0; j < kKN; ++j) {
        const int kd = kh0 + 8 * j + 2 * c4;
        const float2 br = *reinterpret_cast<const float2*>(sB + ref * L::kBStride + kd);
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          const int t = 16 * i + g8 + 8 * hr;
          const float2 b = *reinterpret_cast<const float2*>(sB + t * L::kBStride + kd);
          dq[j][2 * hr] += tmp[j][2 * hr] * exp2f(b.x - br.x);
          dq[j][2 * hr + 1] += tmp[j][2 * hr + 1] * exp2f(b.y - br.y);
        }
      }
    }
  }

  // ---- intra-chunk dk: token block j = rb ------------------------------------------------
  //   off-diagonal (blocks i > j) relative to r = 16j + 15, the last token of the block:
  //   dk_s += exp2(b_r - b_s) * sum_t dA[t][s] * (q_t * exp2(b_t - b_r)).
  {
    const int j = rb;
    if (j < 3) {
      const int ref = 16 * j + 15;
      float tmp[kKN][4];
#pragma unroll
      for (int x = 0; x < kKN; ++x)
#pragma unroll
        for (int r = 0; r < 4; ++r) tmp[x][r] = 0.0f;
      for (int i = j + 1; i < 4; ++i) {
        uint32_t af[4];  // dA^T rows s = 16j + g (+8), cols t = 16i + 2c (+1) (+8)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int s = 16 * j + g8 + 8 * (e & 1);
          const int t = 16 * i + 2 * c4 + 8 * (e >> 1);
          af[e] = E::pack2(sDA[t * L::kDAStride + s], sDA[(t + 1) * L::kDAStride + s]);
        }
#pragma unroll
        for (int kb = 0; kb < kKH; kb += 16) {
          uint32_t bq[4];  // q rows t, cols key dims, read transposed
          ldsm_x4_trans(bq, sQ + (16 * i + lm_row) * L::kQKStride + kh0 + kb + lm_col);
#pragma unroll
          for (int m = 0; m < 4; ++m) {
            const int t = 16 * i + 2 * c4 + 8 * (m & 1);
            const int kd = kh0 + kb + g8 + 8 * (m >> 1);
            const float br = sB[ref * L::kBStride + kd];
            float x0, x1;
            E::unpack2(bq[m], x0, x1);
            bq[m] = E::pack2(x0 * exp2f(sB[t * L::kBStride + kd] - br),
                             x1 * exp2f(sB[(t + 1) * L::kBStride + kd] - br));
          }
          E::mma(tmp[kb / 8], af, bq[0], bq[1]);
          E::mma(tmp[kb / 8 + 1], af, bq[2], bq[3]);
        }
      }
#pragma unroll
      for (int x = 0; x < kKN; ++x) {
        const int kd = kh0 + 8 * x + 2 * c4;
        const float2 br = *reinterpret_cast<const float2*>(sB + ref * L::kBStride + kd);
#pragma unroll
        for (int hr = 0; hr < 2; ++hr) {
          const int s = 16 * j + g8 + 8 * hr;
          const float2 b = *reinterpret_cast<const float2*>(sB + s * L::kBStride + kd);
          dk[x][2 * hr] += tmp[x][2 * hr] * exp2f(br.x - b.x);
          dk[x][2 * hr + 1] += tmp[x][2 * hr + 1] * exp2f(br.y - b.y);
        }
      }
    }
  }

  // ---- diagonal blocks (dq, dk final); dq, dk out, q dq - k dk -> sD; dg ------------------
  bwd_diag_blocks<T, KT, L>(dq, dk, sQ, sK, sB, sDA, sD, tid, rb, half, lane);
  bwd_write_dq_dk<T, KT, L>(dq, dk, sQ, sK, sD, a, cp, rb, half, lane);
  bwd_dg<KT, L>(sD, sB, sRow, sPart, sTot, a, cp, tid);
}

// ---- launcher ------------------------------------------------------------------------

struct BwdGrid {
  unsigned scan_x = 0, scan_y = 0, scan_z = 0;  // state scans: N * H, V tiles, key tiles
  unsigned chunk_x = 0, chunk_y = 0;  // chunk kernel: chunks (upper bound), H
  bool scan_only = false;             // no tokens: only dh0 (from dht) to write
  bool empty = false;                 // nothing to launch at all
};

// Checks p and fills the kernel arguments and grids (16-bit inputs, or float32 ones for the
// tf32 backward: f32). Returns an error message, or nullptr.
const char* prepare_bwd(const GlaParams& p, ChunkArgs* args, BwdGrid* grid, bool f32 = false) {
  *grid = BwdGrid{};
  if (const char* err = check_chunk_params(p, f32 ? "chunk_bwd_f32_cuda" : "chunk_bwd_cuda", f32))
    return err;
  if (p.state_idx != nullptr || p.state_v_first)
    return "chunk_bwd_cuda: the backward takes dense K-first states (no pools, no V-first)";
  if (p.N * p.H == 0) {
    grid->empty = true;
    return nullptr;
  }
  if (p.dh0 == nullptr) return "chunk_bwd_cuda: dh0 must not be null";
  if (p.T > 0 && (p.q == nullptr || p.k == nullptr || p.v == nullptr || p.g == nullptr ||
                  p.dout == nullptr || p.dq == nullptr || p.dk == nullptr ||
                  p.dv == nullptr || p.dg == nullptr || p.workspace == nullptr))
    return "chunk_bwd_cuda: inputs, gradients and workspace must not be null";

  *args = common_args(p);
  args->dout = p.dout;
  args->dht = static_cast<const float*>(p.dht);
  args->dq = p.dq;
  args->dk = p.dk;
  args->dv = p.dv;
  args->dg = static_cast<float*>(p.dg);
  args->dh0 = static_cast<float*>(p.dh0);
  if (p.workspace != nullptr) {  // [chunk offsets (varlen)] [states] [dstates]
    args->chunk_offsets =
        p.cu_seqlens != nullptr ? reinterpret_cast<int64_t*>(p.workspace) : nullptr;
    if (f32) {
      args->fstates = p.workspace + offsets_floats(p);
      args->fdstates = args->fstates + f32_state_floats(max_chunks(p), p.H, p.K, p.V);
    } else {
      args->states = reinterpret_cast<uint16_t*>(p.workspace + offsets_floats(p));
      args->dstates = args->states + state_elems(max_chunks(p), p.H, p.K, p.V);
    }
  }
  if (!(p.V % 8 == 0 && aligned(p.dout, 16))) args->flags &= ~kVecV;  // dout loads like v
  if (p.V % 8 == 0 && aligned(p.workspace, 16)) args->flags |= kVecS;
  if (p.K % 2 == 0 && aligned(p.dq, 4) && aligned(p.dk, 4)) args->flags |= kPairQK;
  if (p.V % 2 == 0 && aligned(p.dv, 4)) args->flags |= kPairV;
  grid->scan_x = static_cast<unsigned>(p.N * p.H);
  grid->scan_y = static_cast<unsigned>((p.V + kScanV - 1) / kScanV);
  grid->scan_z = static_cast<unsigned>((p.K + kScanK - 1) / kScanK);
  grid->chunk_x = static_cast<unsigned>(max_chunks(p));
  grid->chunk_y = static_cast<unsigned>(p.H);
  grid->scan_only = p.T == 0;
  return nullptr;
}

#ifndef GLA_CHUNK_EMULATE
constexpr const char* kOp = "chunk_bwd_cuda";

// The launches in order (stream order makes each see the previous one's results): both state
// scans in one grid, then the chunk kernel.
template <typename T, int KT>
const char* launch_all(const ChunkArgs& args, const BwdGrid& grid, cudaStream_t stream) {
  if (grid.scan_only)  // no tokens: only dh0 (= dht, or 0) to write
    return launch_chunk_kernel(scan_vec(args) ? gla_chunk_state_scan_kernel<T, true, true>
                                              : gla_chunk_state_scan_kernel<T, true, false>,
                               dim3(grid.scan_x, grid.scan_y, grid.scan_z), kScanThreads,
                               ScanLayout::kBytes, stream, args, kOp,
                               "gla_chunk_state_scan_kernel (gradients)");
  if (args.chunk_offsets != nullptr) {
    if (const char* e = launch_chunk_kernel(gla_chunk_offsets_kernel, dim3(1), kOffsetThreads,
                                            kOffsetSmem, stream, args, kOp,
                                            "gla_chunk_offsets_kernel"))
      return e;
  }
  if (const char* e = launch_chunk_kernel(scan_vec(args) ? gla_chunk_state_scans_kernel<T, true>
                                                         : gla_chunk_state_scans_kernel<T, false>,
                                          dim3(grid.scan_x, grid.scan_y, 2 * grid.scan_z),
                                          kScanThreads, ScanLayout::kBytes, stream, args, kOp,
                                          "gla_chunk_state_scans_kernel"))
    return e;
  return launch_chunk_kernel(gla_chunk_bwd_kernel<T, KT>, dim3(grid.chunk_x, grid.chunk_y),
                             kBwdThreads, BwdLayout<KT>::kBytes, stream, args, kOp,
                             "gla_chunk_bwd_kernel");
}

// The float32 backward: both state scans in one grid, then the chunk kernel.
template <int KT, int kPasses>
const char* launch_all_f32(const ChunkArgs& args, const BwdGrid& grid, cudaStream_t stream) {
  constexpr const char* op = "chunk_bwd_f32_cuda";
  if (!grid.scan_only && args.chunk_offsets != nullptr) {
    if (const char* e = launch_chunk_kernel(gla_chunk_offsets_kernel, dim3(1), kOffsetThreads,
                                            kOffsetSmem, stream, args, op,
                                            "gla_chunk_offsets_kernel"))
      return e;
  }
  if (const char* e = launch_chunk_kernel(
          gla_chunk_state_scans_f32_kernel<KT, kPasses>,
          dim3(grid.scan_x, (args.V + kF32BV - 1) / kF32BV, 2), kF32Threads,
          F32ScanLayout<KT>::kBytes, stream, args, op, "gla_chunk_state_scans_f32_kernel"))
    return e;
  if (grid.scan_only) return nullptr;
  return launch_chunk_kernel(gla_chunk_bwd_f32_kernel<KT, kPasses>,
                             dim3(grid.chunk_x, grid.chunk_y), kBwdThreads,
                             F32BwdLayout<KT>::kBytes, stream, args, op,
                             "gla_chunk_bwd_f32_kernel");
}
#endif  // GLA_CHUNK_EMULATE

}  // namespace

int64_t chunk_bwd_cuda_workspace_floats(const GlaParams& p) {
  if (p.T <= 0) return 0;
  if (p.dtype == DType::kFloat32)  // float32 states (chunk_bwd_f32.cuh)
    return offsets_floats(p) + 2 * f32_state_floats(max_chunks(p), p.H, p.K, p.V);
  // chunk start states and end-state gradients, 16-bit each
  return offsets_floats(p) + state_elems(max_chunks(p), p.H, p.K, p.V);
}

#ifndef GLA_CHUNK_EMULATE
int64_t chunk_cuda_max_k() {
  int device = 0;
  DeviceInfo info;
  if (current_device_info(&device, &info) != cudaSuccess) {  // cached per device
    (void)cudaGetLastError();
    return 64;  // chunk_fwd_cuda / chunk_bwd_cuda report the device error itself
  }
  return info.smem_optin >= BwdLayout<128>::kBytes ? 128 : 64;
}

const char* chunk_bwd_cuda(const GlaParams& p, void* stream_ptr) {
  ChunkArgs args;
  BwdGrid grid;
  if (const char* err = prepare_bwd(p, &args, &grid)) return err;
  if (grid.empty) return nullptr;
  int sm_count = 0;
  if (const char* err = check_device(kOp, &sm_count)) return err;
  if (p.K > 64 && chunk_cuda_max_k() < 128)
    return "chunk_bwd_cuda: K > 64 needs 152 KB of shared memory per block and this GPU has "
           "less; pass K in slices of 64 (chunk_gla does)";

  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  const bool bf16 = p.dtype == DType::kBFloat16;
  if (p.K <= 64)
    return bf16 ? launch_all<__nv_bfloat16, 64>(args, grid, stream)
                : launch_all<__half, 64>(args, grid, stream);
  return bf16 ? launch_all<__nv_bfloat16, 128>(args, grid, stream)
              : launch_all<__half, 128>(args, grid, stream);
}

const char* chunk_bwd_f32_cuda(const GlaParams& p, int passes, void* stream_ptr) {
  if (passes != 1 && passes != 3) return "chunk_bwd_f32_cuda: passes must be 1 or 3";
  ChunkArgs args;
  BwdGrid grid;
  if (const char* err = prepare_bwd(p, &args, &grid, true)) return err;
  if (grid.empty) return nullptr;
  int sm_count = 0;
  if (const char* err = check_device("chunk_bwd_f32_cuda", &sm_count)) return err;
  if (p.K > 64 && chunk_cuda_max_k() < 128)
    return "chunk_bwd_f32_cuda: K > 64 needs 159 KB of shared memory per block and this GPU "
           "has less";
  cudaStream_t stream = static_cast<cudaStream_t>(stream_ptr);
  if (p.K <= 64)
    return passes == 1 ? launch_all_f32<64, 1>(args, grid, stream)
                       : launch_all_f32<64, 3>(args, grid, stream);
  return passes == 1 ? launch_all_f32<128, 1>(args, grid, stream)
                     : launch_all_f32<128, 3>(args, grid, stream);
}
#endif  // GLA_CHUNK_EMULATE

}  // namespace gla
