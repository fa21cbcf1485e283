// Chunked GLA on the CPU: the kernel body. No include guard on purpose: chunk.cpp includes
// this file once per instruction set, each time inside its own namespace, under its own
// `#pragma GCC target`, with GLA_VEC_BYTES set to the vector width (16 SSE2/NEON, 32 AVX2,
// 64 AVX-512). The code is written with GCC vector extensions, so one source gives all
// three builds; a few hot spots have AVX-512 intrinsic versions for float (16x16 transposes,
// exp, the diagonal score blocks).
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
// without microcode assists. exp itself: about 2 ulp for float with FMA (AVX2/AVX-512),
// through double lanes on SSE2, and a degree-13 polynomial in double for float64.
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
#error "define GLA_VEC_BYTES before including chunk_impl.h"
#endif

using idx = int64_t;
constexpr idx kBlk = 16;  // sub-block (secondary chunk) length; a multiple of every vector width
constexpr int kVecRegs = GLA_VEC_BYTES == 64 ? 32 : 16;

template <typename T> constexpr int lanes() { return GLA_VEC_BYTES / static_cast<int>(sizeof(T)); }
template <typename T, int L> struct VecT {
  typedef T type __attribute__((vector_size(sizeof(T) * L)));
};
template <typename T> using Vec = typename VecT<T, lanes<T>()>::type;

inline idx round_up(idx x, idx m) { return (x + m - 1) / m * m; }
inline idx imin(idx a, idx b) { return a < b ? a : b; }

template <typename T> inline Vec<T> vload(const T* p) {
  Vec<T> v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T> inline void vstore(T* p, Vec<T> v) { __builtin_memcpy(p, &v, sizeof(v)); }

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

// ---- exp ------------------------------------------------------------------------------
// exp of L lanes in double: x = n ln2 + r, |r| <= ln2/2, Taylor polynomial of degree DEG in
// r (7: float accuracy, 13: double accuracy), times 2^n built in the exponent bits.
// Exact at 0 (gives 1), exactly 0 below log(DBL_MIN) and for -inf, +inf above the range.
template <int L> struct ExpVec {
  typedef double d __attribute__((vector_size(8 * L)));
  typedef int32_t i32 __attribute__((vector_size(4 * L)));
  typedef int64_t i64 __attribute__((vector_size(8 * L)));
};

template <int L, int DEG>
inline typename ExpVec<L>::d exp_lanes(typename ExpVec<L>::d x) {
  using vd = typename ExpVec<L>::d;
  using vi = typename ExpVec<L>::i32;
  using vl = typename ExpVec<L>::i64;
  const vd lo = vd{} - 708.0, hi = vd{} + 709.0;
  vd xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  // n = floor(x log2(e) + 1/2), through truncation of a positive number
  const vi n = __builtin_convertvector(xc * 1.4426950408889634 + 2048.5, vi) - 2048;
  const vd nd = __builtin_convertvector(n, vd);
  const vd r = (xc - nd * 0.693145751953125) - nd * 1.42860682030941723212e-6;
  // 1/d! for d = 0..13
  static constexpr double coef[14] = {1.0,
                                      1.0,
                                      0.5,
                                      0.16666666666666666,
                                      0.041666666666666664,
                                      0.008333333333333333,
                                      0.001388888888888889,
                                      0.0001984126984126984,
                                      2.48015873015873e-05,
                                      2.7557319223985893e-06,
                                      2.755731922398589e-07,
                                      2.505210838544172e-08,
                                      2.08767569878681e-09,
                                      1.6059043836821613e-10};
  static_assert(DEG <= 13, "degree");
  vd poly = vd{} + coef[DEG];
#pragma GCC unroll 16
  for (int d = DEG - 1; d >= 0; --d) poly = poly * r + coef[d];
  const vl bits = (__builtin_convertvector(n, vl) + 1023) << 52;
  vd two_n;
  __builtin_memcpy(&two_n, &bits, sizeof(two_n));
  vd y = poly * two_n;
  y = x < -708.3964185322641 ? vd{} : y;
  y = x > 709.782712893384 ? vd{} + __builtin_inf() : y;
  y = x != x ? x : y;  // NaN stays NaN (a NaN gate propagates, as in the reference)
  return y;
}

// exp of float lanes in float arithmetic, for the instruction sets with FMA: the reduction
// r = x - n ln2 is contracted into fused multiply-adds (so even if the compiler merges the
// two-part ln2 under -ffast-math, r carries only ln2's rounding, |n| * 2e-9), then the
// degree-6 minimax polynomial of Cephes' expf (about 1 ulp). Same edge behaviour as
// exp_lanes: exact 1 at 0, exact 0 at -inf and below the float range.
template <int L> inline typename VecT<float, L>::type exp_float_lanes(typename VecT<float, L>::type x) {
  using vf = typename VecT<float, L>::type;
  using vi = typename VecT<int32_t, L>::type;
  const vf lo = vf{} - 87.5f, hi = vf{} + 88.0f;
  vf xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const vi n = __builtin_convertvector(xc * 1.44269504088896341f + 128.5f, vi) - 128;
  const vf nf = __builtin_convertvector(n, vf);
  const vf r = (xc - nf * 0.693359375f) + nf * 2.12194440e-4f;
  vf p = vf{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const vi bits = (n + 127) << 23;
  vf two_n;
  __builtin_memcpy(&two_n, &bits, sizeof(two_n));
  vf y = p * two_n;
  y = x < -87.33654475f ? vf{} : y;
  y = x > 88.72283905f ? vf{} + __builtin_inff() : y;
  y = x != x ? x : y;  // NaN stays NaN (a NaN gate propagates, as in the reference)
  return y;
}

// y[0..n) = exp(y[0..n)), n a multiple of the vector width.
inline void exp_inplace(float* y, idx n) {
#if defined(__x86_64__) && GLA_VEC_BYTES == 64
  // AVX-512: the same reduction and polynomial, rounding by vrndscaleps and the 2^n scaling
  // by vscalefps (which also gives the exact 0 below the float range under FTZ/DAZ, and
  // +inf above it), so no clamps or blends beyond the input clamp that keeps r finite.
  const __m512 lo = _mm512_set1_ps(-104.0f), hi = _mm512_set1_ps(89.0f);
  for (idx i = 0; i < n; i += 16) {
    // operand order keeps NaN (max/min return their second operand when one is NaN), so a
    // NaN gate propagates as in the reference instead of becoming a full forget
    const __m512 x = _mm512_min_ps(hi, _mm512_max_ps(lo, _mm512_loadu_ps(y + i)));
    const __m512 nf = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                           _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    const __m512 r = _mm512_fnmadd_ps(nf, _mm512_set1_ps(0.693147180559945309f), x);
    __m512 p = _mm512_set1_ps(1.9875691500e-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    _mm512_storeu_ps(y + i, _mm512_scalef_ps(p, nf));
  }
#elif GLA_VEC_BYTES >= 32
  constexpr int W = lanes<float>();
  for (idx i = 0; i < n; i += W) vstore(y + i, exp_float_lanes<W>(vload(y + i)));
#else
  // no FMA: the reduction in double lanes of the native width (half a float vector at a time)
  constexpr int L = lanes<double>();
  using vf = typename VecT<float, L>::type;
  using vd = typename ExpVec<L>::d;
  for (idx i = 0; i < n; i += L) {
    vf x;
    __builtin_memcpy(&x, y + i, sizeof(x));
    const vf e = __builtin_convertvector((exp_lanes<L, 7>(__builtin_convertvector(x, vd))), vf);
    __builtin_memcpy(y + i, &e, sizeof(e));
  }
#endif
}
inline void exp_inplace(double* y, idx n) {
  constexpr int W = lanes<double>();
  for (idx i = 0; i < n; i += W) vstore(y + i, exp_lanes<W, 13>(vload(y + i)));
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

// ---- forward ----------------------------------------------------------------------------

template <typename T> struct FwdBufs {
  T *q, *k, *a, *pq, *pk, *qe, *qi, *kf, *kt, *v, *o, *S, *at, *qit, *ubuf, *dblk, *dpre, *dsuf;
  FwdBufs(Carver& w, const Dims& d) {
    const idx ck = d.ldA * d.Kp, cv = d.ldA * d.Vp;  // rows up to a whole last block
    q = w.take<T>(ck); k = w.take<T>(ck); a = w.take<T>(ck); pq = w.take<T>(ck);
    pk = w.take<T>(ck); qe = w.take<T>(ck); qi = w.take<T>(ck); kf = w.take<T>(ck);
    kt = w.take<T>(ck); v = w.take<T>(cv); o = w.take<T>(cv); S = w.take<T>(d.Kp * d.Vp);
    at = w.take<T>(d.ldA * d.ldA); qit = w.take<T>(d.Kp * kBlk); ubuf = w.take<T>(d.Kp * kBlk);
    dblk = w.take<T>(d.nb * d.Kp); dpre = w.take<T>((d.nb + 1) * d.Kp);
    dsuf = w.take<T>(d.nb * d.Kp);
  }
};

template <typename scalar_t> size_t fwd_workspace_bytes_t(idx C, idx K, idx vw) {
  using T = acc_type_t<scalar_t>;
  Carver w(nullptr);
  FwdBufs<T> b(w, make_dims<T>(C, K, vw));
  return w.used + 64;
}

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

template <typename T>
void diag_scores(idx Kp, const T* q, const T* k, const T* a, T* at, idx ldA, T* ubuf) {
#if defined(__x86_64__) && GLA_VEC_BYTES == 64
  if constexpr (sizeof(T) == 4) {
    diag_scores_row16<0>(Kp, q, k, a, at, ldA);
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

// One (sequence n, head h, value columns [v0, v1)) task of the forward.
template <typename scalar_t>
void fwd_task_t(const GlaParams& p, idx n, idx h, idx v0, idx v1, idx C, void* ws) {
  using T = acc_type_t<scalar_t>;
  const Layout L(p);
  const idx K = p.K, V = p.V, vw = v1 - v0;
  const Dims d = make_dims<T>(C, K, vw);
  const idx Kp = d.Kp, Vp = d.Vp, ldA = d.ldA;
  Carver w(reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(ws) + 63) & ~uintptr_t(63)));
  FwdBufs<T> b(w, d);

  const auto* q = static_cast<const scalar_t*>(p.q);
  const auto* k = static_cast<const scalar_t*>(p.k);
  const auto* v = static_cast<const scalar_t*>(p.v);
  const auto* g = static_cast<const T*>(p.g);
  // state rows by pool index and K/V strides (gla.h: h0_row, ht_row, state_*_stride)
  const idx in_row = h0_row(p, n), sk = state_k_stride(p), sv = state_v_stride(p);
  if (in_row < 0) {  // padding row: o stays zero, no pool row read or written
    T* zero = static_cast<T*>(p.ht) + L.state(n, h);
    if (!p.inplace_final)
      for (idx i = 0; i < K; ++i)
        for (idx j = v0; j < v1; ++j) zero[i * sk + j * sv] = T(0);
    return;
  }
  T* ht = static_cast<T*>(p.ht) + L.state(ht_row(p, n), h);
  const T* h0 = p.h0 ? static_cast<const T*>(p.h0) + L.state(in_row, h) : nullptr;
  auto* o = static_cast<scalar_t*>(p.o);
  const T scale = static_cast<T>(p.scale);

  for (idx i = 0; i < Kp; ++i)
    for (idx j = 0; j < Vp; ++j)
      b.S[i * Vp + j] = (h0 && i < K && j < vw) ? h0[i * sk + (v0 + j) * sv] : T(0);

  idx row, start, stop;
  sequence_bounds(p, n, &row, &start, &stop);
  for (idx c0 = start; c0 < stop; c0 += C) {
    const idx c = imin(C, stop - c0), nb = (c + kBlk - 1) / kBlk;
    for (idx t = 0; t < c; ++t) {
      const idx qo = L.qk(row, c0 + t, h), vo = L.v(row, c0 + t, h) + v0;
      load_row(q + qo, K, Kp, b.q + t * Kp, scale);
      load_row(k + qo, K, Kp, b.k + t * Kp, T(1));
      load_row(g + qo, K, Kp, b.a + t * Kp, T(1));
      exp_inplace(b.a + t * Kp, Kp);
      load_row(v + vo, vw, Vp, b.v + t * Vp, T(1));
    }
    pad_block_rows(c, Kp, b.q, b.k, b.a);
    RowPrefetch pf;
    if (c0 + C < stop) {
      const idx qo = L.qk(row, c0 + C, h), vo = L.v(row, c0 + C, h) + v0;
      const idx qs = p.H * K * sizeof(scalar_t), vs = p.H * V * sizeof(scalar_t);
      pf.add(q + qo, qs, K * sizeof(scalar_t));
      pf.add(k + qo, qs, K * sizeof(scalar_t));
      pf.add(g + qo, p.H * K * sizeof(T), K * sizeof(T));
      pf.add(v + vo, vs, vw * sizeof(scalar_t));
      pf.start(imin(C, stop - c0 - C), 16);
    }
    gates_forward(c, Kp, b.q, b.a, b.pq, b.dblk, b.dpre, b.qi, b.qe);
    pf.step();
    gates_backward(c, Kp, b.k, b.a, b.pk, b.dblk, b.dsuf, b.kf, false, static_cast<T*>(nullptr));
    pf.step();
    // inter-chunk: o = (q * e^b) S0
    gemm(c, Vp, Kp, b.qe, Kp, 1, b.S, Vp, b.o, Vp, false);
    pf.step();
    // intra-chunk, one block row at a time: scores against earlier blocks (one product),
    // the diagonal block, then o += scores v
    for (idx I = 0; I < nb; ++I) {
      const idx base = I * kBlk, R = imin(kBlk, c - base);
      if (I > 0) {
        advance_offdiag<T>(I, Kp, b.k, b.pk, b.dblk, b.kt, nullptr);
        pack_block_t(b.qi, Kp, base, R, Kp, b.qit);
        gemm(base, kBlk, Kp, b.kt, Kp, 1, b.qit, kBlk, b.at + base, ldA, false);
        pf.step();
      }
      diag_scores(Kp, b.q + base * Kp, b.k + base * Kp, b.a + base * Kp,
                  b.at + base * ldA + base, ldA, b.ubuf);
      pf.step();
      gemm(R, Vp, base + R, b.at + base, 1, ldA, b.v, Vp, b.o + base * Vp, Vp, true);
      pf.step();
    }
    // state: S1 = e^{b_last} S0 + (k * e^{b_last - b})^T v
    gemm(Kp, Vp, c, b.kf, 1, Kp, b.v, Vp, b.S, Vp, true, b.dpre + nb * Kp);
    while (pf.done < pf.rows) pf.step();
    for (idx t = 0; t < c; ++t) put_row(b.o + t * Vp, vw, o + L.v(row, c0 + t, h) + v0);
  }
  for (idx i = 0; i < K; ++i)
    for (idx j = 0; j < vw; ++j) ht[i * sk + (v0 + j) * sv] = b.S[i * Vp + j];
}

// ---- backward ---------------------------------------------------------------------------

template <typename T> struct BwdBufs {
  T *q, *k, *a, *pq, *pk, *qe, *qi, *kf, *kt, *ft, *v, *dout, *dv, *dqi, *dqs, *dki, *dks, *y,
      *tmp, *at, *dat, *qit, *dot_t, *dst, *dS, *S, *u, *ubuf, *dblk, *dpre, *dsuf, *states;
  double *rev, *run, *e1;
  BwdBufs(Carver& w, const Dims& d, idx nchunks) {
    const idx ck = d.ldA * d.Kp, cv = d.ldA * d.Vp, kv = d.Kp * d.Vp;
    q = w.take<T>(ck); k = w.take<T>(ck); a = w.take<T>(ck); pq = w.take<T>(ck);
    pk = w.take<T>(ck); qe = w.take<T>(ck); qi = w.take<T>(ck); kf = w.take<T>(ck);
    kt = w.take<T>(ck); ft = w.take<T>(ck); v = w.take<T>(cv); dout = w.take<T>(cv);
    dv = w.take<T>(cv); dqi = w.take<T>(ck); dqs = w.take<T>(ck); dki = w.take<T>(ck);
    dks = w.take<T>(ck); y = w.take<T>(ck); tmp = w.take<T>(kBlk * d.Kp);
    at = w.take<T>(d.ldA * d.ldA); dat = w.take<T>(d.ldA * d.ldA); qit = w.take<T>(d.Kp * kBlk);
    dot_t = w.take<T>(d.Vp * kBlk); dst = w.take<T>(kv);
    dS = w.take<T>(kv); S = w.take<T>(kv); u = w.take<T>(d.Kp); ubuf = w.take<T>(d.Kp * kBlk);
    dblk = w.take<T>(d.nb * d.Kp); dpre = w.take<T>((d.nb + 1) * d.Kp);
    dsuf = w.take<T>(d.nb * d.Kp); states = w.take<T>(nchunks * kv);
    rev = w.take<double>(ck); run = w.take<double>(d.Kp); e1 = w.take<double>(d.Kp);
  }
};

template <typename scalar_t> size_t bwd_workspace_bytes_t(idx C, idx K, idx V, idx nchunks) {
  using T = acc_type_t<scalar_t>;
  Carver w(nullptr);
  BwdBufs<T> b(w, make_dims<T>(C, K, V), nchunks);
  return w.used + 64;
}

// Diagonal block of the backward: the strict (s < t) parts of dq and dk, as running
// products of a along the block. dat holds dA_{t s} at dat[s*ldA + t] (like at).
//   dq_t += sum_{s<t} dA_ts k_s prod_{s<r<=t} a_r,   dk_s += sum_{t>s} dA_ts q_t prod_{s<r<=t} a_r
// With 32 vector registers: one vector of keys at a time, the 16 rows of dq (or dk) held in
// registers while every chain runs through them; all 16 rows are processed (rows past a short
// block's end only touch padding rows). Otherwise: one chain at a time through memory.
template <typename T, int S>
inline void diag_dq_chains(idx Kp, idx i, const T* k, const T* a, const T* dat, idx ldA,
                           Vec<T>* D) {
  Vec<T> u = vload(k + S * Kp + i);
#pragma GCC unroll 16
  for (int t = S + 1; t < kBlk; ++t) {
    u *= vload(a + t * Kp + i);
    D[t] += dat[S * ldA + t] * u;
  }
  if constexpr (S + 2 < kBlk) diag_dq_chains<T, S + 1>(Kp, i, k, a, dat, ldA, D);
}

template <typename T, int Tt>
inline void diag_dk_chains(idx Kp, idx i, const T* q, const T* a, const T* dat, idx ldA,
                           Vec<T>* D) {
  Vec<T> u = vload(q + Tt * Kp + i);
#pragma GCC unroll 16
  for (int s = Tt - 1; s >= 0; --s) {
    u *= vload(a + (s + 1) * Kp + i);
    D[s] += dat[s * ldA + Tt] * u;
  }
  if constexpr (Tt + 1 < kBlk) diag_dk_chains<T, Tt + 1>(Kp, i, q, a, dat, ldA, D);
}

template <typename T>
void diag_backward(idx R, idx Kp, const T* q, const T* k, const T* a, const T* dat, idx ldA,
                   T* u, T* dqs, T* dks) {
  constexpr int W = lanes<T>();
  if constexpr (kVecRegs == 32) {
    (void)R;
    (void)u;
    for (idx i = 0; i < Kp; i += W) {
      Vec<T> D[kBlk];
#pragma GCC unroll 16
      for (int t = 0; t < kBlk; ++t) D[t] = vload(dqs + t * Kp + i);
      diag_dq_chains<T, 0>(Kp, i, k, a, dat, ldA, D);
#pragma GCC unroll 16
      for (int t = 0; t < kBlk; ++t) vstore(dqs + t * Kp + i, D[t]);
#pragma GCC unroll 16
      for (int t = 0; t < kBlk; ++t) D[t] = vload(dks + t * Kp + i);
      diag_dk_chains<T, 1>(Kp, i, q, a, dat, ldA, D);
#pragma GCC unroll 16
      for (int t = 0; t < kBlk; ++t) vstore(dks + t * Kp + i, D[t]);
    }
  } else {
    for (idx s = 0; s + 1 < R; ++s) {
      vcopy(u, k + s * Kp, Kp);
      for (idx t = s + 1; t < R; ++t) mul_axpy(u, a + t * Kp, dat[s * ldA + t], dqs + t * Kp, Kp);
    }
    for (idx t = 1; t < R; ++t) {
      vcopy(u, q + t * Kp, Kp);
      for (idx s = t - 1; s >= 0; --s)
        mul_axpy(u, a + (s + 1) * Kp, dat[s * ldA + t], dks + s * Kp, Kp);
    }
  }
}

// dg of one chunk, the sums in double (see the header comment):
//   dg_t = e^{b_last} rowsum(S0 * dS) + sum_{r>=t} q_r dq_inter_r
//          + sum_{s<t} (k_s (dk_inter_s + dk_strict_s) - q_s dq_strict_s)
// S0T, dST: the states transposed [Vp x Kp]; e1, run: Kp doubles; rev: c*Kp doubles;
// tmp: Kp of T; out(t) points at dg's row of token t. Works on double vectors of the native
// width (L lanes), widening L elements of T at a time.
template <typename T, typename Out>
void chunk_dg(idx c, idx Kp, idx Vp, const T* S0T, const T* dST, const T* last, const T* q,
              const T* k, const T* dqi, const T* dqs, const T* dki, const T* dks, double* e1,
              double* run, double* rev, T* tmp, Out out, idx K) {
  constexpr int L = lanes<double>();
  using vt = typename VecT<T, L>::type;
  using vd = typename VecT<double, L>::type;
  auto wide = [](const T* p) {
    vt x;
    __builtin_memcpy(&x, p, sizeof(x));
    return __builtin_convertvector(x, vd);
  };
  auto ld = [](const double* p) {
    vd x;
    __builtin_memcpy(&x, p, sizeof(x));
    return x;
  };
  auto st = [](double* p, vd x) { __builtin_memcpy(p, &x, sizeof(x)); };
  for (idx i = 0; i < Kp; i += L) st(e1 + i, vd{});
  for (idx j = 0; j < Vp; ++j)
    for (idx i = 0; i < Kp; i += L)
      st(e1 + i, ld(e1 + i) + wide(S0T + j * Kp + i) * wide(dST + j * Kp + i));
  for (idx i = 0; i < Kp; i += L) {
    st(e1 + i, ld(e1 + i) * wide(last + i));
    st(run + i, vd{});
  }
  for (idx t = c - 1; t >= 0; --t)
    for (idx i = 0; i < Kp; i += L) {
      const idx e = t * Kp + i;
      const vd r = ld(run + i) + wide(q + e) * wide(dqi + e);
      st(run + i, r);
      st(rev + e, r);
    }
  for (idx i = 0; i < Kp; i += L) st(run + i, vd{});
  for (idx t = 0; t < c; ++t) {
    for (idx i = 0; i < Kp; i += L) {
      const idx e = t * Kp + i;
      const vd r = ld(run + i);
      const vt dgv = __builtin_convertvector(ld(e1 + i) + ld(rev + e) + r, vt);
      __builtin_memcpy(tmp + i, &dgv, sizeof(dgv));
      st(run + i, r + wide(k + e) * (wide(dki + e) + wide(dks + e)) - wide(q + e) * wide(dqs + e));
    }
    put_row(tmp, K, out(t));
  }
}

template <typename scalar_t>
void bwd_task_t(const GlaParams& p, idx n, idx h, idx C, idx nchunks_max, void* ws) {
  using T = acc_type_t<scalar_t>;
  const Layout L(p);
  const idx K = p.K, V = p.V;
  const Dims d = make_dims<T>(C, K, V);
  const idx Kp = d.Kp, Vp = d.Vp, ldA = d.ldA, KV = Kp * Vp;
  Carver w(reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(ws) + 63) & ~uintptr_t(63)));
  BwdBufs<T> b(w, d, nchunks_max);

  const auto* q = static_cast<const scalar_t*>(p.q);
  const auto* k = static_cast<const scalar_t*>(p.k);
  const auto* v = static_cast<const scalar_t*>(p.v);
  const auto* g = static_cast<const T*>(p.g);
  const auto* dout = static_cast<const scalar_t*>(p.dout);
  const T* h0 = p.h0 ? static_cast<const T*>(p.h0) + L.state(n, h) : nullptr;
  const T* dht = p.dht ? static_cast<const T*>(p.dht) + L.state(n, h) : nullptr;
  auto* dq = static_cast<scalar_t*>(p.dq);
  auto* dk = static_cast<scalar_t*>(p.dk);
  auto* dv = static_cast<scalar_t*>(p.dv);
  auto* dg = static_cast<T*>(p.dg);
  T* dh0 = static_cast<T*>(p.dh0) + L.state(n, h);
  const T scale = static_cast<T>(p.scale);

  idx row, start, stop;
  sequence_bounds(p, n, &row, &start, &stop);
  const idx nchunks = (stop - start + C - 1) / C;

  // Pass 1: the state at the start of every chunk.
  // Kept transposed, S^T [Vp x Kp]: the form the backward's products read.
  for (idx j = 0; j < Vp; ++j)
    for (idx i = 0; i < Kp; ++i) b.S[j * Kp + i] = (h0 && i < K && j < V) ? h0[i * V + j] : T(0);
  for (idx ci = 0; ci < nchunks; ++ci) {
    const idx c0 = start + ci * C, c = imin(C, stop - c0), nb = (c + kBlk - 1) / kBlk;
    __builtin_memcpy(b.states + ci * KV, b.S, sizeof(T) * KV);
    if (ci + 1 == nchunks) break;  // the final state is not needed
    for (idx t = 0; t < c; ++t) {
      const idx qo = L.qk(row, c0 + t, h), vo = L.v(row, c0 + t, h);
      load_row(k + qo, K, Kp, b.k + t * Kp, T(1));
      load_row(g + qo, K, Kp, b.a + t * Kp, T(1));
      exp_inplace(b.a + t * Kp, Kp);
      load_row(v + vo, V, Vp, b.v + t * Vp, T(1));
    }
    RowPrefetch pf;
    if (ci + 2 < nchunks) {  // the next chunk this pass loads
      const idx qo = L.qk(row, c0 + C, h), vo = L.v(row, c0 + C, h);
      pf.add(k + qo, p.H * K * sizeof(scalar_t), K * sizeof(scalar_t));
      pf.add(g + qo, p.H * K * sizeof(T), K * sizeof(T));
      pf.add(v + vo, p.H * V * sizeof(scalar_t), V * sizeof(scalar_t));
      pf.start(imin(C, stop - c0 - C), 4);
    }
    pf.step();
    T* last = b.dpre + nb * Kp;
    gates_backward(c, Kp, b.k, b.a, b.pk, b.dblk, b.dsuf, b.kf, true, last);
    pf.step();
    for (idx j = 0; j < Vp; ++j) vmul_inplace(b.S + j * Kp, last, Kp);
    pf.step();
    gemm(Vp, Kp, c, b.v, 1, Vp, b.kf, Kp, b.S, Kp, true);  // S^T += v^T (k e^{b_last-b})
    pf.step();
  }

  // Pass 2: chunks in reverse, carrying dS, the gradient of the state at the chunk's end.
  for (idx i = 0; i < Kp; ++i)
    for (idx j = 0; j < Vp; ++j) b.dS[i * Vp + j] = (dht && i < K && j < V) ? dht[i * V + j] : T(0);
  for (idx ci = nchunks - 1; ci >= 0; --ci) {
    const idx c0 = start + ci * C, c = imin(C, stop - c0), nb = (c + kBlk - 1) / kBlk;
    const T* S0T = b.states + ci * KV;
    for (idx t = 0; t < c; ++t) {
      const idx qo = L.qk(row, c0 + t, h), vo = L.v(row, c0 + t, h);
      load_row(q + qo, K, Kp, b.q + t * Kp, T(1));
      load_row(k + qo, K, Kp, b.k + t * Kp, T(1));
      load_row(g + qo, K, Kp, b.a + t * Kp, T(1));
      exp_inplace(b.a + t * Kp, Kp);
      load_row(v + vo, V, Vp, b.v + t * Vp, T(1));
      load_row(dout + vo, V, Vp, b.dout + t * Vp, scale);
    }
    pad_block_rows(c, Kp, b.q, b.k, b.a);
    RowPrefetch pf;
    if (ci > 0) {  // the chunk before, next in this walk
      const idx qo = L.qk(row, c0 - C, h), vo = L.v(row, c0 - C, h);
      const idx qs = p.H * K * sizeof(scalar_t), vs = p.H * V * sizeof(scalar_t);
      pf.add(q + qo, qs, K * sizeof(scalar_t));
      pf.add(k + qo, qs, K * sizeof(scalar_t));
      pf.add(g + qo, p.H * K * sizeof(T), K * sizeof(T));
      pf.add(v + vo, vs, V * sizeof(scalar_t));
      pf.add(dout + vo, vs, V * sizeof(scalar_t));
      pf.start(C, 16);
    }
    gates_forward(c, Kp, b.q, b.a, b.pq, b.dblk, b.dpre, b.qi, b.qe);
    gates_backward(c, Kp, b.k, b.a, b.pk, b.dblk, b.dsuf, b.kf, false, static_cast<T*>(nullptr));
    pf.step();
    transpose(b.dS, Vp, Kp, Kp, Vp, b.dst, Kp);
    // inter-chunk parts
    gemm(c, Kp, Vp, b.dout, Vp, 1, S0T, Kp, b.dqi, Kp, false);  // dO S0^T
    pf.step();
    gemm(c, Kp, Vp, b.v, Vp, 1, b.dst, Kp, b.dki, Kp, false);     // v dS^T
    pf.step();
    gemm(c, Vp, Kp, b.kf, Kp, 1, b.dS, Vp, b.dv, Vp, false);      // (k e^{b_last-b}) dS
    pf.step();
    for (idx t = 0; t < c; ++t) {
      const idx e = t * Kp;
      vmul2_inplace(b.dqi + e, b.pq + e, b.dpre + (t / kBlk) * Kp, Kp);
      vmul2_inplace(b.dki + e, b.pk + e, b.dsuf + (t / kBlk) * Kp, Kp);
    }
    vfill(b.dqs, T(0), round_up(c, kBlk) * Kp);
    vfill(b.dks, T(0), round_up(c, kBlk) * Kp);
    // intra-chunk, one block row at a time
    for (idx I = 0; I < nb; ++I) {
      const idx base = I * kBlk, R = imin(kBlk, c - base);
      pack_block_t(b.dout, Vp, base, R, Vp, b.dot_t);
      gemm(base + R, kBlk, Vp, b.v, Vp, 1, b.dot_t, kBlk, b.dat + base, ldA, false);
      if (I > 0) {
        advance_offdiag<T>(I, Kp, b.k, b.pk, b.dblk, b.kt, b.ft);
        pack_block_t(b.qi, Kp, base, R, Kp, b.qit);
        gemm(base, kBlk, Kp, b.kt, Kp, 1, b.qit, kBlk, b.at + base, ldA, false);
        // dq of block I from earlier blocks: Pq * (dA K~)
        gemm(R, Kp, base, b.dat + base, 1, ldA, b.kt, Kp, b.tmp, Kp, false);
        vmul(b.dqs + base * Kp, b.pq + base * Kp, b.tmp, R * Kp);
        pf.step();
        // dk of earlier blocks from block I: factor * (dA^T (q Pq))
        gemm(base, Kp, R, b.dat + base, ldA, 1, b.qi + base * Kp, Kp, b.y, Kp, false);
        vfma_inplace(b.dks, b.ft, b.y, base * Kp);
      }
      diag_scores(Kp, b.q + base * Kp, b.k + base * Kp, b.a + base * Kp,
                  b.at + base * ldA + base, ldA, b.ubuf);
      for (idx r = base + R; r < base + kBlk; ++r) vfill(b.dat + r * ldA + base, T(0), kBlk);
      pf.step();
      diag_backward(R, Kp, b.q + base * Kp, b.k + base * Kp, b.a + base * Kp,
                    b.dat + base * ldA + base, ldA, b.u, b.dqs + base * Kp, b.dks + base * Kp);
      pf.step();
    }
    // dv += A^T dO, block row by block row (A is zero above the diagonal)
    for (idx J = 0; J < nb; ++J) {
      const idx base = J * kBlk, R = imin(kBlk, c - base);
      gemm(R, Vp, c - base, b.at + base * ldA + base, ldA, 1, b.dout + base * Vp, Vp,
           b.dv + base * Vp, Vp, true);
    }
    pf.step();
    // dg, with the four sums of the header comment, then dq and dk
    chunk_dg(c, Kp, Vp, S0T, b.dst, b.dpre + nb * Kp, b.q, b.k, b.dqi, b.dqs, b.dki, b.dks, b.e1,
             b.run, b.rev, b.tmp, [&](idx t) { return dg + L.qk(row, c0 + t, h); }, K);
    for (idx t = 0; t < c; ++t) {
      // adding the diagonal terms dA_tt k_t and dA_tt q_t
      const T dtt = b.dat[t * ldA + t];
      const idx e = t * Kp;
      const Vec<T> dv_tt = Vec<T>{} + dtt;
      for (idx i = 0; i < Kp; i += lanes<T>()) {
        vstore(b.tmp + i, vload(b.dqi + e + i) + vload(b.dqs + e + i) + dv_tt * vload(b.k + e + i));
        vstore(b.tmp + Kp + i,
               vload(b.dki + e + i) + vload(b.dks + e + i) + dv_tt * vload(b.q + e + i));
      }
      const idx qo = L.qk(row, c0 + t, h);
      put_row(b.tmp, K, dq + qo);
      put_row(b.tmp + Kp, K, dk + qo);
      put_row(b.dv + t * Vp, V, dv + L.v(row, c0 + t, h));
    }
    pf.step();
    // dS0 = e^{b_last} dS + (q e^b)^T dO
    gemm(Kp, Vp, c, b.qe, 1, Kp, b.dout, Vp, b.dS, Vp, true, b.dpre + nb * Kp);
    while (pf.done < pf.rows) pf.step();
  }
  for (idx i = 0; i < K; ++i)
    for (idx j = 0; j < V; ++j) dh0[i * V + j] = b.dS[i * Vp + j];
}

// ---- entry points (non-template, so each instruction set exports plain functions) ----------

#define GLA_CHUNK_DISPATCH(dtype, CALL)                  \
  switch (dtype) {                                       \
    case DType::kFloat32: { using st = float; CALL; } break;         \
    case DType::kFloat64: { using st = double; CALL; } break;        \
    case DType::kFloat16: { using st = c10::Half; CALL; } break;     \
    case DType::kBFloat16: { using st = c10::BFloat16; CALL; } break; \
  }

inline size_t fwd_workspace_bytes(DType dt, idx C, idx K, idx vw) {
  size_t r = 0;
  GLA_CHUNK_DISPATCH(dt, r = fwd_workspace_bytes_t<st>(C, K, vw));
  return r;
}
inline void fwd_task(const GlaParams& p, idx n, idx h, idx v0, idx v1, idx C, void* ws) {
  GLA_CHUNK_DISPATCH(p.dtype, fwd_task_t<st>(p, n, h, v0, v1, C, ws));
}
inline size_t bwd_workspace_bytes(DType dt, idx C, idx K, idx V, idx nchunks) {
  size_t r = 0;
  GLA_CHUNK_DISPATCH(dt, r = bwd_workspace_bytes_t<st>(C, K, V, nchunks));
  return r;
}
inline void bwd_task(const GlaParams& p, idx n, idx h, idx C, idx nchunks, void* ws) {
  GLA_CHUNK_DISPATCH(p.dtype, bwd_task_t<st>(p, n, h, C, nchunks, ws));
}
#undef GLA_CHUNK_DISPATCH
