// The chunked forward for float32 q/k/v on the tensor cores (tf32), fused path only: one block
// per (sequence, head, 64 V columns) walks the sequence's chunks with the state in float32
// registers, as gla_chunk_fwd_kernel's fused path does for 16-bit inputs (chunk_fwd.cu).
//
// Precision (kPasses): 1 = one tf32 pass per product (torch's "high" / "medium": operands
// rounded to 10 mantissa bits, ~1e-3 relative error), 3 = 3xTF32 (torch's "highest": each
// operand as a tf32 hi + lo pair, a*b ~ a_hi b_hi + a_hi b_lo + a_lo b_hi, float32 accuracy).
//
// Per chunk of kC tokens (b = cumulative gates, exp2 domain; all exponents <= 0 for g <= 0):
//   scores A[t][s], s <= t: the 16 x 16 diagonal blocks by dyadic levels (f32_diag_block), the
//     blocks below them through the last token r of the column block:
//     (q_t exp2(b_t - b_r)) . (k_s exp2(b_r - b_s)), all on the tensor cores;
//   o = (q * exp2(b) * scale) @ S + A @ v;  S <- S * exp2(b_last) + (k * exp2(b_last - b))^T v.
// Tiles are float32 in shared memory; the state goes to shared memory once per chunk (over the
// gates, which are no longer needed then) to be the B operand of q~ @ S.
//
// Fragment loads are plain 32-bit shared loads (m16n8k8 tf32: one element per register, see
// chunk_common.cuh); rows are padded by 4 floats so the 8 rows x 4 columns of a fragment fall
// in 32 different banks.
#pragma once

#include "chunk_common.cuh"

namespace gla {
namespace {

constexpr int kF32BV = 64;  // V columns per block
constexpr int kF32Warps = 4;  // warp w owns V columns [16w, 16w + 16) of the tile
constexpr int kF32Threads = 32 * kF32Warps;

template <int KT>
struct F32Layout {
  static constexpr int kQKStride = KT + 4;     // q, k tiles: [kC][kQKStride] float
  static constexpr int kBStride = KT + 8;      // cumulative gates: [kC][kBStride] float
  static constexpr int kSStride = kF32BV + 4;  // the state, over the gates: [KT][kSStride]
  static constexpr int kVStride = kF32BV + 4;  // v tile: [kC][kVStride]
  static constexpr int kAStride = kC + 4;      // scores: [kC][kAStride]
  static constexpr int kQOff = 0;
  static constexpr int kKOff = kQOff + kC * kQKStride * 4;
  static constexpr int kBOff = kKOff + kC * kQKStride * 4;
  static constexpr int kVOff = kBOff + kC * kBStride * 4;
  static constexpr int kAOff = kVOff + kC * kVStride * 4;
  static constexpr int kLastOff = kAOff + kC * kAStride * 4;  // b_last: [KT] float
  static constexpr int kTotOff = kLastOff + KT * 4;           // gate scan scratch
  static constexpr int kBytes = kTotOff + gate_scratch_floats<KT>() * 4;
  static_assert(KT * kSStride <= kC * kBStride, "the state must fit where the gates were");
  static_assert(kKOff % 16 == 0 && kBOff % 16 == 0 && kVOff % 16 == 0 && kAOff % 16 == 0 &&
                    kLastOff % 16 == 0 && kTotOff % 16 == 0,
                "tiles must start 16-byte aligned");
  static_assert((kQKStride * 4) % 16 == 0 && (kBStride * 4) % 16 == 0 &&
                    (kVStride * 4) % 16 == 0,
                "rows must stay 16-byte aligned (cp.async)");
};
// Where F32Layout<KT>'s tiles lie in a block's shared memory (the fused and split kernels).
template <int KT>
struct F32Tiles {
  float *q, *k, *b, *v, *a, *last, *tot;
  __device__ __forceinline__ explicit F32Tiles(unsigned char* smem)
      : q(reinterpret_cast<float*>(smem + F32Layout<KT>::kQOff)),
        k(reinterpret_cast<float*>(smem + F32Layout<KT>::kKOff)),
        b(reinterpret_cast<float*>(smem + F32Layout<KT>::kBOff)),
        v(reinterpret_cast<float*>(smem + F32Layout<KT>::kVOff)),
        a(reinterpret_cast<float*>(smem + F32Layout<KT>::kAOff)),
        last(reinterpret_cast<float*>(smem + F32Layout<KT>::kLastOff)),
        tot(reinterpret_cast<float*>(smem + F32Layout<KT>::kTotOff)) {}
};
static_assert(F32Layout<64>::kBytes <= 99 * 1024, "K <= 64 must fit sm_86/sm_89 (99 KB)");
static_assert(F32Layout<128>::kBytes <= 163 * 1024, "K = 128 must fit sm_80 (163 KB)");

// A fragment's float32 values as tf32 operands: rounded (1 pass) or split into hi + lo (3
// passes), once per fragment so a fragment used by several mma is converted once.
template <int N, int kPasses>
struct Tf32Frag {
  static_assert(kPasses == 1 || kPasses == 3, "1xTF32 or 3xTF32");
  uint32_t hi[N], lo[N];
  __device__ __forceinline__ explicit Tf32Frag(const float (&x)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) {
      if constexpr (kPasses == 1) {
        hi[i] = cvt_tf32(x[i]);
      } else {
        tf32_split(x[i], hi[i], lo[i]);
      }
    }
  }
};

// d += a @ b: one tf32 pass or 3xTF32 (small terms first).
template <int kPasses>
__device__ __forceinline__ void mma_frags(float (&d)[4], const Tf32Frag<4, kPasses>& a,
                                          const Tf32Frag<2, kPasses>& b) {
  if constexpr (kPasses == 3) {
    mma_tf32(d, a.lo, b.hi[0], b.hi[1]);
    mma_tf32(d, a.hi, b.lo[0], b.lo[1]);
  }
  mma_tf32(d, a.hi, b.hi[0], b.hi[1]);
}

// d += a @ b on float32 operands.
template <int kPasses>
__device__ __forceinline__ void mma_f32(float (&d)[4], const float (&a)[4], const float (&b)[2]) {
  mma_frags<kPasses>(d, Tf32Frag<4, kPasses>(a), Tf32Frag<2, kPasses>(b));
}

// Fragments of m16n8k8 from float tiles in shared memory (g = lane / 4, c = lane % 4).
// A (16 x 8) at (row r0, column c0) of a row-major tile.
__device__ __forceinline__ void frag_a(float (&a)[4], const float* x, int stride, int r0, int c0,
                                       int lane) {
  const float* const p = x + (r0 + (lane >> 2)) * stride + c0 + (lane & 3);
  a[0] = p[0];
  a[1] = p[8 * stride];
  a[2] = p[4];
  a[3] = p[8 * stride + 4];
}
// A (16 x 8) = X^T at (row r0, column c0) of a tile X stored [column][row].
__device__ __forceinline__ void frag_a_trans(float (&a)[4], const float* x, int stride, int r0,
                                             int c0, int lane) {
  const float* const p = x + (c0 + (lane & 3)) * stride + r0 + (lane >> 2);
  a[0] = p[0];
  a[1] = p[8];
  a[2] = p[4 * stride];
  a[3] = p[4 * stride + 8];
}
// B (8 x 8) at (row k0, column n0) of a tile stored [k][n].
__device__ __forceinline__ void frag_b(float (&b)[2], const float* x, int stride, int k0, int n0,
                                       int lane) {
  const float* const p = x + (k0 + (lane & 3)) * stride + n0 + (lane >> 2);
  b[0] = p[0];
  b[1] = p[4 * stride];
}

// acc[nb] += A @ B for one warp's 16 x 8NB tile over k in [k_begin, k_end) (steps of 8):
// A(i, kk) = fa(i, kk) for tile rows i in [0, 16), B(kk, j) = fb(kk, j) for tile columns j in
// [0, 8NB); the callers' lambdas hold the tile offsets, layouts and any gate factors. Each
// operand element is read (and gated) once per warp; A is converted once per k step.
template <int kPasses, int NB, typename FA, typename FB>
__device__ __forceinline__ void warp_mma_tiles(float (&acc)[NB][4], int k_begin, int k_end,
                                               int lane, FA&& fa, FB&& fb) {
  const int g8 = lane >> 2, c4 = lane & 3;
  for (int k0 = k_begin; k0 < k_end; k0 += 8) {
    const float av[4] = {fa(g8, k0 + c4), fa(g8 + 8, k0 + c4), fa(g8, k0 + c4 + 4),
                         fa(g8 + 8, k0 + c4 + 4)};
    const Tf32Frag<4, kPasses> af(av);
#pragma unroll
    for (int nb = 0; nb < NB; ++nb) {
      const float bv[2] = {fb(k0 + c4, 8 * nb + g8), fb(k0 + c4 + 4, 8 * nb + g8)};
      mma_frags<kPasses>(acc[nb], af, Tf32Frag<2, kPasses>(bv));
    }
  }
}

// One warp's slice of the state (S^T for V columns wc + g (+8) by key dims 8nt + 2c (+1), the
// layout of the m16n8 accumulators) -> sS[key dim][column], row stride SS.
template <int NT, int SS>
__device__ __forceinline__ void state_to_smem(const float (&s)[NT][4], float* sS, int wc,
                                              int lane) {
  const int g8 = lane >> 2, c4 = lane & 3;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt)
#pragma unroll
    for (int r = 0; r < 4; ++r)
      sS[(8 * nt + 2 * c4 + (r & 1)) * SS + wc + g8 + 8 * (r >> 1)] = s[nt][r];
}

// S^T <- S^T * exp2(b_last) + Y^T @ X for one warp's 16 columns wc.. of the value-side tile sY
// ([token][column], stride YS) and the gated key-side tile sX ([token][key dim], stride XS);
// sLast: b_last per key dim. The forward's state update and the backward's state scans.
template <int KT, int kPasses, int YS, int XS>
__device__ __forceinline__ void f32_state_update(float (&s)[KT / 8][4], const float* sY,
                                                 const float* sX, const float* sLast, int wc,
                                                 int lane) {
  const int c4 = lane & 3;
#pragma unroll
  for (int nt = 0; nt < KT / 8; ++nt) {
    const float e0 = exp2f(sLast[8 * nt + 2 * c4]), e1 = exp2f(sLast[8 * nt + 2 * c4 + 1]);
    s[nt][0] *= e0;
    s[nt][1] *= e1;
    s[nt][2] *= e0;
    s[nt][3] *= e1;
  }
  for (int t0 = 0; t0 < kC; t0 += 8) {
    float av[4];
    frag_a_trans(av, sY, YS, wc, t0, lane);
    const Tf32Frag<4, kPasses> af(av);
#pragma unroll
    for (int nt = 0; nt < KT / 8; ++nt) {
      float bv[2];
      frag_b(bv, sX, XS, t0, 8 * nt, lane);
      mma_frags<kPasses>(s[nt], af, Tf32Frag<2, kPasses>(bv));
    }
  }
}

// Two consecutive floats of a shared tile (8-byte aligned: even column, rows of 16-byte multiples).
__device__ __forceinline__ float2 f2(const float* p) { return *reinterpret_cast<const float2*>(p); }

// The diagonal blocks take 3xTF32 at both precisions: they hold each row's largest scores
// (A[t][t], no decay), and one tf32 pass there lifted "high"'s o error from ~3e-4 to ~4.4e-4
// at K = 128 and to 8e-4 of the contract's 1e-3 at K = 3 (worst of 100 draws); the split costs
// about a tenth of "high"'s instructions per chunk (docs/cuda_float32.md).
constexpr int kDiagPasses = 3;

// One diagonal 16 x 16 block of the scores (tokens 16 blk + 0..15) by dyadic levels on the tf32
// tensor cores, one warp: the scheme of the 16-bit kernels' diag_block_scores
// (chunk_common.cuh) on float32 tiles. At level L = 2^lv (8, 4, 2, 1) the pairs s < t whose
// highest differing bit is lv (t has it set, s clear, same higher bits) factor through
// r = s | (L - 1), the last token of s's group of L, with t > r >= s:
// (q_t exp2(b_t - b_r)) . (k_s exp2(b_r - b_s)), both exponents <= 0. mma rows 8..15 are the
// level's 8 tokens t, columns its 8 tokens s; rows 0..7 take raw q of the tokens s = r of the
// level's columns (their factor is 1), so the same mma gives A[r][r]. A[15][15] (no level's r)
// is a plain dot product. 56 exp2 per key dim and block instead of 136 (one per pair); every
// entry comes from exactly one level. The products are 3xTF32 at both precisions (kDiagPasses).
template <int KT, typename L>
__device__ __forceinline__ void f32_diag_block(const float* sQ, const float* sK, const float* sB,
                                               float* sA, float scale, int blk, int lane) {
  const int g8 = lane >> 2, c4 = lane & 3;
  const int base = 16 * blk;
#pragma unroll
  for (int lv = 3; lv >= 0; --lv) {
    const int lsz = 1 << lv;
    const int nz = 8 >> lv;                             // tokens r of the level's columns
    const int td = (g8 % nz) * 2 * lsz + lsz - 1;       // A row g: token r (raw q)
    const int tf = insert_bit(g8, lv, 1);               // A row g + 8: token t
    const int rf = (tf & ~(2 * lsz - 1)) | (lsz - 1);   // t's reference token
    const int sc = insert_bit(g8, lv, 0);               // B column g: token s
    const int rc = sc | (lsz - 1);                      // s's reference token
    const float* const qd = sQ + (base + td) * L::kQKStride;
    const float* const qt = sQ + (base + tf) * L::kQKStride;
    const float* const bt = sB + (base + tf) * L::kBStride;
    const float* const brf = sB + (base + rf) * L::kBStride;
    const float* const ks = sK + (base + sc) * L::kQKStride;
    const float* const bs = sB + (base + sc) * L::kBStride;
    const float* const brc = sB + (base + rc) * L::kBStride;
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll 2
    for (int k0 = 0; k0 < KT; k0 += 8) {
      const int kd = k0 + 2 * c4;  // mma k columns c, c + 4 = key dims kd, kd + 1 (f2 loads)
      const float2 q0 = f2(qd + kd), q1 = f2(qt + kd), b1 = f2(bt + kd), r1 = f2(brf + kd);
      const float av[4] = {q0.x, q1.x * exp2f(b1.x - r1.x), q0.y, q1.y * exp2f(b1.y - r1.y)};
      const float2 kv = f2(ks + kd);
      float bv[2] = {kv.x, kv.y};
      if (lv > 0) {  // level 1's columns are their own reference (factor 1)
        const float2 bq = f2(brc + kd), bk = f2(bs + kd);
        bv[0] *= exp2f(bq.x - bk.x);
        bv[1] *= exp2f(bq.y - bk.y);
      }
      mma_f32<kDiagPasses>(acc, av, bv);
    }
    diag_level_owned(acc, lv, g8, c4, [&](int t, int s, float x) {
      sA[(base + t) * L::kAStride + base + s] = x * scale;
    });
  }
  // A[15][15] = q_15 . k_15 (no decay): lanes over key dims in float32 FMA, a butterfly sum
  {
    const int t = base + 15;
    float d = 0.0f;
#pragma unroll
    for (int kd = lane; kd < KT; kd += 32)
      d = fmaf(sQ[t * L::kQKStride + kd], sK[t * L::kQKStride + kd], d);
#pragma unroll
    for (int m = 16; m >= 1; m >>= 1) d += __shfl_xor_sync(0xffffffffu, d, m);
    if (lane == 0) sA[t * L::kAStride + t] = d * scale;
  }
  // zeros above the block's diagonal: lane -> row lane / 2, columns 8 (lane & 1) + 0..7
  {
    const int t = lane >> 1;
#pragma unroll
    for (int x = 0; x < 8; ++x) {
      const int s = 8 * (lane & 1) + x;
      if (s > t) sA[(base + t) * L::kAStride + base + s] = 0.0f;
    }
  }
}

// sA (kC x kC, float, stride L::kAStride) <- scale * A from raw q, k and cumulative gates sB.
// Entries above the diagonal are 0. No barrier at the end.
template <int KT, int kPasses, typename L, int NTHREADS = kF32Threads>
__device__ __forceinline__ void f32_scores(const float* sQ, const float* sK, const float* sB,
                                           float* sA, float scale, int tid, int warp,
                                           int lane) {
  constexpr int kNW = NTHREADS / 32;
  static_assert(kNW >= 4, "one warp per diagonal block");
  static_assert(L::kQKStride % 2 == 0 && L::kBStride % 2 == 0, "float2 loads need even strides");
  static_assert(L::kAStride % 4 == 0, "16-byte zero stores into sA");
  const int g8 = lane >> 2, c4 = lane & 3;
  // below the diagonal blocks: pair u = (i, j), i > j, of the 6; warp w takes u = w, w + kNW
  for (int u = warp; u < 6; u += kNW) {
    const int i = u < 3 ? u + 1 : (u < 5 ? u - 1 : 3);  // (1,0) (2,0) (3,0) (2,1) (3,1) (3,2)
    const int j = u < 3 ? 0 : (u < 5 ? 1 : 2);
    const float* const br = sB + (16 * j + 15) * L::kBStride;  // b of the reference token r
    float acc[2][4] = {{0.0f, 0.0f, 0.0f, 0.0f}, {0.0f, 0.0f, 0.0f, 0.0f}};
    const int t = 16 * i + g8;
    for (int k0 = 0; k0 < KT; k0 += 8) {
      const int kd = k0 + 2 * c4;  // mma k columns c, c + 4 = key dims kd, kd + 1 (f2 loads)
      const float2 rb = f2(br + kd);
      const float2 q0 = f2(sQ + t * L::kQKStride + kd), b0 = f2(sB + t * L::kBStride + kd);
      const float2 q1 = f2(sQ + (t + 8) * L::kQKStride + kd);
      const float2 b1 = f2(sB + (t + 8) * L::kBStride + kd);
      const float af[4] = {q0.x * exp2f(b0.x - rb.x), q1.x * exp2f(b1.x - rb.x),
                           q0.y * exp2f(b0.y - rb.y), q1.y * exp2f(b1.y - rb.y)};
#pragma unroll
      for (int nh = 0; nh < 2; ++nh) {
        const int s = 16 * j + 8 * nh + g8;
        const float2 kv = f2(sK + s * L::kQKStride + kd), bs = f2(sB + s * L::kBStride + kd);
        const float bf[2] = {kv.x * exp2f(rb.x - bs.x), kv.y * exp2f(rb.y - bs.y)};
        mma_f32<kPasses>(acc[nh], af, bf);
      }
    }
#pragma unroll
    for (int nh = 0; nh < 2; ++nh) {
      float* const d = sA + (16 * i + g8) * L::kAStride + 16 * j + 8 * nh + 2 * c4;
      d[0] = acc[nh][0] * scale;
      d[1] = acc[nh][1] * scale;
      d[8 * L::kAStride] = acc[nh][2] * scale;
      d[8 * L::kAStride + 1] = acc[nh][3] * scale;
    }
  }
  // the diagonal blocks, one warp each, from the last warp down (with the backward's 8 warps:
  // the two that took no off-diagonal block and two that took one)
  const int dblk = kNW - 1 - warp;
  if (dblk < 4) {  // warp-uniform
    f32_diag_block<KT, L>(sQ, sK, sB, sA, scale, dblk, lane);
  }
  // zeros right of the diagonal blocks, in 16-byte stores (inside them: f32_diag_block)
  for (int e = tid; e < kC * kC / 4; e += NTHREADS) {
    const int t = e / (kC / 4), s = 4 * (e % (kC / 4));
    if (s >= (t | 15) + 1)
      *reinterpret_cast<float4*>(sA + t * L::kAStride + s) = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  }
}

// Step 4 of a chunk (the fused and split forwards): q <- q * exp2(b) * scale and, for the
// state update (kGateK), k <- k * exp2(b_last - b) and b_last -> sLast. No barrier at the end.
template <int KT, typename L, bool kGateK>
__device__ __forceinline__ void f32_gate_tiles(float* sQ, float* sK, const float* sB,
                                               float* sLast, float scale, int tid) {
  // 16-byte vectors of 4 key dims (rows are 16-byte aligned, KT % 4 == 0)
  const float* const blast = sB + (kC - 1) * L::kBStride;
  for (int e = tid; e < kC * KT / 4; e += kF32Threads) {
    const int t = e / (KT / 4), kd = 4 * (e % (KT / 4));
    const float4 b = *reinterpret_cast<const float4*>(sB + t * L::kBStride + kd);
    float4* const qp = reinterpret_cast<float4*>(sQ + t * L::kQKStride + kd);
    const float4 qv = *qp;
    *qp = make_float4(qv.x * exp2f(b.x) * scale, qv.y * exp2f(b.y) * scale,
                      qv.z * exp2f(b.z) * scale, qv.w * exp2f(b.w) * scale);
    if constexpr (kGateK) {
      const float4 bl = *reinterpret_cast<const float4*>(blast + kd);
      float4* const kp = reinterpret_cast<float4*>(sK + t * L::kQKStride + kd);
      const float4 kv = *kp;
      *kp = make_float4(kv.x * exp2f(bl.x - b.x), kv.y * exp2f(bl.y - b.y),
                        kv.z * exp2f(bl.z - b.z), kv.w * exp2f(bl.w - b.w));
    }
  }
  if constexpr (kGateK)
    for (int kd = tid; kd < KT; kd += kF32Threads) sLast[kd] = blast[kd];
}

// Step 5 of a chunk (the fused and split forwards): o = q~ @ S + A @ v for one warp's 16
// columns wc.. of the V tile starting at column v0, from the gated q (sQ), the scores (sA),
// the state S ([key dim][column], stride L::kSStride) and the v tile; o is written to
// out (the chunk's first token, head h) for tokens < len and columns < V.
template <int KT, int kPasses, typename L>
__device__ __forceinline__ void f32_chunk_output(const float* sQ, const float* sA,
                                                 const float* sS, const float* sV, float* out,
                                                 int len, int v0, int V, int64_t v_tok, int wc,
                                                 int lane) {
  const int g8 = lane >> 2, c4 = lane & 3;
  float o[4][2][4] = {};
  for (int k0 = 0; k0 < KT; k0 += 8) {
    float bf[2][2];
    frag_b(bf[0], sS, L::kSStride, k0, wc, lane);
    frag_b(bf[1], sS, L::kSStride, k0, wc + 8, lane);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float af[4];
      frag_a(af, sQ, L::kQKStride, 16 * i, k0, lane);
      mma_f32<kPasses>(o[i][0], af, bf[0]);
      mma_f32<kPasses>(o[i][1], af, bf[1]);
    }
  }
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    for (int t0 = 0; t0 < 16 * i + 16; t0 += 8) {  // causal: token blocks j <= i
      float af[4], bf0[2], bf1[2];
      frag_a(af, sA, L::kAStride, 16 * i, t0, lane);
      frag_b(bf0, sV, L::kVStride, t0, wc, lane);
      frag_b(bf1, sV, L::kVStride, t0, wc + 8, lane);
      mma_f32<kPasses>(o[i][0], af, bf0);
      mma_f32<kPasses>(o[i][1], af, bf1);
    }
  }
  // rows 16i + g (+8), columns v0 + 16w + 8nh + 2c (+1)
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int nh = 0; nh < 2; ++nh)
#pragma unroll
      for (int hr = 0; hr < 2; ++hr) {
        const int t = 16 * i + g8 + 8 * hr;
        const int vc = v0 + wc + 8 * nh + 2 * c4;
        if (t >= len) continue;
        float* const dst = out + t * v_tok + vc;
        if (vc < V) dst[0] = o[i][nh][2 * hr];
        if (vc + 1 < V) dst[1] = o[i][nh][2 * hr + 1];
      }
}

// grid x = N * H, y = V tiles of kF32BV.
template <int KT, int kPasses>
__global__ void __launch_bounds__(kF32Threads, 1) gla_chunk_fwd_f32_kernel(const ChunkArgs a) {
  using L = F32Layout<KT>;
  constexpr int kNT = KT / 8;
  extern __shared__ __align__(16) unsigned char smem[];
  const F32Tiles<KT> tiles(smem);
  float *const sQ = tiles.q, *const sK = tiles.k, *const sB = tiles.b, *const sV = tiles.v;
  float *const sA = tiles.a, *const sLast = tiles.last, *const sTot = tiles.tot;
  float* const sS = sB;  // the state, once the gates are used up

  const int tid = threadIdx.x;
  const int warp = tid >> 5, lane = tid & 31;
  const int g8 = lane >> 2;
  const int H = a.H, V = a.V;
  const float scale = a.scale;
  const int h = static_cast<int>(blockIdx.x % static_cast<unsigned>(H));
  const int64_t n = blockIdx.x / static_cast<unsigned>(H);
  const int v_first = blockIdx.y * kF32BV;
  int64_t row, start, end;
  seq_range(a, n, &row, &start, &end);

  // pool rows (fused_state_rows): a padding row runs no tokens
  const StateRows rows = fused_state_rows(a, n, h);
  if (rows.padding) end = start;

  // S^T for this warp's 16 V columns (vc_lo + {0, 8}) by key dims 8nt + 2c + {0, 1}
  float s[kNT][4];
#pragma unroll
  for (int nt = 0; nt < kNT; ++nt)
#pragma unroll
    for (int r = 0; r < 4; ++r) s[nt][r] = 0.0f;
  const int vc_lo = v_first + 16 * warp + g8;
  if (a.h0 != nullptr && !rows.padding) load_h0(s, a, rows.h0_base, vc_lo, lane);

  float* const out = static_cast<float*>(a.o);
  const int64_t v_tok = static_cast<int64_t>(H) * V;
  const int wc = 16 * warp;  // this warp's first column within the tile

  for (int64_t c0 = start; c0 < end; c0 += kC) {
    const ChunkPos cp = chunk_pos(a, row, h, c0, end);
    const int len = cp.len;
    const int64_t v_base = cp.v_base;

    // ---- 1. tiles -> shared memory (zero past len, K, V); 2. cumulative gates ------------
    stage_chunk<KT, kF32BV, L::kQKStride, L::kBStride, L::kVStride, kF32Threads>(
        sQ, sK, sB, sV, sTot, a, cp, v_first, tid);
    // ---- 3. scores -------------------------------------------------------------------------
    f32_scores<KT, kPasses, L>(sQ, sK, sB, sA, scale, tid, warp, lane);
    __syncthreads();  // raw q, k and the gates are read above; changed below

    // ---- 4. q <- q * exp2(b) * scale, k <- k * exp2(b_last - b), b_last aside -------------
    f32_gate_tiles<KT, L, true>(sQ, sK, sB, sLast, scale, tid);
    __syncthreads();  // the gates are done with: the state goes over them
    state_to_smem<kNT, L::kSStride>(s, sS, wc, lane);
    __syncthreads();

    // ---- 5. o = q~ @ S + A @ v for this warp's 16 columns ---------------------------------
    f32_chunk_output<KT, kPasses, L>(sQ, sA, sS, sV, out + v_base, len, v_first, V, v_tok, wc,
                                     lane);

    // ---- 6. S^T <- S^T * exp2(b_last) + v^T @ k~ -------------------------------------------
    f32_state_update<KT, kPasses, L::kVStride, L::kQKStride>(s, sV, sK, sLast, wc, lane);
    __syncthreads();  // every warp is done with this chunk's tiles before they are reloaded
  }

  store_ht(s, a, rows.ht_base, vc_lo, lane, rows.padding);
}

// Checks p (float32) and fills the kernel arguments and grid; returns an error message or
// nullptr. *empty: nothing to launch.
inline const char* prepare_f32(const GlaParams& p, ChunkArgs* args, unsigned* gx, unsigned* gy,
                               bool* empty) {
  *empty = false;
  if (p.dtype != DType::kFloat32) return "chunk_fwd_f32_cuda: q/k/v must be float32";
  if (const char* err = check_chunk_params(p, "chunk_fwd_f32_cuda", true)) return err;
  if (p.N * p.H == 0) {
    *empty = true;
    return nullptr;
  }
  if (p.ht == nullptr) return "chunk_fwd_f32_cuda: ht (final state) must not be null";
  if (p.T > 0 && (p.q == nullptr || p.k == nullptr || p.v == nullptr || p.g == nullptr ||
                  p.o == nullptr))
    return "chunk_fwd_f32_cuda: q, k, v, g and o must not be null";
  *args = common_args(p);  // its vector flags (K, V % 8, 16-byte aligned) suit float tiles too
  args->o = p.o;
  args->ht = static_cast<float*>(p.ht);
  *gx = static_cast<unsigned>(p.N * p.H);
  *gy = static_cast<unsigned>((p.V + kF32BV - 1) / kF32BV);
  return nullptr;
}

}  // namespace
}  // namespace gla
