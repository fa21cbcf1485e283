// Fused recurrent GLA on the CPU, forward and backward.
// One task per (sequence, head); the K x V state lives in a float (double for float64)
// buffer and every inner loop runs over V contiguous elements so the compiler vectorizes it.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <vector>

#include "cpu_common.h"
#include "gla.h"

namespace gla {
namespace {

template <typename scalar_t>
void recurrent_fwd_impl(const GlaParams& p) {
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

  at::parallel_for(0, p.N * p.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> qa(K), ka(K), decay(K), va(V), oa(V);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / p.H, h = task % p.H;
      acc_t* S = ht + L.state(n, h);  // the running state is written in place of ht
      init_state(S, h0 ? h0 + L.state(n, h) : nullptr, K * V);
      int64_t row, start, stop;
      sequence_bounds(p, n, &row, &start, &stop);
      for (int64_t step = 0; step < stop - start; ++step) {
        const int64_t t = p.reverse ? stop - 1 - step : start + step;
        const int64_t qk_off = L.qk(row, t, h), v_off = L.v(row, t, h);
        for (int64_t i = 0; i < K; ++i) {
          qa[i] = static_cast<acc_t>(q[qk_off + i]) * scale;
          ka[i] = static_cast<acc_t>(k[qk_off + i]);
          decay[i] = std::exp(g[qk_off + i]);
        }
        for (int64_t j = 0; j < V; ++j) {
          va[j] = static_cast<acc_t>(v[v_off + j]);
          oa[j] = 0;
        }
        for (int64_t i = 0; i < K; ++i) {
          acc_t* Si = S + i * V;
          const acc_t a = decay[i], ki = ka[i], qi = qa[i];
          for (int64_t j = 0; j < V; ++j) {
            Si[j] = a * Si[j] + ki * va[j];
            oa[j] += qi * Si[j];
          }
        }
        for (int64_t j = 0; j < V; ++j) o[v_off + j] = static_cast<scalar_t>(oa[j]);
      }
    }
  });
}

// Gradients (see DESIGN.md math):
//   dq_t = scale * S_t do_t                        (pass 1, forward in time)
//   D_t  = scale q_t^T do_t + diag(a_{t+1}) D_{t+1}, D_last includes dht   (pass 2, backward)
//   dk_t = D_t v_t,  dv_t = D_t^T k_t,  dh0 = diag(a_first) D_first
//   dg_t = sum over s at or after t of (q_s*dq_s - k_s*dk_s) + rowsum(ht * dht)
template <typename scalar_t>
void recurrent_bwd_impl(const GlaParams& p) {
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
  const int64_t K = p.K, V = p.V;

  at::parallel_for(0, p.N * p.H, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> S(K * V), ka(K), qa(K), decay(K), va(V), doa(V), acc_k(K), dva(V);
    std::vector<acc_t> qdq;    // q_t * dq_t per token, kept in acc precision for dg
    std::vector<acc_t> hdh(K);
    std::vector<double> running(K);  // long sums of differences: keep them in double
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / p.H, h = task % p.H;
      int64_t row, start, stop;
      sequence_bounds(p, n, &row, &start, &stop);
      const int64_t len = stop - start;
      auto token = [&](int64_t step) { return p.reverse ? stop - 1 - step : start + step; };
      qdq.assign(len * K, 0);

      // Pass 1: recompute the states in processing order; dq_t = scale * S_t do_t.
      init_state(S.data(), h0 ? h0 + L.state(n, h) : nullptr, K * V);
      for (int64_t step = 0; step < len; ++step) {
        const int64_t t = token(step);
        const int64_t qk_off = L.qk(row, t, h), v_off = L.v(row, t, h);
        for (int64_t j = 0; j < V; ++j) {
          va[j] = static_cast<acc_t>(v[v_off + j]);
          doa[j] = static_cast<acc_t>(dout[v_off + j]);
        }
        for (int64_t i = 0; i < K; ++i) {
          acc_t* Si = S.data() + i * V;
          const acc_t a = std::exp(g[qk_off + i]), ki = static_cast<acc_t>(k[qk_off + i]);
          acc_t dqi = 0;
          for (int64_t j = 0; j < V; ++j) {
            Si[j] = a * Si[j] + ki * va[j];
            dqi += Si[j] * doa[j];
          }
          dqi *= scale;
          dq[qk_off + i] = static_cast<scalar_t>(dqi);
          qdq[step * K + i] = static_cast<acc_t>(q[qk_off + i]) * dqi;
        }
      }
      // rowsum(ht * dht): every gate before the end scales ht, so it enters every dg_t.
      for (int64_t i = 0; i < K; ++i) {
        acc_t s = 0;
        if (dht) {
          const acc_t* Di = dht + L.state(n, h) + i * V;
          for (int64_t j = 0; j < V; ++j) s += S[i * V + j] * Di[j];
        }
        hdh[i] = s;
        running[i] = 0;
      }

      // Pass 2: walk back; S now holds D, the gradient of the state.
      init_state(S.data(), dht ? dht + L.state(n, h) : nullptr, K * V);
      for (int64_t step = len - 1; step >= 0; --step) {
        const int64_t t = token(step);
        const int64_t qk_off = L.qk(row, t, h), v_off = L.v(row, t, h);
        for (int64_t j = 0; j < V; ++j) {
          va[j] = static_cast<acc_t>(v[v_off + j]);
          doa[j] = static_cast<acc_t>(dout[v_off + j]) * scale;
          dva[j] = 0;
        }
        for (int64_t i = 0; i < K; ++i) {
          qa[i] = static_cast<acc_t>(q[qk_off + i]);
          ka[i] = static_cast<acc_t>(k[qk_off + i]);
          decay[i] = std::exp(g[qk_off + i]);
        }
        for (int64_t i = 0; i < K; ++i) {
          acc_t* Di = S.data() + i * V;
          const acc_t qi = qa[i], ki = ka[i];
          acc_t dki = 0;
          for (int64_t j = 0; j < V; ++j) {
            Di[j] += qi * doa[j];
            dki += Di[j] * va[j];
            dva[j] += ki * Di[j];
          }
          acc_k[i] = dki;
        }
        for (int64_t i = 0; i < K; ++i) {
          dk[qk_off + i] = static_cast<scalar_t>(acc_k[i]);
          running[i] += qdq[step * K + i] - ka[i] * acc_k[i];
          dg[qk_off + i] = static_cast<acc_t>(running[i] + hdh[i]);
          acc_t* Di = S.data() + i * V;
          const acc_t a = decay[i];
          for (int64_t j = 0; j < V; ++j) Di[j] *= a;
        }
        for (int64_t j = 0; j < V; ++j) dv[v_off + j] = static_cast<scalar_t>(dva[j]);
      }
      acc_t* out = dh0 + L.state(n, h);
      for (int64_t e = 0; e < K * V; ++e) out[e] = S[e];
    }
  });
}

}  // namespace

void recurrent_fwd_cpu(const GlaParams& p) { dispatch_dtype(p.dtype, [&](auto tag) {
  recurrent_fwd_impl<decltype(tag)>(p);
}); }

void recurrent_bwd_cpu(const GlaParams& p) { dispatch_dtype(p.dtype, [&](auto tag) {
  recurrent_bwd_impl<decltype(tag)>(p);
}); }

}  // namespace gla
