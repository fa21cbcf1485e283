// The token-step loop of the engine (one token for B rows), per thread: engine_step.cpp runs
// stages [s0, s1) of the plan in one OpenMP region, thread t of T owning a fixed slice of
// every matrix's panels and of the (row, head) tasks, a barrier between dependent stages.
// No include guard on purpose (engine_isa.cpp compiles it per instruction set).
//
// Attention core, per row and head:
//   decay = exp(logsigmoid(gate logit + b) / normalizer)          gate_decay (math_impl.h)
//   S'    = diag(decay) S + k^T v;  o = scale * q S'              one pass over the state
//   o     = RMSNorm(o) * w (optional);  o *= silu(r) (optional)   head_output
// S and S0 may be the same buffer (a state pool advanced in place): every element is read
// before it is written, by the same lane.

// One head's state S [K, V] (row stride ld) advanced from S0 and its output row:
// S' = diag(decay) S0 + k^T v, o = scale q S' (S0 null: a zero state). head_block does the
// NV * W columns at v, S0, S, o (already offset to the block): v and the output stay in
// registers, the state streams through once.
template <int NV>
inline void head_block(const float* q, const float* k, const float* v, const float* decay,
                       const float* S0, float* S, float* o, idx K, idx ld, float scale) {
  vf vv[NV], acc[NV];
#pragma GCC unroll 8
  for (int j = 0; j < NV; ++j) {
    vv[j] = vload(v + j * W);
    acc[j] = vf{};
  }
  for (idx i = 0; i < K; ++i) {
    const float di = decay[i], ki = k[i], qi = q[i] * scale;
    float* s = S + i * ld;
    if (S0) {
      const float* s0 = S0 + i * ld;
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

// The last n < W columns: the output accumulates in memory.
inline void head_cols(const float* q, const float* k, const float* v, const float* decay,
                      const float* S0, float* S, float* o, idx K, idx ld, idx n, float scale) {
  for (idx j = 0; j < n; ++j) o[j] = 0.f;
  for (idx i = 0; i < K; ++i) {
    const float di = decay[i], ki = k[i], qi = q[i] * scale;
    float* s = S + i * ld;
    const float* s0 = S0 ? S0 + i * ld : nullptr;
    for (idx j = 0; j < n; ++j) {
      const float x = (s0 ? di * s0[j] : 0.f) + ki * v[j];
      s[j] = x;
      o[j] += qi * x;
    }
  }
}

// The whole head [K, V]: blocks of 8, 4, 2, 1 vectors of columns, then the tail.
inline void head_update(const float* q, const float* k, const float* v, const float* decay,
                        const float* S0, float* S, float* o, idx K, idx V, float scale) {
  idx j = 0;
  const auto at = [&](idx c) { return S0 ? S0 + c : nullptr; };
  for (; j + 8 * W <= V; j += 8 * W) head_block<8>(q, k, v + j, decay, at(j), S + j, o + j, K, V, scale);
  if (j + 4 * W <= V) { head_block<4>(q, k, v + j, decay, at(j), S + j, o + j, K, V, scale); j += 4 * W; }
  if (j + 2 * W <= V) { head_block<2>(q, k, v + j, decay, at(j), S + j, o + j, K, V, scale); j += 2 * W; }
  if (j + W <= V) { head_block<1>(q, k, v + j, decay, at(j), S + j, o + j, K, V, scale); j += W; }
  if (j < V) head_cols(q, k, v + j, decay, at(j), S + j, o + j, K, V, V - j, scale);
}

// o = scale q S for a state already advanced (the other query heads of a GQA group).
inline void head_query(const float* q, const float* S, float* o, idx K, idx V, float scale) {
  for (idx j = 0; j < V; ++j) o[j] = 0.f;
  for (idx i = 0; i < K; ++i) {
    const float qi = q[i] * scale;
    const float* s = S + i * V;
    vmap(o, o, V, [s, qi, V](vf x, idx c) { return x + qi * vload_part(s + c, V - c); });
  }
}

// Heads [h0, h1) of batch row `row` of layer l (scratch: a + 16 floats).
inline void step_heads(const StepPlan& p, const EngineLayerPtrs& L, idx l, idx row, idx h0,
                       idx h1, float* scratch) {
  const EngineModel& m = p.m;
  const idx D = m.D, a = m.a, off = h0 * D, len = (h1 - h0) * D;
  const float* pr = p.b.proj + row * p.b.ldp;
  const float* S0 = p.old_states[l * p.B + row];
  float* S = p.new_states[l * p.B + row];
  gate_decay<true>(pr + m.g_col + off, L.gate_b + off, scratch + off, len, m.inv_normalizer);
  for (idx h = h0; h < h1; ++h) {
    const idx c = h * D;
    const float* s0 = S0 ? S0 + h * D * D : nullptr;
    float* s = S + h * D * D;
    float* o = p.b.o + row * a + c;
    const float *q = pr + c, *k = pr + a + c, *v = pr + 2 * a + c, *dh = scratch + c;
    head_update(q, k, v, dh, s0, s, o, D, D, m.scale);
    head_output(o, m.use_gate ? pr + m.off_r + c : nullptr, L.rms_w, D, m.eps);
  }
}

// (row, key/value head) tasks [t0, t1) of an AttnRowsPlan (engine_plan.h).
inline void attn_rows(const AttnRowsPlan& p, idx t0, idx t1) {
  static thread_local std::vector<float> decay;
  decay.resize(static_cast<size_t>(p.K));
  const idx G = p.H / p.Hkv, K = p.K, V = p.V;
  for (idx task = t0; task < t1; ++task) {
    const idx row = task / p.Hkv, h = task % p.Hkv;
    const float* pr = p.proj + row * p.ldp;
    const float* gk = p.gk + row * p.ldg + h * K;
    if (p.clamp) gate_decay<true, true>(gk, nullptr, decay.data(), K, p.inv_normalizer, p.clamp_min);
    else gate_decay<true>(gk, nullptr, decay.data(), K, p.inv_normalizer);
    float* S = p.states + (row * p.Hkv + h) * K * V;
    const float *k = pr + p.k_col + h * K, *v = pr + p.v_col + h * V;
    for (idx g = 0; g < G; ++g) {
      const idx qh = h * G + g;
      const float* q = pr + p.q_col + qh * K;
      float* o = p.o + row * p.ldo + qh * V;
      if (g == 0) head_update(q, k, v, decay.data(), S, S, o, K, V, p.scale);
      else head_query(q, S, o, K, V, p.scale);
      rmsnorm_row(o, o, p.rms_w, V, p.eps);   // always normalized (fla); null: no weight
      head_output(o, p.r_col >= 0 ? pr + p.r_col + qh * V : nullptr, nullptr, V, p.eps);
    }
  }
}

// Stages [s0, s1) (none a vendor product) for thread t of T.
inline void step_thread(const StepPlan& p, idx s0, idx s1, int t, int T) {
  const EngineModel& m = p.m;
  const EngineBufs& b = p.b;
  const idx B = p.B, d = m.d, dp = m.dp;
  float* xn_own = p.xn_threads + t * B * dp;  // this thread's LN rows (fused stages)
  float* scratch = p.scratch + t * (m.a + 16);
  idx p0, p1, r0, r1;
  split(B, t, T, &r0, &r1);
  for (idx s = s0; s < s1; ++s) {
    if (s > s0 && T > 1) {
#pragma omp barrier
    }
    const EngineStage& st = p.stages[s];
    const EngineLayerPtrs* L = st.op == kOpIn || st.op == kOpFinal ? nullptr : &m.layers[st.layer];
    switch (st.op) {
      case kOpIn:
        if (m.in) {
          split(m.in->num_panels(), t, T, &p0, &p1);
          m.in->apply(p.x, m.E, B, b.h, dp, false, p0, p1);
          if (m.in_b) add_bias(b.h, dp, B, m.in_b, p0 * m.nr, std::min(p1 * m.nr, d));
        } else {
          for (idx r = r0; r < r1; ++r) std::memcpy(b.h + r * dp, p.x + r * m.E, sizeof(float) * d);
        }
        break;
      case kOpLn1:
      case kOpLn2:
        layer_norm_rows(b.h + r0 * dp, dp, b.xn + r0 * dp, dp, st.op == kOpLn1 ? L->ln1_w : L->ln2_w,
                        st.op == kOpLn1 ? L->ln1_b : L->ln2_b, r1 - r0, d, m.eps);
        break;
      case kOpProj:  // own kernel: every thread norms all rows itself (no barrier)
        layer_norm_rows(b.h, dp, xn_own, dp, L->ln1_w, L->ln1_b, B, d, m.eps);
        split(L->proj->num_panels(), t, T, &p0, &p1);
        L->proj->apply(xn_own, dp, B, b.proj, b.ldp, false, p0, p1);
        break;
      case kOpGate2:
        split(L->gate2->num_panels(), t, T, &p0, &p1);
        L->gate2->apply(b.proj + m.off_gate, b.ldp, B, b.proj + m.g_col, b.ldp, false, p0, p1);
        break;
      case kOpAttn: {  // (row, head) tasks; consecutive heads of one row go together
        idx k0, k1;
        split(B * m.H, t, T, &k0, &k1);
        for (idx task = k0; task < k1;) {
          const idx row = task / m.H, h0 = task % m.H, h1 = std::min(m.H, h0 + (k1 - task));
          step_heads(p, *L, st.layer, row, h0, h1, scratch);
          task += h1 - h0;
        }
        break;
      }
      case kOpWo:
        split(L->wo->num_panels(), t, T, &p0, &p1);
        L->wo->apply(b.o, m.a, B, b.h, dp, true, p0, p1);
        break;
      case kOpW13:  // own kernel: LN2 per thread, SwiGLU of this thread's own panels
        layer_norm_rows(b.h, dp, xn_own, dp, L->ln2_w, L->ln2_b, B, d, m.eps);
        split(L->w13->num_panels(), t, T, &p0, &p1);
        L->w13->apply(xn_own, dp, B, b.u, 2 * m.f_pad, false, p0, p1);
        for (idx q = p0; q < p1; ++q) swiglu_panel(b.u, b.act, B, q, m.half, m.f, m.f_pad);
        break;
      case kOpSwiGlu:  // after a vendor [W1 | W3]
        swiglu_rows(b.u, b.act, r0, r1, m.f, m.f_pad);
        break;
      case kOpW2:
        split(L->w2->num_panels(), t, T, &p0, &p1);
        L->w2->apply(b.act, m.f_pad, B, b.h, dp, true, p0, p1);
        break;
      case kOpFinal:
        layer_norm_rows(b.h + r0 * dp, dp, p.y + r0 * d, d, m.norm_w, m.norm_b, r1 - r0, d, m.eps);
        break;
      default:
        break;
    }
  }
}
