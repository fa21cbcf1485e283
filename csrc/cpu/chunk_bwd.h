// Chunked GLA on the CPU: the backward (math at the top of chunk_common.h). Per-ISA body
// included after chunk_fwd.h (see chunk_impl.h); no include guard on purpose.


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

// ---- entry points -------------------------------------------------------------------------

inline size_t bwd_workspace_bytes(DType dt, idx C, idx K, idx V, idx nchunks) {
  size_t r = 0;
  dispatch_dtype(dt, [&](auto tag) { r = bwd_workspace_bytes_t<decltype(tag)>(C, K, V, nchunks); });
  return r;
}
inline void bwd_task(const GlaParams& p, idx n, idx h, idx C, idx nchunks, void* ws) {
  dispatch_dtype(p.dtype, [&](auto tag) { bwd_task_t<decltype(tag)>(p, n, h, C, nchunks, ws); });
}
