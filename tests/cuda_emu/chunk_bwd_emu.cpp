// Runs the three kernels of csrc/cuda/chunk_bwd.cu on the CPU (see emu.h). Inputs come from a
// file and the gradients go to a file; tests/test_cuda_chunk_emu.py makes the inputs and
// compares the gradients with the float64 reference (torch autograd).
//
//   chunk_bwd_emu dtype=bf16 B=1 T=77 H=2 K=64 V=64 h0=1 dht=1 cu=- order=both misalign=0
//                 in=FILE out=FILE
//   in:  q, k, v, dout (16-bit, [B,T,H,K] / [B,T,H,V]), g (float [B,T,H,K]), then h0 and dht
//        (float [N,H,K,V]) when h0=1 / dht=1.
//   out: dq, dk, dv (16-bit), dg, dh0 (float), in that order.
//   cu:  - (none) or comma-separated offsets (B must be 1).
//   order: fwd | rev | both (twice, threads in opposite orders; results must match bitwise)
//   misalign=1 offsets every input and gradient pointer by one element (scalar paths).
// Prints one line; exit status 0 when the run completed with guards intact and, for
// order=both, both orders agree bitwise. The numbers are judged by the Python test.
#include "emu.h"

#define GLA_CHUNK_EMULATE 1
#include "cuda/chunk_bwd.cu"
#include "harness.h"

using harness::Guarded;

int main(int argc, char** argv) {
  auto kv = harness::parse_args(
      argc, argv,
      {{"dtype", "bf16"}, {"B", "1"}, {"T", "77"}, {"H", "2"}, {"K", "64"}, {"V", "64"},
       {"h0", "1"}, {"dht", "1"}, {"cu", "-"}, {"order", "both"}, {"misalign", "0"},
       {"in", ""}, {"out", ""}});
  const bool bf16 = kv["dtype"] == "bf16";
  if (!bf16 && kv["dtype"] != "fp16") {
    std::fprintf(stderr, "dtype must be bf16 or fp16\n");
    return 2;
  }
  const int64_t B = std::stoll(kv["B"]), T = std::stoll(kv["T"]), H = std::stoll(kv["H"]);
  const int64_t K = std::stoll(kv["K"]), V = std::stoll(kv["V"]);
  const bool with_h0 = kv["h0"] == "1", with_dht = kv["dht"] == "1";
  const size_t mis = kv["misalign"] == "1" ? 1 : 0;
  const std::vector<int64_t> cu = harness::parse_offsets(kv["cu"]);
  const int64_t N = cu.empty() ? B : static_cast<int64_t>(cu.size()) - 1;
  const size_t nqk = B * T * H * K, nv = B * T * H * V, ns = N * H * K * V;

  Guarded<uint16_t> q(nqk, mis, 0xffff), k(nqk, mis, 0xffff), v(nv, mis, 0xffff),
      dout(nv, mis, 0xffff);
  Guarded<float> g(nqk, mis, NAN), h0(ns, mis, NAN), dht(ns, mis, NAN);
  Guarded<uint16_t> dq(nqk, mis, 0xffff), dk(nqk, mis, 0xffff), dv(nv, mis, 0xffff);
  Guarded<float> dg(nqk, mis, NAN), dh0(ns, mis, NAN);
  {
    std::ifstream f(kv["in"], std::ios::binary);
    if (!f) {
      std::fprintf(stderr, "cannot read %s\n", kv["in"].c_str());
      return 2;
    }
    q.read(f), k.read(f), v.read(f), dout.read(f), g.read(f);
    if (with_h0) h0.read(f);
    if (with_dht) dht.read(f);
    if (!f) {
      std::fprintf(stderr, "input file too short\n");
      return 2;
    }
  }

  gla::GlaParams p;
  p.dtype = bf16 ? gla::DType::kBFloat16 : gla::DType::kFloat16;
  p.B = B, p.T = T, p.H = H, p.K = K, p.V = V, p.N = N;
  p.cu_seqlens = cu.empty() ? nullptr : cu.data();
  p.scale = 1.0 / std::sqrt(static_cast<double>(K));
  p.q = q.data(), p.k = k.data(), p.v = v.data(), p.g = g.data();
  p.h0 = with_h0 ? h0.data() : nullptr;
  p.dout = dout.data();
  p.dht = with_dht ? dht.data() : nullptr;
  p.dq = dq.data(), p.dk = dk.data(), p.dv = dv.data(), p.dg = dg.data(), p.dh0 = dh0.data();
  const int64_t nwork = gla::chunk_bwd_cuda_workspace_floats(p);
  Guarded<float> work(static_cast<size_t>(nwork), 0, NAN);  // poisoned: unwritten reads show
  p.workspace = nwork > 0 ? work.data() : nullptr;

  gla::ChunkArgs args;
  gla::BwdGrid grid;
  if (const char* err = gla::prepare_bwd(p, &args, &grid)) {
    std::printf("prepare refused: %s\n", err);
    return 4;
  }

  auto launch = [&](unsigned gx, unsigned gy, unsigned gz, int threads,
                    const std::function<void()>& body) {
    for (unsigned bz = 0; bz < gz; ++bz)
      for (unsigned by = 0; by < gy; ++by)
        for (unsigned bx = 0; bx < gx; ++bx) emu::run_block({bx, by, bz}, threads, body);
  };
  auto run_all = [&](bool reverse) {
    emu::st().reverse = reverse;
    std::memset(work.data(), 0xff, work.n * 4);  // NaN as bf16 and fp16 (16-bit states)
    if (grid.empty) return;
    std::function<void()> both_scans, grad_scan, chunk;
    if (K <= 64) {
      if (bf16) {
        both_scans = [&] { (gla::scan_vec(args) ? gla::gla_chunk_state_scans_kernel<__nv_bfloat16, true>
                                                : gla::gla_chunk_state_scans_kernel<__nv_bfloat16, false>)(args); };
        grad_scan = [&] { (gla::scan_vec(args) ? gla::gla_chunk_state_scan_kernel<__nv_bfloat16, true, true>
                                                : gla::gla_chunk_state_scan_kernel<__nv_bfloat16, true, false>)(args); };
        chunk = [&] { gla::gla_chunk_bwd_kernel<__nv_bfloat16, 64>(args); };
      } else {
        both_scans = [&] { (gla::scan_vec(args) ? gla::gla_chunk_state_scans_kernel<__half, true>
                                                : gla::gla_chunk_state_scans_kernel<__half, false>)(args); };
        grad_scan = [&] { (gla::scan_vec(args) ? gla::gla_chunk_state_scan_kernel<__half, true, true>
                                                : gla::gla_chunk_state_scan_kernel<__half, true, false>)(args); };
        chunk = [&] { gla::gla_chunk_bwd_kernel<__half, 64>(args); };
      }
    } else {
      if (bf16) {
        both_scans = [&] { (gla::scan_vec(args) ? gla::gla_chunk_state_scans_kernel<__nv_bfloat16, true>
                                                : gla::gla_chunk_state_scans_kernel<__nv_bfloat16, false>)(args); };
        grad_scan = [&] { (gla::scan_vec(args) ? gla::gla_chunk_state_scan_kernel<__nv_bfloat16, true, true>
                                                : gla::gla_chunk_state_scan_kernel<__nv_bfloat16, true, false>)(args); };
        chunk = [&] { gla::gla_chunk_bwd_kernel<__nv_bfloat16, 128>(args); };
      } else {
        both_scans = [&] { (gla::scan_vec(args) ? gla::gla_chunk_state_scans_kernel<__half, true>
                                                : gla::gla_chunk_state_scans_kernel<__half, false>)(args); };
        grad_scan = [&] { (gla::scan_vec(args) ? gla::gla_chunk_state_scan_kernel<__half, true, true>
                                                : gla::gla_chunk_state_scan_kernel<__half, true, false>)(args); };
        chunk = [&] { gla::gla_chunk_bwd_kernel<__half, 128>(args); };
      }
    }
    if (grid.scan_only) {
      launch(grid.scan_x, grid.scan_y, grid.scan_z, gla::kScanThreads, grad_scan);
      return;
    }
    if (args.chunk_offsets != nullptr)
      launch(1, 1, 1, gla::kOffsetThreads, [&] { gla::gla_chunk_offsets_kernel(args); });
    launch(grid.scan_x, grid.scan_y, 2 * grid.scan_z, gla::kScanThreads, both_scans);
    launch(grid.chunk_x, grid.chunk_y, 1, gla::kBwdThreads, chunk);
  };

  const std::string order = kv["order"];
  run_all(order == "rev");
  bool order_equal = true;
  if (order == "both") {
    const auto dq1 = dq.copy(), dk1 = dk.copy(), dv1 = dv.copy();
    const auto dg1 = dg.copy(), dh01 = dh0.copy();
    dq.fill_poison(), dk.fill_poison(), dv.fill_poison(), dg.fill_poison(), dh0.fill_poison();
    run_all(true);
    order_equal = dq1 == dq.copy() && dk1 == dk.copy() && dv1 == dv.copy() &&
                  std::memcmp(dg1.data(), dg.data(), nqk * 4) == 0 &&
                  std::memcmp(dh01.data(), dh0.data(), ns * 4) == 0;
  }
  {
    std::ofstream f(kv["out"], std::ios::binary);
    dq.write(f), dk.write(f), dv.write(f), dg.write(f), dh0.write(f);
  }
  const bool guards = q.guards_intact() && k.guards_intact() && v.guards_intact() &&
                      dout.guards_intact() && g.guards_intact() && h0.guards_intact() &&
                      dht.guards_intact() && dq.guards_intact() && dk.guards_intact() &&
                      dv.guards_intact() && dg.guards_intact() && dh0.guards_intact() &&
                      work.guards_intact();
  const bool ok = guards && order_equal;
  std::printf("%s guards=%d order_equal=%d flags=%d scan_grid=%ux%ux%u chunk_grid=%ux%u "
              "collectives=%ld barriers=%ld\n",
              ok ? "DONE" : "FAIL", guards ? 1 : 0, order_equal ? 1 : 0, args.flags, grid.scan_x,
              grid.scan_y, grid.scan_z, grid.chunk_x, grid.chunk_y, emu::st().collectives,
              emu::st().barriers);
  return ok ? 0 : 1;
}
