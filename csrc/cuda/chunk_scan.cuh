// The state scan shared by the chunked kernels: per (sequence, head, 64 V columns, 64 key
// dims), walk the sequence's chunks (state in float32 registers) and store the state each
// chunk starts from (forward; used by the split forward and by the backward) or the gradient
// arriving on each chunk's end state (backward), rounded to the input dtype: that is how
// the tensor cores take them anyway, and it halves the workspace. Serial over chunks;
// double-buffered with cp.async so the next chunk's tiles load while the current one is
// computed.
#pragma once

#include "chunk_common.cuh"

namespace gla {
namespace {

constexpr int kScanWarps = 4;             // warp w owns V columns [16w, 16w+16) of the tile
constexpr int kScanThreads = 32 * kScanWarps;
constexpr int kScanK = 64;                // key dims per block
constexpr int kScanV = 64;                // V columns per block

// Shared memory of the state scans: two stages, so the next chunk's tiles load (cp.async)
// while the current one is computed.
struct ScanLayout {
  static constexpr int kXStride = kScanK + 8;   // gated key-side tile (k or q): 16-bit
  static constexpr int kBStride = kScanK + 8;   // cumulative gates: float
  static constexpr int kYStride = kScanV + 8;   // value-side tile (v or dO): 16-bit
  static constexpr int kXOff = 0;
  static constexpr int kBOff = kXOff + kC * kXStride * 2;
  static constexpr int kYOff = kBOff + kC * kBStride * 4;
  static constexpr int kStageBytes = kYOff + kC * kYStride * 2;
  static constexpr int kOutStride = kScanV + 8;  // the state being saved: [kScanK] rows 16-bit
  static constexpr int kOutOff = 2 * kStageBytes;
  static constexpr int kTotOff = kOutOff + kScanK * kOutStride * 2;
  static constexpr int kBytes = kTotOff + gate_scratch_floats<kScanK>() * 4;
  static_assert(kBOff % 16 == 0 && kYOff % 16 == 0 && kStageBytes % 16 == 0 &&
                    kTotOff % 16 == 0 && (kOutStride * 2) % 16 == 0,
                "alignment");
};
static_assert(ScanLayout::kBytes <= 99 * 1024, "the scans must fit sm_86/sm_89 (99 KB per block)");

// ---- the state scan kernel -------------------------------------------------------------
// kGrad = false: x = k, y = v, walks forward from h0, stores S0 of each chunk (and the final
//                state into ht when ht is not null).
// kGrad = true:  x = q, y = dO, walks backward from dht, stores dS_end of each chunk, then dh0.
// Both are S^T <- S^T * exp2(b_last) + y^T @ x~ with x~ = k * exp2(b_last - b) (forward) or
// q * exp2(b) * scale (gradient). Rows of the state (key dims) are independent, so the grid
// splits them too: x = N * H, y = V tiles of 64, z = key tiles of kScanK.
template <typename T, bool kGrad>
__device__ __forceinline__ void state_scan(const ChunkArgs& a, int key_tile) {
  using E = Elem<T>;
  using L = ScanLayout;
  constexpr int KT = kScanK;
  constexpr int kNT = KT / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  float* const sTot = reinterpret_cast<float*>(smem + L::kTotOff);
  uint16_t* const sOut = reinterpret_cast<uint16_t*>(smem + L::kOutOff);

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

  // chunk number ci in walking order -> its first token and length
  auto chunk_of = [&](int64_t ci, int64_t* c0, int* len) {
    const int64_t c = kGrad ? nchunks - 1 - ci : ci;
    *c0 = start + c * kC;
    *len = static_cast<int>(end - *c0 < kC ? end - *c0 : kC);
    return c;
  };
  // issues the loads of chunk ci into stage `stage` (one commit group)
  auto load_stage = [&](int64_t ci, int stage) {
    unsigned char* const base = smem + stage * L::kStageBytes;
    int64_t c0;
    int len;
    chunk_of(ci, &c0, &len);
    const int64_t qk_base = ((row * a.T + c0) * H + h) * static_cast<int64_t>(K);
    const int64_t v_base = ((row * a.T + c0) * H + h) * static_cast<int64_t>(V);
    load_tile<KT, L::kXStride, kScanThreads>(reinterpret_cast<uint16_t*>(base + L::kXOff), x,
                                               qk_base, qk_tok, len, k0, K,
                                               (a.flags & kVecQK) != 0, tid);
    load_tile<KT, L::kBStride, kScanThreads>(reinterpret_cast<float*>(base + L::kBOff), a.g,
                                               qk_base, qk_tok, len, k0, K,
                                               (a.flags & kVecG) != 0, tid);
    load_tile<kScanV, L::kYStride, kScanThreads>(reinterpret_cast<uint16_t*>(base + L::kYOff),
                                                   y, v_base, v_tok, len, v0, V,
                                                   (a.flags & kVecV) != 0, tid);
    cp_async_commit();
  };

  if (nchunks > 0) load_stage(0, 0);
  for (int64_t ci = 0; ci < nchunks; ++ci) {
    const int stage = static_cast<int>(ci & 1);
    // the other stage was released by the barrier that ended the previous iteration
    if (ci + 1 < nchunks) {
      load_stage(ci + 1, stage ^ 1);
      cp_async_wait_group<1>();  // this chunk's group has landed, the next may be in flight
    } else {
      cp_async_wait_group<0>();
    }
    __syncthreads();
    unsigned char* const base = smem + stage * L::kStageBytes;
    uint16_t* const sX = reinterpret_cast<uint16_t*>(base + L::kXOff);
    float* const sB = reinterpret_cast<float*>(base + L::kBOff);
    const uint16_t* const sY = reinterpret_cast<const uint16_t*>(base + L::kYOff);
    int64_t c0;
    int len;
    const int64_t c = chunk_of(ci, &c0, &len);
    gate_cumsum<KT, L::kBStride, kScanThreads>(sB, sTot, tid);

    // x~ in place (input dtype)
    {
      constexpr int kPerRow = KT / 8;
      const float* const blast = sB + (kC - 1) * L::kBStride;  // rows past len repeat b_last
      for (int i = tid; i < kC * kPerRow; i += kScanThreads) {
        const int t = i / kPerRow, kb = (i % kPerRow) * 8;
        uint4* const xp = reinterpret_cast<uint4*>(sX + t * L::kXStride + kb);
        const float* const bt = sB + t * L::kBStride + kb;
        uint4 xv = *xp;
        uint32_t* const xw = reinterpret_cast<uint32_t*>(&xv);
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const float2 b = *reinterpret_cast<const float2*>(bt + 2 * e);
          float x0, x1;
          E::unpack2(xw[e], x0, x1);
          if constexpr (kGrad) {
            xw[e] = E::pack2(x0 * exp2f(b.x) * a.scale, x1 * exp2f(b.y) * a.scale);
          } else {
            const float2 bl = *reinterpret_cast<const float2*>(blast + kb + 2 * e);
            xw[e] = E::pack2(x0 * exp2f(bl.x - b.x), x1 * exp2f(bl.y - b.y));
          }
        }
        *xp = xv;
      }
    }

    // save the state this chunk starts from (forward) / the gradient on its end (backward),
    // rounded to the input dtype: staged in shared memory, then written in 16-byte vectors
#pragma unroll
    for (int nt = 0; nt < kNT; ++nt) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const int kl = 8 * nt + 2 * c4 + (r & 1);         // key dim within the tile
        const int vl = 16 * warp + g8 + (r >> 1) * 8;     // V column within the tile
        sOut[kl * L::kOutStride + vl] = E::from_float(s[nt][r]);
      }
    }
    __syncthreads();
    if (chunk0 + c < a.ws_chunks) {  // always, for offsets the wrapper accepts
      uint16_t* const dst = saved + ((chunk0 + c) * H + h) * static_cast<int64_t>(K) * V;
      if (a.flags & kVecS) {  // V % 8 == 0: whole vectors are inside or outside
        for (int i = tid; i < KT * (kScanV / 8); i += kScanThreads) {
          const int kl = i / (kScanV / 8), vl = (i % (kScanV / 8)) * 8;
          if (k0 + kl < K && v0 + vl < V)
            *reinterpret_cast<uint4*>(dst + static_cast<int64_t>(k0 + kl) * V + v0 + vl) =
                *reinterpret_cast<const uint4*>(sOut + kl * L::kOutStride + vl);
        }
      } else {
        for (int i = tid; i < KT * kScanV; i += kScanThreads) {
          const int kl = i / kScanV, vl = i % kScanV;
          if (k0 + kl < K && v0 + vl < V)
            dst[static_cast<int64_t>(k0 + kl) * V + v0 + vl] = sOut[kl * L::kOutStride + vl];
        }
      }
    }

    uint32_t yf[4][4];
#pragma unroll
    for (int j = 0; j < 4; ++j)
      ldsm_x4_trans(yf[j], sY + (16 * j + lm_row) * L::kYStride + 16 * warp + lm_col);
    state_update<T, KT, L::kXStride>(s, yf, sX, sB + (kC - 1) * L::kBStride, lane);
    __syncthreads();  // this stage is refilled two chunks from now; sOut is rewritten next
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

// One scan per block: grid x = N * H, y = V tiles, z = key tiles.
template <typename T, bool kGrad>
__global__ void __launch_bounds__(kScanThreads)
    gla_chunk_state_scan_kernel(const ChunkArgs a) {
  state_scan<T, kGrad>(a, blockIdx.z);
}

// Both scans of the backward in one launch (they are independent: k, v, h0 -> states and
// q, dO, dht -> dstates, dh0), so twice the blocks share the GPU: z = 2 x key tiles, the
// first half forward, the second half gradient.
template <typename T>
__global__ void __launch_bounds__(kScanThreads)
    gla_chunk_state_scans_kernel(const ChunkArgs a) {
  const int key_tiles = (a.K + kScanK - 1) / kScanK;
  if (static_cast<int>(blockIdx.z) < key_tiles) {
    state_scan<T, false>(a, blockIdx.z);
  } else {
    state_scan<T, true>(a, blockIdx.z - key_tiles);
  }
}

}  // namespace
}  // namespace gla
