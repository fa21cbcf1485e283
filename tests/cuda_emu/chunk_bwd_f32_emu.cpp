// Runs the float32 chunked backward of csrc/cuda/chunk_bwd_f32.cuh (tf32 tensor cores: the
// state scans and the chunk kernel, plus the chunk-offset kernel with cu_seqlens) on the CPU
// (see emu.h). Inputs come from a file and the gradients go to a file;
// tests/test_cuda_chunk_bwd_f32_emu.py compares them with the float64 reference.
//
//   chunk_bwd_f32_emu prec=1|3 B=1 T=77 H=2 K=64 V=64 h0=1 dht=1 cu=- misalign=0
//                     in=FILE out=FILE
//   prec: 1 = one tf32 pass ("high"), 3 = 3xTF32 ("highest").
//   in:  q, k, g ([B,T,H,K]), v, dout ([B,T,H,V]), then h0 and dht ([N,H,K,V]) when asked
//        for; all float32.
//   out: dq, dk, dv, dg, dh0 (float32), in that order.
//   misalign=1 offsets every input and gradient pointer by one element (scalar paths).
// Runs twice, threads and blocks in opposite orders, with the workspace poisoned (NaN): both runs
// must agree bitwise. chunk_bwd_f32_emu_sm90.cpp builds it as sm_90 code (tf32 operands rounded by
// cvt.rn); the line reports the roundings of each kind. Prints one line ending in DONE; exit status
// 0 when guards are intact and the runs agree.
#include "emu.h"

#define GLA_CHUNK_EMULATE 1
#include "cuda/chunk_bwd.cu"
#include "harness.h"

using harness::Guarded;

int main(int argc, char** argv) {
  auto kv = harness::parse_args(
      argc, argv,
      {{"prec", "1"}, {"B", "1"}, {"T", "77"}, {"H", "2"}, {"K", "64"}, {"V", "64"},
       {"h0", "1"}, {"dht", "1"}, {"cu", "-"}, {"misalign", "0"}, {"in", ""}, {"out", ""}});
  const int prec = std::stoi(kv["prec"]);
  if (prec != 1 && prec != 3) {
    std::fprintf(stderr, "prec must be 1 or 3\n");
    return 2;
  }
  const int64_t B = std::stoll(kv["B"]), T = std::stoll(kv["T"]), H = std::stoll(kv["H"]);
  const int64_t K = std::stoll(kv["K"]), V = std::stoll(kv["V"]);
  const bool with_h0 = kv["h0"] == "1", with_dht = kv["dht"] == "1";
  const size_t mis = kv["misalign"] == "1" ? 1 : 0;
  const std::vector<int64_t> cu = harness::parse_offsets(kv["cu"]);
  const int64_t N = cu.empty() ? B : static_cast<int64_t>(cu.size()) - 1;
  const size_t nqk = B * T * H * K, nv = B * T * H * V, ns = N * H * K * V;

  Guarded<float> q(nqk, mis, NAN), k(nqk, mis, NAN), g(nqk, mis, NAN), v(nv, mis, NAN),
      dout(nv, mis, NAN), h0(with_h0 ? ns : 0, mis, NAN), dht(with_dht ? ns : 0, mis, NAN);
  Guarded<float> dq(nqk, mis, NAN), dk(nqk, mis, NAN), dv(nv, mis, NAN), dg(nqk, mis, NAN),
      dh0(ns, mis, NAN);
  harness::read_inputs(kv["in"], q, k, g, v, dout, h0, dht);

  gla::GlaParams p;
  p.dtype = gla::DType::kFloat32;
  p.B = B, p.T = T, p.H = H, p.K = K, p.V = V, p.N = N;
  p.cu_seqlens = cu.empty() ? nullptr : cu.data();
  p.scale = 1.0 / std::sqrt(static_cast<double>(K));
  p.q = q.data(), p.k = k.data(), p.v = v.data(), p.g = g.data();
  p.h0 = with_h0 ? h0.data() : nullptr;
  p.dout = dout.data();
  p.dht = with_dht ? dht.data() : nullptr;
  p.dq = dq.data(), p.dk = dk.data(), p.dv = dv.data(), p.dg = dg.data(), p.dh0 = dh0.data();
  const int64_t nwork = gla::chunk_bwd_cuda_workspace_floats(p);
  Guarded<float> work(static_cast<size_t>(nwork), 0, NAN);
  p.workspace = nwork > 0 ? work.data() : nullptr;

  gla::ChunkArgs args;
  gla::BwdGrid grid;
  if (const char* err = gla::prepare_bwd(p, &args, &grid, true)) {
    std::printf("prepare refused: %s\n", err);
    return 4;
  }
  const unsigned scan_y = static_cast<unsigned>((V + gla::kF32BV - 1) / gla::kF32BV);

  auto launch = [&](bool reverse, unsigned gx, unsigned gy, unsigned gz, int threads,
                    const std::function<void()>& body) {
    for (unsigned bz = 0; bz < gz; ++bz)
      for (unsigned by = 0; by < gy; ++by)
        for (unsigned bx = 0; bx < gx; ++bx) {
          const unsigned x = reverse ? gx - 1 - bx : bx, z = reverse ? gz - 1 - bz : bz;
          emu::run_block({x, by, z}, threads, body);
        }
  };
  auto run_all = [&](bool reverse) {
    emu::st().reverse = reverse;
    work.fill_poison();
    dq.fill_poison(), dk.fill_poison(), dv.fill_poison(), dg.fill_poison(), dh0.fill_poison();
    if (grid.empty) return;
    std::function<void()> scans, chunk;
    if (K <= 64) {
      scans = [&] { (prec == 1 ? gla::gla_chunk_state_scans_f32_kernel<64, 1>
                               : gla::gla_chunk_state_scans_f32_kernel<64, 3>)(args); };
      chunk = [&] { (prec == 1 ? gla::gla_chunk_bwd_f32_kernel<64, 1>
                               : gla::gla_chunk_bwd_f32_kernel<64, 3>)(args); };
    } else {
      scans = [&] { (prec == 1 ? gla::gla_chunk_state_scans_f32_kernel<128, 1>
                               : gla::gla_chunk_state_scans_f32_kernel<128, 3>)(args); };
      chunk = [&] { (prec == 1 ? gla::gla_chunk_bwd_f32_kernel<128, 1>
                               : gla::gla_chunk_bwd_f32_kernel<128, 3>)(args); };
    }
    if (!grid.scan_only && args.chunk_offsets != nullptr)
      launch(reverse, 1, 1, 1, gla::kOffsetThreads, [&] { gla::gla_chunk_offsets_kernel(args); });
    launch(reverse, grid.scan_x, scan_y, 2, gla::kF32Threads, scans);
    if (!grid.scan_only) launch(reverse, grid.chunk_x, grid.chunk_y, 1, gla::kBwdThreads, chunk);
  };
  auto results = [&]() {
    std::vector<unsigned char> r;
    for (auto* b : {&dq, &dk, &dv, &dg, &dh0}) {
      const auto* d = reinterpret_cast<const unsigned char*>(b->data());
      r.insert(r.end(), d, d + b->n * 4);
    }
    return r;
  };

  run_all(false);
  const std::vector<unsigned char> first = results();
  run_all(true);
  const bool runs_equal = results() == first;
  {
    std::ofstream f(kv["out"], std::ios::binary);
    f.write(reinterpret_cast<const char*>(first.data()),
            static_cast<std::streamsize>(first.size()));
  }
  const bool guards = q.guards_intact() && k.guards_intact() && g.guards_intact() &&
                      v.guards_intact() && dout.guards_intact() && h0.guards_intact() &&
                      dht.guards_intact() && dq.guards_intact() && dk.guards_intact() &&
                      dv.guards_intact() && dg.guards_intact() && dh0.guards_intact() &&
                      work.guards_intact();
  std::printf("guards=%d runs_equal=%d flags=%d workspace_floats=%ld barriers=%ld mmas=%ld "
              "arch=%d cvt_rna=%ld cvt_rn=%ld DONE\n",
              guards ? 1 : 0, runs_equal ? 1 : 0, args.flags, static_cast<long>(nwork),
              emu::st().barriers, emu::st().mmas, __CUDA_ARCH__, emu::st().cvt_rna,
              emu::st().cvt_rn);
  return guards && runs_equal ? 0 : 1;
}
