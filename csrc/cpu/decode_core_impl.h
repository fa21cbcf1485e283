// Attention core of the fused decode step (decode.cpp), per ISA: no include guard on
// purpose; decode.cpp includes it once per instruction set inside its own namespace and
// `#pragma GCC target`, with GLA_VEC_BYTES set (16, 32, 64). GCC vector extensions only.
//
// For one batch row and a range of heads:
//   decay = exp(logsigmoid(gate logit) / normalizer)            vectorized exp / log1p
//   S'    = diag(decay) S + k^T v;  o = scale * q S'            one pass over the state
//   o     = RMSNorm(o) * w (optional);  o *= silu(r) (optional)
// S and S0 may be the same buffer (a state pool advanced in place): every element is read
// before it is written, by the same lane.

#ifndef GLA_VEC_BYTES
#error "define GLA_VEC_BYTES before including decode_core_impl.h"
#endif

using idx = int64_t;
constexpr int W = GLA_VEC_BYTES / 4;
typedef float vf __attribute__((vector_size(GLA_VEC_BYTES)));
typedef int32_t vi __attribute__((vector_size(GLA_VEC_BYTES)));

inline vf vload(const float* p) {
  vf v;
  __builtin_memcpy(&v, p, sizeof(v));
  return v;
}
inline void vstore(float* p, vf v) { __builtin_memcpy(p, &v, sizeof(v)); }
inline vf splat(float x) { return vf{} + x; }

// Keeps x as computed (no reassociation into a later product under -ffast-math): the output
// of a zero state must equal that of an explicit zero state bit for bit.
inline vf opaque(vf x) {
#if defined(__x86_64__) || defined(__i386__)
  __asm__("" : "+v"(x));
#endif
  return x;
}

inline vf vfloor(vf x) {  // floor through truncation (|x| < 2^31 here)
  const vf t = __builtin_convertvector(__builtin_convertvector(x, vi), vf);
  return t > x ? t - 1.f : t;
}

// exp(x), relative error ~2e-7 for x in [-87, 88] (clamped outside): 2^n * p(r) with
// r = x - n ln2 in [-ln2/2, ln2/2] and p the degree-7 Taylor polynomial.
inline vf vexp(vf x) {
  x = x < -87.f ? splat(-87.f) : x;
  x = x > 88.f ? splat(88.f) : x;
  const vf n = vfloor(x * 1.44269504088896341f + 0.5f);
  const vf r = (x - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
  vf p = splat(1.f / 5040.f);
  p = p * r + 1.f / 720.f;
  p = p * r + 1.f / 120.f;
  p = p * r + 1.f / 24.f;
  p = p * r + 1.f / 6.f;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  __builtin_memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

// log1p(t) for t in [0, 1]: 2 atanh(s), s = t / (2 + t) in [0, 1/3] (no 1 + t rounding).
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

// exp(logsigmoid(x) * inv_norm), logsigmoid(x) = min(x, 0) - log1p(exp(-|x|)).
inline vf vdecay(vf x, float inv_norm) {
  const vf ax = x < 0.f ? -x : x;
  const vf mn = x < 0.f ? x : splat(0.f);
  return vexp((mn - vlog1p_unit(vexp(-ax))) * inv_norm);
}

inline vf vsilu(vf x) { return x / (1.f + vexp(-x)); }

// out[i] = f(in[i]) for n floats, full vectors then a padded tail.
template <typename F>
inline void map(const float* in, float* out, idx n, F f) {
  idx i = 0;
  for (; i + W <= n; i += W) vstore(out + i, f(vload(in + i)));
  if (i < n) {
    float tmp[W] = {};
    for (idx j = 0; j < n - i; ++j) tmp[j] = in[i + j];
    vstore(tmp, f(vload(tmp)));
    for (idx j = 0; j < n - i; ++j) out[i + j] = tmp[j];
  }
}

// S' = diag(decay) S0 + k^T v and o = scale q S' for one head with D = NV * W: v and the
// output row stay in registers, the state streams through once.
template <int NV>
inline void head_fixed(const float* q, const float* k, const float* v, const float* decay,
                       const float* S0, float* S, float* o, idx D, float scale) {
  vf vv[NV], acc[NV];
#pragma GCC unroll 8
  for (int j = 0; j < NV; ++j) {
    vv[j] = vload(v + j * W);
    acc[j] = vf{};
  }
  for (idx i = 0; i < D; ++i) {
    const float di = decay[i], ki = k[i], qi = q[i] * scale;
    float* s = S + i * D;
    if (S0) {
      const float* s0 = S0 + i * D;
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) {
        const vf x = opaque(di * vload(s0 + j * W) + ki * vv[j]);
        vstore(s + j * W, x);
        acc[j] = opaque(acc[j] + qi * x);
      }
    } else {
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) {
        const vf x = opaque(ki * vv[j]);
        vstore(s + j * W, x);
        acc[j] = opaque(acc[j] + qi * x);
      }
    }
  }
#pragma GCC unroll 8
  for (int j = 0; j < NV; ++j) vstore(o + j * W, acc[j]);
}

// Any D: the output row accumulates in memory.
inline void head_any(const float* q, const float* k, const float* v, const float* decay,
                     const float* S0, float* S, float* o, idx D, float scale) {
  for (idx j = 0; j < D; ++j) o[j] = 0.f;
  for (idx i = 0; i < D; ++i) {
    const float di = decay[i], ki = k[i], qi = q[i] * scale;
    float* s = S + i * D;
    const float* s0 = S0 ? S0 + i * D : nullptr;
    for (idx j = 0; j < D; ++j) {
      const float x = (s0 ? di * s0[j] : 0.f) + ki * v[j];
      s[j] = x;
      o[j] += qi * x;
    }
  }
}

// Heads [h0, h1) of one batch row. q, k, v, g (gate logits, bias included) and r (output
// gate input, or null) point at the row's [H * D] parts; S0 (or null for zeros) and S at
// the row's [H, D, D] state; o at its [H * D] output; scratch holds H * D floats.
inline void core_heads(const float* q, const float* k, const float* v, const float* g,
                       const float* r, const float* rms_w, const float* S0, float* S, float* o,
                       idx h0, idx h1, idx D, float inv_norm, float scale, float eps,
                       float* scratch) {
  const idx off = h0 * D, len = (h1 - h0) * D;
  float* decay = scratch + off;
  map(g + off, decay, len, [inv_norm](vf x) { return vdecay(x, inv_norm); });
  for (idx h = h0; h < h1; ++h) {
    const idx c = h * D;
    const float* s0 = S0 ? S0 + h * D * D : nullptr;
    float* s = S + h * D * D;
    const float* dh = scratch + c;  // this head's decay factors
    if (D == W) head_fixed<1>(q + c, k + c, v + c, dh, s0, s, o + c, D, scale);
    else if (D == 2 * W) head_fixed<2>(q + c, k + c, v + c, dh, s0, s, o + c, D, scale);
    else if (D == 4 * W) head_fixed<4>(q + c, k + c, v + c, dh, s0, s, o + c, D, scale);
    else if (D == 8 * W) head_fixed<8>(q + c, k + c, v + c, dh, s0, s, o + c, D, scale);
    else head_any(q + c, k + c, v + c, dh, s0, s, o + c, D, scale);
    if (rms_w) {
      float sq = 0.f;
      for (idx j = 0; j < D; ++j) sq += o[c + j] * o[c + j];
      const float rs = 1.f / std::sqrt(sq / D + eps);
      for (idx j = 0; j < D; ++j) o[c + j] = o[c + j] * rs * rms_w[j];
    }
  }
  if (r) {
    float* gate = scratch + off;  // decay is no longer needed
    map(r + off, gate, len, [](vf x) { return vsilu(x); });
    for (idx j = 0; j < len; ++j) o[off + j] *= gate[j];
  }
}

// act[j] = silu(u1[j]) * u3[j] for n values.
inline void swiglu(const float* u1, const float* u3, float* act, idx n) {
  idx i = 0;
  for (; i + W <= n; i += W) vstore(act + i, vsilu(vload(u1 + i)) * vload(u3 + i));
  for (; i < n; ++i) act[i] = u1[i] / (1.f + std::exp(-u1[i])) * u3[i];
}
