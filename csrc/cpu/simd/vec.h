// The SIMD math vocabulary of the CPU kernels, one copy per instruction set: simd/per_isa.h
// includes this file inside each ISA namespace with GLA_VEC_BYTES (16, 32, 64) and
// GLA_ISA_FMA set. No include guard on purpose. Written with GCC vector extensions, so one
// source serves every width; a few hot spots use AVX-512 intrinsics.
//
// Accuracy (float lanes; tests/test_cpu_simd.py checks these against float64):
//   vexp        about 1.3 ulp (measured max over [-87.3, 88.7]); exact 1 at 0, exact 0 at
//               -inf and below the float range, +inf above it, NaN stays NaN. Float
//               arithmetic with a two-part ln2 kept apart by a barrier and Cephes' degree-6
//               minimax polynomial (exp_float_lanes); double lanes: 2e-16 relative.
//   vlog1p_unit log1p(t) for t in [0, 1] as 2 atanh(t / (2 + t)): never forms 1 + t, so
//               it keeps full relative accuracy for tiny t (logsigmoid of a large x then
//               gives -exp(-x) rather than 0); odd series to s^13, |s| <= 1/3, error < 2e-8.
//               (This is the fused decoder's log1p; the prefill's 2^n m form rounded 1 + t.)
//   vlogsigmoid min(x, 0) - log1p(exp(-|x|)), torch's form: no overflow either way.

#ifndef GLA_VEC_BYTES
#error "include cpu/simd/per_isa.h, which sets GLA_VEC_BYTES"
#endif

using idx = int64_t;

template <typename T> constexpr int lanes() { return GLA_VEC_BYTES / static_cast<int>(sizeof(T)); }
template <typename T, int L> struct VecT {
  typedef T type __attribute__((vector_size(sizeof(T) * L)));
};
template <typename T> using Vec = typename VecT<T, lanes<T>()>::type;

using vf = Vec<float>;
using vd = Vec<double>;
using vi = Vec<int32_t>;
constexpr int W = lanes<float>();  // float lanes per vector
constexpr int kVecRegs = GLA_VEC_BYTES == 64 ? 32 : 16;

inline idx round_up(idx x, idx m) { return (x + m - 1) / m * m; }
inline idx imin(idx a, idx b) { return a < b ? a : b; }

// Unaligned loads and stores of whole vectors.
template <typename T> inline Vec<T> vload(const T* p) {
  Vec<T> v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
template <typename T> inline void vstore(T* p, Vec<T> v) { __builtin_memcpy(p, &v, sizeof(v)); }
inline vf splat(float x) { return vf{} + x; }

// Keeps x as computed (no reassociation into a later product under -ffast-math).
template <typename V> inline V opaque(V x) {
#if defined(__x86_64__) || defined(__i386__)
#if GLA_EMULATE_AVX512  // no 64-byte registers in the emulated AVX-512 copy: via memory
  if constexpr (sizeof(V) > 32) __asm__("" : "+m"(x)); else __asm__("" : "+v"(x));
#else
  __asm__("" : "+v"(x));
#endif
#endif
  return x;
}

inline float hsum(vf v) {
  float s = 0.f;
#pragma GCC unroll 16
  for (int j = 0; j < W; ++j) s += v[j];
  return s;
}
inline double hsum(vd v) {
  double s = 0.0;
#pragma GCC unroll 8
  for (int j = 0; j < lanes<double>(); ++j) s += v[j];
  return s;
}

// ---- exp ------------------------------------------------------------------------------
// exp of L double lanes: x = n ln2 + r, |r| <= ln2/2, Taylor polynomial of degree DEG in r
// (7: float accuracy, 13: double accuracy), times 2^n built in the exponent bits.
// Exact at 0 (gives 1), exactly 0 below log(DBL_MIN) and for -inf, +inf above the range.
template <int L, int DEG>
inline typename VecT<double, L>::type exp_lanes(typename VecT<double, L>::type x) {
  using d = typename VecT<double, L>::type;
  using i32 = typename VecT<int32_t, L>::type;
  using i64 = typename VecT<int64_t, L>::type;
  const d lo = d{} - 708.0, hi = d{} + 709.0;
  d xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  // n = floor(x log2(e) + 1/2), through truncation of a positive number
  const i32 n = __builtin_convertvector(xc * 1.4426950408889634 + 2048.5, i32) - 2048;
  const d nd = __builtin_convertvector(n, d);
  // Two-part ln2 (the high part times n is exact); the barrier stops -ffast-math from
  // merging the parts, which would cost |n| ulps of r.
  const d r = opaque(xc - nd * 0.693145751953125) - nd * 1.42860682030941723212e-6;
  // 1/k! for k = 0..13
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
  d poly = d{} + coef[DEG];
#pragma GCC unroll 16
  for (int k = DEG - 1; k >= 0; --k) poly = poly * r + coef[k];
  const i64 bits = (__builtin_convertvector(n, i64) + 1023) << 52;
  d two_n;
  __builtin_memcpy(&two_n, &bits, sizeof(two_n));
  d y = poly * two_n;
  y = x < -708.3964185322641 ? d{} : y;
  y = x > 709.782712893384 ? d{} + __builtin_inf() : y;
  y = x != x ? x : y;  // NaN stays NaN (a NaN gate propagates, as in the reference)
  return y;
}

// exp of float lanes in float arithmetic (avx2 and generic; AVX-512 has its own version in
// vexp): the reduction r = x - n ln2 with a two-part ln2 (n times the 9-bit high part is
// exact, and so is x minus it), the barrier keeping -ffast-math from merging the parts
// (merged, r carries ln2's rounding |n| * 2e-9: 4.5 ulp near |x| = 87, measured), then the
// degree-6 minimax polynomial of Cephes' expf. Measured max error over [-87.3, 88.7]: 1.24
// ulp with FMA, 1.28 without. Same edge behaviour as exp_lanes.
template <int L> inline typename VecT<float, L>::type exp_float_lanes(typename VecT<float, L>::type x) {
  using f = typename VecT<float, L>::type;
  using i32 = typename VecT<int32_t, L>::type;
  const f lo = f{} - 87.5f, hi = f{} + 88.75f;
  f xc = x < lo ? lo : x;
  xc = xc > hi ? hi : xc;
  const i32 n = __builtin_convertvector(xc * 1.44269504088896341f + 128.5f, i32) - 128;
  const f nf = __builtin_convertvector(n, f);
  const f r = opaque(xc - nf * 0.693359375f) + nf * 2.12194440e-4f;
  f p = f{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  // 2^n as 2^n1 * 2^n2: n reaches 128 just below the overflow threshold
  const i32 n1 = n >> 1, b1 = (n1 + 127) << 23, b2 = (n - n1 + 127) << 23;
  f s1, s2;
  __builtin_memcpy(&s1, &b1, sizeof(s1));
  __builtin_memcpy(&s2, &b2, sizeof(s2));
  f y = opaque(p * s1) * s2;  // not p * (s1 * s2), which overflows for n = 128
  y = x < -87.33654475f ? f{} : y;
  y = x > 88.72283905f ? f{} + __builtin_inff() : y;
  y = x != x ? x : y;
  return y;
}

inline vf vexp(vf x) {
#if defined(__x86_64__) && GLA_VEC_BYTES == 64
  // AVX-512: the same reduction and polynomial, rounding by vrndscaleps and the 2^n scaling
  // by vscalefps (which also gives the exact 0 below the float range under FTZ/DAZ, and
  // +inf above it), so no clamps or blends beyond the input clamp that keeps r finite.
  // Operand order keeps NaN (max/min return their second operand when one is NaN).
  const __m512 xc = _mm512_min_ps(_mm512_set1_ps(89.0f),
                                  _mm512_max_ps(_mm512_set1_ps(-104.0f), (__m512)x));
  const __m512 nf = _mm512_roundscale_ps(_mm512_mul_ps(xc, _mm512_set1_ps(1.44269504088896341f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  // two-part ln2, as in exp_float_lanes (the high part's product and difference are exact)
  const __m512 r = _mm512_fmadd_ps(nf, _mm512_set1_ps(2.12194440e-4f),
                                   _mm512_fnmadd_ps(nf, _mm512_set1_ps(0.693359375f), xc));
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return (vf)_mm512_scalef_ps(p, nf);
#else
  return exp_float_lanes<W>(x);
#endif
}
inline vd vexp(vd x) { return exp_lanes<lanes<double>(), 13>(x); }

// y[0..n) = exp(y[0..n)), n a multiple of the vector width.
inline void exp_inplace(float* y, idx n) {
  for (idx i = 0; i < n; i += W) vstore(y + i, vexp(vload(y + i)));
}
inline void exp_inplace(double* y, idx n) {
  for (idx i = 0; i < n; i += lanes<double>()) vstore(y + i, vexp(vload(y + i)));
}

// ---- log1p, logsigmoid, sigmoid, silu --------------------------------------------------
// log1p(t) for t in [0, 1]: 2 atanh(s), s = t / (2 + t) in [0, 1/3] (see the top).
inline vf vlog1p_unit(vf t) {
  const vf s = t / (t + 2.f), s2 = s * s;
  vf p = splat(1.f / 13.f);
  p = p * s2 + 1.f / 11.f;
  p = p * s2 + 1.f / 9.f;
  p = p * s2 + 1.f / 7.f;
  p = p * s2 + 1.f / 5.f;
  p = p * s2 + 1.f / 3.f;
  p = p * s2 + 1.f;
  return 2.f * s * p;
}

inline vf vlogsigmoid(vf x) {
  const vf ax = x < 0.f ? -x : x;
  const vf mn = x < 0.f ? x : vf{};
  return mn - vlog1p_unit(vexp(-ax));
}

inline vf vsigmoid(vf x) { return 1.f / (1.f + vexp(-x)); }
inline vf vsilu(vf x) { return x / (1.f + vexp(-x)); }

// ---- rows ------------------------------------------------------------------------------
// The first min(n, lanes) elements at p, zero-padded to a vector (a row's tail).
template <typename T> inline Vec<T> vload_part(const T* p, idx n) {
  constexpr int L = lanes<T>();
  if (n >= L) return vload(p);
  T t[L] = {};
  for (idx j = 0; j < n; ++j) t[j] = p[j];
  return vload(t);
}

// out[i] = f(in[i]) for n floats or doubles (any n; in and out may be the same): full
// vectors, then a zero-padded tail. f takes the vector, or the vector and the index of its
// first element.
template <typename T, typename F> inline Vec<T> apply_at(F& f, Vec<T> x, idx i) {
  if constexpr (std::is_invocable_v<F&, Vec<T>, idx>) return f(x, i);
  else return f(x);
}
template <typename T, typename F> inline void vmap(const T* in, T* out, idx n, F f) {
  constexpr int L = lanes<T>();
  idx i = 0;
  for (; i + L <= n; i += L) vstore(out + i, apply_at<T>(f, vload(in + i), i));
  if (i < n) {
    T t[L];
    vstore(t, apply_at<T>(f, vload_part(in + i, n - i), i));
    for (idx j = i; j < n; ++j) out[j] = t[j - i];
  }
}

// sum of x[i] and of (x[i] - c)^2 over one row of n (any n)
inline float row_sum(const float* x, idx n) {
  vf s{};
  idx i = 0;
  for (; i + W <= n; i += W) s += vload(x + i);
  float r = hsum(s);
  for (; i < n; ++i) r += x[i];
  return r;
}
inline float row_sumsq(const float* x, idx n, float c) {
  vf s{};
  idx i = 0;
  for (; i + W <= n; i += W) {
    const vf d = vload(x + i) - c;
    s += d * d;
  }
  float r = hsum(s);
  for (; i < n; ++i) r += (x[i] - c) * (x[i] - c);
  return r;
}

// y = x / sqrt(mean(x^2) + eps) * w over one row of n (w may be null: no weight).
inline void rmsnorm_row(const float* x, float* y, const float* w, idx n, float eps) {
  const float r = 1.f / std::sqrt(row_sumsq(x, n, 0.f) / n + eps);
  if (w) vmap(x, y, n, [r, w, n](vf v, idx i) { return v * r * vload_part(w + i, n - i); });
  else vmap(x, y, n, [r](vf v) { return v * r; });
}

// y = (x - mean) / sqrt(var + eps) * w + b over one row of n (two passes: the variance is
// taken around the mean, not as E[x^2] - mean^2). w and b may be null (1 and 0).
inline void layernorm_row(const float* x, float* y, const float* w, const float* b, idx n,
                          float eps) {
  const float mean = row_sum(x, n) / n;
  const float rstd = 1.f / std::sqrt(row_sumsq(x, n, mean) / n + eps);
  vmap(x, y, n, [=](vf v, idx i) {
    const vf wv = w ? vload_part(w + i, n - i) : splat(1.f);
    const vf bv = b ? vload_part(b + i, n - i) : vf{};
    return (v - mean) * rstd * wv + bv;
  });
}
