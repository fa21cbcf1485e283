// Body of recurrent.cpp's per-ISA copies (cpu/simd/per_isa.h): the fused recurrent kernel,
// forward and backward, one thread's share of the (sequence, head) tasks. No include guard
// on purpose. The K x V state lives in a float (double for float64) buffer; every inner
// loop runs over V contiguous elements so the compiler vectorizes it for the copy's
// instruction set; exp of the gates is the vocabulary's vexp (cpu/simd/vec.h).

template <typename scalar_t>
void fwd_share(const GlaParams& p, idx begin, idx end) {
  using acc_t = acc_type_t<scalar_t>;
  const Layout L(p);
  const auto* q = static_cast<const scalar_t*>(p.q);
  const auto* k = static_cast<const scalar_t*>(p.k);
  const auto* v = static_cast<const scalar_t*>(p.v);
  const auto* g = static_cast<const acc_t*>(p.g);
  const auto* h0 = static_cast<const acc_t*>(p.h0);
  auto* o = static_cast<scalar_t*>(p.o);
  auto* ht = static_cast<acc_t*>(p.ht);
  const acc_t scale = static_cast<acc_t>(p.scale);
  const int64_t K = p.K, V = p.V;

  // The state is carried in place in its output row (ht's row n, or with inplace_final the
  // pool row itself), in the caller's layout: K-first rows update along V, V-first rows
  // (fla's and vLLM's layout) along K, both over contiguous memory with no transposed copy.
  const bool v_first = p.state_v_first;
  std::vector<acc_t> qa(K), ka(K), decay(K), va(V), oa(V);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t n = task / p.H, h = task % p.H;
    const int64_t in_row = h0_row(p, n), out_row = ht_row(p, n);
    if (in_row < 0) {  // padding row: o stays zero, the pool is not touched
      if (!p.inplace_final) std::fill(ht + L.state(n, h), ht + L.state(n, h) + K * V, acc_t(0));
      continue;
    }
    acc_t* S = ht + L.state(out_row, h);
    const acc_t* src = h0 ? h0 + L.state(in_row, h) : nullptr;
    if (src != S) init_state(S, src, K * V);   // equal only for a pool row updated in place
    int64_t row, start, stop;
    sequence_bounds(p, n, &row, &start, &stop);
    for (int64_t step = 0; step < stop - start; ++step) {
      const int64_t t = p.reverse ? stop - 1 - step : start + step;
      const int64_t qk_off = L.qk(row, t, h), v_off = L.v(row, t, h);
      for (int64_t i = 0; i < K; ++i) {
        qa[i] = static_cast<acc_t>(q[qk_off + i]) * scale;
        ka[i] = static_cast<acc_t>(k[qk_off + i]);
      }
      vmap(g + qk_off, decay.data(), K, [](auto x) { return vexp(x); });
      for (int64_t j = 0; j < V; ++j) {
        va[j] = static_cast<acc_t>(v[v_off + j]);
        oa[j] = 0;
      }
      if (v_first) {
        for (int64_t j = 0; j < V; ++j) {
          acc_t* Sj = S + j * K;
          const acc_t vj = va[j];
          acc_t acc = 0;
          for (int64_t i = 0; i < K; ++i) {
            Sj[i] = decay[i] * Sj[i] + ka[i] * vj;
            acc += qa[i] * Sj[i];
          }
          oa[j] = acc;
        }
      } else {
        for (int64_t i = 0; i < K; ++i) {
          acc_t* Si = S + i * V;
          const acc_t a = decay[i], ki = ka[i], qi = qa[i];
          for (int64_t j = 0; j < V; ++j) {
            Si[j] = a * Si[j] + ki * va[j];
            oa[j] += qi * Si[j];
          }
        }
      }
      for (int64_t j = 0; j < V; ++j) o[v_off + j] = static_cast<scalar_t>(oa[j]);
    }
  }
}

// Gradients (see docs/design.md "The math"), with D_t the gradient of the state S_t:
//   D_t  = scale q_t^T do_t + diag(a_{t+1}) D_{t+1}, and D_last also holds dht
//   dq_t = scale * S_t do_t,  dk_t = D_t v_t,  dv_t = D_t^T k_t,  dh0 = diag(a_first) D_first
//   dg_t = a_t * rowsum(S_{t-1} * D_t)
// dg is taken in this direct form rather than as a cumulative sum of (q*dq - k*dk): with
// strong decay those two terms nearly cancel and float32 rounding would show in dg.
// S_{t-1} is needed walking backwards, so states are checkpointed every kSegment tokens
// and recomputed one segment at a time.
constexpr int64_t kSegment = 64;

template <typename scalar_t>
void bwd_share(const GlaParams& p, idx begin, idx end) {
  using acc_t = acc_type_t<scalar_t>;
  const Layout L(p);
  const auto* q = static_cast<const scalar_t*>(p.q);
  const auto* k = static_cast<const scalar_t*>(p.k);
  const auto* v = static_cast<const scalar_t*>(p.v);
  const auto* g = static_cast<const acc_t*>(p.g);
  const auto* h0 = static_cast<const acc_t*>(p.h0);
  const auto* dout = static_cast<const scalar_t*>(p.dout);
  const auto* dht = static_cast<const acc_t*>(p.dht);
  auto* dq = static_cast<scalar_t*>(p.dq);
  auto* dk = static_cast<scalar_t*>(p.dk);
  auto* dv = static_cast<scalar_t*>(p.dv);
  auto* dg = static_cast<acc_t*>(p.dg);
  auto* dh0 = static_cast<acc_t*>(p.dh0);
  const acc_t scale = static_cast<acc_t>(p.scale);
  const int64_t K = p.K, V = p.V, KV = p.K * p.V;

  std::vector<acc_t> S(KV), D(KV), seg_states(kSegment * KV), checkpoints;
  std::vector<acc_t> ka(K), qa(K), decay(K), va(V), doa(V), dva(V);
  for (int64_t task = begin; task < end; ++task) {
    const int64_t n = task / p.H, h = task % p.H;
    int64_t row, start, stop;
    sequence_bounds(p, n, &row, &start, &stop);
    const int64_t len = stop - start;
    const int64_t num_segments = (len + kSegment - 1) / kSegment;
    auto token = [&](int64_t step) { return p.reverse ? stop - 1 - step : start + step; };
    auto load_token = [&](int64_t t) {  // k, v, exp(g) of token t into ka, va, decay
      const int64_t qk_off = L.qk(row, t, h), v_off = L.v(row, t, h);
      for (int64_t i = 0; i < K; ++i) ka[i] = static_cast<acc_t>(k[qk_off + i]);
      vmap(g + qk_off, decay.data(), K, [](auto x) { return vexp(x); });
      for (int64_t j = 0; j < V; ++j) va[j] = static_cast<acc_t>(v[v_off + j]);
    };
    auto advance = [&](acc_t* state) {  // state = diag(decay) state + ka^T va
      for (int64_t i = 0; i < K; ++i) {
        acc_t* Si = state + i * V;
        const acc_t a = decay[i], ki = ka[i];
        for (int64_t j = 0; j < V; ++j) Si[j] = a * Si[j] + ki * va[j];
      }
    };

    // Pass 1: the state before each segment.
    checkpoints.resize(num_segments * KV);
    init_state(S.data(), h0 ? h0 + L.state(n, h) : nullptr, KV);
    for (int64_t seg = 0; seg < num_segments; ++seg) {
      std::copy(S.begin(), S.end(), checkpoints.begin() + seg * KV);
      const int64_t seg_end = std::min(len, (seg + 1) * kSegment);
      for (int64_t step = seg * kSegment; step < seg_end; ++step) {
        load_token(token(step));
        advance(S.data());
      }
    }

    // Pass 2: segments from last to first; D walks back through time.
    init_state(D.data(), dht ? dht + L.state(n, h) : nullptr, KV);
    for (int64_t seg = num_segments - 1; seg >= 0; --seg) {
      const int64_t seg_start = seg * kSegment, seg_len = std::min(len, seg_start + kSegment) - seg_start;
      // Recompute S_t inside the segment; dq_t = scale * S_t do_t.
      const acc_t* prev = checkpoints.data() + seg * KV;
      for (int64_t c = 0; c < seg_len; ++c) {
        const int64_t t = token(seg_start + c);
        load_token(t);
        acc_t* St = seg_states.data() + c * KV;
        std::copy(prev, prev + KV, St);
        advance(St);
        const int64_t qk_off = L.qk(row, t, h), v_off = L.v(row, t, h);
        for (int64_t j = 0; j < V; ++j) doa[j] = static_cast<acc_t>(dout[v_off + j]);
        for (int64_t i = 0; i < K; ++i) {
          const acc_t* Si = St + i * V;
          acc_t dqi = 0;
          for (int64_t j = 0; j < V; ++j) dqi += Si[j] * doa[j];
          dq[qk_off + i] = static_cast<scalar_t>(dqi * scale);
        }
        prev = St;
      }
      for (int64_t c = seg_len - 1; c >= 0; --c) {
        const int64_t t = token(seg_start + c);
        load_token(t);
        const int64_t qk_off = L.qk(row, t, h), v_off = L.v(row, t, h);
        for (int64_t i = 0; i < K; ++i) qa[i] = static_cast<acc_t>(q[qk_off + i]);
        for (int64_t j = 0; j < V; ++j) {
          doa[j] = static_cast<acc_t>(dout[v_off + j]) * scale;
          dva[j] = 0;
        }
        const acc_t* before = c > 0 ? seg_states.data() + (c - 1) * KV
                                    : checkpoints.data() + seg * KV;  // S_{t-1}
        for (int64_t i = 0; i < K; ++i) {
          acc_t* Di = D.data() + i * V;
          const acc_t* Pi = before + i * V;
          const acc_t qi = qa[i], ki = ka[i];
          acc_t dki = 0, dgi = 0;
          for (int64_t j = 0; j < V; ++j) {
            Di[j] += qi * doa[j];
            dki += Di[j] * va[j];
            dva[j] += ki * Di[j];
            dgi += Pi[j] * Di[j];
          }
          dk[qk_off + i] = static_cast<scalar_t>(dki);
          dg[qk_off + i] = decay[i] * dgi;
          const acc_t a = decay[i];
          for (int64_t j = 0; j < V; ++j) Di[j] *= a;
        }
        for (int64_t j = 0; j < V; ++j) dv[v_off + j] = static_cast<scalar_t>(dva[j]);
      }
    }
    std::copy(D.begin(), D.end(), dh0 + L.state(n, h));
  }
}

// Entry points of one copy: tasks [begin, end) of p, any dtype.
inline void fwd_tasks(const GlaParams& p, idx begin, idx end) {
  dispatch_dtype(p.dtype, [&](auto tag) { fwd_share<decltype(tag)>(p, begin, end); });
}
inline void bwd_tasks(const GlaParams& p, idx begin, idx end) {
  dispatch_dtype(p.dtype, [&](auto tag) { bwd_share<decltype(tag)>(p, begin, end); });
}
