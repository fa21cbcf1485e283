// The state scan shared by the chunked kernels: per (sequence, head, 128 V columns, 64 key
// dims), walk the sequence's chunks (state in float32 registers) and store the state each
// chunk starts from (forward; used by the split forward and by the backward) or the gradient
// arriving on each chunk's end state (backward), rounded to the input dtype: that is how
// the tensor cores take them anyway, and it halves the workspace. Serial over chunks;
// double-buffered with cp.async so the next chunk's tiles load while the current one is
// computed. One block covers up to kScanV = 128 columns of V (all of V for the usual head
// sizes), so the gates are summed and x~ made once per chunk and key tile.
#pragma once

#include "chunk_common.cuh"

namespace gla {
namespace {

constexpr int kScanWarps = 8;             // warp w owns V columns [16w, 16w+16) of the tile
constexpr int kScanThreads = 32 * kScanWarps;
constexpr int kScanK = 64;                // key dims per block
constexpr int kScanV = 16 * kScanWarps;   // V columns per block (all of V up to 128)
constexpr int kScanSegRows = kGateRows;   // rows of one cumulative-gate segment

// Shared memory of the state scans: the key-side and value-side tiles in two stages, so the
// next chunk's tiles load (cp.async) while the current one is computed. The gates never pass
// through shared memory: thread (key dim, segment) loads its kScanSegRows gates into
// registers (the next chunk's while this one is computed) and sums them there.
struct ScanLayout {
  static constexpr int kXStride = kScanK + 8;   // gated key-side tile (k or q): 16-bit
  static constexpr int kYStride = kScanV + 8;   // value-side tile (v or dO): 16-bit
  static constexpr int kXOff = 0;
  static constexpr int kYOff = kXOff + kC * kXStride * 2;
  static constexpr int kStageBytes = kYOff + kC * kYStride * 2;
  // the state being saved, 16-bit, key dims in pairs: [kScanK / 2][kOutPairStride] words
  static constexpr int kOutPairStride = kScanV + 8;  // == 8 (mod 32): conflict-free stores
  static constexpr int kOutOff = 2 * kStageBytes;
  static constexpr int kLastOff = kOutOff + (kScanK / 2) * kOutPairStride * 4;  // b_last float
  static constexpr int kBytes = kLastOff + kScanK * 4;
  static_assert(kYOff % 16 == 0 && kStageBytes % 16 == 0 && kOutOff % 16 == 0 &&
                    kLastOff % 16 == 0 && (kOutPairStride * 4) % 16 == 0,
                "alignment");
};
static_assert(ScanLayout::kBytes <= 99 * 1024, "the scans must fit sm_86/sm_89 (99 KB per block)");
static_assert(kScanK * kGateSegs == kScanThreads, "one (key dim, gate segment) per thread");

// Row kl, columns vl..vl+7 of the pair-interleaved staged state (ScanLayout::kOutPairStride)
// as one 16-byte vector: the low or high halves of 8 words.
__device__ __forceinline__ uint4 out_row8(const uint32_t* sOutW, int kl, int vl) {
  const uint32_t* const w = sOutW + (kl >> 1) * ScanLayout::kOutPairStride + vl;
  const uint4 a = *reinterpret_cast<const uint4*>(w);
  const uint4 b = *reinterpret_cast<const uint4*>(w + 4);
  const uint32_t sel = (kl & 1) ? 0x7632u : 0x5410u;  // high or low halves
  return make_uint4(byte_perm(a.x, a.y, sel), byte_perm(a.z, a.w, sel),
                    byte_perm(b.x, b.y, sel), byte_perm(b.z, b.w, sel));
}

// ---- the state scan kernel -------------------------------------------------------------
// kGrad = false: x = k, y = v, walks forward from h0, stores S0 of each chunk (and the final
//                state into ht when ht is not null).
// kGrad = true:  x = q, y = dO, walks backward from dht, stores dS_end of each chunk, then dh0.
// Both are S^T <- S^T * exp2(b_last) + y^T @ x~ with x~ = k * exp2(b_last - b) (forward) or
// q * exp2(b) * scale (gradient). Rows of the state (key dims) are independent, so the grid
// splits them too: x = N * H, y = V tiles of kScanV, z = key tiles of kScanK.
// kVec: every tile load and state store is a 16-byte vector (flags kVecQK, kVecV, kVecS; the
// usual case), so the scalar paths are compiled out of the hot loop (ptxas had spilled for
// their registers); scan_vec says which variant to launch.
template <typename T, bool kGrad, bool kVec>
__device__ __forceinline__ void state_scan(const ChunkArgs& a, int key_tile) {
  using E = Elem<T>;
  using L = ScanLayout;
  constexpr int KT = kScanK;
  constexpr int kNT = KT / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  uint16_t* const sOut = reinterpret_cast<uint16_t*>(smem + L::kOutOff);
  float* const sLast = reinterpret_cast<float*>(smem + L::kLastOff);

  const int tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31;
  const int g8 = lane >> 2, c4 = lane & 3;
  const int lm_row = (lane & 7) + ((lane >> 3) & 1) * 8;
  const int lm_col = (lane >> 4) * 8;
  const int H = a.H, K = a.K, V = a.V;
  const int h = static_cast<int>(blockIdx.x % static_cast<unsigned>(H));
  const int64_t n = blockIdx.x / static_cast<unsigned>(H);
  const int v0 = blockIdx.y * kScanV;
  const int k0 = key_tile * KT;
  int64_t row, start, end;
  seq_range(a, n, &row, &start, &end);
  const int64_t nchunks = num_chunks(start, end);
  const int64_t chunk0 = nchunks > 0 ? first_chunk(a, n) : 0;  // no offsets without tokens

  // S^T (or dS^T) for V columns vc_lo + {0, 8} and key dims k0 + 8nt + 2c + {0, 1}
  float s[kNT][4];
  const int vc_lo = v0 + 16 * warp + g8;
  // A warp whose 16 columns all lie past V would only multiply zeros (half the warps at
  // V = 64): it skips the state update, warp-uniformly; its columns are never stored.
  const bool warp_active = v0 + 16 * warp < V;
  const int64_t state_base = (n * H + h) * static_cast<int64_t>(K) * V;
  // forward scan: h0 from pool row state_idx[n], final state to ht row n or (in place) that
  // pool row. A padding row reads no state and writes zeros to ht row n (nothing in place);
  // the chunk states it stores are never read (the split chunk kernel skips padding rows).
  const float* init = kGrad ? a.dht : a.h0;
  float* last = kGrad ? a.dh0 : a.ht;
  int64_t init_base = state_base, last_base = state_base;
  bool zero_last = false;
  if constexpr (!kGrad) {
    const int64_t in_row = h0_state_row(a, n);
    if (in_row < 0) {
      init = nullptr;
      zero_last = true;
      if (a.inplace_final) last = nullptr;
    } else {
      init_base = (in_row * H + h) * static_cast<int64_t>(K) * V;
      last_base = (ht_state_row(a, n) * H + h) * static_cast<int64_t>(K) * V;
    }
  }
  for (int nt = 0; nt < kNT; ++nt)
    for (int r = 0; r < 4; ++r) s[nt][r] = 0.0f;
  // h0 by its strides; dht (kGrad) is always K-first: ChunkArgs strides are (V, 1) there
  if (init != nullptr) {
    if (a.state_v_stride == 1)
      for_state_slice(s, k0, vc_lo, K, V, lane, [&](float& x, int64_t off) { x = init[init_base + off]; });
    else
      for_state_elems(s, k0, vc_lo, K, V, lane, [&](float& x, int kd, int vc) {
        x = init[init_base + state_elem(a, kd, vc)];
      });
  }

  const uint16_t* const x = static_cast<const uint16_t*>(kGrad ? a.q : a.k);
  const uint16_t* const y = static_cast<const uint16_t*>(kGrad ? a.dout : a.v);
  uint16_t* const saved = kGrad ? a.dstates : a.states;
  const int64_t qk_tok = static_cast<int64_t>(H) * K;
  const int64_t v_tok = static_cast<int64_t>(H) * V;
  const bool vec_x = kVec || (a.flags & kVecQK) != 0, vec_y = kVec || (a.flags & kVecV) != 0;

  // this thread's gate column and segment: key dim k0 + gcol, rows [16 gseg, 16 gseg + 16);
  // the four segments of a column are lanes gcol % 8 + 8 * {0, 1, 2, 3} of one warp
  const int gcol = 8 * warp + (lane & 7), gseg = lane >> 3;
  const bool gcol_ok = k0 + gcol < K;
  const float* const gbase = a.g + (row * a.T * H + h) * static_cast<int64_t>(K) + k0 + gcol;

  // chunk number ci in walking order -> its first token and length
  auto chunk_of = [&](int64_t ci, int64_t* c0, int* len) {
    const int64_t c = kGrad ? nchunks - 1 - ci : ci;
    *c0 = start + c * kC;
    *len = static_cast<int>(end - *c0 < kC ? end - *c0 : kC);
    return c;
  };
  // issues the tile loads of chunk ci into stage `stage` (one commit group)
  auto load_stage = [&](int64_t ci, int stage) {
    unsigned char* const base = smem + stage * L::kStageBytes;
    int64_t c0;
    int len;
    chunk_of(ci, &c0, &len);
    const int64_t qk_base = ((row * a.T + c0) * H + h) * static_cast<int64_t>(K);
    const int64_t v_base = ((row * a.T + c0) * H + h) * static_cast<int64_t>(V);
    load_tile<KT, L::kXStride, kScanThreads>(reinterpret_cast<uint16_t*>(base + L::kXOff), x,
                                               qk_base, qk_tok, len, k0, K, vec_x, tid);
    load_tile<kScanV, L::kYStride, kScanThreads>(reinterpret_cast<uint16_t*>(base + L::kYOff),
                                                   y, v_base, v_tok, len, v0, V, vec_y, tid);
    cp_async_commit();
  };
  // this thread's gates of chunk ci (0 past the sequence end and past K)
  float gnext[kScanSegRows];
  auto load_gates = [&](int64_t ci) {
    int64_t c0;
    int len;
    chunk_of(ci, &c0, &len);
    const float* gp = gbase + (c0 + kScanSegRows * gseg) * qk_tok;
    const int rows = gcol_ok ? len - kScanSegRows * gseg : 0;  // rows of the segment inside
    if (rows >= kScanSegRows) {  // the usual case: no per-row test
#pragma unroll
      for (int r = 0; r < kScanSegRows; ++r, gp += qk_tok) gnext[r] = *gp;
    } else {
#pragma unroll
      for (int r = 0; r < kScanSegRows; ++r, gp += qk_tok) gnext[r] = r < rows ? *gp : 0.0f;
    }
  };

  if (nchunks > 0) {
    load_stage(0, 0);
    load_gates(0);
  }
  for (int64_t ci = 0; ci < nchunks; ++ci) {
    const int stage = static_cast<int>(ci & 1);
    // the other stage was released by the barrier that ended the previous iteration
    if (ci + 1 < nchunks) {
      load_stage(ci + 1, stage ^ 1);
      cp_async_wait_group<1>();  // this chunk's group has landed, the next may be in flight
    } else {
      cp_async_wait_group<0>();
    }
    // cumulative gates of this thread's segment (gate_cumsum's order), then the next
    // chunk's gates are loaded while this one is computed
    float b[kScanSegRows];
    {
      float run = 0.0f;
#pragma unroll
      for (int r = 0; r < kScanSegRows; ++r) {
        run = gate_step(run, gnext[r]);
        b[r] = run;
      }
      // totals of the column's four segments: lanes ^ 8, ^ 16, ^ 24
      const float o8 = __shfl_xor_sync(0xffffffffu, run, 8);
      const float o16 = __shfl_xor_sync(0xffffffffu, run, 16);
      const float o24 = __shfl_xor_sync(0xffffffffu, run, 24);
      float t0, t1, t2, t3;  // segment totals by segment
      if (gseg == 0) {
        t0 = run, t1 = o8, t2 = o16, t3 = o24;
      } else if (gseg == 1) {
        t0 = o8, t1 = run, t2 = o24, t3 = o16;
      } else if (gseg == 2) {
        t0 = o16, t1 = o24, t2 = run, t3 = o8;
      } else {
        t0 = o24, t1 = o16, t2 = o8, t3 = run;
      }
      const float pre = gate_prefix(gseg, t0, t1, t2);
      if (gseg > 0) {
#pragma unroll
        for (int r = 0; r < kScanSegRows; ++r) b[r] += pre;
      }
      const float blast = gate_prefix(3, t0, t1, t2) + t3;  // = b of row kC - 1
      if (gseg == 0) sLast[gcol] = blast;
      __syncthreads();  // this stage's tiles are visible to every thread
      // x~ in place (input dtype): this thread's column and segment
      uint16_t* const sX = reinterpret_cast<uint16_t*>(smem + stage * L::kStageBytes + L::kXOff);
#pragma unroll
      for (int r = 0; r < kScanSegRows; ++r) {
        uint16_t* const xp = sX + (kScanSegRows * gseg + r) * L::kXStride + gcol;
        const float xv = E::to_float(*xp);
        if constexpr (kGrad) {
          *xp = E::from_float(xv * exp2f(b[r]) * a.scale);
        } else {
          *xp = E::from_float(xv * exp2f(blast - b[r]));
        }
      }
    }
    if (ci + 1 < nchunks) load_gates(ci + 1);  // in flight during the rest of this chunk
    int64_t c0;
    int len;
    const int64_t c = chunk_of(ci, &c0, &len);
    const uint16_t* const sX =
        reinterpret_cast<const uint16_t*>(smem + stage * L::kStageBytes + L::kXOff);
    const uint16_t* const sY =
        reinterpret_cast<const uint16_t*>(smem + stage * L::kStageBytes + L::kYOff);

    // save the state this chunk starts from (forward) / the gradient on its end (backward),
    // rounded to the input dtype: staged in shared memory, then written in 16-byte vectors
    // sOut holds key dims in pairs: word (pair kl / 2, column vl) = (S[kl][vl], S[kl+1][vl]),
    // which is how the fragments hold them, so one 32-bit store takes two entries
    uint32_t* const sOutW = reinterpret_cast<uint32_t*>(sOut);
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int hv = 0; hv < 2; ++hv) {
        const int kp = 4 * nt + c4;                       // key-dim pair within the tile
        const int vl = 16 * warp + g8 + 8 * hv;           // V column within the tile
        sOutW[kp * L::kOutPairStride + vl] = E::pack2(s[nt][2 * hv], s[nt][2 * hv + 1]);
      }
    }
    __syncthreads();  // x~, b_last and the staged state are complete
    if (chunk0 + c < a.ws_chunks) {  // always, for offsets the wrapper accepts
      uint16_t* const dst = saved + ((chunk0 + c) * H + h) * static_cast<int64_t>(K) * V;
      if (kVec || (a.flags & kVecS)) {  // V % 8 == 0: whole vectors are inside or outside
        // thread -> one 8-column vector, key dims kl0 + kRowStep m (pointer steps, no
        // 64-bit multiply per store)
        constexpr int kPerRow = kScanV / 8;
        constexpr int kRowStep = kScanThreads / kPerRow;
        const int kl0 = tid / kPerRow, vl = (tid % kPerRow) * 8;
        const int rows = v0 + vl < V ? K - k0 - kl0 : 0;  // key dims of this thread inside K
        uint16_t* dp = dst + static_cast<int64_t>(k0 + kl0) * V + v0 + vl;
        const int64_t step = static_cast<int64_t>(kRowStep) * V;
#pragma unroll
        for (int m = 0; m < KT / kRowStep; ++m, dp += step) {
          if (m * kRowStep < rows)
            *reinterpret_cast<uint4*>(dp) = out_row8(sOutW, kl0 + m * kRowStep, vl);
        }
      } else {
        for (int i = tid; i < KT * kScanV; i += kScanThreads) {
          const int kl = i / kScanV, vl = i % kScanV;
          if (k0 + kl < K && v0 + vl < V)
            dst[static_cast<int64_t>(k0 + kl) * V + v0 + vl] = static_cast<uint16_t>(
                sOutW[(kl >> 1) * L::kOutPairStride + vl] >> (16 * (kl & 1)));
        }
      }
    }

    // S^T <- S^T * exp2(b_last) + y^T @ x~: state_update's arithmetic in the same order, with
    // the y fragments read one token block at a time (fewer live registers)
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
      const float2 bl = *reinterpret_cast<const float2*>(sLast + 8 * nt + 2 * c4);
      const float e0 = exp2f(bl.x), e1 = exp2f(bl.y);
      s[nt][0] *= e0;
      s[nt][1] *= e1;
      s[nt][2] *= e0;
      s[nt][3] *= e1;
    }
    // ldmatrix lanes with bits 3 and 4 swapped: the transposed y tile comes out directly in
    // the A order state_update builds as {yf0, yf2, yf1, yf3}
    const int ya_row = (lane & 7) + ((lane >> 4) & 1) * 8, ya_col = ((lane >> 3) & 1) * 8;
    if (warp_active) {  // token blocks one at a time: unrolled, the backward's scans spilled
#pragma unroll 1
      for (int j = 0; j < 4; ++j) {
        uint32_t ay[4];
        ldsm_x4_trans(ay, sY + (16 * j + ya_row) * L::kYStride + 16 * warp + ya_col);
#pragma unroll
        for (int kk = 0; kk < KT / 16; ++kk) {
          uint32_t xf[4];
          ldsm_x4_trans(xf, sX + (16 * j + lm_row) * L::kXStride + 16 * kk + lm_col);
          E::mma(s[2 * kk], ay, xf[0], xf[1]);
          E::mma(s[2 * kk + 1], ay, xf[2], xf[3]);
        }
      }
    }
    __syncthreads();  // this stage is refilled two chunks from now; sOut, sLast next chunk
  }

  // what is left: dh0 (gradient scan), or the final state when asked for (forward scan)
  if (last != nullptr) {
    if (a.state_v_stride == 1)
      for_state_slice(s, k0, vc_lo, K, V, lane, [&](float& x, int64_t off) {
        last[last_base + off] = zero_last ? 0.0f : x;
      });
    else
      for_state_elems(s, k0, vc_lo, K, V, lane, [&](float& x, int kd, int vc) {
        last[last_base + state_elem(a, kd, vc)] = zero_last ? 0.0f : x;
      });
  }
}

// Whether the scans run their all-vector variant for these arguments (the launchers and
// the emulator pick the kernel instantiation with it).
inline bool scan_vec(const ChunkArgs& a) {
  constexpr int kAll = kVecQK | kVecV | kVecS;
  return (a.flags & kAll) == kAll;
}

// One scan per block: grid x = N * H, y = V tiles, z = key tiles. The all-vector variant
// keeps two blocks per SM in registers (where shared memory fits two: not sm_86/89); the
// scalar one (rare inputs) gets all it needs.
template <typename T, bool kGrad, bool kVec>
__global__ void __launch_bounds__(kScanThreads, min_blocks_per_sm(ScanLayout::kBytes, kVec ? 2 : 1))
    gla_chunk_state_scan_kernel(const ChunkArgs a) {
  state_scan<T, kGrad, kVec>(a, blockIdx.z);
}

// Both scans of the backward in one launch (they are independent: k, v, h0 -> states and
// q, dO, dht -> dstates, dh0), so twice the blocks share the GPU: z = 2 x key tiles, the
// first half forward, the second half gradient.
template <typename T, bool kVec>
__global__ void __launch_bounds__(kScanThreads, min_blocks_per_sm(ScanLayout::kBytes, kVec ? 2 : 1))
    gla_chunk_state_scans_kernel(const ChunkArgs a) {
  const int key_tiles = (a.K + kScanK - 1) / kScanK;
  if (static_cast<int>(blockIdx.z) < key_tiles) {
    state_scan<T, false, kVec>(a, blockIdx.z);
  } else {
    state_scan<T, true, kVec>(a, blockIdx.z - key_tiles);
  }
}

}  // namespace
}  // namespace gla
