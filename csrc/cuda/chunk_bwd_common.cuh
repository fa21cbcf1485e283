// Steps shared by the two chunk kernels of the backward: gla_chunk_bwd_kernel (bf16 / fp16
// tiles, chunk_bwd.cu) and gla_chunk_bwd_f32_kernel (float32 tiles, chunk_bwd_f32.cuh). Both
// run 8 warps per (chunk, head); warp (rb, half) = (warp % 4, warp / 4) holds dq and dk for
// token rows [16 rb, 16 rb + 16) and key dims [half * KT/2, ...) as m16n8 accumulators
// (dq[x][r]: row 16 rb + g + 8 (r >> 1), key dim kh0 + 8x + 2c + (r & 1)), and dA for those
// rows and tokens [32 half, 32 half + 32). The math is at the top of chunk_bwd.cu.
// The q / k tiles are 16-bit (read through Elem<T>) or float (X = the tile element).
#pragma once

#include <type_traits>

#include "chunk_common.cuh"

namespace gla {
namespace {

constexpr int kBwdWarps = 8;              // chunk kernels
constexpr int kBwdThreads = 32 * kBwdWarps;

// Shared memory shared by the layouts of both chunk kernels: region R from byte R0, holding
// the V loop's v, dO ([kC][VS]) and S0, dS ([KT][SS]) tiles of ESZ-byte elements, and after the
// loop the kernel's own AFTER bytes; then the small float arrays.
template <int KT, int R0, int VS, int SS, int ESZ, int AFTER>
struct BwdRegions {
  static constexpr int kROff = R0;
  static constexpr int kVOff = R0;
  static constexpr int kDOOff = kVOff + kC * VS * ESZ;
  static constexpr int kSOff = kDOOff + kC * VS * ESZ;
  static constexpr int kDSOff = kSOff + KT * SS * ESZ;
  static constexpr int kLoopEnd = kDSOff + KT * SS * ESZ;
  static constexpr int kREnd = kLoopEnd > R0 + AFTER ? kLoopEnd : R0 + AFTER;
  static constexpr int kTotOff = kREnd;  // gate scan scratch, then dg segment totals (float)
  static constexpr int kTotFloats = gate_scratch_floats<KT>() > kBwdThreads
                                        ? gate_scratch_floats<KT>() : kBwdThreads;
  static constexpr int kRowOff = kTotOff + kTotFloats * 4;  // [KT] rowsum(S0 * dS)
  static constexpr int kPartOff = kRowOff + KT * 4;         // [4][KT] per row block
  static constexpr int kBytes = kPartOff + 4 * KT * 4;
  static_assert(R0 % 16 == 0 && kDOOff % 16 == 0 && kSOff % 16 == 0 && kDSOff % 16 == 0 &&
                    kTotOff % 16 == 0,
                "tiles must start 16-byte aligned");
};

// Elements i, i + 1 (i even) of a q / k tile as floats.
template <typename T>
__device__ __forceinline__ void tile_pair(const uint16_t* x, int i, float& a, float& b) {
  Elem<T>::unpack2(*reinterpret_cast<const uint32_t*>(x + i), a, b);
}
template <typename T>
__device__ __forceinline__ void tile_pair(const float* x, int i, float& a, float& b) {
  const float2 v = *reinterpret_cast<const float2*>(x + i);
  a = v.x;
  b = v.y;
}
template <typename T>
__device__ __forceinline__ float tile_elem(const uint16_t* x, int i) {
  return Elem<T>::to_float(x[i]);
}
template <typename T>
__device__ __forceinline__ float tile_elem(const float* x, int i) {
  return x[i];
}

// Where chunk gc (workspace numbering) of head h lies; false past the last chunk (the grid
// over chunks is an upper bound with cu_seqlens).
struct BwdChunk {
  int len;
  int64_t qk_base, v_base, state_off;  // element offsets: q/k/g/dq/dk/dg, v/dO/dv, workspace
};
__device__ __forceinline__ bool bwd_chunk(const ChunkArgs& a, int64_t gc, int h, BwdChunk* p) {
  int64_t n = 0, c = 0;
  if (!locate_chunk(a, gc, &n, &c)) return false;
  int64_t row, start, end;
  seq_range(a, n, &row, &start, &end);
  const int64_t c0 = start + c * kC;
  p->len = static_cast<int>(end - c0 < kC ? end - c0 : kC);
  p->qk_base = ((row * a.T + c0) * a.H + h) * static_cast<int64_t>(a.K);
  p->v_base = ((row * a.T + c0) * a.H + h) * static_cast<int64_t>(a.V);
  p->state_off = (gc * a.H + h) * static_cast<int64_t>(a.K) * a.V;
  return true;
}

// After the V loop: dq *= scale * exp2(b_t), dk *= exp2(b_last - b_s) (the inter-chunk parts
// get their gates); sPart[rb][key] = sum over the warp's rows of k * dk (the inter part of
// the dg carry), and sDA <- dA * scale below the diagonal, 0 above.
template <typename T, int KT, typename L, typename X>
__device__ __forceinline__ void bwd_gate_inter(float (&dq)[KT / 16][4], float (&dk)[KT / 16][4],
                                               const float (&dA)[4][4], const float* sB,
                                               const X* sK, float* sPart, float* sDA,
                                               float scale, int rb, int half, int lane) {
  const int g8 = lane >> 2, c4 = lane & 3;
  const int kh0 = (KT / 2) * half;
  const float* const blast = sB + (kC - 1) * L::kBStride;
#pragma unroll
  for (int j = 0; j < KT / 16; ++j) {
    const int kd = kh0 + 8 * j + 2 * c4;
    float part0 = 0.0f, part1 = 0.0f;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int t = 16 * rb + g8 + 8 * hr;
      const float2 b = *reinterpret_cast<const float2*>(sB + t * L::kBStride + kd);
      const float2 bl = *reinterpret_cast<const float2*>(blast + kd);
      dq[j][2 * hr] *= scale * exp2f(b.x);
      dq[j][2 * hr + 1] *= scale * exp2f(b.y);
      dk[j][2 * hr] *= exp2f(bl.x - b.x);
      dk[j][2 * hr + 1] *= exp2f(bl.y - b.y);
      float k0, k1;
      tile_pair<T>(sK, t * L::kQKStride + kd, k0, k1);
      part0 += k0 * dk[j][2 * hr];
      part1 += k1 * dk[j][2 * hr + 1];
    }
    // sum over the 8 row groups g (lanes with the same c), fixed order
#pragma unroll
    for (int m = 4; m < 32; m <<= 1) {
      part0 += __shfl_xor_sync(0xffffffffu, part0, m);
      part1 += __shfl_xor_sync(0xffffffffu, part1, m);
    }
    if (g8 == 0) {
      sPart[rb * KT + kd] = part0;
      sPart[rb * KT + kd + 1] = part1;
    }
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int t = 16 * rb + g8 + 8 * (r >> 1);
      const int s = 32 * half + 8 * j + 2 * c4 + (r & 1);
      sDA[t * L::kDAStride + s] = s <= t ? dA[j][r] * scale : 0.0f;
    }
  }
}

// The diagonal 16 x 16 blocks, dq and dk together. One thread per (diagonal block, key dim)
// column: each exp2(b_t - b_s), s <= t in the block, is computed once and used twice,
// P = dA[t][s] exp2(b_t - b_s): dq_t += P k_s, dk_s += P q_t (b never increases, so no
// exponent is positive). The owners' dq, then dk, pass through sD, where the column threads
// add their part. Ends with a barrier; dq and dk are final afterwards.
template <typename T, int KT, typename L, typename X>
__device__ __forceinline__ void bwd_diag_blocks(float (&dq)[KT / 16][4], float (&dk)[KT / 16][4],
                                                const X* sQ, const X* sK, const float* sB,
                                                const float* sDA, float* sD, int tid, int rb,
                                                int half, int lane) {
  constexpr int kKN = KT / 16;
  const int g8 = lane >> 2, c4 = lane & 3;
  const int kh0 = (KT / 2) * half;
  constexpr int kCols = 4 * KT / kBwdThreads;  // columns per thread: 2 (KT = 128) or 1
  static_assert((4 * KT) % kBwdThreads == 0, "whole columns per thread");
  // owners' fragments <-> sD (rows 16rb + g (+8), key dims kh0 + 8x + 2c (+1))
  auto frag_sd = [&](float (&f)[kKN][4], bool to_sd) {
#pragma unroll
    for (int x = 0; x < kKN; ++x) {
      const int kd = kh0 + 8 * x + 2 * c4;
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int t = 16 * rb + g8 + 8 * hr;
        float2* const p = reinterpret_cast<float2*>(sD + t * L::kDStride + kd);
        if (to_sd) {
          *p = make_float2(f[x][2 * hr], f[x][2 * hr + 1]);
        } else {
          f[x][2 * hr] = p->x;
          f[x][2 * hr + 1] = p->y;
        }
      }
    }
  };
  float ddk[kCols][16];  // the columns' dk part, held until dk passes through sD
  frag_sd(dq, true);  // sD is free: nothing reads it before this step
  __syncthreads();
#pragma unroll
  for (int cl = 0; cl < kCols; ++cl) {
    const int w = tid + cl * kBwdThreads;
    const int blk = w / KT, kd = w % KT, t0 = 16 * blk;
    float bc[16], qc[16], kc[16], ddq[16];
#pragma unroll
    for (int r = 0; r < 16; ++r) {
      bc[r] = sB[(t0 + r) * L::kBStride + kd];
      qc[r] = tile_elem<T>(sQ, (t0 + r) * L::kQKStride + kd);
      kc[r] = tile_elem<T>(sK, (t0 + r) * L::kQKStride + kd);
      ddq[r] = 0.0f;
      ddk[cl][r] = 0.0f;
    }
#pragma unroll
    for (int tt = 0; tt < 16; ++tt) {
      const float* const da_row = sDA + (t0 + tt) * L::kDAStride + t0;  // same for the warp
#pragma unroll
      for (int ss = 0; ss <= tt; ++ss) {
        const float pp = da_row[ss] * exp2f(bc[tt] - bc[ss]);
        ddq[tt] = fmaf(pp, kc[ss], ddq[tt]);
        ddk[cl][ss] = fmaf(pp, qc[tt], ddk[cl][ss]);
      }
    }
#pragma unroll
    for (int r = 0; r < 16; ++r) sD[(t0 + r) * L::kDStride + kd] += ddq[r];
  }
  __syncthreads();
  frag_sd(dq, false);  // final dq
  frag_sd(dk, true);   // same elements of the same thread: no barrier in between
  __syncthreads();
#pragma unroll
  for (int cl = 0; cl < kCols; ++cl) {
    const int w = tid + cl * kBwdThreads;
    const int t0 = 16 * (w / KT), kd = w % KT;
#pragma unroll
    for (int r = 0; r < 16; ++r) sD[(t0 + r) * L::kDStride + kd] += ddk[cl][r];
  }
  __syncthreads();
  frag_sd(dk, false);  // final dk
}

// dq, dk -> global (16-bit, pairs when kPairQK; or float), and sD <- q dq - k dk, element by
// element (each thread overwrites only what it read above). Ends with a barrier.
template <typename T, int KT, typename L, typename X>
__device__ __forceinline__ void bwd_write_dq_dk(const float (&dq)[KT / 16][4],
                                                const float (&dk)[KT / 16][4], const X* sQ,
                                                const X* sK, float* sD, const ChunkArgs& a,
                                                const BwdChunk& cp, int rb, int half, int lane) {
  const int g8 = lane >> 2, c4 = lane & 3;
  const int kh0 = (KT / 2) * half;
  const int K = a.K;
  const int64_t qk_tok = static_cast<int64_t>(a.H) * K;
  X* const dqp = static_cast<X*>(a.dq) + cp.qk_base;
  X* const dkp = static_cast<X*>(a.dk) + cp.qk_base;
  const bool pair = (a.flags & kPairQK) != 0;
#pragma unroll
  for (int x = 0; x < KT / 16; ++x) {
    const int kd = kh0 + 8 * x + 2 * c4;
#pragma unroll
    for (int hr = 0; hr < 2; ++hr) {
      const int t = 16 * rb + g8 + 8 * hr;
      float q0, q1, k0, k1;
      tile_pair<T>(sQ, t * L::kQKStride + kd, q0, q1);
      tile_pair<T>(sK, t * L::kQKStride + kd, k0, k1);
      const float dq0 = dq[x][2 * hr], dq1 = dq[x][2 * hr + 1];
      const float dk0 = dk[x][2 * hr], dk1 = dk[x][2 * hr + 1];
      sD[t * L::kDStride + kd] = q0 * dq0 - k0 * dk0;
      sD[t * L::kDStride + kd + 1] = q1 * dq1 - k1 * dk1;
      if (t >= cp.len || kd >= K) continue;
      const int64_t off = t * qk_tok + kd;
      if constexpr (std::is_same_v<X, float>) {
        dqp[off] = dq0;
        dkp[off] = dk0;
        if (kd + 1 < K) {
          dqp[off + 1] = dq1;
          dkp[off + 1] = dk1;
        }
      } else if (pair) {  // K even, so kd even < K implies kd + 1 < K
        *reinterpret_cast<uint32_t*>(dqp + off) = Elem<T>::pack2(dq0, dq1);
        *reinterpret_cast<uint32_t*>(dkp + off) = Elem<T>::pack2(dk0, dk1);
      } else {
        dqp[off] = Elem<T>::from_float(dq0);
        dkp[off] = Elem<T>::from_float(dk0);
        if (kd + 1 < K) {
          dqp[off + 1] = Elem<T>::from_float(dq1);
          dkp[off + 1] = Elem<T>::from_float(dk1);
        }
      }
    }
  }
  __syncthreads();
}

// dg: reverse cumulative sum of sD (q dq - k dk) down each key column, plus the carry: every
// later chunk collapsed onto this chunk's end state,
// exp2(b_last) rowsum(S0 * dS) + sum of sPart (see chunk_bwd.cu's top).
template <int KT, typename L>
__device__ __forceinline__ void bwd_dg(const float* sD, const float* sB, const float* sRow,
                                       const float* sPart, float* sTot, const ChunkArgs& a,
                                       const BwdChunk& cp, int tid) {
  constexpr int kP = kBwdThreads / KT;  // threads per key column
  constexpr int kRows = kC / kP;        // rows of each
  const int col = tid % KT, seg = tid / KT;
  const int r0 = seg * kRows;
  const float* const blast = sB + (kC - 1) * L::kBStride;
  float tot = 0.0f;
  for (int r = 0; r < kRows; ++r) tot += sD[(r0 + r) * L::kDStride + col];
  sTot[tid] = tot;
  __syncthreads();
  float run = exp2f(blast[col]) * sRow[col] + sPart[col] + sPart[KT + col] +
              sPart[2 * KT + col] + sPart[3 * KT + col];
  for (int p = kP - 1; p > seg; --p) run += sTot[p * KT + col];  // later segments
  const int64_t qk_tok = static_cast<int64_t>(a.H) * a.K;
  float* const dgp = a.dg + cp.qk_base;
  for (int r = kRows - 1; r >= 0; --r) {
    const int t = r0 + r;
    run += sD[t * L::kDStride + col];
    if (t < cp.len && col < a.K) dgp[t * qk_tok + col] = run;
  }
}

}  // namespace
}  // namespace gla
