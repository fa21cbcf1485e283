"""CPU chunked GLA kernels: speed against the machine's float32 matmul rate, the pure-PyTorch
chunked reference and the fused recurrent kernel, for each instruction-set path.

    python benchmarks/bench_cpu_chunk.py [--B 1 --T 4096 --H 4 --K 64 --V 64 --chunk 64]
                                         [--isa avx512 avx2] [--threads 2] [--save]

FLOPs of the chunked forward are counted as 2*T*C*K + 2*T*C*V + 4*T*K*V per (sequence, head)
(C = 64: scores and score-times-values unmasked, plus the two state products).

Two matmul rates are measured: torch.mm as installed (MKL picks its widest code, AVX-512 on
an AVX-512 CPU) and torch.mm with MKL held to AVX2 (MKL_ENABLE_INSTRUCTIONS=AVX2, in a child
process, since MKL reads it once). On an AVX2-only CPU (e.g. AMD Zen 2/3) both are the same
thing; on an AVX-512 machine the second is the like-for-like bound of the AVX2 path.
--cpu-time (with --threads 1) times with the thread's CPU clock instead of the wall clock: on a
machine shared with other jobs it leaves out the time the thread waited for a core.
--save writes bench_cpu_chunk.json / .md (with --cpu-time: bench_cpu_chunk_cputime) under
benchmarks/results.
"""
import argparse
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

import gla_ext._C  # noqa: F401  (registers torch.ops.gla_ext)
from gla_ext._timing import best_seconds
from gla_ext.reference import chunk_gla_reference

MM_N = 2048
clock = time.perf_counter


def best_time(fn, reps=5, warmup=1):
    for _ in range(warmup):
        fn()
    return best_seconds(fn, reps, clock)


def interleaved_best(fns, reps):
    """Best time of each function, calling them in turn (so load changes hit all alike)."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(reps):
        for i, fn in enumerate(fns):
            t0 = clock()
            fn()
            best[i] = min(best[i], clock() - t0)
    return best


def mm_rate_child(mkl_isa, threads, reps=10):
    """Best-of-reps torch.mm float32 rate in a child process with MKL_ENABLE_INSTRUCTIONS."""
    c = "time.thread_time" if clock is time.thread_time else "time.perf_counter"
    code = (f"import torch,time\ntorch.set_num_threads({threads})\nn={MM_N}\n"
            "a,b=torch.randn(n,n),torch.randn(n,n)\ntorch.mm(a,b)\nbest=9.0\n"
            f"for _ in range({reps}):\n t={c}();torch.mm(a,b);"
            f"best=min(best,{c}()-t)\nprint(2*n**3/best)")
    env = dict(os.environ, MKL_ENABLE_INSTRUCTIONS=mkl_isa)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def plot(rows, path_png):
    """Forward rate of each ISA path as a fraction of torch.mm, as installed and held to AVX2."""
    from common import pyplot
    plt = pyplot()
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    xs = range(len(rows))
    ax.bar([x - 0.2 for x in xs], [100 * r["fraction_of_mm"] for r in rows], 0.4,
           label="of torch.mm (as installed)")
    ax.bar([x + 0.2 for x in xs], [100 * r["fraction_of_mm_avx2"] for r in rows], 0.4,
           label="of torch.mm, MKL held to AVX2")
    ax.set_xticks(list(xs), [r["isa"] for r in rows])
    ax.set_ylabel("chunk forward, % of the matmul rate")
    ax.set_ylim(0, 125)   # room for the legend above the bars
    ax.set_title("CPU chunk kernel per ISA path, float32")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path_png, dpi=110)
    print(f"saved {path_png}")


def main():
    ap = argparse.ArgumentParser()
    for name, default in [("B", 1), ("T", 4096), ("H", 4), ("K", 64), ("V", 64), ("chunk", 64)]:
        ap.add_argument(f"--{name}", type=int, default=default)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--isa", nargs="+", default=[os.environ.get("GLA_EXT_CPU_ISA", "auto")])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--no-reference", action="store_true")
    ap.add_argument("--save", action="store_true")
    ap.add_argument("--cpu-time", action="store_true", help="thread CPU clock (needs --threads 1)")
    a = ap.parse_args()
    global clock
    if a.cpu_time:
        if a.threads != 1:
            ap.error("--cpu-time needs --threads 1 (the work must run on the calling thread)")
        clock = time.thread_time
    torch.set_num_threads(a.threads)
    B, T, H, K, V, C = a.B, a.T, a.H, a.K, a.V, a.chunk
    q, k = torch.randn(B, T, H, K), torch.randn(B, T, H, K)
    v = torch.randn(B, T, H, V)
    g = F.logsigmoid(torch.randn(B, T, H, K)) / 16
    h0 = torch.randn(B, H, K, V)
    do, dht = torch.randn(B, T, H, V), torch.randn(B, H, K, V)
    scale = K ** -0.5
    ops = torch.ops.gla_ext
    flops = B * H * (2 * T * 64 * K + 2 * T * 64 * V + 4 * T * K * V)
    ma, mb = torch.randn(MM_N, MM_N), torch.randn(MM_N, MM_N)

    def with_isa(isa, fn):
        def call():
            if isa == "auto":
                os.environ.pop("GLA_EXT_CPU_ISA", None)
            else:
                os.environ["GLA_EXT_CPU_ISA"] = isa   # read by the kernel on every call
            fn()
        return call

    fns = [lambda: ma @ mb]
    for isa in a.isa:
        fns.append(with_isa(isa, lambda: ops.chunk_fwd(q, k, v, g, h0, None, scale, C)))
        fns.append(with_isa(isa, lambda: ops.chunk_bwd(q, k, v, g, do, dht, h0, None, scale, C)))
    mm_avx2_before = mm_rate_child("AVX2", a.threads)
    times = interleaved_best(fns, a.reps)
    mm_avx2 = max(mm_avx2_before, mm_rate_child("AVX2", a.threads))
    mm = 2 * MM_N ** 3 / times[0]
    lines = [f"threads {a.threads}  B={B} T={T} H={H} K={K} V={V} chunk={C}  "
             f"clock {'thread CPU time' if a.cpu_time else 'wall'}",
             f"torch.mm float32 ({MM_N}^3), as installed: {mm / 1e9:.1f} GFLOP/s; "
             f"MKL held to AVX2: {mm_avx2 / 1e9:.1f} GFLOP/s"]
    rows = []
    for i, isa in enumerate(a.isa):
        t_fwd, t_bwd = times[1 + 2 * i], times[2 + 2 * i]
        rate = flops / t_fwd
        rows.append({"isa": isa, "fwd_s": t_fwd, "bwd_s": t_bwd, "fwd_flops": rate,
                     "fraction_of_mm": rate / mm, "fraction_of_mm_avx2": rate / mm_avx2})
        lines.append(f"chunk_fwd [{isa:7}] {t_fwd * 1e3:8.2f} ms  {rate / 1e9:7.1f} GFLOP/s "
                     f"({100 * rate / mm:.0f}% of mm, {100 * rate / mm_avx2:.0f}% of AVX2 mm)  "
                     f"chunk_bwd {t_bwd * 1e3:8.2f} ms")
    os.environ.pop("GLA_EXT_CPU_ISA", None)
    t_fwd = times[1]
    t_rfwd = best_time(lambda: ops.recurrent_fwd(q, k, v, g, h0, None, scale, False), a.reps)
    lines.append(f"recurrent_fwd  {t_rfwd * 1e3:8.2f} ms  (chunk [{a.isa[0]}] is "
                 f"{t_rfwd / t_fwd:.1f}x faster)")
    # peers of the forward (issue 10 asks for these ratios): causal SDPA on the same q/k/v,
    # fla-core's naive_recurrent_gla (when importable); best of 3
    with torch.no_grad():
        qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
        t_sdpa = best_time(lambda: F.scaled_dot_product_attention(qt, kt, vt, is_causal=True), 3)
        peers = {"sdpa_causal": t_sdpa}
        try:
            from fla.ops.gla.naive import naive_recurrent_gla
            peers["fla_naive_recurrent_gla"] = best_time(
                lambda: naive_recurrent_gla(q, k, v, g, initial_state=h0), 3)
        except Exception as exc:  # noqa: BLE001 - say why the peer is missing
            lines.append(f"fla-core not importable ({type(exc).__name__}): no fla ratio")
    for name, t in peers.items():
        ratios = ", ".join(f"[{r['isa']}] {t / r['fwd_s']:.1f}x" for r in rows)
        lines.append(f"{name:24} {t * 1e3:8.2f} ms  (chunk fwd is {ratios} faster)")
        for r in rows:
            r[f"x_{name}"] = t / r["fwd_s"]
    if not a.no_reference:
        leaves = [x.clone() for x in (q, k, v, g, h0)]

        def ref_fwd():
            with torch.no_grad():
                chunk_gla_reference(*leaves[:4], scale=scale, initial_state=leaves[4],
                                    output_final_state=True, chunk_size=C)
        t_ref = best_time(ref_fwd, max(1, a.reps // 4))
        lines.append(f"reference fwd  {t_ref * 1e3:8.2f} ms  (chunk is {t_ref / t_fwd:.1f}x faster)")
    print("\n".join(lines))
    if a.save:
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        from common import save_results
        path = save_results("bench_cpu_chunk" + ("_cputime" if a.cpu_time else ""), rows, "\n".join(lines),
                            {"mm_flops": mm, "mm_flops_mkl_avx2": mm_avx2,
                             "shape": [B, T, H, K, V], "chunk": C, "threads": a.threads,
                             "flops_formula": "B*H*(2*T*64*K + 2*T*64*V + 4*T*K*V)",
                             "peers_s": peers,
                             "cpu_isa_auto": torch.backends.cpu.get_cpu_capability(),
                             "note": "the kernels pick their code by instruction set only "
                                     "(GLA_EXT_CPU_ISA forces one), never by CPU vendor"})
        print(f"saved {path}")
        plot(rows, path.replace(".json", ".png"))


if __name__ == "__main__":
    main()
