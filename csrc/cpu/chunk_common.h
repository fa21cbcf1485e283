// Chunked GLA on the CPU, shared helpers of the forward (chunk_fwd.h) and the backward
// (chunk_bwd.h). Per-ISA bodies: no include guard on purpose; chunk.cpp and the fused
// prefill compile them once per instruction set through cpu/simd/per_isa.h, whose SIMD
// vocabulary (cpu/simd/vec.h: Vec, vload, vexp, exp_inplace, ...) they use. The code is
// written with GCC vector extensions, so one source gives all three builds; a few hot spots
// have AVX-512 / AVX2 intrinsic versions for float (16x16 transposes, the diagonal score
// blocks).
//
// Work per chunk: one register-blocked matrix-product micro-kernel (gemm below) does the
// inter-chunk products (q e^b) S0 and (k e^{b_last-b})^T v, the off-diagonal score blocks
// and scores times values; the diagonal 16 x 16 score blocks have their own kernels.
//
// Per (sequence, head) and chunk of C tokens (C = 64 unless asked otherwise), with
// a_t = exp(g_t) and b_t the cumulative log gate inside the chunk:
//
//   o_t  = scale * [ (q_t * e^{b_t}) S0 + sum_{s<=t} (sum_i q_ti k_si e^{b_ti - b_si}) v_s ]
//   S1   = e^{b_last} * S0 + sum_s (k_s * e^{b_last - b_s})^T v_s
//
// Numerics. Gates are never summed: every decay factor is a product of a_r = exp(g_r) <= 1,
// the only exponentials taken are of the gates themselves (so no exp of a positive number,
// no difference of large cumulative sums, and g = -inf gives a_r = 0 exactly, g = 0 gives 1
// exactly; nothing can become NaN). The chunk is split into sub-blocks of 16 tokens
// (secondary chunking, GLA paper section 4):
//   Pq_t = prod of a_r for r in t's block, r <= t     (decay from the block start to t)
//   Pk_s = prod of a_r for r in s's block, r > s      (decay from s to the block end)
//   D_j  = decay over all of block j
// For t in block I and s in an earlier block J the gated score factors through the
// reference point "end of block I-1": e^{b_t - b_s} = Pq_t * (Pk_s * D_{J+1} ... D_{I-1}),
// both factors <= 1, so the off-diagonal scores are an ordinary matrix product of
// q * Pq and k * Pk * D... Inside a diagonal block the factor is taken per (t, s, i) as a
// running product of a_r, a chain of at most 15 multiplications.
// Denormals are flushed by the caller (MXCSR FTZ/DAZ), so long products reach exact zeros
// without microcode assists. exp is the vocabulary's vexp (accuracy in cpu/simd/vec.h).
//
// Backward (dO scaled by `scale`, dS the gradient of the state at the chunk's end):
//   dA_ts = dO_t . v_s (s <= t);  A_ts the gated score above (without scale)
//   dv_s  = sum_{t>=s} A_ts dO_t + (k_s * e^{b_last-b_s}) dS
//   dq_t  = e^{b_t} * (S0 dO_t) + sum_{s<=t} dA_ts k_s e^{b_t-b_s}
//   dk_s  = e^{b_last-b_s} * (dS v_s) + sum_{t>=s} dA_ts q_t e^{b_t-b_s}
//   dS0   = e^{b_last} * dS + sum_t (q_t * e^{b_t})^T dO_t
//   dg_t  = a_t * rowsum(S_{t-1} * D_t)  (D_t = gradient of S_t), taken in a form where no
//           two large terms cancel (the cumulative sum of q*dq - k*dk would: with strong
//           decay dg is ~e^{g} small while those terms are O(1)). Expanding S_{t-1} and D_t
//           over the chunk gives four sums, each of terms that carry the decay across t:
//     e^{b_last} * rowsum(S0 * dS)
//   + sum_{r>=t} q_r * dq_inter_r                       (dq_inter: the S0 part of dq)
//   + sum_{s<t}  k_s * dk_inter_s                       (dk_inter: the dS part of dk)
//   + sum_{s<t<=r} q_r k_s e^{b_r-b_s} dA_rs  = sum_{u<t} (k_u * dk_strict_u - q_u * dq_strict_u)
//   where *_strict leave out the s == t terms (those are O(1) and cancel exactly in the
//   difference, so they are never added in). The sums run over one chunk, in double.

#ifndef GLA_VEC_BYTES
#error "include through cpu/simd/per_isa.h (sets GLA_VEC_BYTES)"
#endif

constexpr idx kBlk = 16;  // sub-block (secondary chunk) length; a multiple of every vector width

// ---- matrix product -------------------------------------------------------------------
// C[m x n] (+)= A[m x k] B[k x n]; A is read through strides (A(r, p) = A[r*rsa + p*csa]),
// so A or its transpose can be used in place; B and C are row-major with n contiguous and
// n a multiple of the vector width. Register-blocked: MR rows of C times NV vectors.

template <typename T, int MR, int NV>
void micro_kernel(idx k, const T* __restrict A, idx rsa, idx csa, const T* __restrict B, idx ldb,
                  T* __restrict C, idx ldc, bool accumulate, const T* __restrict rowscale) {
  constexpr int W = lanes<T>();
  Vec<T> c[MR][NV];
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j)
      c[r][j] = !accumulate ? Vec<T>{}
                : rowscale  ? vload(C + r * ldc + j * W) * rowscale[r]
                            : vload(C + r * ldc + j * W);
  for (idx p = 0; p < k; ++p) {
    const T* bp = B + p * ldb;
    const T* ap = A + p * csa;
    Vec<T> b[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) b[j] = vload(bp + j * W);
#pragma GCC unroll 16
    for (int r = 0; r < MR; ++r) {
      const T ar = ap[r * rsa];
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) c[r][j] += ar * b[j];
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < MR; ++r)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) vstore(C + r * ldc + j * W, c[r][j]);
}

// Rows per micro-tile for NV vectors per row: enough independent accumulators to cover the
// FMA latency, few enough to stay in registers (16 vector registers, or 32 with AVX-512).
template <int NV> constexpr int rows_for() {
  return kVecRegs == 32 ? (NV >= 4 ? 6 : 8) : (NV >= 2 ? 6 : 8);
}
constexpr int kMaxNV = kVecRegs == 32 ? 4 : 2;

template <typename T, int NV, int R>
inline void micro_tail(idx rows, idx k, const T* A, idx rsa, idx csa, const T* B, idx ldb, T* C,
                       idx ldc, bool accumulate, const T* rowscale) {
  if constexpr (R > 0) {
    if (rows == R) micro_kernel<T, R, NV>(k, A, rsa, csa, B, ldb, C, ldc, accumulate, rowscale);
    else micro_tail<T, NV, R - 1>(rows, k, A, rsa, csa, B, ldb, C, ldc, accumulate, rowscale);
  }
}

template <typename T, int NV>
void gemm_panel(idx m, idx k, const T* A, idx rsa, idx csa, const T* B, idx ldb, T* C, idx ldc,
                bool accumulate, const T* rowscale) {
  constexpr int MR = rows_for<NV>();
  idx r = 0;
  for (; r + MR <= m; r += MR)
    micro_kernel<T, MR, NV>(k, A + r * rsa, rsa, csa, B, ldb, C + r * ldc, ldc, accumulate,
                            rowscale ? rowscale + r : nullptr);
  if (r < m)
    micro_tail<T, NV, MR - 1>(m - r, k, A + r * rsa, rsa, csa, B, ldb, C + r * ldc, ldc,
                              accumulate, rowscale ? rowscale + r : nullptr);
}

// C = A B, C += A B (accumulate), or C = diag(rowscale) C + A B (accumulate and rowscale).
template <typename T>
void gemm(idx m, idx n, idx k, const T* A, idx rsa, idx csa, const T* B, idx ldb, T* C, idx ldc,
          bool accumulate, const T* rowscale = nullptr) {
  constexpr int W = lanes<T>();
  if (m <= 0 || n <= 0) return;
  idx j = 0;
  for (; j + kMaxNV * W <= n; j += kMaxNV * W)
    gemm_panel<T, kMaxNV>(m, k, A, rsa, csa, B + j, ldb, C + j, ldc, accumulate, rowscale);
  const idx rest = (n - j) / W;
  if (rest == 1)
    gemm_panel<T, 1>(m, k, A, rsa, csa, B + j, ldb, C + j, ldc, accumulate, rowscale);
  if constexpr (kMaxNV > 2) {
    if (rest == 2)
      gemm_panel<T, 2>(m, k, A, rsa, csa, B + j, ldb, C + j, ldc, accumulate, rowscale);
    if (rest == 3)
      gemm_panel<T, 3>(m, k, A, rsa, csa, B + j, ldb, C + j, ldc, accumulate, rowscale);
  }
}

// ---- small helpers on rows of n (a multiple of the vector width) ----------------------

// u *= a; y += c * u
template <typename T> inline void mul_axpy(T* u, const T* a, T c, T* y, idx n) {
  constexpr int W = lanes<T>();
  for (idx i = 0; i < n; i += W) {
    const Vec<T> uv = vload(u + i) * vload(a + i);
    vstore(u + i, uv);
    vstore(y + i, vload(y + i) + c * uv);
  }
}

// Elementwise on rows of n elements, n a multiple of the vector width. Written with explicit
// vectors: the buffers all come from one allocation, so the compiler could not prove the
// plain loops free of aliasing and left them scalar.
template <typename T> inline void vmul(T* d, const T* x, const T* y, idx n) {
  for (idx i = 0; i < n; i += lanes<T>()) vstore(d + i, vload(x + i) * vload(y + i));
}
template <typename T> inline void vmul_inplace(T* d, const T* x, idx n) {
  for (idx i = 0; i < n; i += lanes<T>()) vstore(d + i, vload(d + i) * vload(x + i));
}
// d *= x * y
template <typename T> inline void vmul2_inplace(T* d, const T* x, const T* y, idx n) {
  for (idx i = 0; i < n; i += lanes<T>()) vstore(d + i, vload(d + i) * (vload(x + i) * vload(y + i)));
}
// d += x * y
template <typename T> inline void vfma_inplace(T* d, const T* x, const T* y, idx n) {
  for (idx i = 0; i < n; i += lanes<T>()) vstore(d + i, vload(d + i) + vload(x + i) * vload(y + i));
}
template <typename T> inline void vfill(T* d, T value, idx n) {
  const Vec<T> v = Vec<T>{} + value;
  for (idx i = 0; i < n; i += lanes<T>()) vstore(d + i, v);
}
template <typename T> inline void vcopy(T* d, const T* x, idx n) {
  for (idx i = 0; i < n; i += lanes<T>()) vstore(d + i, vload(x + i));
}

// dst[0..n) = src[0..n) * mul, zeros up to npad
template <typename S, typename T> inline void load_row(const S* src, idx n, idx npad, T* dst, T mul) {
  constexpr int W = lanes<T>();
  idx i = 0;
  if constexpr (std::is_same_v<S, T>) {  // same type: whole vectors, then the tail
    const Vec<T> m = Vec<T>{} + mul;
    for (; i + W <= n; i += W) {
      Vec<T> x;
      __builtin_memcpy(&x, src + i, sizeof(x));
      vstore(dst + i, x * m);
    }
  }
  for (; i < n; ++i) dst[i] = static_cast<T>(src[i]) * mul;
  for (; i < npad; ++i) dst[i] = 0;
}

template <typename T, typename S> inline void store_row(const T* src, idx n, S* dst) {
  for (idx i = 0; i < n; ++i) dst[i] = static_cast<S>(src[i]);
}

// Software prefetch (into L2) of the rows the next chunk will load, a few rows at a time at
// several points of this chunk's work: the rows of one head are H*K elements apart, which
// the hardware prefetchers follow poorly, and a single burst of prefetches would only stall
// on the full miss queues.
struct RowPrefetch {
  const char* first[5];
  idx stride[5], bytes[5];
  int tensors = 0;
  idx done = 0, rows = 0, per_step = 0;
  void add(const void* p, idx row_stride_bytes, idx row_bytes) {
    first[tensors] = static_cast<const char*>(p);
    stride[tensors] = row_stride_bytes;
    bytes[tensors] = row_bytes;
    ++tensors;
  }
  void start(idx nrows, int steps) {
    done = 0;
    rows = nrows;
    per_step = (nrows + steps - 1) / steps;
  }
  void step() {
    const idx end = imin(done + per_step, rows);
    for (idx r = done; r < end; ++r)
      for (int x = 0; x < tensors; ++x)
        for (idx off = 0; off < bytes[x]; off += 64)
          __builtin_prefetch(first[x] + r * stride[x] + off, 0, 2);
    done = end;
  }
};

// Output rows: streaming (non-temporal) stores where the row is a whole number of aligned
// vectors, so the output lines are not read from memory first; plain stores otherwise.
template <typename T, typename S> inline void put_row(const T* src, idx n, S* dst) {
#if defined(__x86_64__) && GLA_VEC_BYTES == 64
  if constexpr (sizeof(T) == sizeof(S) && sizeof(T) == 4) {
    if ((reinterpret_cast<uintptr_t>(dst) & 63) == 0 && n % 16 == 0) {
      for (idx i = 0; i < n; i += 16)
        _mm512_stream_ps(reinterpret_cast<float*>(dst) + i, _mm512_loadu_ps(reinterpret_cast<const float*>(src) + i));
      return;
    }
  }
#elif defined(__x86_64__) && GLA_VEC_BYTES == 32
  if constexpr (sizeof(T) == sizeof(S) && sizeof(T) == 4) {
    if ((reinterpret_cast<uintptr_t>(dst) & 31) == 0 && n % 8 == 0) {
      for (idx i = 0; i < n; i += 8)
        _mm256_stream_ps(reinterpret_cast<float*>(dst) + i, _mm256_loadu_ps(reinterpret_cast<const float*>(src) + i));
      return;
    }
  }
#endif
  store_row(src, n, dst);
}

#if defined(__x86_64__) && GLA_VEC_BYTES == 64
// 16 x 16 float tile: dst[j*ldd + i] = src[i*lds + j]; rows i >= rows read as zero.
inline void transpose16(const float* src, idx lds, idx rows, float* dst, idx ldd) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = i < rows ? _mm512_loadu_ps(src + i * lds) : _mm512_setzero_ps();
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i]), _mm512_castps_pd(t[i + 2])));
    r[i + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
    r[i + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(_mm512_castps_pd(t[i + 1]), _mm512_castps_pd(t[i + 3])));
  }
  // r[4g + m] now holds, in each 128-bit lane L, column 4L + m of rows 4g .. 4g+3
  for (int m = 0; m < 4; ++m) {
    t[m] = _mm512_shuffle_f32x4(r[m], r[4 + m], 0x88);       // lanes 0,2 of rows 0-3, 4-7
    t[4 + m] = _mm512_shuffle_f32x4(r[m], r[4 + m], 0xdd);   // lanes 1,3
    t[8 + m] = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0x88);
    t[12 + m] = _mm512_shuffle_f32x4(r[8 + m], r[12 + m], 0xdd);
  }
  for (int m = 0; m < 4; ++m) {
    // column m (lane 0), 8+m (lane 2) from t[m], t[8+m]; 4+m, 12+m from t[4+m], t[12+m]
    _mm512_storeu_ps(dst + m * ldd, _mm512_shuffle_f32x4(t[m], t[8 + m], 0x88));
    _mm512_storeu_ps(dst + (8 + m) * ldd, _mm512_shuffle_f32x4(t[m], t[8 + m], 0xdd));
    _mm512_storeu_ps(dst + (4 + m) * ldd, _mm512_shuffle_f32x4(t[4 + m], t[12 + m], 0x88));
    _mm512_storeu_ps(dst + (12 + m) * ldd, _mm512_shuffle_f32x4(t[4 + m], t[12 + m], 0xdd));
  }
}
#endif

#if defined(__x86_64__) && GLA_VEC_BYTES == 32
// 8 x 8 float tile: dst[j*ldd + i] = src[i*lds + j]; rows i >= rows read as zero.
inline void transpose8(const float* src, idx lds, idx rows, float* dst, idx ldd) {
  __m256 r[8], t[8];
  for (int i = 0; i < 8; ++i) r[i] = i < rows ? _mm256_loadu_ps(src + i * lds) : _mm256_setzero_ps();
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    r[i] = _mm256_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], 0xee);
    r[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], 0xee);
  }
  // r[4g + m]: in each 128-bit half h, column 4h + m of rows 4g .. 4g+3
  for (int m = 0; m < 4; ++m) {
    _mm256_storeu_ps(dst + m * ldd, _mm256_permute2f128_ps(r[m], r[4 + m], 0x20));
    _mm256_storeu_ps(dst + (4 + m) * ldd, _mm256_permute2f128_ps(r[m], r[4 + m], 0x31));
  }
}
#endif

// dst[j*ldd + i] = src[i*lds + j] for i < rows_pad, j < cols, reading rows i >= rows as zero
// (rows_pad and cols multiples of 16 when the vector tile is used).
template <typename T>
void transpose(const T* src, idx lds, idx rows, idx rows_pad, idx cols, T* dst, idx ldd) {
#if defined(__x86_64__) && GLA_VEC_BYTES == 64
  if constexpr (sizeof(T) == 4) {
    if (rows_pad % 16 == 0 && cols % 16 == 0) {
      for (idx i0 = 0; i0 < rows_pad; i0 += 16)
        for (idx j0 = 0; j0 < cols; j0 += 16)
          transpose16(src + i0 * lds + j0, lds, rows - i0, dst + j0 * ldd + i0, ldd);
      return;
    }
  }
#elif defined(__x86_64__) && GLA_VEC_BYTES == 32
  if constexpr (sizeof(T) == 4) {
    if (rows_pad % 8 == 0 && cols % 8 == 0) {
      for (idx i0 = 0; i0 < rows_pad; i0 += 8)
        for (idx j0 = 0; j0 < cols; j0 += 8)
          transpose8(src + i0 * lds + j0, lds, rows - i0, dst + j0 * ldd + i0, ldd);
      return;
    }
  }
#endif
  for (idx i0 = 0; i0 < rows_pad; i0 += 16)
    for (idx j0 = 0; j0 < cols; j0 += 16)
      for (idx i = i0; i < imin(i0 + 16, rows_pad); ++i)
        for (idx j = j0; j < imin(j0 + 16, cols); ++j)
          dst[j * ldd + i] = i < rows ? src[i * lds + j] : T(0);
}

// ---- workspace --------------------------------------------------------------------------
// Buffers are carved out of one caller-owned allocation; a dry run (base 0) gives its size.
// Successive buffers start at different offsets modulo 4 KiB (192 bytes apart): buffers
// whose sizes are multiples of 4 KiB would otherwise all map to the same L1 sets, and the
// loops that stream several of them at once would evict each other.
struct Carver {
  uintptr_t base;
  size_t used = 0;
  size_t takes = 0;
  explicit Carver(void* p) : base(reinterpret_cast<uintptr_t>(p)) {}
  template <typename T> T* take(idx count) {
    used = (used + 63) & ~static_cast<size_t>(63);
    used += (takes++ * 192) % 4096;
    T* out = reinterpret_cast<T*>(base + used);
    used += static_cast<size_t>(count) * sizeof(T);
    return out;
  }
};

// Sizes of one chunk's tiles: C tokens, K and V padded to the vector width, score rows of ldA.
struct Dims {
  idx C, nb, Kp, Vp, ldA;
};
template <typename T> Dims make_dims(idx C, idx K, idx vw) {
  return Dims{C, (C + kBlk - 1) / kBlk, round_up(K, lanes<T>()), round_up(vw, lanes<T>()),
              round_up(C, kBlk)};
}

// Gate products of one chunk (c tokens, rows of Kp), see the header comment, in two sweeps
// that also make the gated copies of q and k while each row is at hand.
// Forward sweep: pq per token, dblk[j] per block, dpre[j] = D_0 ... D_{j-1} (dpre[nb] =
// e^{b_last}), qi = q * pq, qe = q * e^{b} = q * (pq * dpre[block]).
template <typename T>
void gates_forward(idx c, idx Kp, const T* q, const T* a, T* pq, T* dblk, T* dpre, T* qi, T* qe) {
  constexpr int W = lanes<T>();
  const idx nb = (c + kBlk - 1) / kBlk;
  vfill(dpre, T(1), Kp);
  for (idx I = 0; I < nb; ++I) {
    const idx base = I * kBlk, end = imin(base + kBlk, c);
    const T* pre = dpre + I * Kp;
    for (idx t = base; t < end; ++t) {
      const idx e = t * Kp;
      for (idx i = 0; i < Kp; i += W) {
        const Vec<T> pv = t == base ? vload(a + e + i) : vload(pq + e - Kp + i) * vload(a + e + i);
        const Vec<T> qv = vload(q + e + i);
        vstore(pq + e + i, pv);
        vstore(qi + e + i, qv * pv);
        vstore(qe + e + i, qv * (pv * vload(pre + i)));
      }
    }
    vcopy(dblk + I * Kp, pq + (end - 1) * Kp, Kp);
    vmul(dpre + (I + 1) * Kp, pre, dblk + I * Kp, Kp);
  }
}

// Backward sweep: pk per token, dsuf[j] = D_{j+1} ... D_{nb-1}, kf = k * e^{b_last - b} =
// k * (pk * dsuf[block]). With want_dblk it also sets dblk[j] = a_first * pk_first (the
// whole block's decay) and dpre[nb] = e^{b_last}, for callers that skip the forward sweep.
template <typename T>
void gates_backward(idx c, idx Kp, const T* k, const T* a, T* pk, T* dblk, T* dsuf, T* kf,
                    bool want_dblk, T* last) {
  constexpr int W = lanes<T>();
  const idx nb = (c + kBlk - 1) / kBlk;
  vfill(dsuf + (nb - 1) * Kp, T(1), Kp);
  for (idx I = nb - 1; I >= 0; --I) {
    const idx base = I * kBlk, end = imin(base + kBlk, c);
    const T* suf = dsuf + I * Kp;
    for (idx s = end - 1; s >= base; --s) {
      const idx e = s * Kp;
      for (idx i = 0; i < Kp; i += W) {
        const Vec<T> pv = s == end - 1 ? Vec<T>{} + T(1) : vload(pk + e + Kp + i) * vload(a + e + Kp + i);
        vstore(pk + e + i, pv);
        vstore(kf + e + i, vload(k + e + i) * (pv * vload(suf + i)));
      }
    }
    if (want_dblk) vmul(dblk + I * Kp, a + base * Kp, pk + base * Kp, Kp);
    if (I > 0) vmul(dsuf + (I - 1) * Kp, suf, dblk + I * Kp, Kp);
  }
  if (want_dblk) vmul(last, dsuf, dblk, Kp);
}

// Step I of the off-diagonal factorisation: rows of blocks < I-1 get D_{I-1}, the rows of
// block I-1 start at Pk (ft, the factor alone) and k * Pk (kt).
template <typename T>
void advance_offdiag(idx I, idx Kp, const T* k, const T* pk, const T* dblk, T* kt, T* ft) {
  const idx prev = (I - 1) * kBlk;
  const T* d = dblk + (I - 1) * Kp;
  for (idx s = 0; s < prev; ++s) {
    vmul_inplace(kt + s * Kp, d, Kp);
    if (ft) vmul_inplace(ft + s * Kp, d, Kp);
  }
  for (idx s = prev; s < prev + kBlk; ++s) {
    vmul(kt + s * Kp, k + s * Kp, pk + s * Kp, Kp);
    if (ft) vcopy(ft + s * Kp, pk + s * Kp, Kp);
  }
}

// dst[i*16 + l] = src[(base + l)*ld + i] for l < R, 0 for R <= l < 16
template <typename T> void pack_block_t(const T* src, idx ld, idx base, idx R, idx n, T* dst) {
  transpose(src + base * ld, ld, R, kBlk, n, dst, kBlk);
}

// ---- diagonal score blocks (forward, and recomputed by the backward) -------------------

// Diagonal block scores: at[s*ldA + t] = A_{t s} = sum_i q_ti k_si prod_{s<r<=t} a_ri for
// s <= t in one 16-token block, zero for s > t. q, k, a point at the block's first row; all
// 16 rows are read, so rows past the end of a short last block must hold q = k = 0 and a
// finite (the loaders pad them).
// Vectorized over t (16 lanes, NT vectors) with the key index i outermost: for each i a
// vector u over t is carried down s = 15..0 (u *= a_{s+1,i}; lane s = q_si), and row s of
// the block accumulates k_si * u in registers, so no horizontal sums are needed. Rows are
// done G at a time (G*NT accumulators), u parked in ubuf[Kp x 16] between groups.
template <typename T, int G, int S0>
inline void diag_scores_rows(idx Kp, const T* q, const T* k, const T* a, T* at, idx ldA,
                             T* ubuf) {
  constexpr int W = lanes<T>(), NT = kBlk / W;
  Vec<T> acc[G][NT];
#pragma GCC unroll 16
  for (int r = 0; r < G; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < NT; ++j) acc[r][j] = Vec<T>{};
  // X keys at a time: X independent chains of products (each step a multiply and a lane
  // insert, both on the chain) to overlap their latency. Kp is a multiple of W >= X.
  constexpr int X = NT == 1 ? 4 : 2;
  for (idx i = 0; i < Kp; i += X) {
    Vec<T> u[X][NT];
#pragma GCC unroll 4
    for (int x = 0; x < X; ++x)
#pragma GCC unroll 16
      for (int j = 0; j < NT; ++j)
        u[x][j] = S0 + G == kBlk ? Vec<T>{} : vload(ubuf + (i + x) * kBlk + j * W);
#pragma GCC unroll 16
    for (int r = G - 1; r >= 0; --r) {
      const int s = S0 + r;
#pragma GCC unroll 4
      for (int x = 0; x < X; ++x) {
        if (s < kBlk - 1) {
          const T as = a[(s + 1) * Kp + i + x];
#pragma GCC unroll 16
          for (int j = 0; j < NT; ++j) u[x][j] *= as;
        }
        u[x][s / W][s % W] = q[s * Kp + i + x];
        const T ks = k[s * Kp + i + x];
#pragma GCC unroll 16
        for (int j = 0; j < NT; ++j) acc[r][j] += ks * u[x][j];
      }
    }
    if constexpr (S0 > 0) {
#pragma GCC unroll 4
      for (int x = 0; x < X; ++x)
#pragma GCC unroll 16
        for (int j = 0; j < NT; ++j) vstore(ubuf + (i + x) * kBlk + j * W, u[x][j]);
    }
  }
#pragma GCC unroll 16
  for (int r = 0; r < G; ++r)
#pragma GCC unroll 16
    for (int j = 0; j < NT; ++j) vstore(at + (S0 + r) * ldA + j * W, acc[r][j]);
  if constexpr (S0 > 0) diag_scores_rows<T, G, (S0 > G ? S0 - G : 0)>(Kp, q, k, a, at, ldA, ubuf);
}

#if defined(__x86_64__) && GLA_VEC_BYTES == 64
// AVX-512, float: one row s at a time, vectorized over i instead: u = k_s * prod a (16 keys
// per vector) runs along t = s..15, P_t += q_t * u, and the 16 partial vectors P_t are
// reduced together by a transpose-and-add tree (lane t of the result = sum of P_t), which
// costs fewer operations per score than the lane-insert form above.
inline __m512 hsum16(const __m512* v) {
  __m512 a[8], b[4], c[2];
  for (int j = 0; j < 8; ++j)
    a[j] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * j], v[2 * j + 1]),
                         _mm512_unpackhi_ps(v[2 * j], v[2 * j + 1]));
  for (int j = 0; j < 4; ++j) {
    const __m512d x = _mm512_castps_pd(a[2 * j]), y = _mm512_castps_pd(a[2 * j + 1]);
    b[j] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(x, y)),
                         _mm512_castpd_ps(_mm512_unpackhi_pd(x, y)));
  }
  for (int j = 0; j < 2; ++j)
    c[j] = _mm512_add_ps(_mm512_shuffle_f32x4(b[2 * j], b[2 * j + 1], 0x88),
                         _mm512_shuffle_f32x4(b[2 * j], b[2 * j + 1], 0xdd));
  return _mm512_add_ps(_mm512_shuffle_f32x4(c[0], c[1], 0x88),
                       _mm512_shuffle_f32x4(c[0], c[1], 0xdd));
}

template <int S>
inline void diag_scores_row16(idx Kp, const float* q, const float* k, const float* a, float* at,
                              idx ldA) {
  __m512 P[16];
#pragma GCC unroll 16
  for (int t = 0; t < 16; ++t) P[t] = _mm512_setzero_ps();
  for (idx i = 0; i < Kp; i += 16) {
    __m512 u = _mm512_loadu_ps(k + S * Kp + i);
    P[S] = _mm512_fmadd_ps(_mm512_loadu_ps(q + S * Kp + i), u, P[S]);
#pragma GCC unroll 16
    for (int t = S + 1; t < 16; ++t) {
      u = _mm512_mul_ps(u, _mm512_loadu_ps(a + t * Kp + i));
      P[t] = _mm512_fmadd_ps(_mm512_loadu_ps(q + t * Kp + i), u, P[t]);
    }
  }
  _mm512_storeu_ps(at + S * ldA, hsum16(P));
  if constexpr (S < 15) diag_scores_row16<S + 1>(Kp, q, k, a, at, ldA);
}
#endif

#if defined(__x86_64__) && GLA_VEC_BYTES == 32
// AVX2, float: the row form of the AVX-512 kernel above with 8-key vectors. The 16 partial
// vectors of a row would need all 16 registers, so rows s < 8 take two passes over the keys
// (t < 8, parking u in ubuf, then t >= 8), each with at most 8 accumulators.
inline __m256 hsum8(const __m256* v) {
  const __m256 h01 = _mm256_hadd_ps(v[0], v[1]), h23 = _mm256_hadd_ps(v[2], v[3]);
  const __m256 h45 = _mm256_hadd_ps(v[4], v[5]), h67 = _mm256_hadd_ps(v[6], v[7]);
  const __m256 lo = _mm256_hadd_ps(h01, h23), hi = _mm256_hadd_ps(h45, h67);
  return _mm256_add_ps(_mm256_permute2f128_ps(lo, hi, 0x20), _mm256_permute2f128_ps(lo, hi, 0x31));
}

// P[t - T0] += q_t * u for t in [T0, T1), u *= a_t before each t > first.
template <int T0, int T1, bool kFirstMul>
inline __m256 diag_chain8(idx Kp, idx i, const float* q, const float* a, __m256 u, __m256* P) {
#pragma GCC unroll 16
  for (int t = T0; t < T1; ++t) {
    if (kFirstMul || t > T0) u = _mm256_mul_ps(u, _mm256_loadu_ps(a + t * Kp + i));
    P[t - T0] = _mm256_fmadd_ps(_mm256_loadu_ps(q + t * Kp + i), u, P[t - T0]);
  }
  return u;
}

template <int S>
inline void diag_scores_row8(idx Kp, const float* q, const float* k, const float* a, float* at,
                             idx ldA, float* ubuf) {
  __m256 lo[8], hi[8];
#pragma GCC unroll 8
  for (int t = 0; t < 8; ++t) lo[t] = hi[t] = _mm256_setzero_ps();
  if constexpr (S < 8) {
    for (idx i = 0; i < Kp; i += 8) {
      const __m256 u = diag_chain8<S, 8, false>(Kp, i, q, a, _mm256_loadu_ps(k + S * Kp + i), lo + S);
      _mm256_storeu_ps(ubuf + i, u);
    }
    for (idx i = 0; i < Kp; i += 8)
      diag_chain8<8, 16, true>(Kp, i, q, a, _mm256_loadu_ps(ubuf + i), hi);
  } else {
    for (idx i = 0; i < Kp; i += 8)
      diag_chain8<S, 16, false>(Kp, i, q, a, _mm256_loadu_ps(k + S * Kp + i), hi + (S - 8));
  }
  _mm256_storeu_ps(at + S * ldA, hsum8(lo));
  _mm256_storeu_ps(at + S * ldA + 8, hsum8(hi));
  if constexpr (S < 15) diag_scores_row8<S + 1>(Kp, q, k, a, at, ldA, ubuf);
}
#endif

template <typename T>
void diag_scores(idx Kp, const T* q, const T* k, const T* a, T* at, idx ldA, T* ubuf) {
#if defined(__x86_64__) && GLA_VEC_BYTES == 64
  if constexpr (sizeof(T) == 4) {
    diag_scores_row16<0>(Kp, q, k, a, at, ldA);
    return;
  }
#elif defined(__x86_64__) && GLA_VEC_BYTES == 32
  if constexpr (sizeof(T) == 4) {
    diag_scores_row8<0>(Kp, q, k, a, at, ldA, ubuf);
    return;
  }
#endif
  constexpr int NT = kBlk / lanes<T>();
  // rows per group: the accumulators within about half the vector registers
  constexpr int G0 = (kVecRegs / 2) / NT;
  constexpr int G = G0 >= 16 ? 16 : G0 >= 8 ? 8 : G0 >= 4 ? 4 : G0 >= 2 ? 2 : 1;
  diag_scores_rows<T, G, kBlk - G>(Kp, q, k, a, at, ldA, ubuf);
}

// Rows [c, round_up(c, 16)) of a short last block: q = k = 0, a = 1.
template <typename T> void pad_block_rows(idx c, idx Kp, T* q, T* k, T* a) {
  const idx end = round_up(c, kBlk);
  for (idx t = c; t < end; ++t) {
    vfill(q + t * Kp, T(0), Kp);
    vfill(k + t * Kp, T(0), Kp);
    vfill(a + t * Kp, T(1), Kp);
  }
}

