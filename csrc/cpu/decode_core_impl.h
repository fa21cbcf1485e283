// Attention core of the fused decode step (decode.cpp), compiled per instruction set through
// cpu/simd/per_isa.h (no include guard on purpose); the vector math is the vocabulary of
// cpu/simd/vec.h.
//
// For one batch row and a range of heads:
//   decay = exp(logsigmoid(gate logit) / normalizer)            vexp, vlogsigmoid
//   S'    = diag(decay) S + k^T v;  o = scale * q S'            one pass over the state
//   o     = RMSNorm(o) * w (optional);  o *= silu(r) (optional)
// S and S0 may be the same buffer (a state pool advanced in place): every element is read
// before it is written, by the same lane.

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
        // opaque pins x and the sums: the output of a zero state must equal that of an
        // explicit zero state bit for bit, and under -ffast-math GCC otherwise reassociates
        // the output sums differently here than in the branch below (seen on AVX2;
        // tests/test_decode_cpu.py::test_no_state_and_zero_state_agree).
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
  vmap(g + off, decay, len, [inv_norm](vf x) { return vexp(vlogsigmoid(x) * inv_norm); });
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
    if (rms_w) rmsnorm_row(o + c, o + c, rms_w, D, eps);
  }
  if (r) {
    const float* ro = r + off;
    vmap(o + off, o + off, len,
         [ro, len](vf x, idx i) { return x * vsilu(vload_part(ro + i, len - i)); });
  }
}

// act[j] = silu(u1[j]) * u3[j] for n values.
inline void swiglu(const float* u1, const float* u3, float* act, idx n) {
  vmap(u1, act, n, [u3, n](vf x, idx i) { return vsilu(x) * vload_part(u3 + i, n - i); });
}

// LayerNorm of each of the B rows of length n (w and b: the layer's weight and bias).
inline void layer_norm_rows(const float* x, float* y, const float* w, const float* b, idx B,
                            idx n, float eps) {
  for (idx row = 0; row < B; ++row) layernorm_row(x + row * n, y + row * n, w, b, n, eps);
}

const DecodeCoreKernels kCore{&core_heads, &swiglu, &layer_norm_rows};
