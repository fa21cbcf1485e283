// Building blocks shared by the tensor-core chunked kernels (chunk_fwd.cu, chunk_bwd.cu,
// chunk_scan.cuh):
// PTX wrappers (mma.sync m16n8k16, ldmatrix, cp.async), bf16/fp16 element helpers, chunk tile
// loaders, the in-chunk cumulative gate sum and the intra-chunk score matrix A.
//
// Chunk math (docs/design.md), chunk of kC tokens, b_t = cumulative sum of the gates over the
// chunk up to and including token t (one value per key dimension, exp2 domain here):
//   A[t][s] = scale * sum_k q_t[k] k_s[k] exp2(b_t[k] - b_s[k])   for s <= t, else 0.
// Every exponent used is <= 0 for gates g <= 0; g is clamped at kGateFloor per token first,
// so g = -inf gives exact zeros (never -inf - -inf = NaN).
//
// GLA_CHUNK_EMULATE: tests/cuda_emu supplies the CUDA types and the warp primitives (emu.h)
// so the kernels run on a CPU; only the primitives below are swapped out.
#pragma once

#ifndef GLA_CHUNK_EMULATE
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "device_cache.cuh"
#endif

#include <cstdint>
#include <cstdio>
#include <cstring>

#include "gla.h"

namespace gla {
namespace {

constexpr int kC = 64;          // tokens per chunk
constexpr float kLog2e = 1.4426950408889634f;
// Per-token gate floor. exp(-128) ~ 2.6e-56 is already 0 in float32, so clamping changes no
// float32 result, while every cumulative sum stays finite (|b| <= 64 * 128 * log2(e)).
constexpr float kGateFloor = -128.0f;

// Which global accesses may be vectorized (set by the launchers from sizes and alignment).
enum : int {
  kVecQK = 1,    // q, k: K % 8 == 0, 16-byte aligned (cp.async)
  kVecG = 2,     // g: K % 4 == 0, 16-byte aligned (cp.async)
  kVecV = 4,     // v (and dout in the backward): V % 8 == 0, 16-byte aligned (cp.async)
  kVecO = 8,     // o: V % 2 == 0, 4-byte aligned (pairs of 16-bit stores)
  kVecS = 16,    // workspace states (16-bit): V % 8 == 0, workspace 16-byte aligned
  kPairQK = 32,  // dq, dk: K % 2 == 0, 4-byte aligned
  kPairV = 64,   // dv: V % 2 == 0, 4-byte aligned
};

// Arguments of every chunk kernel (forward, state scans, backward); unused pointers are null.
struct ChunkArgs {
  const void* q;
  const void* k;
  const void* v;
  const float* g;
  const float* h0;     // may be null
  void* o;             // forward
  float* ht;           // forward: final state (may be null in the backward's scan)
  const void* dout;    // backward
  const float* dht;    // may be null
  void* dq;
  void* dk;
  void* dv;
  float* dg;
  float* dh0;
  // workspace, in the input dtype (the tensor cores take the states rounded to it anyway):
  uint16_t* states;    // [chunks, H, K, V]: state at the start of each chunk
  uint16_t* dstates;   // [chunks, H, K, V]: gradient on each chunk's end state
  // the float32 backward keeps them in float32 (chunk_bwd_f32.cuh)
  float* fstates;
  float* fdstates;
  const int64_t* cu_seqlens;  // device pointer, may be null
  int64_t* chunk_offsets;     // with cu_seqlens: [N + 1], see gla_chunk_offsets_kernel
  int64_t T;
  int64_t chunks_per_row;     // ceil(T / kC): chunks of one batch row without cu_seqlens
  int64_t ws_chunks;          // chunks the workspace holds (saves past it are dropped)
  int N, H, K, V;
  float scale;
  int flags;
  // state pools, forward only (see GlaParams in gla.h): h0 row of sequence n is
  // state_idx[n] (null: n; outside [0, P): padding row), the final state goes to that row
  // when inplace_final (ht == h0), states are [H, V, K] when state_v_first.
  const int64_t* state_idx;
  int64_t P;
  int inplace_final;
  int64_t state_k_stride, state_v_stride;  // element strides of h0 / ht: (V, 1) or (1, K)
};

// ---- state rows (pools, V-first) -----------------------------------------------------
// h0 row of sequence n; -1 for a padding row (no state read or written, o left zero).
__device__ __forceinline__ int64_t h0_state_row(const ChunkArgs& a, int64_t n) {
  return ::gla::pool_row(a.state_idx, a.P, n);  // the rule in gla.h
}
__device__ __forceinline__ int64_t ht_state_row(const ChunkArgs& a, int64_t n) {
  return a.inplace_final ? h0_state_row(a, n) : n;
}
// Offset of element (kd, vc) inside one (row, head) state of h0 / ht, by strides (K-first or
// V-first; the workspace states and the gradients are always K-first).
__device__ __forceinline__ int64_t state_elem(const ChunkArgs& a, int kd, int vc) {
  return kd * a.state_k_stride + vc * a.state_v_stride;
}

// ---- chunk bookkeeping ---------------------------------------------------------------
// Sequence n is batch row n, or tokens [cu[n], cu[n+1]) of row 0 with cu_seqlens. Chunks
// start at the sequence start; workspace chunks are numbered sequence by sequence.
__device__ __forceinline__ void seq_range(const ChunkArgs& a, int64_t n, int64_t* row,
                                          int64_t* start, int64_t* end) {
  if (a.cu_seqlens != nullptr) {
    *row = 0;
    // Malformed offsets (the Python wrapper rejects them; direct op calls and CUDA-graph
    // capture skip that check) must not run a loop backwards or leave the rows.
    *start = a.cu_seqlens[n];
    *end = a.cu_seqlens[n + 1];
    *start = *start < 0 ? 0 : (*start > a.T ? a.T : *start);
    *end = *end < *start ? *start : (*end > a.T ? a.T : *end);
  } else {
    *row = n;
    *start = 0;
    *end = a.T;
  }
}

__device__ __forceinline__ int64_t num_chunks(int64_t start, int64_t end) {
  return (end - start + kC - 1) / kC;
}

// With cu_seqlens, chunk_offsets[n] is the workspace index of sequence n's first chunk
// (chunk_offsets[N] = all chunks), written by gla_chunk_offsets_kernel before the other
// launches, so finding a block's chunk is a binary search, not a walk over every sequence.

// Workspace index of sequence n's first chunk.
__device__ __forceinline__ int64_t first_chunk(const ChunkArgs& a, int64_t n) {
  if (a.cu_seqlens == nullptr) return n * a.chunks_per_row;
  return a.chunk_offsets[n];
}

// Sequence and chunk-within-sequence of workspace chunk gc; false past the last chunk (grids
// over chunks are an upper bound with cu_seqlens).
__device__ __forceinline__ bool locate_chunk(const ChunkArgs& a, int64_t gc, int64_t* n,
                                             int64_t* c) {
  if (a.cu_seqlens == nullptr) {
    *n = gc / a.chunks_per_row;
    *c = gc % a.chunks_per_row;
    return *n < a.N;
  }
  const int64_t* const off = a.chunk_offsets;
  if (gc >= off[a.N]) return false;
  int64_t lo = 0, hi = a.N;  // off[lo] <= gc < off[hi]; empty sequences are skipped over
  while (hi - lo > 1) {
    const int64_t mid = (lo + hi) / 2;
    if (off[mid] <= gc) lo = mid;
    else hi = mid;
  }
  *n = lo;
  *c = gc - off[lo];
  return true;
}

// One block of kOffsetThreads: chunk_offsets[0..N] = exclusive prefix sum of the sequences'
// chunk counts (a block-wide scan per 256 sequences, carried across).
constexpr int kOffsetThreads = 256;
constexpr int kOffsetSmem = kOffsetThreads * 8;

__global__ void __launch_bounds__(kOffsetThreads) gla_chunk_offsets_kernel(const ChunkArgs a) {
  extern __shared__ __align__(16) unsigned char smem[];
  int64_t* const part = reinterpret_cast<int64_t*>(smem);
  const int tid = threadIdx.x;
  if (tid == 0) a.chunk_offsets[0] = 0;
  int64_t carry = 0;
  for (int64_t base = 0; base < a.N; base += kOffsetThreads) {
    const int64_t n = base + tid;
    int64_t count = 0;
    if (n < a.N) {
      int64_t row, s, e;
      seq_range(a, n, &row, &s, &e);
      count = num_chunks(s, e);
    }
    part[tid] = count;
    __syncthreads();
    for (int step = 1; step < kOffsetThreads; step <<= 1) {  // inclusive scan
      const int64_t add = tid >= step ? part[tid - step] : 0;
      __syncthreads();
      part[tid] += add;
      __syncthreads();
    }
    if (n < a.N) a.chunk_offsets[n + 1] = carry + part[tid];
    carry += part[kOffsetThreads - 1];
    __syncthreads();  // part is rewritten next round
  }
}

// Floats of workspace the chunk offsets take (int64 [N + 1], rounded to 16 bytes); 0 without
// cu_seqlens. The states follow them.
inline int64_t offsets_floats(const GlaParams& p) {
  return p.cu_seqlens != nullptr ? (2 * (p.N + 1) + 3) / 4 * 4 : 0;
}

// Elements of one workspace state array ([chunks, H, K, V], 16-bit), rounded up to whole
// 16-byte vectors so that a second array placed after it stays aligned.
inline int64_t state_elems(int64_t chunks, int64_t H, int64_t K, int64_t V) {
  return (chunks * H * K * V + 7) / 8 * 8;
}

// Elements of one float32 workspace state array (the float32 backward and split forward),
// rounded up to whole 16-byte vectors.
inline int64_t f32_state_floats(int64_t chunks, int64_t H, int64_t K, int64_t V) {
  return (chunks * H * K * V + 3) / 4 * 4;
}

inline bool aligned(const void* p, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

// Upper bound on the number of chunks (exact without cu_seqlens): each packed sequence adds
// at most one partial chunk.
inline int64_t max_chunks(int64_t B, int64_t T, int64_t N, bool varlen) {
  const int64_t per_row = (T + kC - 1) / kC;
  return varlen ? per_row + N : B * per_row;
}

// ---- blocks per SM for __launch_bounds__ ------------------------------------------------
// A launch bound's minimum blocks per SM caps the registers per thread (65536 / (threads x
// blocks)); asking for more blocks than shared memory lets fit only costs registers. So the
// kernels ask for min(what their registers aim at, what shared memory allows on the
// architecture of the device pass being compiled): per SM sm_80/87 164 KB, sm_86/89/120
// 100 KB, sm_90/100 228 KB, with 1 KB reserved per block. The host pass (no __CUDA_ARCH__)
// and the emulator take sm_90's figure; launch bounds only act in device passes.
constexpr int smem_per_sm_kb() {
#if defined(__CUDA_ARCH__) && (__CUDA_ARCH__ == 800 || __CUDA_ARCH__ == 870)
  return 164;
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
  return 100;
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 1200
  return 100;
#else
  return 228;
#endif
}

constexpr int min_blocks_per_sm(int block_bytes, int want) {
  const int fit = smem_per_sm_kb() * 1024 / (block_bytes + 1024);
  return fit < 1 ? 1 : (fit < want ? fit : want);
}

// ---- warp-level primitives (PTX) -------------------------------------------------------
// mma.m16n8k16 with f16/bf16 and cp.async need sm_80. Device passes for older targets still
// compile the kernel, with every primitive a trap; the launcher refuses those devices.
#ifndef GLA_CHUNK_EMULATE
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
#define GLA_CHUNK_SM80 0
#else
#define GLA_CHUNK_SM80 1
#endif

// d += a @ b with float32 accumulators: m16n8k16 (A row-major 16x16, B column-major 16x8) for
// bf16 / fp16 inputs, m16n8k8 (A 16x8, B 8x8) for tf32 inputs (fragments: see below).
enum class MmaIn { kBf16, kF16, kTf32 };

template <MmaIn kIn>
__device__ __forceinline__ void mma_sync(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
#if GLA_CHUNK_SM80
#define GLA_MMA(SHAPE_TYPES)                                                            \
  asm("mma.sync.aligned." SHAPE_TYPES " {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "          \
      "{%0,%1,%2,%3};\n"                                                                 \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                  \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
  if constexpr (kIn == MmaIn::kBf16) {
    GLA_MMA("m16n8k16.row.col.f32.bf16.bf16.f32");
  } else if constexpr (kIn == MmaIn::kF16) {
    GLA_MMA("m16n8k16.row.col.f32.f16.f16.f32");
  } else {
    GLA_MMA("m16n8k8.row.col.f32.tf32.tf32.f32");
  }
#undef GLA_MMA
#else
  (void)d, (void)a, (void)b0, (void)b1;
  __trap();
#endif
}

__device__ __forceinline__ void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  mma_sync<MmaIn::kBf16>(d, a, b0, b1);
}
__device__ __forceinline__ void mma_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                        uint32_t b1) {
  mma_sync<MmaIn::kF16>(d, a, b0, b1);
}
__device__ __forceinline__ void mma_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                         uint32_t b1) {
  mma_sync<MmaIn::kTf32>(d, a, b0, b1);
}

// TF32 (float32 inputs on the tensor cores). Operands are rounded first (cvt_tf32, below: this
// cvt_rna_tf32 = round to nearest, ties away from zero, on the 13 mantissa bits tf32 drops, or
// cvt_rn_tf32 = ties to even, on sm_90+): an mma given raw
// float32 bits ignores those bits (truncation), which biases every product towards zero.
__device__ __forceinline__ uint32_t cvt_rna_tf32(float x) {
#if GLA_CHUNK_SM80
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
#else
  (void)x;
  __trap();
  return 0u;
#endif
}

// cvt.rn.tf32.f32: round to nearest, ties to even. PTX has it from sm_90 (ptxas refuses it for
// sm_80/86/89); there it is one SASS instruction (F2FP.TF32.F32.PACK_B) where cvt.rna is three.
__device__ __forceinline__ uint32_t cvt_rn_tf32(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  uint32_t r;
  asm("cvt.rn.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
#else
  (void)x;
  __trap();
  return 0u;
#endif
}

#if GLA_CHUNK_SM80
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// 16 bytes global -> shared without passing through registers.
__device__ __forceinline__ void cp_async16(void* dst, const void* src) {
#if GLA_CHUNK_SM80
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(dst)),
               "l"(__cvta_generic_to_global(src))
               : "memory");
#else
  (void)dst, (void)src;
  __trap();
#endif
}

// Commits this thread's outstanding copies and waits for all of them.
__device__ __forceinline__ void cp_async_wait_all() {
#if GLA_CHUNK_SM80
  asm volatile("cp.async.wait_all;\n" ::: "memory");
#endif
}

// Closes the group of this thread's copies issued since the last commit.
__device__ __forceinline__ void cp_async_commit() {
#if GLA_CHUNK_SM80
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N of this thread's committed groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait_group() {
#if GLA_CHUNK_SM80
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Four 8x8 matrices of 16-bit elements. Lane l gives the address of row (l & 7) of matrix
// l >> 3; register m then holds, of matrix m, row lane/4 and columns 2*(lane%4) + {0, 1}.
__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const void* row_addr) {
#if GLA_CHUNK_SM80
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row_addr)));
#else
  (void)row_addr;
  r[0] = r[1] = r[2] = r[3] = 0u;
  __trap();
#endif
}

// As ldsm_x4, transposed: register m holds, of matrix m, rows 2*(lane%4) + {0, 1} of column
// lane/4 (the matrices are read column-major).
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const void* row_addr) {
#if GLA_CHUNK_SM80
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(row_addr)));
#else
  (void)row_addr;
  r[0] = r[1] = r[2] = r[3] = 0u;
  __trap();
#endif
}
#endif  // GLA_CHUNK_EMULATE

// __byte_perm(x, y, sel): byte i of the result is byte (sel >> 4i) & 7 of y:x.
__device__ __forceinline__ uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t sel) {
#ifndef GLA_CHUNK_EMULATE
  return __byte_perm(x, y, sel);
#else
  const uint64_t yx = (static_cast<uint64_t>(y) << 32) | x;
  uint32_t r = 0;
  for (int i = 0; i < 4; ++i) r |= ((yx >> (8 * ((sel >> (4 * i)) & 7))) & 0xffu) << (8 * i);
  return r;
#endif
}

__device__ __forceinline__ void zero16(void* dst) {
  *reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);
}

// ---- element types ------------------------------------------------------------------
template <typename T>
struct Elem;

template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(uint16_t x) {
    return __uint_as_float(static_cast<uint32_t>(x) << 16);
  }
  static __device__ __forceinline__ void unpack2(uint32_t x, float& lo, float& hi) {
    lo = __uint_as_float(x << 16);
    hi = __uint_as_float(x & 0xffff0000u);
  }
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    uint32_t r;
    memcpy(&r, &h, 4);
    return r;
  }
  static __device__ __forceinline__ uint16_t from_float(float x) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4],
                                             uint32_t b0, uint32_t b1) {
    mma_bf16(d, a, b0, b1);
  }
};

template <>
struct Elem<__half> {
  static __device__ __forceinline__ float to_float(uint16_t x) {
    return __half2float(__ushort_as_half(x));
  }
  static __device__ __forceinline__ void unpack2(uint32_t x, float& lo, float& hi) {
    __half2 h;
    memcpy(&h, &x, 4);
    const float2 f = __half22float2(h);
    lo = f.x;
    hi = f.y;
  }
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    uint32_t r;
    memcpy(&r, &h, 4);
    return r;
  }
  static __device__ __forceinline__ uint16_t from_float(float x) {
    return __half_as_ushort(__float2half_rn(x));
  }
  static __device__ __forceinline__ void mma(float (&d)[4], const uint32_t (&a)[4],
                                             uint32_t b0, uint32_t b1) {
    mma_f16(d, a, b0, b1);
  }
};

// ---- fragment conventions --------------------------------------------------------------
//
// Fragment conventions (PTX ISA, mma.m16n8k16 with .f16/.bf16, g = lane >> 2, c = lane & 3):
//   A (16x16, row-major): reg0 = (row g, cols 2c..2c+1), reg1 = (row g+8, cols 2c..2c+1),
//                         reg2 = (row g, cols 2c+8..2c+9), reg3 = (row g+8, cols 2c+8..2c+9)
//   B (16x8, "col"):      reg0 = (rows 2c..2c+1, col g), reg1 = (rows 2c+8..2c+9, col g)
//   C/D (16x8, float):    d0, d1 = (row g, cols 2c, 2c+1), d2, d3 = (row g+8, cols 2c, 2c+1)
// With lane l pointing ldmatrix at row (l & 7) + 8 * ((l >> 3) & 1), column 8 * (l >> 4) of
// a 16x16 tile stored row-major, ldsm_x4 gives exactly the A fragment of that tile, and
// ldsm_x4_trans of a tile stored [k][n] gives the B fragments of its two 8-column halves:
// {r0, r1} for columns 0..7 and {r2, r3} for columns 8..15.

// mma.m16n8k8 with .tf32 (one 32-bit element per register, same g and c):
//   A (16x8, row-major):  reg0 = (row g, col c), reg1 = (row g+8, col c),
//                         reg2 = (row g, col c+4), reg3 = (row g+8, col c+4)
//   B (8x8, "col"):       reg0 = (row c, col g), reg1 = (row c+4, col g)
//   C/D (16x8, float):    as for m16n8k16.

// A float32 operand rounded to tf32 for the tensor cores: cvt.rn where the PTX target has it
// (sm_90+: one instruction), cvt.rna before (three). Both round to nearest and differ only on
// exact ties, so the accuracy is the same; the emulator picks by its __CUDA_ARCH__ (emu.h).
__device__ __forceinline__ uint32_t cvt_tf32(float x) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cvt_rn_tf32(x);
#else
  return cvt_rna_tf32(x);
#endif
}

// x as a tf32 pair for 3xTF32: hi = x rounded to tf32, lo = what that left, rounded too;
// a * b ~ a_hi b_hi + a_hi b_lo + a_lo b_hi keeps about float32's accuracy (the dropped
// a_lo b_lo is ~2^-22 of the product).
__device__ __forceinline__ void tf32_split(float x, uint32_t& hi, uint32_t& lo) {
  hi = cvt_tf32(x);
  lo = cvt_tf32(x - __uint_as_float(hi));
}

// ---- chunk tiles -> shared memory ------------------------------------------------------
// Rows are tokens t < ROWS (= kC) of the chunk (token t at src + base + t * tok_stride), or
// key dims of a state (ROWS = KT, len = K, tok_stride = V); columns are
// [col0, col0 + COLS) of a row `width` elements wide. Rows at or past len and columns at or
// past width are zero. X is a 16-bit type (uint16_t) or float. vec: width is a multiple of the
// elements in 16 bytes and src is 16-byte aligned, so whole 16-byte vectors are either fully
// inside or fully outside, and go through cp.async.
// The caller commits / waits (cp_async_wait_group or _wait_all) and syncs before reading.
template <int COLS, int STRIDE, int NTHREADS, int ROWS = kC, typename X>
__device__ __forceinline__ void load_tile(X* dst, const X* src, int64_t base, int64_t tok_stride,
                                          int len, int col0, int width, bool vec, int tid) {
  constexpr int kVec = 16 / static_cast<int>(sizeof(X));  // elements per 16-byte vector
  if (vec) {
    // Each thread keeps one column of vectors and walks rows kStep apart: its addresses are
    // fixed offsets from one source pointer (no division or 64-bit multiply per copy).
    constexpr int kPerRow = COLS / kVec;
    static_assert(COLS % kVec == 0 && NTHREADS % kPerRow == 0 &&
                      ROWS % (NTHREADS / kPerRow) == 0,
                  "tile shape must split evenly over the threads");
    constexpr int kStep = NTHREADS / kPerRow;
    const int t0 = tid / kPerRow, cc = (tid % kPerRow) * kVec;
    const bool col_ok = col0 + cc < width;
    const X* s = src + base + t0 * tok_stride + col0 + cc;
    X* const d = dst + t0 * STRIDE + cc;
#pragma unroll
    for (int m = 0; m < ROWS / kStep; ++m) {
      if (col_ok && t0 + m * kStep < len) {
        cp_async16(d + m * kStep * STRIDE, s);
      } else {
        zero16(d + m * kStep * STRIDE);
      }
      s += kStep * tok_stride;
    }
  } else {
    for (int i = tid; i < ROWS * COLS; i += NTHREADS) {
      const int t = i / COLS, cc = i % COLS;
      dst[t * STRIDE + cc] =
          (t < len && col0 + cc < width) ? src[base + t * tok_stride + col0 + cc] : X{0};
    }
  }
}

// ---- cumulative gates ------------------------------------------------------------------
// In place down each key column of sB (kC rows, KT columns, row stride STRIDE):
// b_t = sum_{s <= t} max(g_s, kGateFloor) * log2(e). Rows past the chunk's end hold g = 0,
// so they repeat the last real b (row kC - 1 is b_last). The order of the additions is fixed
// whatever the thread count, so every kernel gets bitwise the same b: kGateSegs segments of
// kGateRows rows, each a running sum from 0 (gate_step), then segment q adds
// gate_prefix(q) of the segments' totals. The state scan (chunk_scan.cuh) computes the same
// sums in registers. sTot: gate_scratch_floats<KT>() floats. Ends with __syncthreads().
constexpr int kGateSegs = 4;
constexpr int kGateRows = kC / kGateSegs;

template <int KT>
constexpr int gate_scratch_floats() {
  return kGateSegs * KT;
}

// Sum of the totals of segments 0..q-1, always as ((t0 + t1) + t2).
__device__ __forceinline__ float gate_prefix(int q, float t0, float t1, float t2) {
  return q == 0 ? 0.0f : (q == 1 ? t0 : (q == 2 ? t0 + t1 : (t0 + t1) + t2));
}

// max(g, kGateFloor) that keeps NaN (fmaxf would turn a NaN gate into a full forget; the
// reference and the other kernels propagate it).
__device__ __forceinline__ float gate_floor(float g) { return g < kGateFloor ? kGateFloor : g; }

// One step of a segment's running sum (every kernel sums the gates with this). Written as
// one fused multiply-add: nvcc contracts `run + g * kLog2e` into an FFMA anyway, and the
// emulator's host build would not, so spelling it out makes the emulator compute the GPU's
// bits (fmaf is FFMA on the device and a correctly rounded std::fma on the host).
__device__ __forceinline__ float gate_step(float run, float g) {
  return fmaf(gate_floor(g), kLog2e, run);
}

template <int KT, int STRIDE, int NTHREADS>
__device__ __forceinline__ void gate_cumsum(float* sB, float* sTot, int tid) {
  for (int w = tid; w < kGateSegs * KT; w += NTHREADS) {
    const int col = w % KT, seg = w / KT;
    float* const bcol = sB + (seg * kGateRows) * STRIDE + col;
    float x[kGateRows];
#pragma unroll
    for (int r = 0; r < kGateRows; ++r) x[r] = bcol[r * STRIDE];  // loads ahead of the adds
    float run = 0.0f;
#pragma unroll
    for (int r = 0; r < kGateRows; ++r) {
      run = gate_step(run, x[r]);
      bcol[r * STRIDE] = run;
    }
    sTot[w] = run;
  }
  __syncthreads();
  for (int w = KT + tid; w < kGateSegs * KT; w += NTHREADS) {  // segments 1.. += prefix
    const int col = w % KT, seg = w / KT;
    const float pre = gate_prefix(seg, sTot[col], sTot[KT + col], sTot[2 * KT + col]);
    float* const bcol = sB + (seg * kGateRows) * STRIDE + col;
#pragma unroll
    for (int r = 0; r < kGateRows; ++r) bcol[r * STRIDE] += pre;
  }
  __syncthreads();
}

// ---- intra-chunk scores ----------------------------------------------------------------
// sA (kC x kC, input dtype, row stride L::kAStride) <- A from raw q, k (sQ, sK, stride
// L::kQKStride) and cumulative gates sB (stride L::kBStride), all on tensor cores, by
// sub-blocks of 16 tokens (the paper's secondary chunking):
//   off-diagonal pairs (row block i > column block j): the gates are folded into both factors
//   relative to r = last token of block j: q_t * exp2(b_t - b_r) and k_s * exp2(b_r - b_s),
//   both exponents <= 0 (one unit per column block j, so the k side is made once per j);
//   diagonal 16 x 16 blocks: see diag_block_scores.
// Entries above the diagonal are written as 0. No barrier at the end.

// x0, x1 rounded to the input dtype (hi) and what that rounding left (lo), so hi + lo
// carries about twice the bits for the tensor cores.
template <typename E>
__device__ __forceinline__ void split_pack(float x0, float x1, uint32_t& hi, uint32_t& lo) {
  hi = E::pack2(x0, x1);
  float h0, h1;
  E::unpack2(hi, h0, h1);
  lo = E::pack2(x0 - h0, x1 - h1);
}

// Inserts a bit at position lv into i: the i-th number (0..7) of 0..15 whose bit lv is `set`.
__device__ __forceinline__ int insert_bit(int i, int lv, int set) {
  const int low = (1 << lv) - 1;
  return ((i & ~low) << 1) | (set << lv) | (i & low);
}

// The entries of one dyadic level's accumulator that the level owns (diag_block_scores and
// the float32 f32_diag_block): acc[r] is (A row g (+8 for r >= 2), column 2c + (r & 1)); rows
// 8..15 hold the level's tokens t (owned where t and s share the bits above the level), rows
// 0..7 the reference tokens r (owned only on the diagonal t == s). put(t, s, acc[r]) stores
// one, with t and s inside the 16 x 16 block.
template <typename Put>
__device__ __forceinline__ void diag_level_owned(const float (&acc)[4], int lv, int g8, int c4,
                                                 Put put) {
  const int lsz = 1 << lv, nz = 8 >> lv;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    const int row = g8 + 8 * (r >> 1);
    const int s = insert_bit(2 * c4 + (r & 1), lv, 0);
    int t;
    bool own;
    if (row >= 8) {
      t = insert_bit(row - 8, lv, 1);
      own = (t >> (lv + 1)) == (s >> (lv + 1));
    } else {
      t = row * 2 * lsz + lsz - 1;
      own = row < nz && t == s;
    }
    if (own) put(t, s, acc[r]);
  }
}

// One diagonal 16 x 16 block (tokens 16 blk + 0..15) by dyadic levels, one warp. At level
// L = 2^lv (8, 4, 2, 1) the pairs (t, s) with s < t whose highest differing bit is lv (t has
// it set, s clear, same higher bits) factor through r = s | (L - 1), the last token of s's
// group of L, with t > r >= s: q_t * exp2(b_t - b_r) and k_s * exp2(b_r - b_s), both
// exponents <= 0. A rows 8..15 are those 8 rows t of the level, B columns its 8 columns s:
// one mma per 16 key dims, the exp2 only for the 8 + 8 tokens that take part (the level-1
// column factors are 1). A rows 0..7 take raw q of the tokens s = r (factor 1) of the same
// columns, so the same mma gives the diagonal entries A[s][s] for those; A[15][15] (the only
// token that is no level's r) is a plain dot product. 56 exp2 per key dim and block instead
// of one per (t, s) pair; every entry comes from exactly one level. The gated operands go in
// as two terms of the input dtype (split_pack: two or three mma per level), so the diagonal
// keeps about the accuracy of its former float32 per-pair products.
template <typename T, int KT, typename L>
__device__ __forceinline__ void diag_block_scores(const uint16_t* sQ, const uint16_t* sK,
                                                  const float* sB, uint16_t* sA, float scale,
                                                  int blk, int lane) {
  using E = Elem<T>;
  const int g8 = lane >> 2, c4 = lane & 3;
  const int base = 16 * blk;
  const int rho = (lane & 7) + ((lane >> 3) & 1) * 8;  // ldmatrix row of this lane
  const int lm_col = (lane >> 4) * 8;
#pragma unroll
  for (int lv = 3; lv >= 0; --lv) {
    const int lsz = 1 << lv;
    const int nz = 8 >> lv;  // tokens s = r of this level's columns: s = 2L m + L - 1
    const int tok_a = rho >= 8 ? insert_bit(rho - 8, lv, 1) : (rho % nz) * 2 * lsz + lsz - 1;
    const int tf = insert_bit(g8, lv, 1);             // this lane's factor row (A row g + 8)
    const int rf = (tf & ~(2 * lsz - 1)) | (lsz - 1);  // its reference token
    const int sc = insert_bit(g8, lv, 0);             // this lane's B column
    const int rc = sc | (lsz - 1);                    // its reference token
    float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll 2
    for (int kb = 0; kb < KT; kb += 16) {
      uint32_t af[4];
      ldsm_x4(af, sQ + (base + tok_a) * L::kQKStride + kb + lm_col);
      uint32_t al[4] = {0u, 0u, 0u, 0u};  // rounding remainders of the gated rows
      uint32_t bf[2], bl[2] = {0u, 0u};
#pragma unroll
      for (int hk = 0; hk < 2; ++hk) {  // key dims kb + 2c (+8 for hk = 1)
        const int kd = kb + 2 * c4 + 8 * hk;
        const float2 bt = *reinterpret_cast<const float2*>(sB + (base + tf) * L::kBStride + kd);
        const float2 br = *reinterpret_cast<const float2*>(sB + (base + rf) * L::kBStride + kd);
        float x0, x1;
        E::unpack2(af[1 + 2 * hk], x0, x1);
        split_pack<E>(x0 * exp2f(bt.x - br.x), x1 * exp2f(bt.y - br.y), af[1 + 2 * hk],
                      al[1 + 2 * hk]);
        uint32_t kw = *reinterpret_cast<const uint32_t*>(sK + (base + sc) * L::kQKStride + kd);
        if (lv > 0) {
          const float2 bs =
              *reinterpret_cast<const float2*>(sB + (base + sc) * L::kBStride + kd);
          const float2 bq =
              *reinterpret_cast<const float2*>(sB + (base + rc) * L::kBStride + kd);
          E::unpack2(kw, x0, x1);
          split_pack<E>(x0 * exp2f(bq.x - bs.x), x1 * exp2f(bq.y - bs.y), kw, bl[hk]);
        }
        bf[hk] = kw;
      }
      // (a + a') (b + b') without a' b': the gated operands keep ~16 bits, as the float32
      // products of the per-pair form did (the raw q, k are exact in the input dtype)
      E::mma(acc, af, bf[0], bf[1]);
      E::mma(acc, al, bf[0], bf[1]);
      if (lv > 0) E::mma(acc, af, bl[0], bl[1]);
    }
    diag_level_owned(acc, lv, g8, c4, [&](int t, int s, float x) {
      sA[(base + t) * L::kAStride + base + s] = E::from_float(x * scale);
    });
  }
  // A[15][15]: q_15 . k_15 (no decay), lanes over pairs of key dims, then a butterfly sum
  {
    const int t = base + 15;
    float d = 0.0f;
#pragma unroll
    for (int kd = 2 * lane; kd < KT; kd += 64) {
      float q0, q1, k0, k1;
      E::unpack2(*reinterpret_cast<const uint32_t*>(sQ + t * L::kQKStride + kd), q0, q1);
      E::unpack2(*reinterpret_cast<const uint32_t*>(sK + t * L::kQKStride + kd), k0, k1);
      d = fmaf(q0, k0, d);
      d = fmaf(q1, k1, d);
    }
    d += __shfl_xor_sync(0xffffffffu, d, 16);
    d += __shfl_xor_sync(0xffffffffu, d, 8);
    d += __shfl_xor_sync(0xffffffffu, d, 4);
    d += __shfl_xor_sync(0xffffffffu, d, 2);
    d += __shfl_xor_sync(0xffffffffu, d, 1);
    if (lane == 0) sA[t * L::kAStride + t] = E::from_float(d * scale);
  }
  // zeros above the diagonal: lane -> row lane / 2, columns 8 (lane & 1) + 0..7
  {
    const int t = lane >> 1;
#pragma unroll
    for (int x = 0; x < 8; ++x) {
      const int s = 8 * (lane & 1) + x;
      if (s > t) sA[(base + t) * L::kAStride + base + s] = 0;
    }
  }
}

template <typename T, int KT, int NWARPS, typename L>
__device__ __forceinline__ void chunk_scores(const uint16_t* sQ, const uint16_t* sK,
                                             const float* sB, uint16_t* sA, float scale,
                                             int warp, int lane) {
  using E = Elem<T>;
  const int g8 = lane >> 2, c4 = lane & 3;
  // off-diagonal: one unit per column block j (0..2) takes every row block i > j, so the k
  // side (relative to r = last token of block j) is made once per j and 16 key dims
  for (int bj = warp; bj < 3; bj += NWARPS) {
    const int ref = 16 * bj + 15;  // reference token: last of block j
    float acc[3][2][4];            // [i - 1][8-column half]
#pragma unroll
    for (int i = 0; i < 3; ++i)
#pragma unroll
      for (int hf = 0; hf < 2; ++hf)
#pragma unroll
        for (int r = 0; r < 4; ++r) acc[i][hf][r] = 0.0f;
#pragma unroll 2
    for (int kb = 0; kb < KT; kb += 16) {
      uint32_t bf[2][2];  // [half][key half]
#pragma unroll
      for (int hk = 0; hk < 2; ++hk) {  // key dims kb + 2c (+8 for hk = 1)
        const int kd = kb + 2 * c4 + 8 * hk;
        const float2 br = *reinterpret_cast<const float2*>(sB + ref * L::kBStride + kd);
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {  // B column (token s) of this lane
          const int sc = 16 * bj + 8 * hf + g8;
          const float2 bs = *reinterpret_cast<const float2*>(sB + sc * L::kBStride + kd);
          float x0, x1;
          E::unpack2(*reinterpret_cast<const uint32_t*>(sK + sc * L::kQKStride + kd), x0, x1);
          bf[hf][hk] = E::pack2(x0 * exp2f(br.x - bs.x), x1 * exp2f(br.y - bs.y));
        }
      }
#pragma unroll
      for (int bi = 1; bi < 4; ++bi) {
        if (bi <= bj) continue;  // warp-uniform
        const int t0 = 16 * bi + g8, t1 = t0 + 8;  // A rows of this lane
        uint32_t af[4];
#pragma unroll
        for (int hk = 0; hk < 2; ++hk) {
          const int kd = kb + 2 * c4 + 8 * hk;
          const float2 br = *reinterpret_cast<const float2*>(sB + ref * L::kBStride + kd);
          const float2 b0 = *reinterpret_cast<const float2*>(sB + t0 * L::kBStride + kd);
          const float2 b1 = *reinterpret_cast<const float2*>(sB + t1 * L::kBStride + kd);
          float x0, x1;
          E::unpack2(*reinterpret_cast<const uint32_t*>(sQ + t0 * L::kQKStride + kd), x0, x1);
          af[2 * hk] = E::pack2(x0 * exp2f(b0.x - br.x), x1 * exp2f(b0.y - br.y));
          E::unpack2(*reinterpret_cast<const uint32_t*>(sQ + t1 * L::kQKStride + kd), x0, x1);
          af[2 * hk + 1] = E::pack2(x0 * exp2f(b1.x - br.x), x1 * exp2f(b1.y - br.y));
        }
        E::mma(acc[bi - 1][0], af, bf[0][0], bf[0][1]);
        E::mma(acc[bi - 1][1], af, bf[1][0], bf[1][1]);
      }
    }
#pragma unroll
    for (int bi = 1; bi < 4; ++bi) {
      if (bi <= bj) continue;
      const int t0 = 16 * bi + g8, t1 = t0 + 8;
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int col = 16 * bj + 8 * hf + 2 * c4;
        *reinterpret_cast<uint32_t*>(sA + t0 * L::kAStride + col) =
            E::pack2(acc[bi - 1][hf][0] * scale, acc[bi - 1][hf][1] * scale);
        *reinterpret_cast<uint32_t*>(sA + t1 * L::kAStride + col) =
            E::pack2(acc[bi - 1][hf][2] * scale, acc[bi - 1][hf][3] * scale);
      }
    }
  }
  // diagonal blocks: one warp each (with 8 warps, the four that took no column block)
  for (int blk = (warp + 4) % NWARPS; blk < 4; blk += NWARPS)
    diag_block_scores<T, KT, L>(sQ, sK, sB, sA, scale, blk, lane);
}

// ---- a warp's slice of a state ---------------------------------------------------------
// A warp carries S^T for 16 V columns as m16n8 accumulators: s[nt][r] is S[kd][vc] with
// kd = k0 + 8nt + 2c + (r & 1) and vc = vc_lo + 8 (r >> 1), where vc_lo is the warp's first
// V column + lane / 4. Calls f(s[nt][r], kd * V + vc) for the entries inside K x V; the
// others are left as they are.
template <int NT, typename F>
__device__ __forceinline__ void for_state_slice(float (&s)[NT][4], int k0, int vc_lo, int K,
                                                int V, int lane, F&& f) {
  const int c4 = lane & 3;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int kd = k0 + 8 * nt + 2 * c4 + (r & 1);
      const int vc = vc_lo + (r >> 1) * 8;
      if (kd < K && vc < V) f(s[nt][r], static_cast<int64_t>(kd) * V + vc);
    }
  }
}

// The same walk, calling f(s[nt][r], kd, vc) (for h0 / ht, whose layout goes by strides).
template <int NT, typename F>
__device__ __forceinline__ void for_state_elems(float (&s)[NT][4], int k0, int vc_lo, int K,
                                                int V, int lane, F&& f) {
  const int c4 = lane & 3;
#pragma unroll
  for (int nt = 0; nt < NT; ++nt) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      const int kd = k0 + 8 * nt + 2 * c4 + (r & 1);
      const int vc = vc_lo + (r >> 1) * 8;
      if (kd < K && vc < V) f(s[nt][r], kd, vc);
    }
  }
}

// ---- the fused forwards' state rows and tiles (chunk_fwd.cu, chunk_fwd_f32.cuh) ----------
// Pool rows of sequence n: a padding row (state_idx < 0) runs no tokens (o stays zero),
// reads no state and writes zeros to ht row n (nothing in place). Element offsets of its
// (row, head) state in h0 and in ht, with K-first addresses (kept the register budget).
struct StateRows {
  bool padding;
  int64_t h0_base, ht_base;
};
__device__ __forceinline__ StateRows fused_state_rows(const ChunkArgs& a, int64_t n, int h) {
  const int64_t in_row = h0_state_row(a, n);
  const bool padding = in_row < 0;
  const int64_t per_head = static_cast<int64_t>(a.K) * a.V;
  return {padding, ((padding ? n : in_row) * a.H + h) * per_head,
          ((padding ? n : ht_state_row(a, n)) * a.H + h) * per_head};
}

// s <- the state at h0 + base (K-first, or V-first by strides); s starts at key dim k0 (the
// split float32 forward's scan tiles K).
template <int NT>
__device__ __forceinline__ void load_h0(float (&s)[NT][4], const ChunkArgs& a, int64_t base,
                                        int vc_lo, int lane, int k0 = 0) {
  if (a.state_v_stride == 1)  // K-first
    for_state_slice(s, k0, vc_lo, a.K, a.V, lane,
                    [&](float& x, int64_t off) { x = a.h0[base + off]; });
  else
    for_state_elems(s, k0, vc_lo, a.K, a.V, lane, [&](float& x, int kd, int vc) {
      x = a.h0[base + state_elem(a, kd, vc)];
    });
}

// ht + base <- s: zeros for a padding row, nothing for one whose final state goes in place.
template <int NT>
__device__ __forceinline__ void store_ht(float (&s)[NT][4], const ChunkArgs& a, int64_t base,
                                         int vc_lo, int lane, bool padding, int k0 = 0) {
  if (padding && a.inplace_final) return;
  if (a.state_v_stride == 1)  // K-first
    for_state_slice(s, k0, vc_lo, a.K, a.V, lane, [&](float& x, int64_t off) {
      a.ht[base + off] = padding ? 0.0f : x;
    });
  else
    for_state_elems(s, k0, vc_lo, a.K, a.V, lane, [&](float& x, int kd, int vc) {
      a.ht[base + state_elem(a, kd, vc)] = padding ? 0.0f : x;
    });
}

// Where chunk c0 of batch row `row` starts (tokens to the sequence end, at most kC).
struct ChunkPos {
  int len;
  int64_t qk_base, v_base;  // element offsets of its first token, head h, in q/k/g and v/o
};
__device__ __forceinline__ ChunkPos chunk_pos(const ChunkArgs& a, int64_t row, int h,
                                              int64_t c0, int64_t end) {
  const int64_t tok = (row * a.T + c0) * a.H + h;
  return {static_cast<int>(end - c0 < kC ? end - c0 : kC), tok * a.K, tok * a.V};
}

// The fused forwards' first step of a chunk: q, k, g and v columns [v0, v0 + BV) into shared
// memory (row strides QKS, BS, VS; X is the q/k/v element, uint16_t or float), then the
// cumulative gates in sB (gate_cumsum; ends with __syncthreads()).
template <int KT, int BV, int QKS, int BS, int VS, int NTHREADS, typename X>
__device__ __forceinline__ void stage_chunk(X* sQ, X* sK, float* sB, X* sV, float* sTot,
                                            const ChunkArgs& a, const ChunkPos& cp, int v0,
                                            int tid) {
  const int64_t qk_tok = static_cast<int64_t>(a.H) * a.K;  // elements between tokens
  const int64_t v_tok = static_cast<int64_t>(a.H) * a.V;
  const bool vec_qk = (a.flags & kVecQK) != 0;
  load_tile<KT, QKS, NTHREADS>(sQ, static_cast<const X*>(a.q), cp.qk_base, qk_tok, cp.len, 0,
                               a.K, vec_qk, tid);
  load_tile<KT, QKS, NTHREADS>(sK, static_cast<const X*>(a.k), cp.qk_base, qk_tok, cp.len, 0,
                               a.K, vec_qk, tid);
  load_tile<KT, BS, NTHREADS>(sB, a.g, cp.qk_base, qk_tok, cp.len, 0, a.K,
                              (a.flags & kVecG) != 0, tid);
  load_tile<BV, VS, NTHREADS>(sV, static_cast<const X*>(a.v), cp.v_base, v_tok, cp.len, v0,
                              a.V, (a.flags & kVecV) != 0, tid);
  cp_async_wait_all();
  __syncthreads();
  gate_cumsum<KT, BS, NTHREADS>(sB, sTot, tid);
}

// ---- chunk state update ----------------------------------------------------------------
// One warp's slice of S^T <- S^T * exp2(b_last) + Y^T @ X, the state carried across chunks.
// s: m16n8 accumulators (float32) of S^T for 16 columns of Y (rows) by KT key dims: s[nt]
// covers key dims 8nt + 2c + {0, 1}. yf[j]: the Y tile's token block j read with
// ldsm_x4_trans (Y stored [token][column]), as loaded for other uses by the caller. X is the
// gated kC x KT key-side tile (stored [token][key dim], row stride XSTRIDE); blast points
// at b_last (the last row of the cumulative gates).
template <typename T, int KT, int XSTRIDE>
__device__ __forceinline__ void state_update(float (&s)[KT / 8][4], const uint32_t (&yf)[4][4],
                                             const uint16_t* sX, const float* blast,
                                             int lane) {
  const int c4 = lane & 3;
  const int lm_row = (lane & 7) + ((lane >> 3) & 1) * 8;
  const int lm_col = (lane >> 4) * 8;
#pragma unroll
  for (int nt = 0; nt < KT / 8; ++nt) {
    const float2 bl = *reinterpret_cast<const float2*>(blast + 8 * nt + 2 * c4);
    const float e0 = exp2f(bl.x), e1 = exp2f(bl.y);
    s[nt][0] *= e0;
    s[nt][1] *= e1;
    s[nt][2] *= e0;
    s[nt][3] *= e1;
  }
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    // A = Y^T (rows = Y columns, cols = tokens): the transposed Y tile read by the caller is
    // already this fragment, in the order {yf0, yf2, yf1, yf3}.
    const uint32_t ay[4] = {yf[j][0], yf[j][2], yf[j][1], yf[j][3]};
#pragma unroll
    for (int kk = 0; kk < KT / 16; ++kk) {
      uint32_t xf[4];
      ldsm_x4_trans(xf, sX + (16 * j + lm_row) * XSTRIDE + 16 * kk + lm_col);
      Elem<T>::mma(s[2 * kk], ay, xf[0], xf[1]);
      Elem<T>::mma(s[2 * kk + 1], ay, xf[2], xf[3]);
    }
  }
}

// ---- launcher helpers ------------------------------------------------------------------
constexpr int kChunkMaxK = 128;  // widest K in one pass (kCudaChunkMaxK in gla.h)
static_assert(kChunkMaxK == kCudaChunkMaxK, "gla.h and the chunk kernels disagree on max K");

inline int64_t max_chunks(const GlaParams& p) {
  return max_chunks(p.B, p.T, p.N, p.cu_seqlens != nullptr);
}

// The size and dtype checks every chunk launcher makes; nullptr when p is fine, else a
// message starting with op (valid until the next failing call on this thread).
inline const char* check_chunk_params(const GlaParams& p, const char* op,
                                      bool float32_ok = false) {
  static thread_local char message[200];
  const char* what = nullptr;
  if (float32_ok ? p.dtype != DType::kFloat32
                 : p.dtype != DType::kFloat16 && p.dtype != DType::kBFloat16)
    what = float32_ok ? "q/k/v must be float32"
                      : "q/k/v must be float16 or bfloat16 (float32 has its own kernel)";
  else if (p.K < 1 || p.K > kChunkMaxK)
    what = "K must be in [1, 128] (split wider K into slices)";
  else if (p.V < 1 || p.V > (int64_t{1} << 30))
    what = "V must be in [1, 2^30]";
  else if (p.B < 0 || p.T < 0 || p.H < 0 || p.N < 0)
    what = "negative size";
  else if (p.cu_seqlens == nullptr && p.N != p.B)
    what = "N must equal B without cu_seqlens";
  else if (p.cu_seqlens != nullptr && p.B != 1)
    what = "B must be 1 with cu_seqlens";
  else if (p.H > 65535 || p.N * p.H > int64_t{0x7fffffff})
    what = "N * H or H exceeds the grid limit";
  else if ((p.V + 63) / 64 > 65535)
    what = "V too large for the grid";
  else if (max_chunks(p) > int64_t{0x7fffffff})
    what = "too many chunks for the grid";
  if (what == nullptr) return nullptr;
  std::snprintf(message, sizeof(message), "%s: %s", op, what);
  return message;
}

// The fields of ChunkArgs every chunk kernel reads, from p: inputs, sizes, and the flags of
// the q/k/g/v loads (the launchers add their outputs and flags).
inline ChunkArgs common_args(const GlaParams& p) {
  ChunkArgs a{};
  a.q = p.q;
  a.k = p.k;
  a.v = p.v;
  a.g = static_cast<const float*>(p.g);
  a.h0 = static_cast<const float*>(p.h0);
  a.cu_seqlens = p.cu_seqlens;
  a.state_idx = p.state_idx;
  a.P = p.P;
  a.inplace_final = p.inplace_final ? 1 : 0;
  a.state_k_stride = state_k_stride(p);
  a.state_v_stride = state_v_stride(p);
  a.T = p.T;
  a.chunks_per_row = (p.T + kC - 1) / kC;
  a.ws_chunks = max_chunks(p);
  a.N = static_cast<int>(p.N);
  a.H = static_cast<int>(p.H);
  a.K = static_cast<int>(p.K);
  a.V = static_cast<int>(p.V);
  a.scale = static_cast<float>(p.scale);
  if (p.K % 8 == 0 && aligned(p.q, 16) && aligned(p.k, 16)) a.flags |= kVecQK;
  if (p.K % 4 == 0 && aligned(p.g, 16)) a.flags |= kVecG;
  if (p.V % 8 == 0 && aligned(p.v, 16)) a.flags |= kVecV;
  return a;
}

// ---- launching -------------------------------------------------------------------------
#ifndef GLA_CHUNK_EMULATE
using ChunkKernel = void (*)(const ChunkArgs);

// Reserves the dynamic shared memory and launches; returns nullptr or a message naming op and
// kernel (valid until the next failing call on this thread).
inline const char* launch_chunk_kernel(ChunkKernel kernel, dim3 grid, int threads, int smem,
                                       cudaStream_t stream, const ChunkArgs& args,
                                       const char* op, const char* name) {
  static thread_local char message[320];
  cudaError_t err = raise_smem_once(reinterpret_cast<const void*>(kernel), smem);
  if (err != cudaSuccess) {
    (void)cudaGetLastError();  // clear it, so it is not reported again by a later check
    std::snprintf(message, sizeof(message), "%s: %s: cannot reserve %d bytes of shared memory: %s",
                  op, name, smem, cudaGetErrorString(err));
    return message;
  }
  kernel<<<grid, threads, smem, stream>>>(args);
  err = cudaGetLastError();
  if (err != cudaSuccess) {
    std::snprintf(message, sizeof(message), "%s: %s launch failed: %s", op, name,
                  cudaGetErrorString(err));
    return message;
  }
  return nullptr;
}

// Checks the current device can run the chunk kernels (sm_80+); *sm_count gets its SM count.
inline const char* check_device(const char* op, int* sm_count) {
  static thread_local char message[320];
  int device = 0;
  DeviceInfo info;
  const cudaError_t err = current_device_info(&device, &info);  // cached per device
  const int major = info.major;
  *sm_count = info.sm_count;
  if (err != cudaSuccess) {
    (void)cudaGetLastError();
    std::snprintf(message, sizeof(message), "%s: cannot query the device: %s", op,
                  cudaGetErrorString(err));
    return message;
  }
  if (major < 8) {
    std::snprintf(message, sizeof(message),
                  "%s: needs a GPU of compute capability 8.0 or newer", op);
    return message;
  }
  return nullptr;
}
#endif  // GLA_CHUNK_EMULATE

}  // namespace
}  // namespace gla
