// Runs the float32 chunked forward of csrc/cuda/chunk_fwd_f32.cuh (tf32 tensor cores) on the
// CPU (see emu.h), with the state pools and V-first states of chunk_pool_emu.cpp. Inputs come
// from a file and the results go to a file; tests/test_cuda_chunk_f32_emu.py compares them
// with the float64 reference.
//
//   chunk_f32_emu prec=1|3 B=1 T=77 H=2 K=64 V=64 cu=- P=0 inplace=0 vfirst=0 in=FILE out=FILE
//   prec: 1 = one tf32 pass ("high"), 3 = 3xTF32 ("highest").
//   in:  q, k, v, g (float), h0 (float; the pool [P,H,.,.] when P > 0, else dense [N,H,.,.]),
//        state indices (int64 [N]) when P > 0.
//   out: o (float, the buffer starts zeroed as the bindings allocate it), ht (float, dense,
//        absent when inplace=1), the pool after the call (P > 0).
// Runs twice, threads and blocks in opposite orders, from the same pool: both must agree bitwise.
// Built as sm_80 device code (tf32 operands rounded by cvt.rna), or as sm_90 code by
// chunk_f32_emu_sm90.cpp (cvt.rn); the line reports how many of each the kernel ran. Prints one
// line ending in DONE; exit status 0 when guards are intact and the runs agree.
#include "emu.h"

#define GLA_CHUNK_EMULATE 1
#include "cuda/chunk_fwd_f32.cuh"
#include "harness.h"

using harness::Guarded;

int main(int argc, char** argv) {
  auto kv = harness::parse_args(
      argc, argv,
      {{"prec", "1"}, {"B", "1"}, {"T", "77"}, {"H", "2"}, {"K", "64"}, {"V", "64"},
       {"cu", "-"}, {"P", "0"}, {"inplace", "0"}, {"vfirst", "0"}, {"in", ""}, {"out", ""}});
  const int prec = std::stoi(kv["prec"]);
  if (prec != 1 && prec != 3) {
    std::fprintf(stderr, "prec must be 1 or 3\n");
    return 2;
  }
  const int64_t B = std::stoll(kv["B"]), T = std::stoll(kv["T"]), H = std::stoll(kv["H"]);
  const int64_t K = std::stoll(kv["K"]), V = std::stoll(kv["V"]), P = std::stoll(kv["P"]);
  const bool inplace = kv["inplace"] == "1", vfirst = kv["vfirst"] == "1";
  const std::vector<int64_t> cu = harness::parse_offsets(kv["cu"]);
  const int64_t N = cu.empty() ? B : static_cast<int64_t>(cu.size()) - 1;
  const size_t nqk = B * T * H * K, nv = B * T * H * V, ns = N * H * K * V;
  const size_t nh0 = P > 0 ? P * H * K * V : ns;

  Guarded<float> q(nqk, 0, NAN), k(nqk, 0, NAN), v(nv, 0, NAN), o(nv, 0, NAN);
  Guarded<float> g(nqk, 0, NAN), h0(nh0, 0, NAN), ht(ns, 0, NAN);
  Guarded<int64_t> idx(P > 0 ? N : 0, 0, -7777);
  harness::read_inputs(kv["in"], q, k, v, g, h0, idx);  // idx is empty without a pool
  const std::vector<float> h0_in = h0.copy();

  gla::GlaParams p;
  p.dtype = gla::DType::kFloat32;
  p.B = B, p.T = T, p.H = H, p.K = K, p.V = V, p.N = N;
  p.cu_seqlens = cu.empty() ? nullptr : cu.data();
  p.scale = 1.0 / std::sqrt(static_cast<double>(K));
  p.q = q.data(), p.k = k.data(), p.v = v.data(), p.g = g.data(), p.h0 = h0.data();
  p.o = o.data();
  p.ht = inplace ? h0.data() : ht.data();
  p.state_idx = P > 0 ? idx.data() : nullptr;
  p.P = P;
  p.inplace_final = inplace;
  p.state_v_first = vfirst;

  auto run = [&](bool reverse) {
    emu::st().reverse = reverse;
    std::fill(o.data(), o.data() + nv, 0.0f);  // the bindings zero o
    ht.fill_poison();
    std::copy(h0_in.begin(), h0_in.end(), h0.data());
    gla::ChunkArgs args;
    unsigned gx = 0, gy = 0;
    bool empty = false;
    if (const char* err = gla::prepare_f32(p, &args, &gx, &gy, &empty)) {
      std::fprintf(stderr, "prepare refused: %s\n", err);
      std::exit(4);
    }
    if (empty) return;
    for (unsigned by = 0; by < gy; ++by)
      for (unsigned bx = 0; bx < gx; ++bx) {
        const unsigned x = reverse ? gx - 1 - bx : bx;
        emu::run_block({x, by, 0}, gla::kF32Threads, [&] {
          (K <= 64 ? (prec == 1 ? gla::gla_chunk_fwd_f32_kernel<64, 1>
                                : gla::gla_chunk_fwd_f32_kernel<64, 3>)
                   : (prec == 1 ? gla::gla_chunk_fwd_f32_kernel<128, 1>
                                : gla::gla_chunk_fwd_f32_kernel<128, 3>))(args);
        });
      }
  };
  auto results = [&]() {
    std::vector<unsigned char> r;
    auto add = [&](const void* d, size_t bytes) {
      r.insert(r.end(), static_cast<const unsigned char*>(d),
               static_cast<const unsigned char*>(d) + bytes);
    };
    add(o.data(), nv * 4);
    if (!inplace) add(ht.data(), ns * 4);
    if (P > 0) add(h0.data(), nh0 * 4);
    return r;
  };

  run(false);
  const std::vector<unsigned char> first = results();
  run(true);
  const bool runs_equal = results() == first;
  const bool guards = q.guards_intact() && k.guards_intact() && v.guards_intact() &&
                      g.guards_intact() && h0.guards_intact() && o.guards_intact() &&
                      ht.guards_intact() && idx.guards_intact();
  {
    std::ofstream f(kv["out"], std::ios::binary);
    f.write(reinterpret_cast<const char*>(first.data()),
            static_cast<std::streamsize>(first.size()));
  }
  std::printf("guards=%d runs_equal=%d barriers=%ld mmas=%ld arch=%d cvt_rna=%ld cvt_rn=%ld DONE\n",
              guards ? 1 : 0, runs_equal ? 1 : 0, emu::st().barriers, emu::st().mmas,
              __CUDA_ARCH__, emu::st().cvt_rna, emu::st().cvt_rn);
  return guards && runs_equal ? 0 : 1;
}
