// Chunked GLA on the CPU: the forward (math at the top of chunk_common.h). Per-ISA body, no
// include guard on purpose (see chunk_common.h); the fused prefill includes only this part.

#include "cpu/chunk_common.h"


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

// Rows of one forward task: element pointers at the task's first token (already offset to the
// head and the value tile) and the distances between successive tokens. The ops' tensors are
// [B, T, H, K] (stride H*K); the fused prefill (prefill.cpp) points into its projection rows.
template <typename scalar_t> struct FwdRows {
  const scalar_t *q, *k, *v;
  const acc_type_t<scalar_t>* g;
  scalar_t* o;
  idx s_qk, s_v, s_o;     // token strides of q/k/g, v, o (elements)
  bool stream_out = true;  // streaming stores for o (off when the caller reads o right away)
};

// The chunk loop of one task over `count` tokens: S (b.S, Kp x Vp) in, S after the last token
// out; o written for every token.
template <typename scalar_t, typename T>
void fwd_chunks(const FwdRows<scalar_t>& r, idx K, idx vw, idx count, idx C, T scale,
                const Dims& d, FwdBufs<T>& b) {
  const idx Kp = d.Kp, Vp = d.Vp, ldA = d.ldA;
  for (idx c0 = 0; c0 < count; c0 += C) {
    const idx c = imin(C, count - c0), nb = (c + kBlk - 1) / kBlk;
    for (idx t = 0; t < c; ++t) {
      const idx qo = (c0 + t) * r.s_qk, vo = (c0 + t) * r.s_v;
      load_row(r.q + qo, K, Kp, b.q + t * Kp, scale);
      load_row(r.k + qo, K, Kp, b.k + t * Kp, T(1));
      load_row(r.g + qo, K, Kp, b.a + t * Kp, T(1));
      exp_inplace(b.a + t * Kp, Kp);
      load_row(r.v + vo, vw, Vp, b.v + t * Vp, T(1));
    }
    pad_block_rows(c, Kp, b.q, b.k, b.a);
    RowPrefetch pf;
    if (c0 + C < count) {
      const idx qo = (c0 + C) * r.s_qk, vo = (c0 + C) * r.s_v;
      const idx qs = r.s_qk * sizeof(scalar_t), vs = r.s_v * sizeof(scalar_t);
      pf.add(r.q + qo, qs, K * sizeof(scalar_t));
      pf.add(r.k + qo, qs, K * sizeof(scalar_t));
      pf.add(r.g + qo, r.s_qk * sizeof(T), K * sizeof(T));
      pf.add(r.v + vo, vs, vw * sizeof(scalar_t));
      pf.start(imin(C, count - c0 - C), 16);
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
    if (r.stream_out)
      for (idx t = 0; t < c; ++t) put_row(b.o + t * Vp, vw, r.o + (c0 + t) * r.s_o);
    else
      for (idx t = 0; t < c; ++t) store_row(b.o + t * Vp, vw, r.o + (c0 + t) * r.s_o);
  }
}

// One (sequence n, head h, value columns [v0, v1)) task of the forward.
template <typename scalar_t>
void fwd_task_t(const GlaParams& p, idx n, idx h, idx v0, idx v1, idx C, void* ws) {
  using T = acc_type_t<scalar_t>;
  const Layout L(p);
  const idx K = p.K, V = p.V, vw = v1 - v0;
  const Dims d = make_dims<T>(C, K, vw);
  const idx Kp = d.Kp, Vp = d.Vp;
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
  const FwdRows<scalar_t> rows{q + L.qk(row, start, h), k + L.qk(row, start, h),
                               v + L.v(row, start, h) + v0, g + L.qk(row, start, h),
                               o + L.v(row, start, h) + v0, p.H * K, p.H * V, p.H * V};
  fwd_chunks(rows, K, vw, stop - start, C, scale, d, b);
  for (idx i = 0; i < K; ++i)
    for (idx j = 0; j < vw; ++j) ht[i * sk + (v0 + j) * sv] = b.S[i * Vp + j];
}

// ---- entry points (non-template, so each instruction set exports plain functions) ----------

inline size_t fwd_workspace_bytes(DType dt, idx C, idx K, idx vw) {
  size_t r = 0;
  dispatch_dtype(dt, [&](auto tag) { r = fwd_workspace_bytes_t<decltype(tag)>(C, K, vw); });
  return r;
}
inline void fwd_task(const GlaParams& p, idx n, idx h, idx v0, idx v1, idx C, void* ws) {
  dispatch_dtype(p.dtype, [&](auto tag) { fwd_task_t<decltype(tag)>(p, n, h, v0, v1, C, ws); });
}
