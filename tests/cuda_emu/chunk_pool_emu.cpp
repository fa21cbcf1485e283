// Runs the chunked forward of csrc/cuda/chunk_fwd.cu (fused, and split: state scan + chunk
// kernel) on the CPU (see emu.h) with state pools: h0 rows read through state indices,
// padding rows, final states written in place, V-first states. Inputs come from a file and
// the results go to a file; tests/test_cuda_chunk_pool_emu.py compares them with the float64
// reference.
//
//   chunk_pool_emu dtype=bf16 B=1 T=77 H=2 K=64 V=64 cu=- P=0 inplace=0 vfirst=0 mode=both
//                  in=FILE out=FILE
//   in:  q, k, v (16-bit), g (float), h0 (float; the pool [P,H,.,.] when P > 0, else dense
//        [N,H,.,.]), state indices (int64 [N]) when P > 0.
//   out: o (16-bit, the buffer starts zeroed as the bindings allocate it), ht (float, dense,
//        absent when inplace=1), the pool after the call (P > 0).
//   mode: fused | split | both (fused in forward thread order, then split in reverse order
//   from the same pool: both must agree bitwise).
// Prints one line ending in DONE; exit status 0 when guards are intact and the runs agree.
#include "emu.h"

#define GLA_CHUNK_EMULATE 1
#include "cuda/chunk_fwd.cu"
#include "harness.h"
#include "chunk_fwd_launch.h"


using harness::Guarded;

int main(int argc, char** argv) {
  auto kv = harness::parse_args(
      argc, argv,
      {{"dtype", "bf16"}, {"B", "1"}, {"T", "77"}, {"H", "2"}, {"K", "64"}, {"V", "64"},
       {"cu", "-"}, {"P", "0"}, {"inplace", "0"}, {"vfirst", "0"}, {"mode", "both"},
       {"in", ""}, {"out", ""}});
  const bool bf16 = kv["dtype"] == "bf16";
  if (!bf16 && kv["dtype"] != "fp16") {
    std::fprintf(stderr, "dtype must be bf16 or fp16\n");
    return 2;
  }
  const int64_t B = std::stoll(kv["B"]), T = std::stoll(kv["T"]), H = std::stoll(kv["H"]);
  const int64_t K = std::stoll(kv["K"]), V = std::stoll(kv["V"]), P = std::stoll(kv["P"]);
  const bool inplace = kv["inplace"] == "1", vfirst = kv["vfirst"] == "1";
  const std::vector<int64_t> cu = harness::parse_offsets(kv["cu"]);
  const int64_t N = cu.empty() ? B : static_cast<int64_t>(cu.size()) - 1;
  const size_t nqk = B * T * H * K, nv = B * T * H * V, ns = N * H * K * V;
  const size_t nh0 = P > 0 ? P * H * K * V : ns;

  Guarded<uint16_t> q(nqk, 0, 0xffff), k(nqk, 0, 0xffff), v(nv, 0, 0xffff), o(nv, 0, 0xffff);
  Guarded<float> g(nqk, 0, NAN), h0(nh0, 0, NAN), ht(ns, 0, NAN);
  Guarded<int64_t> idx(P > 0 ? N : 0, 0, -7777);
  harness::read_inputs(kv["in"], q, k, v, g, h0, idx);  // idx is empty without a pool
  const std::vector<float> h0_in = h0.copy();

  gla::GlaParams p;
  p.dtype = bf16 ? gla::DType::kBFloat16 : gla::DType::kFloat16;
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

  const int64_t nwork =
      T > 0 ? gla::offsets_floats(p) + (gla::state_elems(gla::max_chunks(p), H, K, V) + 1) / 2
            : 0;
  Guarded<float> work(static_cast<size_t>(nwork), 0, NAN);

  gla::ChunkArgs args;
  gla::FwdGrid grid;
  auto run_all = [&](bool split, bool reverse) {
    emu::st().reverse = reverse;
    std::fill(o.data(), o.data() + nv, uint16_t{0});  // the bindings zero o
    ht.fill_poison();
    std::copy(h0_in.begin(), h0_in.end(), h0.data());
    std::memset(work.data(), 0xff, nwork * 4);
    p.workspace = split && nwork > 0 ? work.data() : nullptr;
    if (const char* err = gla::prepare(p, split && T > 0, &args, &grid)) {
      std::fprintf(stderr, "prepare refused: %s\n", err);
      std::exit(4);
    }
    if (grid.empty) return;
    harness::launch_chunk_forward(args, grid, K, bf16);
  };
  auto results = [&]() {
    std::vector<unsigned char> r;
    auto add = [&](const void* d, size_t bytes) {
      r.insert(r.end(), static_cast<const unsigned char*>(d),
               static_cast<const unsigned char*>(d) + bytes);
    };
    add(o.data(), nv * 2);
    if (!inplace) add(ht.data(), ns * 4);
    if (P > 0) add(h0.data(), nh0 * 4);
    return r;
  };

  const std::string mode = kv["mode"];
  run_all(mode == "split", false);
  const std::vector<unsigned char> first = results();
  bool runs_equal = true;
  if (mode == "both") {
    run_all(true, true);
    runs_equal = results() == first;
  }
  const bool guards = q.guards_intact() && k.guards_intact() && v.guards_intact() &&
                      g.guards_intact() && h0.guards_intact() && o.guards_intact() &&
                      ht.guards_intact() && idx.guards_intact() && work.guards_intact();
  {
    std::ofstream f(kv["out"], std::ios::binary);
    f.write(reinterpret_cast<const char*>(first.data()),
            static_cast<std::streamsize>(first.size()));
  }
  std::printf("guards=%d runs_equal=%d barriers=%ld DONE\n", guards ? 1 : 0, runs_equal ? 1 : 0,
              emu::st().barriers);
  return guards && runs_equal ? 0 : 1;
}
