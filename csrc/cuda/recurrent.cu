// Fused recurrent GLA on CUDA, forward and backward. Torch-free: raw pointers and a stream.
//
// Math (docs/design.md "The math"), per sequence n and head h, state S is K x V in float32:
//   S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t,   o_t = scale * q_t S_t
// and the backward of csrc/cpu/recurrent.cpp:
//   dq_t = scale * S_t do_t                                  (pass 1, processing order)
//   D_t  = scale q_t^T do_t + diag(a_{t+1}) D_{t+1}, D starts at dht   (pass 2, reversed)
//   dk_t = D_t v_t,  dv_t = D_t^T k_t,  dh0 = diag(a_first) D_first
//   dg_t = sum over s at or after t (processing order) of (q_s*dq_s - k_s*dk_s) + rowsum(ht*dht)
//
// Work split: one thread block per (sequence n, head h, tile of 32 columns of V).
// Lane = column j of the tile; warp w owns rows [w*R, (w+1)*R) of S and keeps S[:, j] for
// those rows in registers (R rows per thread). Sums over columns (dq, dk, rowsum(ht*dht))
// are done inside a warp by a butterfly that ends with one row per lane; sums over rows
// (o, dv) go through shared memory across the warps. Per token, q/k/exp(g) are staged in
// shared memory (double-buffered, prefetched one token ahead into registers), so a step
// needs exactly one __syncthreads.
//
// dq and dk need every column, so the backward kernel writes its per-tile partial sums to
// the float32 workspace and a second kernel adds the tiles, writes dq/dk and computes dg.
//
// GLA_RECURRENT_EMULATE: tests/cuda_emu/recurrent_emu.cpp compiles the kernels on the CPU
// (emu.h supplies the CUDA types and warp primitives); the launchers are left out.
#ifndef GLA_RECURRENT_EMULATE
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#include <cstdint>
#include <cstdio>

#include "gla.h"

namespace gla {
namespace {

constexpr int kTileV = 32;               // columns of V per block (one per lane)
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kFinalizeThreads = 256;

// ---- element conversions ------------------------------------------------------------
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// ---- sequences ----------------------------------------------------------------------
struct Seq {
  int64_t row, start, len;
  bool reverse;
  // Token index of processing step s (0 <= s < len).
  __device__ __forceinline__ int64_t token(int64_t s) const {
    return reverse ? start + len - 1 - s : start + s;
  }
};

// Sequence n's tokens [start, end) with the cu_seqlens offsets clamped to [0, T] as in the
// chunk kernels: malformed ones (the Python wrapper rejects them; direct op calls and
// CUDA-graph capture skip that check) must neither run a loop backwards nor leave the row.
__device__ __forceinline__ void clamped_bounds(const int64_t* __restrict__ cu, int64_t T,
                                               int64_t n, int64_t* start, int64_t* end) {
  int64_t s = cu[n], e = cu[n + 1];
  s = s < 0 ? 0 : (s > T ? T : s);
  e = e < s ? s : (e > T ? T : e);
  *start = s;
  *end = e;
}

__device__ __forceinline__ Seq make_seq(const int64_t* __restrict__ cu, int64_t T, int64_t n,
                                        bool reverse) {
  Seq s;
  if (cu) {
    int64_t start, end;
    clamped_bounds(cu, T, n, &start, &end);
    s.row = 0;
    s.start = start;
    s.len = end - start;
  } else {
    s.row = n;
    s.start = 0;
    s.len = T;
  }
  s.reverse = reverse;
  return s;
}

// The backward kernels read offsets clamped to [0, T] beforehand (recurrent_clamp_kernel),
// with the unclamped code of before: clamping inside the big backward kernel tipped ptxas
// into a 64-register budget with spills (K <= 128). Offsets within [0, T] and a length of at
// least 0 keep every access inside the row, also for decreasing (malformed) offsets.
__device__ __forceinline__ Seq seq_from_clamped(const int64_t* __restrict__ cu, int64_t T,
                                                int64_t n, bool reverse) {
  Seq s;
  if (cu) {
    s.row = 0;
    s.start = cu[n];
    s.len = cu[n + 1] - s.start;
  } else {
    s.row = n;
    s.start = 0;
    s.len = T;
  }
  if (s.len < 0) s.len = 0;
  s.reverse = reverse;
  return s;
}

constexpr int kClampThreads = 256;

// out[i] = cu[i] clamped to [0, T], i = 0..N (one thread per offset).
__global__ void __launch_bounds__(kClampThreads)
recurrent_clamp_kernel(const int64_t* __restrict__ cu, int64_t count, int64_t T,
                       int64_t* __restrict__ out) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kClampThreads + threadIdx.x;
  if (i < count) {
    const int64_t x = cu[i];
    out[i] = x < 0 ? 0 : (x > T ? T : x);
  }
}

// Where a sequence's state rows live (forward): h0 row state_idx[n] of a pool (or row n),
// final state to the same pool row in place (or ht row n); K-first or V-first by strides.
struct StateRows {
  const int64_t* idx;  // null: identity
  int64_t P;           // pool rows (indices >= P count as padding: no access outside)
  int64_t k_stride, v_stride;
  bool inplace;
};

__device__ __forceinline__ int64_t pool_row(const StateRows& r, int64_t n) {
  return ::gla::pool_row(r.idx, r.P, n);  // the rule in gla.h
}

// ---- warp butterfly: R row sums over the 32 lanes -------------------------------------
// On entry every lane holds x[0..R) (its column's terms for R rows). On exit x[0] of lane l
// holds the sum over all 32 lanes of row l / (32 / R). Costs R - 1 + log2(32 / R) shuffles
// instead of 5 R: each stage halves the rows a lane keeps, swapping the other half with
// its partner lane.
template <int R, int HALF, int M>
__device__ __forceinline__ void butterfly_stage(float (&x)[R], int lane) {
  if constexpr (HALF >= 1) {
    const bool upper = (lane & M) != 0;
#pragma unroll
    for (int r = 0; r < HALF; ++r) {
      const float send = upper ? x[r] : x[r + HALF];
      const float keep = upper ? x[r + HALF] : x[r];
      x[r] = keep + __shfl_xor_sync(kFullMask, send, M);
    }
    butterfly_stage<R, HALF / 2, M / 2>(x, lane);
  }
}

template <int R>
__device__ __forceinline__ float warp_row_sums(float (&x)[R], int lane) {
  static_assert(R >= 1 && R <= 32 && (R & (R - 1)) == 0, "R must be a power of two <= 32");
  butterfly_stage<R, R / 2, 16>(x, lane);
  // Lanes that differ only in the low log2(32 / R) bits hold partial sums of the same row.
#pragma unroll
  for (int m = 16 / R; m >= 1; m /= 2) x[0] += __shfl_xor_sync(kFullMask, x[0], m);
  return x[0];
}

// ---- block geometry -----------------------------------------------------------------
// R rows per thread, NW warps: the block covers K <= R * NW rows and 32 columns.
template <int R_, int NW_>
struct Geometry {
  static constexpr int R = R_;
  static constexpr int NW = NW_;
  static constexpr int kThreads = NW * 32;
  static constexpr int kMaxK = R * NW;
  static constexpr int kLanesPerRow = 32 / R;  // lanes holding one row after warp_row_sums
  // Forward launch bound. With none, ptxas for sm_80 squeezes the K <= 256 forward into 64
  // registers and spills; with 3 (<= 85 registers) sm_90a spills. 2 blocks (<= 128
  // registers at 256 threads) is spill-free on both. The backward is spill-free unbounded.
  static constexpr int kFwdMinBlocks = 2;
  static_assert(R % 4 == 0, "rows are read from shared memory as float4");
  static_assert(kMaxK <= kThreads, "one thread stages one row of q/k/g");
};

// Shared-memory staging of one token's q, k and exp(g) (rows >= K are zero).
template <int KMAX>
struct Stage {
  __align__(16) float q[2][KMAX];
  __align__(16) float k[2][KMAX];
  __align__(16) float a[2][KMAX];
};

// =====================================================================================
// Forward: o and ht.
// =====================================================================================
template <typename T, typename G>
__global__ void __launch_bounds__(G::kThreads, G::kFwdMinBlocks)
recurrent_fwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                     const float* __restrict__ g, const float* h0,  // h0 == ht: in place
                     const int64_t* __restrict__ cu, T* __restrict__ o, float* ht,
                     int64_t Tlen, int64_t H, int K, int V, int NT, float scale, bool reverse,
                     const StateRows rows) {
  constexpr int R = G::R, NW = G::NW, KMAX = G::kMaxK;
  __shared__ Stage<KMAX> st;
  __shared__ float red[2][NW][32];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tile = static_cast<int>(blockIdx.x % NT);
  const int64_t nh = blockIdx.x / NT, n = nh / H, h = nh % H;
  const int j = tile * kTileV + lane;
  const bool col_ok = j < V;
  const int i0 = warp * R;
  const int64_t in_row = pool_row(rows, n);
  const int64_t jv = static_cast<int64_t>(j) * rows.v_stride;
  if (in_row < 0) {  // padding row (uniform per block): o stays zero, the pool untouched
    if (!rows.inplace)
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int i = i0 + r;
        if (col_ok && i < K) ht[nh * K * V + i * rows.k_stride + jv] = 0.f;
      }
    return;
  }
  const Seq seq = make_seq(cu, Tlen, n, reverse);
  const int64_t HK = H * K, HV = H * V;
  const int64_t h0_off = (in_row * H + h) * K * V;
  const int64_t ht_off = ((rows.inplace ? in_row : n) * H + h) * K * V;

  float S[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int i = i0 + r;
    S[r] = (h0 && col_ok && i < K) ? h0[h0_off + i * rows.k_stride + jv] : 0.f;
  }

  // Registers holding the next token's inputs (prefetched one step ahead).
  float nq = 0.f, nk = 0.f, ng = 0.f, nv = 0.f;
  auto load = [&](int64_t t) {
    const int64_t base = seq.row * Tlen + t;
    if (tid < K) {
      const int64_t off = base * HK + h * K + tid;
      nq = to_float(q[off]);
      nk = to_float(k[off]);
      ng = g[off];
    }
    if (col_ok) nv = to_float(v[base * HV + h * V + j]);
  };
  auto stage = [&](int buf) {
    if (tid < KMAX) {
      const bool ok = tid < K;
      st.q[buf][tid] = ok ? nq * scale : 0.f;
      st.k[buf][tid] = ok ? nk : 0.f;
      st.a[buf][tid] = ok ? expf(ng) : 0.f;
    }
  };

  float vcur = 0.f;
  if (seq.len > 0) {
    load(seq.token(0));
    stage(0);
    vcur = nv;
  }
  __syncthreads();

  for (int64_t s = 0; s < seq.len; ++s) {
    const int buf = static_cast<int>(s & 1);
    const int64_t t = seq.token(s);
    if (s + 1 < seq.len) load(seq.token(s + 1));

    const float4* q4 = reinterpret_cast<const float4*>(&st.q[buf][i0]);
    const float4* k4 = reinterpret_cast<const float4*>(&st.k[buf][i0]);
    const float4* a4 = reinterpret_cast<const float4*>(&st.a[buf][i0]);
    float acc = 0.f;
#pragma unroll
    for (int r4 = 0; r4 < R / 4; ++r4) {
      const float4 qq = q4[r4], kk = k4[r4], aa = a4[r4];
      float* s4 = &S[4 * r4];
      s4[0] = aa.x * s4[0] + kk.x * vcur;
      s4[1] = aa.y * s4[1] + kk.y * vcur;
      s4[2] = aa.z * s4[2] + kk.z * vcur;
      s4[3] = aa.w * s4[3] + kk.w * vcur;
      acc += qq.x * s4[0] + qq.y * s4[1] + qq.z * s4[2] + qq.w * s4[3];
    }
    red[buf][warp][lane] = acc;
    if (s + 1 < seq.len) {
      stage(buf ^ 1);
      vcur = nv;
    }
    __syncthreads();
    // red[buf] is rewritten two steps later, after the next barrier: no second barrier needed.
    if (warp == 0 && col_ok) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < NW; ++w) sum += red[buf][w][lane];
      o[(seq.row * Tlen + t) * HV + h * V + j] = from_float<T>(sum);
    }
  }

#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int i = i0 + r;
    if (col_ok && i < K) ht[ht_off + i * rows.k_stride + jv] = S[r];
  }
}

// =====================================================================================
// Backward, kernel 1: dv and dh0 (complete), per-V-tile partials of dq, dk, rowsum(ht*dht).
// =====================================================================================
template <typename T, typename G>
__global__ void __launch_bounds__(G::kThreads)
recurrent_bwd_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                     const float* __restrict__ g, const float* __restrict__ h0,
                     const T* __restrict__ dout, const float* __restrict__ dht,
                     const int64_t* __restrict__ cu, T* __restrict__ dv,
                     float* __restrict__ dh0, float* __restrict__ ws_dq,
                     float* __restrict__ ws_dk, float* __restrict__ ws_hdh, int64_t Tlen,
                     int64_t H, int K, int V, int NT, int64_t qk_total, int64_t nhk_total,
                     float scale, bool reverse) {
  constexpr int R = G::R, NW = G::NW, KMAX = G::kMaxK, LPR = G::kLanesPerRow;
  __shared__ Stage<KMAX> st;
  __shared__ float red[2][NW][32];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int tile = static_cast<int>(blockIdx.x % NT);
  const int64_t nh = blockIdx.x / NT, n = nh / H, h = nh % H;
  const int j = tile * kTileV + lane;
  const bool col_ok = j < V;
  const int i0 = warp * R;
  const Seq seq = seq_from_clamped(cu, Tlen, n, reverse);
  const int64_t HK = H * K, HV = H * V;
  const int64_t state_off = nh * K * V;
  // After warp_row_sums, this lane holds row i_sum; lanes with lane % LPR == 0 write it.
  const int i_sum = i0 + lane / LPR;
  const bool sum_writer = (lane % LPR) == 0 && i_sum < K;
  ws_dq += tile * qk_total;
  ws_dk += tile * qk_total;
  ws_hdh += tile * nhk_total;

  float nq = 0.f, nk = 0.f, ng = 0.f, nv = 0.f, ndo = 0.f;
  auto load = [&](int64_t t, bool with_q) {
    const int64_t base = seq.row * Tlen + t;
    if (tid < K) {
      const int64_t off = base * HK + h * K + tid;
      if (with_q) nq = to_float(q[off]);
      nk = to_float(k[off]);
      ng = g[off];
    }
    if (col_ok) {
      const int64_t off = base * HV + h * V + j;
      nv = to_float(v[off]);
      ndo = to_float(dout[off]);
    }
  };
  auto stage = [&](int buf) {
    if (tid < KMAX) {
      const bool ok = tid < K;
      st.q[buf][tid] = ok ? nq : 0.f;
      st.k[buf][tid] = ok ? nk : 0.f;
      st.a[buf][tid] = ok ? expf(ng) : 0.f;
    }
  };

  // ---- pass 1: recompute S_t in processing order; partial dq_t = scale * S_t do_t ----
  float S[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int i = i0 + r;
    S[r] = (h0 && col_ok && i < K) ? h0[state_off + static_cast<int64_t>(i) * V + j] : 0.f;
  }
  float vcur = 0.f, docur = 0.f;
  if (seq.len > 0) {
    load(seq.token(0), false);
    stage(0);
    vcur = nv;
    docur = ndo;
  }
  __syncthreads();

  for (int64_t s = 0; s < seq.len; ++s) {
    const int buf = static_cast<int>(s & 1);
    const int64_t t = seq.token(s);
    if (s + 1 < seq.len) load(seq.token(s + 1), false);

    const float4* k4 = reinterpret_cast<const float4*>(&st.k[buf][i0]);
    const float4* a4 = reinterpret_cast<const float4*>(&st.a[buf][i0]);
    float x[R];
#pragma unroll
    for (int r4 = 0; r4 < R / 4; ++r4) {
      const float4 kk = k4[r4], aa = a4[r4];
      float* s4 = &S[4 * r4];
      s4[0] = aa.x * s4[0] + kk.x * vcur;
      s4[1] = aa.y * s4[1] + kk.y * vcur;
      s4[2] = aa.z * s4[2] + kk.z * vcur;
      s4[3] = aa.w * s4[3] + kk.w * vcur;
      x[4 * r4 + 0] = s4[0] * docur;
      x[4 * r4 + 1] = s4[1] * docur;
      x[4 * r4 + 2] = s4[2] * docur;
      x[4 * r4 + 3] = s4[3] * docur;
    }
    const float dq_part = warp_row_sums<R>(x, lane) * scale;
    if (sum_writer) ws_dq[(seq.row * Tlen + t) * HK + h * K + i_sum] = dq_part;
    if (s + 1 < seq.len) {
      stage(buf ^ 1);
      vcur = nv;
      docur = ndo;
    }
    __syncthreads();
  }

  // rowsum(ht * dht), partial over this tile; S now holds ht. (dht is uniform: no divergence.)
  if (dht) {
    float x[R];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int i = i0 + r;
      x[r] = (col_ok && i < K) ? S[r] * dht[state_off + static_cast<int64_t>(i) * V + j] : 0.f;
    }
    const float hdh_part = warp_row_sums<R>(x, lane);
    if (sum_writer) ws_hdh[nh * K + i_sum] = hdh_part;
  }

  // ---- pass 2: walk back; S becomes D, the gradient of the state ----
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int i = i0 + r;
    S[r] = (dht && col_ok && i < K) ? dht[state_off + static_cast<int64_t>(i) * V + j] : 0.f;
  }
  // The last barrier of pass 1 has been passed by every thread: stage buffers are free.
  if (seq.len > 0) {
    load(seq.token(seq.len - 1), true);
    stage(0);
    vcur = nv;
    docur = ndo * scale;
  }
  __syncthreads();

  for (int64_t s = 0; s < seq.len; ++s) {
    const int buf = static_cast<int>(s & 1);
    const int64_t step = seq.len - 1 - s;
    const int64_t t = seq.token(step);
    if (step > 0) load(seq.token(step - 1), true);

    const float4* q4 = reinterpret_cast<const float4*>(&st.q[buf][i0]);
    const float4* k4 = reinterpret_cast<const float4*>(&st.k[buf][i0]);
    const float4* a4 = reinterpret_cast<const float4*>(&st.a[buf][i0]);
    float x[R];
    float dv_part = 0.f;
#pragma unroll
    for (int r4 = 0; r4 < R / 4; ++r4) {
      const float4 qq = q4[r4], kk = k4[r4], aa = a4[r4];
      const float qv[4] = {qq.x, qq.y, qq.z, qq.w};
      const float kv[4] = {kk.x, kk.y, kk.z, kk.w};
      const float av[4] = {aa.x, aa.y, aa.z, aa.w};
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        float& d = S[4 * r4 + c];
        d += qv[c] * docur;          // D_t = scale q_t^T do_t + (decayed D_{t+1})
        x[4 * r4 + c] = d * vcur;    // dk_t = D_t v_t
        dv_part += kv[c] * d;        // dv_t = D_t^T k_t
        d *= av[c];                  // carried to the previous token: diag(a_t) D_t
      }
    }
    red[buf][warp][lane] = dv_part;
    const float dk_part = warp_row_sums<R>(x, lane);
    if (sum_writer) ws_dk[(seq.row * Tlen + t) * HK + h * K + i_sum] = dk_part;
    if (step > 0) {
      stage(buf ^ 1);
      vcur = nv;
      docur = ndo * scale;
    }
    __syncthreads();
    if (warp == 0 && col_ok) {
      float sum = 0.f;
#pragma unroll
      for (int w = 0; w < NW; ++w) sum += red[buf][w][lane];
      dv[(seq.row * Tlen + t) * HV + h * V + j] = from_float<T>(sum);
    }
  }

#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int i = i0 + r;
    if (col_ok && i < K) dh0[state_off + static_cast<int64_t>(i) * V + j] = S[r];
  }
}

// =====================================================================================
// Backward, kernel 2: add the V-tile partials, write dq and dk, and run the dg scan.
// One thread per (n, h, i); consecutive threads take consecutive i (coalesced).
// =====================================================================================
template <typename T>
__global__ void __launch_bounds__(kFinalizeThreads)
recurrent_bwd_finalize_kernel(const T* __restrict__ q, const T* __restrict__ k,
                              const int64_t* __restrict__ cu, const float* __restrict__ ws_dq,
                              const float* __restrict__ ws_dk, const float* __restrict__ ws_hdh,
                              bool has_dht, T* __restrict__ dq, T* __restrict__ dk,
                              float* __restrict__ dg, int64_t Tlen, int64_t H, int K,
                              int64_t total, int NT, int64_t qk_total, int64_t nhk_total,
                              bool reverse) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;  // no barriers in this kernel
  const int i = static_cast<int>(idx % K);
  const int64_t nh = idx / K, n = nh / H, h = nh % H;
  const Seq seq = seq_from_clamped(cu, Tlen, n, reverse);

  float hdh = 0.f;
  if (has_dht)
    for (int tile = 0; tile < NT; ++tile) hdh += ws_hdh[tile * nhk_total + nh * K + i];

  const int64_t HK = H * K;
  float running = 0.f;
  for (int64_t step = seq.len - 1; step >= 0; --step) {
    const int64_t off = (seq.row * Tlen + seq.token(step)) * HK + h * K + i;
    float dqv = 0.f, dkv = 0.f;
    for (int tile = 0; tile < NT; ++tile) {
      dqv += ws_dq[tile * qk_total + off];
      dkv += ws_dk[tile * qk_total + off];
    }
    dq[off] = from_float<T>(dqv);
    dk[off] = from_float<T>(dkv);
    running += to_float(q[off]) * dqv - to_float(k[off]) * dkv;
    dg[off] = running + hdh;
  }
}

// =====================================================================================
// Launchers
// =====================================================================================
thread_local char g_message[256];

#ifndef GLA_RECURRENT_EMULATE
const char* launch_error(const char* kernel) {
  const cudaError_t err = cudaGetLastError();
  if (err == cudaSuccess) return nullptr;
  std::snprintf(g_message, sizeof(g_message), "%s launch failed: %s", kernel,
                cudaGetErrorString(err));
  return g_message;
}

#endif  // GLA_RECURRENT_EMULATE

int64_t num_v_tiles(const GlaParams& p) { return (p.V + kTileV - 1) / kTileV; }

// The backward's workspace starts with the clamped offsets (with cu_seqlens: N + 1 int64,
// padded to 16 bytes), then the float partials.
int64_t clamped_offsets_floats(const GlaParams& p) {
  return p.cu_seqlens ? (2 * (p.N + 1) + 3) / 4 * 4 : 0;
}
int64_t* clamped_offsets_in_workspace(const GlaParams& p) {
  return p.cu_seqlens ? reinterpret_cast<int64_t*>(p.workspace) : nullptr;
}

// Checks shared by forward and backward; nullptr when the parameters are usable.
const char* check_params(const GlaParams& p, const char* op) {
  const char* why = nullptr;
  if (p.dtype == DType::kFloat64) why = "float64 is not supported by the CUDA kernels";
  else if (p.K < 0 || p.K > kCudaRecurrentMaxK) why = "K must be in [0, kCudaRecurrentMaxK=256]";
  else if (p.V < 0 || p.V > (int64_t{1} << 30)) why = "V out of range";
  else if (p.N < 0 || p.H < 0 || p.T < 0 || p.B < 0) why = "negative size";
  else if (p.cu_seqlens == nullptr && p.N != p.B) why = "N must equal B without cu_seqlens";
  else if (p.N * p.H * num_v_tiles(p) > int64_t{0x7fffffff})
    why = "too many (sequence, head, V tile) blocks for one grid";
  if (!why) return nullptr;
  std::snprintf(g_message, sizeof(g_message), "%s: %s", op, why);
  return g_message;
}

// The forward kernel's view of p's state rows (pool index, in place, K/V strides).
StateRows state_rows(const GlaParams& p) {
  return StateRows{p.state_idx, p.P, state_k_stride(p), state_v_stride(p), p.inplace_final};
}

#ifndef GLA_RECURRENT_EMULATE
template <typename T, typename G>
const char* launch_fwd(const GlaParams& p, cudaStream_t stream) {
  const int NT = static_cast<int>(num_v_tiles(p));
  const unsigned blocks = static_cast<unsigned>(p.N * p.H * NT);
  if (blocks == 0) return nullptr;
  recurrent_fwd_kernel<T, G><<<blocks, G::kThreads, 0, stream>>>(
      static_cast<const T*>(p.q), static_cast<const T*>(p.k), static_cast<const T*>(p.v),
      static_cast<const float*>(p.g), static_cast<const float*>(p.h0), p.cu_seqlens,
      static_cast<T*>(p.o), static_cast<float*>(p.ht), p.T, p.H, static_cast<int>(p.K),
      static_cast<int>(p.V), NT, static_cast<float>(p.scale), p.reverse, state_rows(p));
  return launch_error("recurrent_fwd_kernel");
}

template <typename T, typename G>
const char* launch_bwd(const GlaParams& p, cudaStream_t stream) {
  const int NT = static_cast<int>(num_v_tiles(p));
  const int64_t qk_total = p.B * p.T * p.H * p.K;
  const int64_t nhk_total = p.N * p.H * p.K;
  int64_t* clamped = clamped_offsets_in_workspace(p);
  if (clamped != nullptr) {
    const int64_t count = p.N + 1;
    recurrent_clamp_kernel<<<static_cast<unsigned>((count + kClampThreads - 1) / kClampThreads),
                             kClampThreads, 0, stream>>>(p.cu_seqlens, count, p.T, clamped);
    if (const char* err = launch_error("recurrent_clamp_kernel")) return err;
  }
  float* ws_dq = p.workspace + clamped_offsets_floats(p);
  float* ws_dk = ws_dq + NT * qk_total;
  float* ws_hdh = ws_dk + NT * qk_total;
  const unsigned blocks = static_cast<unsigned>(p.N * p.H * NT);
  if (blocks > 0) {
    recurrent_bwd_kernel<T, G><<<blocks, G::kThreads, 0, stream>>>(
        static_cast<const T*>(p.q), static_cast<const T*>(p.k), static_cast<const T*>(p.v),
        static_cast<const float*>(p.g), static_cast<const float*>(p.h0),
        static_cast<const T*>(p.dout), static_cast<const float*>(p.dht), clamped,
        static_cast<T*>(p.dv), static_cast<float*>(p.dh0), ws_dq, ws_dk, ws_hdh, p.T, p.H,
        static_cast<int>(p.K), static_cast<int>(p.V), NT, qk_total, nhk_total,
        static_cast<float>(p.scale), p.reverse);
    if (const char* err = launch_error("recurrent_bwd_kernel")) return err;
  }
  const int64_t total = p.N * p.H * p.K;
  if (total == 0) return nullptr;
  const int64_t fblocks = (total + kFinalizeThreads - 1) / kFinalizeThreads;
  if (fblocks > int64_t{0x7fffffff}) return "recurrent_bwd_finalize_kernel: grid too large";
  recurrent_bwd_finalize_kernel<T><<<static_cast<unsigned>(fblocks), kFinalizeThreads, 0,
                                     stream>>>(
      static_cast<const T*>(p.q), static_cast<const T*>(p.k), clamped, ws_dq, ws_dk,
      ws_hdh, p.dht != nullptr, static_cast<T*>(p.dq), static_cast<T*>(p.dk),
      static_cast<float*>(p.dg), p.T, p.H, static_cast<int>(p.K), total, NT, qk_total,
      nhk_total, p.reverse);
  return launch_error("recurrent_bwd_finalize_kernel");
}

#endif  // GLA_RECURRENT_EMULATE

// Three block shapes: K <= 64 (4 warps x 16 rows), K <= 128 (8 x 16), K <= 256 (8 x 32).
using Geo64 = Geometry<16, 4>;
using Geo128 = Geometry<16, 8>;
using Geo256 = Geometry<32, 8>;

#ifndef GLA_RECURRENT_EMULATE

template <bool kBackward, typename T>
const char* dispatch_k(const GlaParams& p, cudaStream_t stream) {
  if (p.K <= Geo64::kMaxK)
    return kBackward ? launch_bwd<T, Geo64>(p, stream) : launch_fwd<T, Geo64>(p, stream);
  if (p.K <= Geo128::kMaxK)
    return kBackward ? launch_bwd<T, Geo128>(p, stream) : launch_fwd<T, Geo128>(p, stream);
  return kBackward ? launch_bwd<T, Geo256>(p, stream) : launch_fwd<T, Geo256>(p, stream);
}

template <bool kBackward>
const char* dispatch(const GlaParams& p, cudaStream_t stream) {
  switch (p.dtype) {
    case DType::kFloat32: return dispatch_k<kBackward, float>(p, stream);
    case DType::kFloat16: return dispatch_k<kBackward, __half>(p, stream);
    case DType::kBFloat16: return dispatch_k<kBackward, __nv_bfloat16>(p, stream);
    default: return "gla recurrent CUDA: unsupported dtype";
  }
}

#endif  // GLA_RECURRENT_EMULATE

static_assert(Geo256::kMaxK == kCudaRecurrentMaxK, "largest block shape must cover kCudaRecurrentMaxK");

}  // namespace

// Workspace (float32): the clamped offsets (with cu_seqlens), [NT][B*T*H*K] dq partials,
// [NT][B*T*H*K] dk partials,
// [NT][N*H*K] rowsum(ht*dht) partials, NT = ceil(V / 32) tiles of V.
int64_t recurrent_bwd_cuda_workspace_floats(const GlaParams& p) {
  const int64_t NT = num_v_tiles(p);
  return clamped_offsets_floats(p) + NT * (2 * p.B * p.T * p.H * p.K + p.N * p.H * p.K);
}

#ifndef GLA_RECURRENT_EMULATE
const char* recurrent_fwd_cuda(const GlaParams& p, void* stream) {
  if (const char* err = check_params(p, "recurrent_fwd_cuda")) return err;
  return dispatch<false>(p, static_cast<cudaStream_t>(stream));
}

const char* recurrent_bwd_cuda(const GlaParams& p, void* stream) {
  if (const char* err = check_params(p, "recurrent_bwd_cuda")) return err;
  if (recurrent_bwd_cuda_workspace_floats(p) > 0 && p.workspace == nullptr)
    return "recurrent_bwd_cuda: workspace is null";
  return dispatch<true>(p, static_cast<cudaStream_t>(stream));
}
#endif  // GLA_RECURRENT_EMULATE

}  // namespace gla
