// The layer math both engine loops call (token step: step_impl.h, window: window_impl.h):
// norms, the gate's log decay, the per-head output (RMSNorm, swish gate), SwiGLU, biases.
// No include guard on purpose: engine_isa.cpp compiles it once per instruction set (the
// vector vocabulary comes from cpu/simd/vec.h).

// LayerNorm of `rows` rows of n floats (w, b: the norm's weight and bias).
inline void layer_norm_rows(const float* x, idx ldx, float* y, idx ldy, const float* w,
                            const float* b, idx rows, idx n, float eps) {
  for (idx r = 0; r < rows; ++r) layernorm_row(x + r * ldx, y + r * ldy, w, b, n, eps);
}

// RMSNorm of `rows` rows of n floats (w: the norm's weight, or null).
inline void rms_norm_rows(const float* x, idx ldx, float* y, idx ldy, const float* w, idx rows,
                          idx n, float eps) {
  for (idx r = 0; r < rows; ++r) rmsnorm_row(x + r * ldx, y + r * ldy, w, n, eps);
}

// y[r, c] += b[c] for r < rows, c in [c0, c1).
inline void add_bias(float* y, idx ldy, idx rows, const float* b, idx c0, idx c1) {
  if (c1 <= c0) return;
  for (idx r = 0; r < rows; ++r) {
    float* yr = y + r * ldy + c0;
    vmap(yr, yr, c1 - c0, [b, c0, c1](vf x, idx i) { return x + vload_part(b + c0 + i, c1 - c0 - i); });
  }
}

// The gate of n channels from its logits g (bias b added; b null: none): the log decay
// logsigmoid(g + b) / normalizer (the window's chunk loop takes logs), or with kExp the decay
// itself (the token step multiplies the state by it). out may be g. With kClamp the log
// decay is first raised to at least lo (fla's clamp_min).
template <bool kExp, bool kClamp = false>
inline void gate_decay(const float* g, const float* b, float* out, idx n, float inv_norm,
                       float lo = 0.f) {
  vmap(g, out, n, [b, n, inv_norm, lo](vf x, idx i) {
    vf l = vlogsigmoid(b ? x + vload_part(b + i, n - i) : x) * inv_norm;
    if constexpr (kClamp) l = l < lo ? splat(lo) : l;
    if constexpr (kExp) return vexp(l);
    else return l;
  });
}

// One head's output row of D: o = RMSNorm(o) * rms_w (rms_w null: none), then o *= silu(r)
// (r null: no output gate).
inline void head_output(float* o, const float* r, const float* rms_w, idx D, float eps) {
  if (rms_w) rmsnorm_row(o, o, rms_w, D, eps);
  if (r) vmap(o, o, D, [r, D](vf x, idx i) { return x * vsilu(vload_part(r + i, D - i)); });
}

// act[j] = silu(u1[j]) * u3[j] for j < n, act[j] = 0 for n <= j < npad.
inline void swiglu(const float* u1, const float* u3, float* act, idx n, idx npad) {
  vmap(u1, act, n, [u3, n](vf x, idx i) { return vsilu(x) * vload_part(u3 + i, n - i); });
  for (idx j = n; j < npad; ++j) act[j] = 0.f;
}

// SwiGLU rows [r0, r1) of act [., f_pad] from u [., 2 f_pad] = [u1 | u3] (the vendor GEMM's
// layout of the [W1 | W3] product).
inline void swiglu_rows(const float* u, float* act, idx r0, idx r1, idx f, idx f_pad) {
  for (idx r = r0; r < r1; ++r) {
    const float* ur = u + r * 2 * f_pad;
    swiglu(ur, ur + f_pad, act + r * f_pad, f, f);
  }
}

// SwiGLU of panel p of the own kernel's [W1 | W3] product for rows [0, M): the panel holds
// u1 then u3 of half columns each (act columns [p * half, +half)).
inline void swiglu_panel(const float* u, float* act, idx M, idx p, idx half, idx f, idx f_pad) {
  const idx j0 = p * half, n = std::min(half, f - j0);
  if (n <= 0) return;
  for (idx r = 0; r < M; ++r) {
    const float* ur = u + r * 2 * f_pad + 2 * j0;
    swiglu(ur, ur + half, act + r * f_pad + j0, n, n);
  }
}

inline void split(idx n, int t, int T, idx* b, idx* e) {
  *b = n * t / T;
  *e = n * (t + 1) / T;
}
