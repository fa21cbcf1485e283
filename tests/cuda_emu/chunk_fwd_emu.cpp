// Runs the kernel of csrc/cuda/chunk_fwd.cu on the CPU (see emu.h) and compares it with a
// float64 token-by-token recurrence on the same (bf16/fp16-rounded) inputs.
//
//   chunk_fwd_emu dtype=bf16 B=2 T=77 H=2 K=64 V=64 gate=norm:1 h0=1 cu=- order=both
//                 misalign=0 seed=1 tol=1e-2
//   gate: norm:X  -> logsigmoid(randn) / X;   const:X -> every gate equals X
//   cu:   -       -> no cu_seqlens;           0,5,5,77 -> packed sequences (B must be 1)
//   order: fwd | rev | both (run twice, threads in opposite orders; results must match bitwise)
//   mode:  fused | split | both (fused, then split in reverse order: must match bitwise)
//   misalign=1 offsets every input pointer by one element, forcing the scalar load paths.
// Prints one line of measurements; exit status 0 when every check passes.
#include "emu.h"

#define GLA_CHUNK_EMULATE 1
#include "cuda/chunk_fwd.cu"
#include "harness.h"
#include "chunk_fwd_launch.h"

#include <random>

using harness::Guarded;

int main(int argc, char** argv) {
  auto kv = harness::parse_args(
      argc, argv,
      {{"dtype", "bf16"}, {"B", "2"}, {"T", "77"}, {"H", "2"}, {"K", "64"}, {"V", "64"},
       {"gate", "norm:1"}, {"h0", "1"}, {"cu", "-"}, {"order", "both"}, {"misalign", "0"},
       {"seed", "1"}, {"tol", "1e-2"}, {"mode", "fused"}});
  const bool bf16 = kv["dtype"] == "bf16";
  if (!bf16 && kv["dtype"] != "fp16") {
    std::fprintf(stderr, "dtype must be bf16 or fp16\n");
    return 2;
  }
  const int64_t B = std::stoll(kv["B"]), T = std::stoll(kv["T"]), H = std::stoll(kv["H"]);
  const int64_t K = std::stoll(kv["K"]), V = std::stoll(kv["V"]);
  const bool with_h0 = kv["h0"] == "1";
  const size_t mis = kv["misalign"] == "1" ? 1 : 0;
  const double tol = std::stod(kv["tol"]);
  const std::vector<int64_t> cu = harness::parse_offsets(kv["cu"]);
  const int64_t N = cu.empty() ? B : static_cast<int64_t>(cu.size()) - 1;

  auto round16 = [&](float x) -> uint16_t {
    return bf16 ? __bfloat16_as_ushort(__float2bfloat16_rn(x))
                : __half_as_ushort(__float2half_rn(x));
  };
  auto from16 = [&](uint16_t b) -> double {
    return bf16 ? emu_bf16_to_float(b) : emu_f16_to_float(b);
  };

  std::mt19937_64 rng(std::stoull(kv["seed"]));
  std::normal_distribution<double> normal(0.0, 1.0);
  const size_t nqk = B * T * H * K, nv = B * T * H * V, ns = N * H * K * V;
  Guarded<uint16_t> q(nqk, mis, 0xffff), k(nqk, mis, 0xffff), v(nv, mis, 0xffff);
  Guarded<uint16_t> o(nv, 0, 0xffff);
  Guarded<float> g(nqk, mis, NAN), h0(ns, mis, NAN), ht(ns, 0, NAN);
  for (size_t i = 0; i < nqk; ++i) q[i] = round16(static_cast<float>(normal(rng)));
  for (size_t i = 0; i < nqk; ++i) k[i] = round16(static_cast<float>(normal(rng)));
  for (size_t i = 0; i < nv; ++i) v[i] = round16(static_cast<float>(normal(rng)));
  const std::string gate = kv["gate"];
  const double gval = std::stod(gate.substr(gate.find(':') + 1));
  for (size_t i = 0; i < nqk; ++i) {
    if (gate.rfind("norm:", 0) == 0) {
      const double x = normal(rng);
      const double logsig = x >= 0 ? -std::log1p(std::exp(-x)) : x - std::log1p(std::exp(x));
      g[i] = static_cast<float>(logsig / gval);
    } else {
      g[i] = static_cast<float>(gval);
    }
  }
  for (size_t i = 0; i < ns; ++i) h0[i] = static_cast<float>(normal(rng));

  gla::GlaParams p;
  p.dtype = bf16 ? gla::DType::kBFloat16 : gla::DType::kFloat16;
  p.B = B;
  p.T = T;
  p.H = H;
  p.K = K;
  p.V = V;
  p.N = N;
  p.cu_seqlens = cu.empty() ? nullptr : cu.data();
  p.scale = 1.0 / std::sqrt(static_cast<double>(K));
  p.q = q.data();
  p.k = k.data();
  p.v = v.data();
  p.g = g.data();
  p.h0 = with_h0 ? h0.data() : nullptr;
  p.o = o.data();
  p.ht = ht.data();

  // split path: the chunk states live in a poisoned workspace
  const int64_t nwork =
      T > 0 ? gla::offsets_floats(p) + (gla::state_elems(gla::max_chunks(p), H, K, V) + 1) / 2
            : 0;
  Guarded<float> work(static_cast<size_t>(nwork), 0, NAN);  // 16-bit states inside

  gla::ChunkArgs args;
  gla::FwdGrid grid;
  // Runs the forward the fused or the split way; false when prepare refuses.
  auto run_all = [&](bool split, bool reverse) {
    emu::st().reverse = reverse;
    std::memset(work.data(), 0xff, nwork * 4);  // NaN as bf16 and fp16
    p.workspace = split && nwork > 0 ? work.data() : nullptr;
    if (const char* err = gla::prepare(p, split && T > 0, &args, &grid)) {
      std::printf("prepare refused: %s\n", err);
      return false;
    }
    if (grid.empty) return true;
    harness::launch_chunk_forward(args, grid, K, bf16);
    return true;
  };

  // mode fused | split: that path, in the order(s) asked; mode both: fused forward-order,
  // then split reverse-order; every pair of runs must agree bitwise.
  const std::string order = kv["order"], mode = kv["mode"];
  const bool first_split = mode == "split";
  const bool second_split = mode == "both" ? true : first_split;
  if (!run_all(first_split, order == "rev")) return 4;
  bool order_equal = true;
  if (order == "both" || mode == "both") {
    const std::vector<uint16_t> o1(o.data(), o.data() + nv);
    const std::vector<float> h1(ht.data(), ht.data() + ns);
    std::fill(o.data(), o.data() + nv, uint16_t{0xffff});
    std::fill(ht.data(), ht.data() + ns, NAN);
    if (!run_all(second_split, true)) return 4;
    order_equal = std::memcmp(o1.data(), o.data(), nv * 2) == 0 &&
                  std::memcmp(h1.data(), ht.data(), ns * 4) == 0;
  }

  // float64 reference recurrence
  std::vector<double> o_ref(nv, 0.0), ht_ref(ns, 0.0), S(K * V);
  for (int64_t n = 0; n < N; ++n) {
    const int64_t row = cu.empty() ? n : 0;
    const int64_t t0 = cu.empty() ? 0 : cu[n], t1 = cu.empty() ? T : cu[n + 1];
    for (int64_t hh = 0; hh < H; ++hh) {
      for (int64_t i = 0; i < K * V; ++i)
        S[i] = with_h0 ? static_cast<double>(h0[(n * H + hh) * K * V + i]) : 0.0;
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t qk = ((row * T + t) * H + hh) * K, vo = ((row * T + t) * H + hh) * V;
        for (int64_t i = 0; i < K; ++i) {
          const double a = std::exp(static_cast<double>(g[qk + i])), ki = from16(k[qk + i]);
          for (int64_t j = 0; j < V; ++j) S[i * V + j] = a * S[i * V + j] + ki * from16(v[vo + j]);
        }
        for (int64_t j = 0; j < V; ++j) {
          double acc = 0.0;
          for (int64_t i = 0; i < K; ++i) acc += from16(q[qk + i]) * S[i * V + j];
          o_ref[vo + j] = acc * p.scale;
        }
      }
      for (int64_t i = 0; i < K * V; ++i) ht_ref[(n * H + hh) * K * V + i] = S[i];
    }
  }

  int nan = 0;
  double do2 = 0, ro2 = 0, dh2 = 0, rh2 = 0;
  for (size_t i = 0; i < nv; ++i) {
    const double x = from16(o[i]);
    if (!std::isfinite(x)) ++nan;
    do2 += (x - o_ref[i]) * (x - o_ref[i]);
    ro2 += o_ref[i] * o_ref[i];
  }
  for (size_t i = 0; i < ns; ++i) {
    const double x = ht[i];
    if (!std::isfinite(x)) ++nan;
    dh2 += (x - ht_ref[i]) * (x - ht_ref[i]);
    rh2 += ht_ref[i] * ht_ref[i];
  }
  const double o_rel = ro2 > 0 ? std::sqrt(do2 / ro2) : std::sqrt(do2);
  const double ht_rel = rh2 > 0 ? std::sqrt(dh2 / rh2) : std::sqrt(dh2);
  const bool guards = q.guards_intact() && k.guards_intact() && v.guards_intact() &&
                      g.guards_intact() && h0.guards_intact() && o.guards_intact() &&
                      ht.guards_intact() && work.guards_intact();
  const bool ok = nan == 0 && guards && order_equal && o_rel <= tol && ht_rel <= tol;
  std::printf("%s o_rel=%.3e ht_rel=%.3e nonfinite=%d guards=%d order_equal=%d flags=%d "
              "blocks=%ux%u collectives=%ld barriers=%ld scan_mmas=%ld\n",
              ok ? "PASS" : "FAIL", o_rel, ht_rel, nan, guards ? 1 : 0, order_equal ? 1 : 0,
              args.flags, grid.fused_x, grid.fused_y, emu::st().collectives, emu::st().barriers,
              harness::scan_mmas);
  return ok ? 0 : 1;
}
