// The window loop of the engine (the model forward over B*T rows), per thread:
// engine_window.cpp runs stages [s0, s1) of the plan in one parallel region, a barrier
// between two stages; work inside a stage is handed out dynamically (an atomic counter per
// stage), so a preempted thread on a shared machine does not hold up its share.
// No include guard on purpose (engine_isa.cpp compiles it per instruction set, together
// with the chunk kernel's forward: its micro-kernel and chunk loop are that ISA's).
//
// Own-kernel products read the engine's PackedMatrix copies (linear.h: panels of nr = two
// vectors of output rows, k-major [K][nr]) with the chunk kernel's register-blocked
// micro-kernel; 16-bit panels are widened per K block into the thread's scratch.

// Columns per weight panel: PackedMatrix's (two vectors).
constexpr idx kPanel = 2 * W;
// K rows per pass over a panel: a block of the panel stays in L1 (about 16 KiB).
constexpr idx kKBlock = 16384 / (kPanel * 4) < 16 ? 16 : 16384 / (kPanel * 4);

inline int64_t window_panel() { return kPanel; }

// C[:, panel p's columns] (+)= A[M x K] W_p^T; C's panel p starts at column p * kPanel.
// scratch: kKBlock * kPanel floats of the calling thread (16-bit weights only).
inline void gemm_mat(idx M, const float* A, idx lda, const PackedMatrix& W, idx p, float* C,
                     idx ldc, bool accumulate, float* scratch) {
  const idx K = W.in_features();
  float* Cp = C + p * kPanel;
  const LinearWeight type = W.weight_type();
  for (idx k0 = 0; k0 < K; k0 += kKBlock) {
    const idx kc = imin(kKBlock, K - k0), off = (p * K + k0) * kPanel;
    const float* block;
    if (type == LinearWeight::kFloat32) {
      block = static_cast<const float*>(W.data()) + off;
    } else {
      const uint16_t* src = static_cast<const uint16_t*>(W.data()) + off;
      if (type == LinearWeight::kFloat16) {
        for (idx i = 0; i < kc * kPanel; ++i) scratch[i] = c10::detail::fp16_ieee_to_fp32_value(src[i]);
      } else {
        for (idx i = 0; i < kc * kPanel; ++i) {
          const uint32_t u = static_cast<uint32_t>(src[i]) << 16;  // bf16 = high half
          std::memcpy(scratch + i, &u, sizeof(float));
        }
      }
      block = scratch;
    }
    gemm_panel<float, 2>(M, kc, A + k0, lda, 1, block, kPanel, Cp, ldc, accumulate || k0 > 0,
                         nullptr);
  }
}

// Per-thread scratch: the chunk kernel's workspace, then one widened K block of a panel.
inline size_t attention_bytes(idx C, idx D) {
  return (fwd_workspace_bytes_t<float>(C, D, D) + 64 + 63) / 64 * 64;
}
inline size_t window_ws_bytes(int64_t C, int64_t D) {
  return attention_bytes(C, D) + kKBlock * kPanel * sizeof(float) + 64;
}
inline float* widen_scratch(char* ws, idx C, idx D) {
  const uintptr_t p = reinterpret_cast<uintptr_t>(ws) + attention_bytes(C, D);
  return reinterpret_cast<float*>((p + 63) & ~uintptr_t(63));
}

// One (row bi, head hh) of the attention core: chunk forward from h0 to ht, then RMSNorm and
// the output gate on the head's rows of o.
inline void window_task(const WindowPlan& pl, const EngineLayerPtrs& L, idx l, idx bi, idx hh,
                        char* ws) {
  const EngineModel& m = pl.m;
  const idx D = m.D, T = pl.T, ldp = pl.b.ldp, a = m.a;
  const Dims dm = make_dims<float>(pl.C, D, D);
  Carver w(reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(ws) + 63) & ~uintptr_t(63)));
  FwdBufs<float> b(w, dm);
  const idx Kp = dm.Kp, Vp = dm.Vp, so = (bi * m.H + hh) * D * D;
  const float* S0 = pl.h0 && pl.h0[l] ? pl.h0[l] + so : nullptr;
  for (idx i = 0; i < Kp; ++i)
    for (idx j = 0; j < Vp; ++j) b.S[i * Vp + j] = (S0 && i < D && j < D) ? S0[i * D + j] : 0.f;
  const float* row0 = pl.b.proj + bi * T * ldp;
  float* o = pl.b.o + bi * T * a + hh * D;
  // a right-padded row stops at its length: the state is the one after its last valid
  // token, the padding rows of o are zeros (they feed only their own rows downstream)
  const idx len = pl.lengths ? pl.lengths[bi] : T;
  FwdRows<float> rows{row0 + hh * D, row0 + a + hh * D, row0 + 2 * a + hh * D,
                      row0 + m.g_col + hh * D, o, ldp, ldp, a, false};
  fwd_chunks(rows, D, D, len, pl.C, m.scale, dm, b);
  for (idx t = len; t < T; ++t) std::memset(o + t * a, 0, sizeof(float) * D);
  if (pl.ht && pl.ht[l]) {
    float* S1 = pl.ht[l] + so;
    for (idx i = 0; i < D; ++i)
      for (idx j = 0; j < D; ++j) S1[i * D + j] = b.S[i * Vp + j];
  }
  for (idx t = 0; t < len; ++t)
    head_output(o + t * a, m.use_gate ? row0 + t * ldp + m.off_r + hh * D : nullptr, L.rms_w,
                D, m.eps);
}

// Gate logits -> log decay over proj's rows [r0, r1) and columns [c0, c1) (inside the gate).
inline void window_gate(const WindowPlan& pl, const EngineLayerPtrs& L, idx r0, idx r1, idx c0,
                        idx c1) {
  const EngineModel& m = pl.m;
  for (idx r = r0; r < r1; ++r) {
    float* g = pl.b.proj + r * pl.b.ldp + c0;
    gate_decay<false>(g, L.gate_b + (c0 - m.g_col), g, c1 - c0, m.inv_normalizer);
  }
}

// Stages [s0, s1) of pl.stages (none a vendor product), a barrier between two stages.
inline void window_run(const WindowPlan& pl, idx s0, idx s1) {
  const EngineModel& m = pl.m;
  const EngineBufs& b = pl.b;
  const idx M = pl.B * pl.T, dp = m.dp, d = m.d, ldp = b.ldp;
  constexpr idx kRowBlock = 16;
  const idx row_blocks = (M + kRowBlock - 1) / kRowBlock;
  char* ws = pl.ws[omp_get_thread_num()];
  float* scratch = widen_scratch(ws, pl.C, m.D);
  for (idx s = s0; s < s1; ++s) {
    if (s > s0) pl.barrier->wait();
    const EngineStage& st = pl.stages[s];
    std::atomic<int64_t>& next = pl.counters[s];
    auto dynamic = [&](idx n, auto&& fn) {
      for (idx i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) fn(i);
    };
    auto rows = [&](auto&& fn) {  // fn(r0, r1) over blocks of rows
      dynamic(row_blocks, [&](idx blk) { fn(blk * kRowBlock, imin(M, (blk + 1) * kRowBlock)); });
    };
    // an own-kernel product over its panels; after(p) runs on the panel's columns
    auto product = [&](const PackedMatrix& W, const float* A, idx lda, float* C, idx ldc,
                       bool acc, auto&& after) {
      dynamic(W.num_panels(), [&](idx p) {
        gemm_mat(M, A, lda, W, p, C, ldc, acc, scratch);
        after(p);
      });
    };
    auto nothing = [](idx) {};
    // the gate activation on the gate columns of panel p of a product written at column c
    auto gate_cols = [&](const EngineLayerPtrs& L, idx c) {
      return [&, c](idx p) {
        const idx g0 = std::max(c + p * kPanel, m.g_col);
        const idx g1 = std::min(c + (p + 1) * kPanel, m.g_col + m.a);
        if (g0 < g1) window_gate(pl, L, 0, M, g0, g1);
      };
    };
    if (st.op == kOpIn) {
      if (m.in) {
        product(*m.in, pl.x, m.E, b.h, dp, false, [&](idx p) {
          if (m.in_b) add_bias(b.h, dp, M, m.in_b, p * kPanel, std::min((p + 1) * kPanel, d));
        });
      } else {
        rows([&](idx r0, idx r1) {
          for (idx r = r0; r < r1; ++r) std::memcpy(b.h + r * dp, pl.x + r * m.E, sizeof(float) * d);
        });
      }
      continue;
    }
    if (st.op == kOpFinal) {
      if (pl.all_positions) {
        rows([&](idx r0, idx r1) {
          layer_norm_rows(b.h + r0 * dp, dp, pl.y + r0 * d, d, m.norm_w, m.norm_b, r1 - r0, d, m.eps);
        });
      } else {
        dynamic(pl.B, [&](idx bi) {
          const idx r = bi * pl.T + (pl.lengths ? pl.lengths[bi] : pl.T) - 1;
          layer_norm_rows(b.h + r * dp, dp, pl.y + bi * d, d, m.norm_w, m.norm_b, 1, d, m.eps);
        });
      }
      continue;
    }
    const EngineLayerPtrs& L = m.layers[st.layer];
    switch (st.op) {
      case kOpLn1:
      case kOpLn2:
        rows([&](idx r0, idx r1) {
          layer_norm_rows(b.h + r0 * dp, dp, b.xn + r0 * dp, dp, st.op == kOpLn1 ? L.ln1_w : L.ln2_w,
                          st.op == kOpLn1 ? L.ln1_b : L.ln2_b, r1 - r0, d, m.eps);
        });
        break;
      case kOpProj:  // the full gate's activation fused per panel
        if (L.gate2) product(*L.proj, b.xn, dp, b.proj, ldp, false, nothing);
        else product(*L.proj, b.xn, dp, b.proj, ldp, false, gate_cols(L, 0));
        break;
      case kOpGate2:
        product(*L.gate2, b.proj + m.off_gate, ldp, b.proj + m.g_col, ldp, false,
                gate_cols(L, m.g_col));
        break;
      case kOpGate:
        rows([&](idx r0, idx r1) { window_gate(pl, L, r0, r1, m.g_col, m.g_col + m.a); });
        break;
      case kOpAttn:
        dynamic(pl.B * m.H, [&](idx task) {
          window_task(pl, L, st.layer, task / m.H, task % m.H, ws);
        });
        break;
      case kOpWo:
        product(*L.wo, b.o, m.a, b.h, dp, true, nothing);
        break;
      case kOpW13:  // panel p holds w1 rows [p*half, +half) then the same w3 rows
        product(*L.w13, b.xn, dp, b.u, 2 * m.f_pad, false,
                [&](idx p) { swiglu_panel(b.u, b.act, M, p, m.half, m.f, m.f_pad); });
        break;
      case kOpSwiGlu:  // after a vendor [W1 | W3]
        rows([&](idx r0, idx r1) { swiglu_rows(b.u, b.act, r0, r1, m.f, m.f_pad); });
        break;
      case kOpW2:
        product(*L.w2, b.act, m.f_pad, b.h, dp, true, nothing);
        break;
      default:
        break;
    }
  }
}
