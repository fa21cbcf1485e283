"""CPU chunked GLA kernels: speed against the machine's float32 matmul rate, the pure-PyTorch
chunked reference and the fused recurrent kernel.

    python benchmarks/bench_cpu_chunk.py [--B 1 --T 4096 --H 4 --K 64 --V 64 --chunk 64]

FLOPs of the chunked forward are counted as 2*T*C*K + 2*T*C*V + 4*T*K*V per (sequence, head)
(C = 64: scores and score-times-values unmasked, plus the two state products).
"""
import argparse
import os
import time

import torch
import torch.nn.functional as F

import gla_ext._C  # noqa: F401  (registers torch.ops.gla_ext)
from gla_ext.reference import chunk_gla_reference


def best_time(fn, reps=5, warmup=1):
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def interleaved_best(fns, reps):
    """Best time of each function, calling them in turn (so load changes hit all alike)."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
    return best


def main():
    ap = argparse.ArgumentParser()
    for name, default in [("B", 1), ("T", 4096), ("H", 4), ("K", 64), ("V", 64), ("chunk", 64)]:
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--no-reference", action="store_true")
    a = ap.parse_args()
    B, T, H, K, V, C = a.B, a.T, a.H, a.K, a.V, a.chunk
    q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K)
    v = torch.randn(B, T, H, V)
    g = F.logsigmoid(torch.randn(B, T, H, K)) / 16
    h0 = torch.randn(B, H, K, V)
    do, dht = torch.randn(B, T, H, V), torch.randn(B, H, K, V)
    scale = K ** -0.5
    ops = torch.ops.gla_ext
    flops = B * H * (2 * T * 64 * K + 2 * T * 64 * V + 4 * T * K * V)

    n = 2048
    ma, mb = torch.randn(n, n), torch.randn(n, n)
    t_mm, t_fwd, t_bwd = interleaved_best([
        lambda: ma @ mb,
        lambda: ops.chunk_fwd(q, k, v, g, h0, None, scale, C),
        lambda: ops.chunk_bwd(q, k, v, g, do, dht, h0, None, scale, C)], a.reps)
    mm = 2 * n ** 3 / t_mm / 1e9
    t_rfwd = best_time(lambda: ops.recurrent_fwd(q, k, v, g, h0, None, scale, False), a.reps)
    t_rbwd = best_time(lambda: ops.recurrent_bwd(q, k, v, g, do, dht, h0, None, scale, False),
                       a.reps)
    print(f"threads {torch.get_num_threads()}  isa {os.environ.get('GLA_EXT_CPU_ISA', 'auto')}  "
          f"B={B} T={T} H={H} K={K} V={V} chunk={C}")
    print(f"torch.mm float32 (2048^3): {mm:.1f} GFLOP/s")
    print(f"chunk_fwd      {t_fwd * 1e3:8.2f} ms  {flops / t_fwd / 1e9:7.1f} GFLOP/s "
          f"({100 * flops / t_fwd / 1e9 / mm:.0f}% of mm)")
    print(f"chunk_bwd      {t_bwd * 1e3:8.2f} ms")
    print(f"chunk fwd+bwd  {(t_fwd + t_bwd) * 1e3:8.2f} ms")
    print(f"recurrent_fwd  {t_rfwd * 1e3:8.2f} ms  (chunk is {t_rfwd / t_fwd:.1f}x faster)")
    print(f"recurrent fwd+bwd {(t_rfwd + t_rbwd) * 1e3:8.2f} ms  "
          f"(chunk is {(t_rfwd + t_rbwd) / (t_fwd + t_bwd):.1f}x faster)")
    if not a.no_reference:
        leaves = [x.clone().requires_grad_() for x in (q, k, v, g, h0)]

        def ref_fwd():
            with torch.no_grad():
                chunk_gla_reference(*leaves[:4], scale=scale, initial_state=leaves[4],
                                    output_final_state=True, chunk_size=C)

        def ref_fwd_bwd():
            o, ht = chunk_gla_reference(*leaves[:4], scale=scale, initial_state=leaves[4],
                                        output_final_state=True, chunk_size=C)
            torch.autograd.backward([o, ht], [do, dht])

        t_ref = best_time(ref_fwd, max(1, a.reps // 2))
        t_ref_all = best_time(ref_fwd_bwd, max(1, a.reps // 2))
        print(f"reference fwd  {t_ref * 1e3:8.2f} ms  (chunk is {t_ref / t_fwd:.1f}x faster)")
        print(f"reference fwd+bwd {t_ref_all * 1e3:8.2f} ms  "
              f"(chunk is {t_ref_all / (t_fwd + t_bwd):.1f}x faster)")


if __name__ == "__main__":
    main()
