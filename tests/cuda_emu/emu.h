// Host emulation of the little CUDA that csrc/cuda/chunk_{fwd,bwd}.cu use, so that their kernel bodies
// can run on a CPU (no GPU needed) and be checked against a float64 recurrence.
//
// - Every thread of a block is a fiber (ucontext). A fiber runs until it reaches
//   __syncthreads() or a warp-collective primitive, then yields. __syncthreads() releases
//   only when all threads of the block wait on it; a warp collective runs when all 32 lanes
//   of the warp wait on the same primitive. Anything else is reported as a deadlock.
//   Scheduling is adversarial for missing barriers: one warp runs as far as it can (through
//   its own collectives) before the next warp starts, lanes one after another, in forward
//   or reverse order. A missing __syncthreads then shows up as reads of not-yet-written
//   (poisoned) shared memory, or of data already overwritten, and as results that depend
//   on the order.
// - ldmatrix (.x4, with and without .trans), mma.m16n8k16 (f16/bf16 in, f32 accumulate) and
//   mma.m16n8k8 (tf32 in, low 13 bits of raw float32 ignored) are written from the fragment
//   tables of the PTX ISA, independently of the kernel; cvt.rna.tf32.f32 rounds ties away,
//   cvt.rn.tf32.f32 (sm_90+) to even.
// - cp.async: in the forward-order run a copy lands when issued; in the reverse-order run it
//   lands only at the wait that covers it (wait_all, or wait_group for older groups). A read
//   before the right wait, or a buffer refilled while still in use, then changes the result.
// - Shared memory is poisoned with 0xFF bytes (NaN as float, bf16 and fp16) before each block.
#pragma once

#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <vector>

// ---- CUDA keywords and types ----------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__
#define __align__(n) __attribute__((aligned(n)))
// The architecture whose device code the emulator runs (the kernels' #if __CUDA_ARCH__
// choices, e.g. cvt_tf32's rounding): a harness built with -DGLA_EMU_ARCH=900 (or a wrapper
// source defining it first) runs the sm_90 code.
#ifndef GLA_EMU_ARCH
#define GLA_EMU_ARCH 800
#endif
#define __CUDA_ARCH__ GLA_EMU_ARCH

struct EmuIdx {
  unsigned x, y, z;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(8) uint2 {
  unsigned x, y;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
struct alignas(8) float2 {
  float x, y;
};
inline float2 make_float2(float x, float y) { return {x, y}; }
struct alignas(16) float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float __uint_as_float(unsigned u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

struct __nv_bfloat16 {
  uint16_t bits;
};
struct __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
struct __half {
  uint16_t bits;
};
struct __half2 {
  __half x, y;
};

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return {static_cast<uint16_t>(0x7fc0)};
  u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
  return {static_cast<uint16_t>(u >> 16)};
}
inline float emu_bf16_to_float(uint16_t b) { return __uint_as_float(static_cast<uint32_t>(b) << 16); }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline uint16_t __bfloat16_as_ushort(__nv_bfloat16 h) { return h.bits; }

inline __half __float2half_rn(float f) {
  const _Float16 x = static_cast<_Float16>(f);  // round to nearest even
  uint16_t b;
  std::memcpy(&b, &x, 2);
  return {b};
}
inline float __half2float(__half h) {
  _Float16 x;
  std::memcpy(&x, &h.bits, 2);
  return static_cast<float>(x);
}
inline float emu_f16_to_float(uint16_t b) { return __half2float(__half{b}); }
inline __half __ushort_as_half(uint16_t b) { return {b}; }
inline uint16_t __half_as_ushort(__half h) { return h.bits; }
inline float2 __half22float2(__half2 h) { return {__half2float(h.x), __half2float(h.y)}; }
inline __half2 __floats2half2_rn(float lo, float hi) {
  return {__float2half_rn(lo), __float2half_rn(hi)};
}

// ---- fibers -------------------------------------------------------------------------------
namespace emu {

constexpr int kMaxThreads = 1024;
constexpr size_t kSmemBytes = 200 * 1024;
constexpr size_t kStackBytes = 256 * 1024;

enum class Wait { kNone, kSync, kWarp, kDone };
enum class Op { kLdsm, kLdsmTrans, kMmaBf16, kMmaF16, kMmaTf32, kShfl };

struct Fiber {
  ucontext_t ctx;
  std::vector<char> stack;
  Wait wait = Wait::kNone;
  Op op = Op::kLdsm;
  const void* addr = nullptr;  // ldmatrix row address
  uint32_t a[4] = {}, b[2] = {};
  float c[4] = {};
  uint32_t r[4] = {};  // ldmatrix result (r[0]: shuffle result)
  uint32_t shfl_val = 0, shfl_xor = 0;  // __shfl_xor_sync operands
  struct Copy {
    void* dst;
    unsigned char data[16];
    int group;
  };
  std::vector<Copy> copies;  // cp.async copies not landed yet (deferred mode)
  int committed = 0;         // groups committed so far
  float d[4] = {};     // mma result
};

struct State {
  Fiber fibers[kMaxThreads];
  int nthreads = 0;
  int current = -1;
  ucontext_t sched;
  EmuIdx block{0, 0, 0};
  std::function<void()> body;
  bool reverse = false;
  long collectives = 0, barriers = 0;
  long mmas = 0;  // warp-level mma instructions run
  long cvt_rna = 0, cvt_rn = 0;  // tf32 operand roundings run (thread-level), per mode
};
inline State& st() {
  static State s;
  return s;
}

[[noreturn]] inline void die(const char* msg) {
  std::fprintf(stderr, "emu error: %s (block %u,%u thread %d)\n", msg, st().block.x,
               st().block.y, st().current);
  std::exit(3);
}

inline EmuIdx thread_idx() { return {static_cast<unsigned>(st().current), 0, 0}; }
inline EmuIdx block_idx() { return st().block; }

inline void yield_to_scheduler() {
  State& s = st();
  swapcontext(&s.fibers[s.current].ctx, &s.sched);
}

inline void syncthreads() {
  st().fibers[st().current].wait = Wait::kSync;
  yield_to_scheduler();
}

inline void fiber_entry() {
  State& s = st();
  s.body();
  s.fibers[s.current].wait = Wait::kDone;
  swapcontext(&s.fibers[s.current].ctx, &s.sched);
  die("finished fiber resumed");
}

}  // namespace emu

// The shared memory of the (single, current) block. The kernel's block-scope
// `extern __shared__ unsigned char smem[];` (in namespace gla::<anonymous>) names this array.
namespace gla {
namespace {
alignas(16) unsigned char smem[emu::kSmemBytes];
}  // namespace
}  // namespace gla

namespace emu {
inline unsigned char* const emu_smem = gla::smem;

inline void check_smem(const void* p, size_t bytes, size_t align, const char* what) {
  const auto* c = static_cast<const unsigned char*>(p);
  if (c < emu_smem || c + bytes > emu_smem + kSmemBytes) die(what);
  if (reinterpret_cast<uintptr_t>(p) % align != 0) die(what);
}

inline float to_float16bit(uint16_t x, bool bf16) {
  return bf16 ? emu_bf16_to_float(x) : emu_f16_to_float(x);
}

// tf32 operand bits as the tensor cores read them: the 13 low mantissa bits are ignored
// (the kernels round with cvt.rna.tf32 first, so nothing is dropped there).
inline double tf32_operand(uint32_t bits) { return __uint_as_float(bits & 0xffffe000u); }

// mma.m16n8k8 .tf32 from the PTX ISA's fragment tables: A a0 (g, c), a1 (g+8, c),
// a2 (g, c+4), a3 (g+8, c+4); B b0 (c, g), b1 (c+4, g); C/D as m16n8k16. Exact products,
// summed in double, rounded once (as the f16/bf16 shapes here).
inline void resolve_mma_tf32(Fiber* lane) {
  double A[16][8], B[8][8], C[16][8];
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, c = l & 3;
    A[g][c] = tf32_operand(lane[l].a[0]);
    A[g + 8][c] = tf32_operand(lane[l].a[1]);
    A[g][c + 4] = tf32_operand(lane[l].a[2]);
    A[g + 8][c + 4] = tf32_operand(lane[l].a[3]);
    B[c][g] = tf32_operand(lane[l].b[0]);
    B[c + 4][g] = tf32_operand(lane[l].b[1]);
    for (int e = 0; e < 4; ++e) C[g + (e >= 2 ? 8 : 0)][2 * c + (e & 1)] = lane[l].c[e];
  }
  for (int l = 0; l < 32; ++l) {
    const int g = l >> 2, c = l & 3;
    for (int e = 0; e < 4; ++e) {
      const int row = g + (e >= 2 ? 8 : 0), col = 2 * c + (e & 1);
      double acc = C[row][col];
      for (int kk = 0; kk < 8; ++kk) acc += A[row][kk] * B[kk][col];
      lane[l].d[e] = static_cast<float>(acc);
    }
  }
}

// Runs one warp-collective op once all 32 lanes of warp w wait on it.
inline void resolve_warp(int w) {
  State& s = st();
  Fiber* lane = &s.fibers[32 * w];
  const Op op = lane[0].op;
  for (int l = 1; l < 32; ++l)
    if (lane[l].op != op) die("lanes of a warp wait on different collectives");
  ++s.collectives;
  if (op == Op::kShfl) {  // every lane reads lane (l ^ mask); all 32 lanes take part
    for (int l = 0; l < 32; ++l) {
      if (lane[l].shfl_xor != lane[0].shfl_xor) die("lanes shuffle with different masks");
      lane[l].r[0] = lane[l ^ lane[l].shfl_xor].shfl_val;
    }
  } else if (op == Op::kLdsm || op == Op::kLdsmTrans) {
    // Matrix m: rows given by lanes 8m..8m+7, each row 8 consecutive 16-bit elements.
    for (int l = 0; l < 32; ++l) check_smem(lane[l].addr, 16, 16, "ldmatrix row address");
    auto elem = [&](int m, int row, int col) -> uint32_t {
      return static_cast<const uint16_t*>(lane[8 * m + row].addr)[col];
    };
    for (int l = 0; l < 32; ++l) {
      for (int m = 0; m < 4; ++m) {
        uint32_t lo, hi;
        if (op == Op::kLdsm) {  // row l/4, columns 2(l%4), 2(l%4)+1
          lo = elem(m, l / 4, 2 * (l % 4));
          hi = elem(m, l / 4, 2 * (l % 4) + 1);
        } else {  // transposed: rows 2(l%4), 2(l%4)+1 of column l/4
          lo = elem(m, 2 * (l % 4), l / 4);
          hi = elem(m, 2 * (l % 4) + 1, l / 4);
        }
        lane[l].r[m] = lo | (hi << 16);
      }
    }
  } else if (op == Op::kMmaTf32) {
    ++s.mmas;
    resolve_mma_tf32(lane);
  } else {
    ++s.mmas;
    const bool bf16 = op == Op::kMmaBf16;
    double A[16][16], B[16][8], C[16][8];
    for (int l = 0; l < 32; ++l) {
      const int g = l >> 2, c = l & 3;
      for (int e = 0; e < 8; ++e) {  // A: a_e in register e/2, low half for even e
        const int row = (e < 2 || (e >= 4 && e < 6)) ? g : g + 8;
        const int col = 2 * c + (e & 1) + (e >= 4 ? 8 : 0);
        const uint16_t bits = static_cast<uint16_t>(lane[l].a[e / 2] >> (16 * (e & 1)));
        A[row][col] = to_float16bit(bits, bf16);
      }
      for (int e = 0; e < 4; ++e) {  // B: b_e in register e/2
        const int row = 2 * c + (e & 1) + (e >= 2 ? 8 : 0);
        const int col = g;
        const uint16_t bits = static_cast<uint16_t>(lane[l].b[e / 2] >> (16 * (e & 1)));
        B[row][col] = to_float16bit(bits, bf16);
      }
      for (int e = 0; e < 4; ++e) {  // C: c_e
        const int row = g + (e >= 2 ? 8 : 0);
        const int col = 2 * c + (e & 1);
        C[row][col] = lane[l].c[e];
      }
    }
    for (int l = 0; l < 32; ++l) {
      const int g = l >> 2, c = l & 3;
      for (int e = 0; e < 4; ++e) {
        const int row = g + (e >= 2 ? 8 : 0);
        const int col = 2 * c + (e & 1);
        double acc = C[row][col];
        for (int kk = 0; kk < 16; ++kk) acc += A[row][kk] * B[kk][col];
        lane[l].d[e] = static_cast<float>(acc);
      }
    }
  }
  for (int l = 0; l < 32; ++l) lane[l].wait = Wait::kNone;
}

inline void warp_collective(Fiber& f, Op op) {
  f.op = op;
  f.wait = Wait::kWarp;
  yield_to_scheduler();
}

// Runs body() as one block of nthreads fibers.
inline void run_block(EmuIdx block, int nthreads, std::function<void()> body) {
  State& s = st();
  if (nthreads % 32 != 0 || nthreads > kMaxThreads) die("block size must be whole warps");
  std::memset(emu_smem, 0xff, kSmemBytes);
  s.block = block;
  s.nthreads = nthreads;
  s.body = std::move(body);
  for (int t = 0; t < nthreads; ++t) {
    Fiber& f = s.fibers[t];
    f.stack.resize(kStackBytes);
    f.wait = Wait::kNone;
    f.copies.clear();
    f.committed = 0;
    getcontext(&f.ctx);
    f.ctx.uc_stack.ss_sp = f.stack.data();
    f.ctx.uc_stack.ss_size = f.stack.size();
    f.ctx.uc_link = nullptr;
    makecontext(&f.ctx, fiber_entry, 0);
  }
  const int nwarps = nthreads / 32;
  for (;;) {
    // Advance one warp at a time as far as it can go (through its collectives) before the
    // next warp starts: the first warp gets as far ahead of the others as a barrier allows.
    for (int wi = 0; wi < nwarps; ++wi) {
      const int w = s.reverse ? nwarps - 1 - wi : wi;
      for (;;) {
        for (int li = 0; li < 32; ++li) {
          const int t = 32 * w + (s.reverse ? 31 - li : li);
          if (s.fibers[t].wait != Wait::kNone) continue;
          s.current = t;
          swapcontext(&s.sched, &s.fibers[t].ctx);
          s.current = -1;
        }
        int at_warp = 0;
        for (int l = 0; l < 32; ++l) at_warp += s.fibers[32 * w + l].wait == Wait::kWarp;
        if (at_warp != 32) break;  // at a barrier, done, or (if mixed) stuck
        resolve_warp(w);
      }
    }
    int done = 0, sync = 0;
    for (int t = 0; t < nthreads; ++t) {
      done += s.fibers[t].wait == Wait::kDone;
      sync += s.fibers[t].wait == Wait::kSync;
    }
    if (done == nthreads) break;
    if (sync == nthreads) {
      ++s.barriers;
      for (int t = 0; t < nthreads; ++t) s.fibers[t].wait = Wait::kNone;
      continue;
    }
    die("deadlock: threads wait on different barriers/collectives (or some have exited)");
  }
}

}  // namespace emu

#define threadIdx (::emu::thread_idx())
#define blockIdx (::emu::block_idx())
inline void __syncthreads() { emu::syncthreads(); }

// ---- the primitives the chunk kernels expect (GLA_CHUNK_EMULATE) ---------------------------------
inline void cp_async16(void* dst, const void* src) {
  emu::check_smem(dst, 16, 16, "cp.async destination");
  if (reinterpret_cast<uintptr_t>(src) % 16 != 0) emu::die("cp.async source not 16-byte aligned");
  if (!emu::st().reverse) {
    std::memcpy(dst, src, 16);
    return;
  }
  emu::Fiber& f = emu::st().fibers[emu::st().current];
  emu::Fiber::Copy c;
  c.dst = dst;
  std::memcpy(c.data, src, 16);
  c.group = f.committed;  // the group the next commit closes
  f.copies.push_back(c);
}
// Lands every pending copy of the current thread whose group is below `group_limit`.
inline void emu_land_copies(int group_limit) {
  emu::Fiber& f = emu::st().fibers[emu::st().current];
  std::vector<emu::Fiber::Copy> keep;
  for (const auto& c : f.copies) {
    if (c.group < group_limit) std::memcpy(c.dst, c.data, 16);
    else keep.push_back(c);
  }
  f.copies.swap(keep);
}
inline void cp_async_commit() { ++emu::st().fibers[emu::st().current].committed; }
template <int N>
inline void cp_async_wait_group() {
  emu_land_copies(emu::st().fibers[emu::st().current].committed - N);
}
inline void cp_async_wait_all() {
  cp_async_commit();
  emu_land_copies(emu::st().fibers[emu::st().current].committed);
}

inline void ldsm_x4(uint32_t (&r)[4], const void* row_addr) {
  emu::Fiber& f = emu::st().fibers[emu::st().current];
  f.addr = row_addr;
  emu::warp_collective(f, emu::Op::kLdsm);
  for (int i = 0; i < 4; ++i) r[i] = f.r[i];
}
inline void ldsm_x4_trans(uint32_t (&r)[4], const void* row_addr) {
  emu::Fiber& f = emu::st().fibers[emu::st().current];
  f.addr = row_addr;
  emu::warp_collective(f, emu::Op::kLdsmTrans);
  for (int i = 0; i < 4; ++i) r[i] = f.r[i];
}
inline void emu_mma(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                    emu::Op op) {
  emu::Fiber& f = emu::st().fibers[emu::st().current];
  for (int i = 0; i < 4; ++i) {
    f.a[i] = a[i];
    f.c[i] = d[i];
  }
  f.b[0] = b0;
  f.b[1] = b1;
  emu::warp_collective(f, op);
  for (int i = 0; i < 4; ++i) d[i] = f.d[i];
}
inline float __shfl_xor_sync(unsigned mask, float v, int lane_mask) {
  if (mask != 0xffffffffu || lane_mask < 0 || lane_mask > 31) emu::die("unsupported shuffle");
  emu::Fiber& f = emu::st().fibers[emu::st().current];
  std::memcpy(&f.shfl_val, &v, 4);
  f.shfl_xor = static_cast<uint32_t>(lane_mask);
  emu::warp_collective(f, emu::Op::kShfl);
  float r;
  std::memcpy(&r, &f.r[0], 4);
  return r;
}
inline void mma_bf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu_mma(d, a, b0, b1, emu::Op::kMmaBf16);
}
inline void mma_f16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu_mma(d, a, b0, b1, emu::Op::kMmaF16);
}
inline void mma_tf32(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  emu_mma(d, a, b0, b1, emu::Op::kMmaTf32);
}
// cvt.rna.tf32.f32: round to nearest, ties away from zero, keeping 10 mantissa bits. As the
// SASS nvcc 13 emits for it on sm_90 (VIADD 0x1000, FSETP |x| >= inf, SEL, LOP3 0xffffe000):
// finite x gets half an ulp added to its magnitude bits, then truncated (a carry into the
// exponent is right, up to infinity); infinities and NaN are only truncated.
inline uint32_t cvt_rna_tf32(float x) {
  ++emu::st().cvt_rna;
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return (std::fabs(x) < INFINITY ? u + 0x1000u : u) & 0xffffe000u;
}
// cvt.rn.tf32.f32 (sm_90+): round to nearest, ties to even, on the 13 dropped mantissa bits:
// finite x gets 0xfff plus the lowest kept bit added to its magnitude bits, then truncated
// (a carry into the exponent is right, up to infinity: FLT_MAX -> inf; subnormals round
// the same way). Infinities pass unchanged; a NaN stays a NaN of the same sign (quieted, low
// bits cleared: its exact payload on the GPU is not known here and nothing depends on it).
inline uint32_t cvt_rn_tf32(float x) {
  ++emu::st().cvt_rn;
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if (std::isnan(x)) return (u | 0x00400000u) & 0xffffe000u;
  if (std::isinf(x)) return u;
  return (u + 0xfffu + ((u >> 13) & 1u)) & 0xffffe000u;
}
