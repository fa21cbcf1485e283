// Launches the chunked forward of csrc/cuda/chunk_fwd.cu on the emulator the way its launcher
// does on a GPU: the fused kernel, or (split) the varlen offset scan, the state scan and the
// chunk kernel, with the instantiation for K (64 or 128) and the dtype. Shared by the forward
// harnesses (chunk_fwd_emu.cpp, chunk_pool_emu.cpp) so a kernel signature change is made once.
// Include after cuda/chunk_fwd.cu.
#pragma once

#include <functional>

namespace harness {

// mma instructions the state scan ran (all launches so far): chunk_fwd_emu prints it.
inline long scan_mmas = 0;

inline void run_grid(unsigned gx, unsigned gy, unsigned gz, int threads,
                     const std::function<void()>& body) {
  for (unsigned bz = 0; bz < gz; ++bz)
    for (unsigned by = 0; by < gy; ++by)
      for (unsigned bx = 0; bx < gx; ++bx) emu::run_block({bx, by, bz}, threads, body);
}

template <typename T, int KT>
void launch_chunk_forward_t(const gla::ChunkArgs& args, const gla::FwdGrid& grid) {
  if (!grid.split) {
    run_grid(grid.fused_x, grid.fused_y, 1, gla::kThreads,
             [&] { gla::gla_chunk_fwd_kernel<T, KT, false>(args); });
    return;
  }
  if (args.chunk_offsets != nullptr)
    run_grid(1, 1, 1, gla::kOffsetThreads, [&] { gla::gla_chunk_offsets_kernel(args); });
  const bool vec = gla::scan_vec(args);
  const long mmas_before = emu::st().mmas;
  run_grid(grid.scan_x, grid.scan_y, grid.scan_z, gla::kScanThreads, [&] {
    (vec ? gla::gla_chunk_state_scan_kernel<T, false, true>
         : gla::gla_chunk_state_scan_kernel<T, false, false>)(args);
  });
  scan_mmas += emu::st().mmas - mmas_before;
  run_grid(grid.chunk_x, grid.chunk_y, grid.chunk_z, gla::kThreads,
           [&] { gla::gla_chunk_fwd_kernel<T, KT, true>(args); });
}

inline void launch_chunk_forward(const gla::ChunkArgs& args, const gla::FwdGrid& grid,
                                 int64_t K, bool bf16) {
  if (K <= 64) {
    if (bf16) launch_chunk_forward_t<__nv_bfloat16, 64>(args, grid);
    else launch_chunk_forward_t<__half, 64>(args, grid);
  } else {
    if (bf16) launch_chunk_forward_t<__nv_bfloat16, 128>(args, grid);
    else launch_chunk_forward_t<__half, 128>(args, grid);
  }
}

}  // namespace harness
