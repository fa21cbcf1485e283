// Fused CPU prefill: the per-thread body. No include guard on purpose: prefill.cpp compiles
// it once per instruction set through cpu/simd/per_isa.h, together with the chunk kernel's
// forward (so its gemm micro-kernel and chunk loop, and the SIMD vocabulary, are that ISA's).
//
// One call runs the whole model forward over B*T rows as a list of steps (PrefillOp in
// prefill_plan.h); every thread of a parallel region runs run_steps() over a run of steps,
// separated by barriers:
//   h = x Win^T + b                      GEMM, column panels split over the threads
//   per layer:  xn = LN1(h)              rows split
//               proj = xn [Wq;Wk;Wv;Wr;Wg]^T, gate columns -> logsigmoid(. + b) / normalizer
//               per (row b, head): chunk forward (the ops' kernel loop) on proj's columns,
//               then RMSNorm and the swish output gate, written into o      tasks split
//               h += o Wo^T                                                   panels split
//               xn = LN2(h); act = silu(xn W1^T) * (xn W3^T)   W1/W3 panels interleaved
//               h += act W2^T
//   y = LN(h) at the last position of each row (or every position).
// A matrix product the driver gives to the vendor GEMM is not run here: the region ends
// before it, and the elementwise part that the own kernel fuses into its panels (gate
// activation, SwiGLU) becomes a step of its own (kOpGate, kOpSwiGlu) in the next region.
// Own-kernel weights: float32 panels of NP columns ([K][NP] each, zero-padded) packed once,
// or 16-bit weights widened per K block into the thread's scratch (PrefillMat); activations
// are float32 row-major with padded leading dimensions.

#include "cpu/chunk_fwd.h"

// Columns per weight panel: the widest register tile of the micro-kernel.
constexpr idx kPanel = kMaxNV * lanes<float>();
// K rows per pass over a panel: a block of the panel stays in L1 (about 16 KiB).
constexpr idx kKBlock = (16384 / (kPanel * 4)) < 16 ? 16 : 16384 / (kPanel * 4);

inline idx panel_width() { return kPanel; }

// scratch[k][c] = W[row c][k0 + k] for k < kc, c < NP: one K block of a 16-bit panel,
// widened to float32 row by row into stage ([NP][kc], contiguous loads the compiler
// vectorizes), then transposed with the chunk kernel's vector tiles. Null rows (past the
// matrix) come only at a panel's end and read as zeros.
inline void widen_block(const uint16_t* const* rows, bool f16, idx k0, idx kc, float* stage,
                        float* scratch) {
  idx valid = 0;
  for (; valid < kPanel && rows[valid]; ++valid) {
    const uint16_t* src = rows[valid] + k0;
    float* dst = stage + valid * kc;
    if (f16) {
      for (idx k = 0; k < kc; ++k) dst[k] = c10::detail::fp16_ieee_to_fp32_value(src[k]);
    } else {
      for (idx k = 0; k < kc; ++k) {
        const uint32_t u = static_cast<uint32_t>(src[k]) << 16;  // bf16 = high half
        std::memcpy(dst + k, &u, sizeof(float));
      }
    }
  }
  transpose(stage, kc, valid, kPanel, kc, scratch, kPanel);
}

// C[:, panel p's columns] (+)= A[M x K] W_p^T; C's panel p starts at column p * NP.
// scratch: 2 * kKBlock * NP floats of the calling thread (16-bit weights only).
inline void gemm_mat(idx M, idx K, const float* A, idx lda, const PrefillMat& W, idx p, float* C,
                     idx ldc, bool accumulate, float* scratch) {
  float* Cp = C + p * kPanel;
  for (idx k0 = 0; k0 < K; k0 += kKBlock) {
    const idx kc = imin(kKBlock, K - k0);
    const float* block;
    if (W.panels) {
      block = W.panels + (p * K + k0) * kPanel;
    } else {
      widen_block(W.rows + p * kPanel, W.f16, k0, kc, scratch + kKBlock * kPanel, scratch);
      block = scratch;
    }
    gemm_panel<float, kMaxNV>(M, kc, A + k0, lda, 1, block, kPanel, Cp, ldc,
                              accumulate || k0 > 0, nullptr);
  }
}

// ---- vector helpers for the elementwise steps --------------------------------------------
using VF = Vec<float>;
constexpr int kW = lanes<float>();

// vexp, vlogsigmoid, vsilu: the SIMD vocabulary (cpu/simd/vec.h).

// Applies f to y[0..n) (n any), through a padded copy for the tail.
template <typename F> inline void map_span(float* y, idx n, F f) {
  idx i = 0;
  for (; i + kW <= n; i += kW) vstore(y + i, f(vload(y + i), i));
  if (i < n) {
    float t[kW] = {};
    for (idx j = i; j < n; ++j) t[j - i] = y[j];
    vstore(t, f(vload(t), i));
    for (idx j = i; j < n; ++j) y[j] = t[j - i];
  }
}

// y = (x - mean) / sqrt(var + eps) * w + b over one row of n; w and b padded to a multiple of
// the vector width, y's padding set to 0 (x's padding is 0 as well).
inline void layer_norm_row(const float* x, float* y, const float* w, const float* b, idx n,
                           idx npad, float eps) {
  VF s{};
  for (idx i = 0; i < npad; i += kW) s += vload(x + i);
  float sum = 0.f;
  for (int j = 0; j < kW; ++j) sum += s[j];
  const float mean = sum / n;
  VF q{};
  for (idx i = 0; i < n / kW * kW; i += kW) {
    const VF c = vload(x + i) - mean;
    q += c * c;
  }
  float sq = 0.f;
  for (int j = 0; j < kW; ++j) sq += q[j];
  for (idx i = n / kW * kW; i < n; ++i) sq += (x[i] - mean) * (x[i] - mean);
  const float rstd = 1.0f / std::sqrt(sq / n + eps);
  for (idx i = 0; i < npad; i += kW)
    vstore(y + i, (vload(x + i) - mean) * rstd * vload(w + i) + vload(b + i));
}

// ---- the plan ---------------------------------------------------------------------------

// Per-thread scratch: the chunk kernel's workspace, then one widened K block of a panel and
// its staging rows.
inline size_t attention_bytes(idx C, idx D) {
  return (fwd_workspace_bytes_t<float>(C, D, D) + 64 + 63) / 64 * 64;
}
inline size_t thread_workspace_bytes(idx C, idx D) {
  return attention_bytes(C, D) + 2 * kKBlock * kPanel * sizeof(float) + 64;
}
inline float* widen_scratch(char* ws, idx C, idx D) {
  const uintptr_t p = reinterpret_cast<uintptr_t>(ws) + attention_bytes(C, D);
  return reinterpret_cast<float*>((p + 63) & ~uintptr_t(63));
}

inline void split(idx n, int tid, int nt, idx* b, idx* e) {
  *b = n * tid / nt;
  *e = n * (tid + 1) / nt;
}

// One (row b, head hh) of the attention core: chunk forward from h0 to ht, then RMSNorm and
// the output gate on the head's rows of o.
inline void attention_task(const PrefillPlan& pl, const PrefillLayerPtrs& L, idx l, idx bi,
                           idx hh, char* ws) {
  const idx D = pl.D, T = pl.T, Pp = pl.Pp, a = pl.a;
  const Dims dm = make_dims<float>(pl.C, D, D);
  Carver w(reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(ws) + 63) & ~uintptr_t(63)));
  FwdBufs<float> b(w, dm);
  const idx Kp = dm.Kp, Vp = dm.Vp, so = (bi * pl.H + hh) * D * D;
  const float* S0 = pl.h0 && pl.h0[l] ? pl.h0[l] + so : nullptr;
  for (idx i = 0; i < Kp; ++i)
    for (idx j = 0; j < Vp; ++j) b.S[i * Vp + j] = (S0 && i < D && j < D) ? S0[i * D + j] : 0.f;
  const float* row0 = pl.proj + bi * T * Pp;
  float* o = pl.o + bi * T * a + hh * D;
  // a right-padded row stops at its length: the state is the one after its last valid
  // token, the padding rows of o are zeros (they feed only their own rows downstream)
  const idx len = pl.lengths ? pl.lengths[bi] : T;
  FwdRows<float> rows{row0 + hh * D, row0 + a + hh * D, row0 + 2 * a + hh * D,
                      row0 + pl.off_gate + hh * D, o, Pp, Pp, a, false};
  fwd_chunks(rows, D, D, len, pl.C, pl.scale, dm, b);
  for (idx t = len; t < T; ++t) std::memset(o + t * a, 0, sizeof(float) * D);
  if (pl.ht && pl.ht[l]) {
    float* S1 = pl.ht[l] + so;
    for (idx i = 0; i < D; ++i)
      for (idx j = 0; j < D; ++j) S1[i * D + j] = b.S[i * Vp + j];
  }
  const float* rms = L.rms_w;
  const bool whole = D % kW == 0;
  for (idx t = 0; t < len; ++t) {
    float* ot = o + t * a;
    const float* rg = row0 + t * Pp + pl.off_r + hh * D;
    if (pl.use_norm) {
      float sq = 0.f;
      for (idx j = 0; j < D; ++j) sq += ot[j] * ot[j];
      const float r = 1.0f / std::sqrt(sq / D + pl.eps);
      if (whole)
        for (idx i = 0; i < D; i += kW) vstore(ot + i, vload(ot + i) * r * vload(rms + i));
      else
        for (idx i = 0; i < D; ++i) ot[i] = ot[i] * r * rms[i];
    }
    if (pl.use_gate) {
      if (whole)
        for (idx i = 0; i < D; i += kW) vstore(ot + i, vload(ot + i) * vsilu(vload(rg + i)));
      else
        for (idx i = 0; i < D; ++i) ot[i] = ot[i] * (rg[i] / (1.0f + std::exp(-rg[i])));
    }
  }
}

// The gate columns [g0, g1) of proj's rows: g = logsigmoid(logit + b) / normalizer.
inline void gate_columns(const PrefillPlan& pl, const PrefillLayerPtrs& L, idx r0, idx r1, idx g0,
                         idx g1) {
  const float inv = pl.inv_normalizer;
  const float* gb = L.gate_b + (g0 - pl.off_gate);
  for (idx r = r0; r < r1; ++r)
    map_span(pl.proj + r * pl.Pp + g0, g1 - g0,
             [&](VF v, idx i) { return vlogsigmoid(v + vload(gb + i)) * inv; });
}

// act[r, c] = silu(u1[c]) * u3[c] over c < n; padding columns of act get zero
inline void swiglu_row(const float* u1, const float* u3, float* act, idx n, idx npad) {
  idx c = 0;
  for (; c + kW <= n; c += kW) vstore(act + c, vsilu(vload(u1 + c)) * vload(u3 + c));
  for (; c < n; ++c) act[c] = u1[c] / (1.0f + std::exp(-u1[c])) * u3[c];
  for (; c < npad; ++c) act[c] = 0.f;
}

// Steps [s0, s1) of pl.steps (none of them a vendor GEMM), a barrier between two steps. Work
// inside a step is handed out dynamically (an atomic counter per step): on a shared machine
// a thread that is preempted does not hold up its share of the step, the others take it.
inline void run_steps(const PrefillPlan& pl, idx s0, idx s1) {
  const idx M = pl.B * pl.T, dp = pl.dp, d = pl.d, Pp = pl.Pp;
  constexpr idx kRowBlock = 16;
  const idx row_blocks = (M + kRowBlock - 1) / kRowBlock;
  char* ws = pl.ws[omp_get_thread_num()];
  float* scratch = widen_scratch(ws, pl.C, pl.D);
  for (idx s = s0; s < s1; ++s) {
    if (s > s0) pl.barrier->wait();
    const PrefillStep& st = pl.steps[s];
    std::atomic<int64_t>& next = pl.counters[s];
    auto dynamic = [&](idx n, auto&& fn) {
      for (idx i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) fn(i);
    };
    auto rows = [&](auto&& fn) {  // fn(r0, r1) over blocks of rows
      dynamic(row_blocks, [&](idx blk) { fn(blk * kRowBlock, imin(M, (blk + 1) * kRowBlock)); });
    };
    if (st.op == kOpIn) {
      if (pl.has_in) {  // padding columns zero (zero weight rows and bias)
        dynamic(dp / kPanel, [&](idx p) {
          gemm_mat(M, pl.E, pl.x, pl.E, pl.in_w, p, pl.h, dp, false, scratch);
          for (idx r = 0; r < M; ++r)
            for (idx c = p * kPanel; c < (p + 1) * kPanel; c += kW)
              vstore(pl.h + r * dp + c, vload(pl.h + r * dp + c) + vload(pl.in_b + c));
        });
      } else {
        rows([&](idx r0, idx r1) {
          for (idx r = r0; r < r1; ++r) std::memcpy(pl.h + r * dp, pl.x + r * pl.E, sizeof(float) * d);
        });
      }
      continue;
    }
    if (st.op == kOpFinal) {  // final LayerNorm into y (through xn's rows, free now)
      if (pl.all_positions) {
        rows([&](idx r0, idx r1) {
          for (idx r = r0; r < r1; ++r) {
            layer_norm_row(pl.h + r * dp, pl.xn + r * dp, pl.norm_w, pl.norm_b, d, dp, pl.eps);
            std::memcpy(pl.y + r * d, pl.xn + r * dp, sizeof(float) * d);
          }
        });
      } else {
        dynamic(pl.B, [&](idx bi) {
          const idx r = bi * pl.T + (pl.lengths ? pl.lengths[bi] : pl.T) - 1;
          layer_norm_row(pl.h + r * dp, pl.xn + r * dp, pl.norm_w, pl.norm_b, d, dp, pl.eps);
          std::memcpy(pl.y + bi * d, pl.xn + r * dp, sizeof(float) * d);
        });
      }
      continue;
    }
    const PrefillLayerPtrs& L = pl.layers[st.layer];
    switch (st.op) {
      case kOpLn1:
      case kOpLn2: {
        const float* w = st.op == kOpLn1 ? L.ln1_w : L.ln2_w;
        const float* b = st.op == kOpLn1 ? L.ln1_b : L.ln2_b;
        rows([&](idx r0, idx r1) {
          for (idx r = r0; r < r1; ++r)
            layer_norm_row(pl.h + r * dp, pl.xn + r * dp, w, b, d, dp, pl.eps);
        });
        break;
      }
      case kOpProj:
        dynamic(Pp / kPanel, [&](idx p) {
          gemm_mat(M, d, pl.xn, dp, L.proj, p, pl.proj, Pp, false, scratch);
          const idx g0 = std::max(p * kPanel, pl.off_gate);
          const idx g1 = std::min((p + 1) * kPanel, pl.off_gate + pl.a);
          if (g0 < g1) gate_columns(pl, L, 0, M, g0, g1);
        });
        break;
      case kOpGate:
        rows([&](idx r0, idx r1) { gate_columns(pl, L, r0, r1, pl.off_gate, pl.off_gate + pl.a); });
        break;
      case kOpAttn:
        dynamic(pl.B * pl.H, [&](idx task) {
          attention_task(pl, L, st.layer, task / pl.H, task % pl.H, ws);
        });
        break;
      case kOpWo:
        dynamic(dp / kPanel, [&](idx p) {
          gemm_mat(M, pl.a, pl.o, pl.a, L.wo, p, pl.h, dp, true, scratch);
        });
        break;
      case kOpW13:  // panel pairs (W1 panel j, W3 panel j) -> act panel j
        dynamic(pl.fp / kPanel, [&](idx j) {
          const idx ldu = 2 * pl.fp;
          gemm_mat(M, d, pl.xn, dp, L.w13, 2 * j, pl.u, ldu, false, scratch);
          gemm_mat(M, d, pl.xn, dp, L.w13, 2 * j + 1, pl.u, ldu, false, scratch);
          for (idx r = 0; r < M; ++r) {
            const float* u1 = pl.u + r * ldu + 2 * j * kPanel;
            swiglu_row(u1, u1 + kPanel, pl.act + r * pl.fp + j * kPanel, kPanel, kPanel);
          }
        });
        break;
      case kOpSwiGlu:  // vendor layout: u = [xn W1^T (fp columns), xn W3^T (fp columns)]
        rows([&](idx r0, idx r1) {
          for (idx r = r0; r < r1; ++r) {
            const float* u1 = pl.u + r * 2 * pl.fp;
            swiglu_row(u1, u1 + pl.fp, pl.act + r * pl.fp, pl.f, pl.fp);
          }
        });
        break;
      case kOpW2:
        dynamic(dp / kPanel, [&](idx p) {
          gemm_mat(M, pl.f, pl.act, pl.fp, L.w2, p, pl.h, dp, true, scratch);
        });
        break;
      default:
        break;
    }
  }
}

// The own kernel alone on the panels of one matrix (the engine choice's measurement):
// C[M, panels * NP] = A W^T, panels split dynamically over the region's threads.
inline void gemm_all_panels(idx M, idx K, const float* A, idx lda, const PrefillMat& W,
                            idx panels, float* C, idx ldc, std::atomic<int64_t>* next,
                            char* ws, idx C_chunk, idx D) {
  float* scratch = widen_scratch(ws, C_chunk, D);
  for (idx p; (p = next->fetch_add(1, std::memory_order_relaxed)) < panels;)
    gemm_mat(M, K, A, lda, W, p, C, ldc, false, scratch);
}
