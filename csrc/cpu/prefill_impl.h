// Fused CPU prefill: the per-thread body. No include guard on purpose: prefill.cpp compiles
// it once per instruction set through cpu/simd/per_isa.h, together with the chunk kernel's
// forward (so its gemm micro-kernel and chunk loop, and the SIMD vocabulary, are that ISA's).
//
// One call runs the whole model forward over B*T rows in one OpenMP parallel region; every
// thread runs run_thread() and the phases are separated by barriers:
//   h = x Win^T + b                      GEMM, column panels split over the threads
//   per layer:  xn = LN1(h)              rows split
//               proj = xn [Wq;Wk;Wv;Wr;Wg]^T, gate columns -> logsigmoid(. + b) / normalizer
//               per (row b, head): chunk forward (the ops' kernel loop) on proj's columns,
//               then RMSNorm and the swish output gate, written into o      tasks split
//               h += o Wo^T                                                   panels split
//               xn = LN2(h); act = silu(xn W1^T) * (xn W3^T)   W1/W3 panels interleaved
//               h += act W2^T
//   y = LN(h) at the last position of each row (or every position).
// Weights are packed once into panels of NP columns ([K][NP] each, zero-padded), the layout
// the micro-kernel streams; activations are float32 row-major with padded leading dimensions.

#include "cpu/chunk_fwd.h"

// Columns per weight panel: the widest register tile of the micro-kernel.
constexpr idx kPanel = kMaxNV * lanes<float>();
// K rows per pass over a panel: a block of the panel stays in L1 (about 16 KiB).
constexpr idx kKBlock = (16384 / (kPanel * 4)) < 16 ? 16 : 16384 / (kPanel * 4);

inline idx panel_width() { return kPanel; }

// C[:, panel columns] (+)= A[M x K] B for the panels [p0, p1) of a packed B ([np][K][NP]);
// C's panel p starts at column cofs(p).
template <typename ColOf>
inline void gemm_panels(idx M, idx K, const float* A, idx lda, const float* Bp, idx p0, idx p1,
                        float* C, idx ldc, bool accumulate, ColOf cofs) {
  for (idx p = p0; p < p1; ++p) {
    const float* panel = Bp + p * K * kPanel;
    float* Cp = C + cofs(p);
    for (idx k0 = 0; k0 < K; k0 += kKBlock) {
      const idx kc = imin(kKBlock, K - k0);
      gemm_panel<float, kMaxNV>(M, kc, A + k0, lda, 1, panel + k0 * kPanel, kPanel, Cp, ldc,
                                accumulate || k0 > 0, nullptr);
    }
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

inline size_t attention_workspace_bytes(idx C, idx D) { return fwd_workspace_bytes_t<float>(C, D, D) + 64; }

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
  FwdRows<float> rows{row0 + hh * D, row0 + a + hh * D, row0 + 2 * a + hh * D,
                      row0 + pl.off_gate + hh * D, o, Pp, Pp, a, false};
  fwd_chunks(rows, D, D, T, pl.C, pl.scale, dm, b);
  if (pl.ht && pl.ht[l]) {
    float* S1 = pl.ht[l] + so;
    for (idx i = 0; i < D; ++i)
      for (idx j = 0; j < D; ++j) S1[i * D + j] = b.S[i * Vp + j];
  }
  const float* rms = L.rms_w;
  const bool whole = D % kW == 0;
  for (idx t = 0; t < T; ++t) {
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

// Work inside each phase is handed out dynamically (an atomic counter per phase): on a shared
// machine a thread that is preempted does not hold up its share of the phase, the others
// take it.
inline void run_thread(const PrefillPlan& pl, int tid, int nt) {
  (void)tid;
  (void)nt;
  const idx M = pl.B * pl.T, dp = pl.dp, d = pl.d, Pp = pl.Pp;
  constexpr idx kRowBlock = 16;
  const idx row_blocks = (M + kRowBlock - 1) / kRowBlock;
  idx phase = 0;
  auto dynamic = [&](idx n, auto&& fn) {
    std::atomic<int64_t>& next = pl.counters[phase++];
    for (idx i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) fn(i);
  };
  auto rows_of = [&](idx blk, auto&& fn) {
    for (idx r = blk * kRowBlock; r < imin(M, (blk + 1) * kRowBlock); ++r) fn(r);
  };
  auto col = [](idx p) { return p * kPanel; };

  // input projection (or copy), padding columns zero
  if (pl.in_w) {
    dynamic(dp / kPanel, [&](idx p) {
      gemm_panels(M, pl.E, pl.x, pl.E, pl.in_w, p, p + 1, pl.h, dp, false, col);
      for (idx r = 0; r < M; ++r)
        for (idx c = p * kPanel; c < (p + 1) * kPanel; c += kW)
          vstore(pl.h + r * dp + c, vload(pl.h + r * dp + c) + vload(pl.in_b + c));
    });
  } else {
    dynamic(row_blocks, [&](idx blk) {
      rows_of(blk, [&](idx r) {
        std::memcpy(pl.h + r * dp, pl.x + r * pl.E, sizeof(float) * d);
        for (idx c = d; c < dp; ++c) pl.h[r * dp + c] = 0.f;
      });
    });
  }
  pl.barrier->wait();
  for (idx l = 0; l < pl.nl; ++l) {
    const PrefillLayerPtrs& L = pl.layers[l];
    dynamic(row_blocks, [&](idx blk) {
      rows_of(blk, [&](idx r) {
        layer_norm_row(pl.h + r * dp, pl.xn + r * dp, L.ln1_w, L.ln1_b, d, dp, pl.eps);
      });
    });
    pl.barrier->wait();
    dynamic(Pp / kPanel, [&](idx p) {
      gemm_panels(M, d, pl.xn, dp, L.proj, p, p + 1, pl.proj, Pp, false, col);
      // gate columns of this panel: g = logsigmoid(logit + b) / normalizer
      const idx g0 = std::max(p * kPanel, pl.off_gate);
      const idx g1 = std::min((p + 1) * kPanel, pl.off_gate + pl.a);
      if (g0 < g1) {
        const float inv = pl.inv_normalizer;
        const float* gb = L.gate_b + (g0 - pl.off_gate);
        for (idx r = 0; r < M; ++r)
          map_span(pl.proj + r * Pp + g0, g1 - g0,
                   [&](VF v, idx i) { return vlogsigmoid(v + vload(gb + i)) * inv; });
      }
    });
    pl.barrier->wait();
    dynamic(pl.B * pl.H, [&](idx task) {
      attention_task(pl, L, l, task / pl.H, task % pl.H, pl.ws[omp_get_thread_num()]);
    });
    pl.barrier->wait();
    dynamic(dp / kPanel, [&](idx p) {
      gemm_panels(M, pl.a, pl.o, pl.a, L.wo, p, p + 1, pl.h, dp, true, col);
    });
    pl.barrier->wait();
    dynamic(row_blocks, [&](idx blk) {
      rows_of(blk, [&](idx r) {
        layer_norm_row(pl.h + r * dp, pl.xn + r * dp, L.ln2_w, L.ln2_b, d, dp, pl.eps);
      });
    });
    pl.barrier->wait();
    // panel pairs (W1 panel j, W3 panel j) -> act panel j
    dynamic(pl.fp / kPanel, [&](idx j) {
      const idx ldu = 2 * pl.fp;
      gemm_panels(M, d, pl.xn, dp, L.w13, 2 * j, 2 * j + 2, pl.u, ldu, false, col);
      for (idx r = 0; r < M; ++r) {
        const float* u1 = pl.u + r * ldu + 2 * j * kPanel;
        float* act = pl.act + r * pl.fp + j * kPanel;
        for (idx c = 0; c < kPanel; c += kW)
          vstore(act + c, vsilu(vload(u1 + c)) * vload(u1 + kPanel + c));
      }
    });
    pl.barrier->wait();
    dynamic(dp / kPanel, [&](idx p) {
      gemm_panels(M, pl.f, pl.act, pl.fp, L.w2, p, p + 1, pl.h, dp, true, col);
    });
    pl.barrier->wait();
  }
  // final LayerNorm into y (through xn's rows, free now)
  if (pl.all_positions) {
    dynamic(row_blocks, [&](idx blk) {
      rows_of(blk, [&](idx r) {
        layer_norm_row(pl.h + r * dp, pl.xn + r * dp, pl.norm_w, pl.norm_b, d, dp, pl.eps);
        std::memcpy(pl.y + r * d, pl.xn + r * dp, sizeof(float) * d);
      });
    });
  } else {
    dynamic(pl.B, [&](idx bi) {
      const idx r = bi * pl.T + pl.T - 1;
      layer_norm_row(pl.h + r * dp, pl.xn + r * dp, pl.norm_w, pl.norm_b, d, dp, pl.eps);
      std::memcpy(pl.y + bi * d, pl.xn + r * dp, sizeof(float) * d);
    });
  }
}

// Phases of run_thread (one counter each).
inline idx prefill_phases(idx nl) { return 2 + 7 * nl; }
