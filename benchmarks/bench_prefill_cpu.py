"""Short-window prefill on the CPU (issue 10): `model(x)` for one window of the default model
(embed_dim=287, T = window_size = 60), fused C++ prefill (gla_ext.prefill) vs the generic
PyTorch forward, against the float32 matmul roofline, in one run.

    roofline time = 2 * params FLOPs per token * B * T / (best-of-10 torch.mm 2048^3 rate)

Timings are the best of interleaved repeats (the fused path, the generic path and torch.mm
in turn, so load from other processes hits them alike); the mm rate is re-measured inside
each batch's loop. Writes bench_prefill_cpu.json / .md (+ .png) under benchmarks/results.
measure_prefill() is importable (benchmarks/bench_decode_cpu.py can add these rows).

    python benchmarks/bench_prefill_cpu.py [--batches 1 8] [--reps 20] [--isa auto avx2]
                                           [--threads N] [--cpu-time]

--cpu-time (with --threads 1) times with the thread's CPU clock instead of the wall clock: on
a machine shared with other jobs it leaves out the time the thread waited for a core; the
results then go to bench_prefill_cpu_cputime.*.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from common import RESULTS_DIR, pyplot, save_results
from gla_ext import GLA
from gla_ext import engine_choice as choice
from gla_ext import prefill as pf


_clock = time.perf_counter


def _timed(fn) -> float:
    t0 = _clock()
    fn()
    return _clock() - t0


def mm_rate_mkl_avx2(threads: int) -> float:
    """torch.mm float32 rate (best of 10) with MKL held to AVX2, in a child process (MKL reads
    MKL_ENABLE_INSTRUCTIONS once): the like-for-like bound of the AVX2 path on an AVX-512 CPU."""
    import subprocess
    c = "time.thread_time" if _clock is time.thread_time else "time.perf_counter"
    code = (f"import torch,time\ntorch.set_num_threads({threads})\nn=2048\n"
            "a,b=torch.randn(n,n),torch.randn(n,n)\ntorch.mm(a,b)\nbest=9.0\n"
            f"for _ in range(10):\n t={c}();torch.mm(a,b);best=min(best,{c}()-t)\n"
            "print(2*n**3/best)")
    env = dict(os.environ, MKL_ENABLE_INSTRUCTIONS="AVX2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def measure_prefill(batches=(1, 8), reps=20, T=None, model=None) -> list[dict]:
    """Rows {B, T, fused_s, generic_s, mm_flops, roofline_s, roofline_fraction, speedup}
    for the default model (or `model`), eval mode, under torch.no_grad()."""
    torch.manual_seed(0)
    model = (model or GLA.build(embed_dim=287)).eval()
    T = T or model.window_size
    params = sum(p.numel() for p in model.parameters())
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    rows = []
    for B in batches:
        x = torch.randn(B, T, model.embed_dim)
        with torch.no_grad():
            def fused():     # the fused engine forced (no per-shape choice)
                saved, choice.MODE = choice.MODE, "fused"
                try:
                    model(x)
                finally:
                    choice.MODE = saved

            def generic():   # the PyTorch layers only
                model.forward_layers(x)
            fns = [fused, generic, lambda: torch.mm(a, b)]
            for fn in fns:
                fn()
            best = [float("inf")] * 3
            for i in range(max(reps, 10)):
                for j, fn in enumerate(fns):
                    if j == 1 and i >= max(3, reps // 4):
                        continue   # the generic path is slow and only the comparison
                    best[j] = min(best[j], _timed(fn))
            assert pf.is_cached(model), "the fused prefill did not run"
        mm = 2 * n ** 3 / best[2]
        roof = 2 * params * B * T / mm
        rows.append({"B": B, "T": T, "params": params, "fused_s": best[0], "generic_s": best[1],
                     "mm_flops": mm, "roofline_s": roof, "roofline_fraction": roof / best[0],
                     "speedup_vs_generic": best[1] / best[0]})
    return rows


def plot(rows, path_png):
    """Fused vs generic ms per window by batch, one line pair per ISA (also from saved JSON)."""
    plt = pyplot()
    if plt is None:
        return
    isas = list(dict.fromkeys(r["isa"] for r in rows))
    fig, ax = plt.subplots(figsize=(6, 4))
    for isa in isas:
        sel = [r for r in rows if r["isa"] == isa]
        ax.plot([r["B"] for r in sel], [r["fused_s"] * 1e3 for r in sel], marker="o",
                label=f"fused ({isa})")
        ax.plot([r["B"] for r in sel], [r["generic_s"] * 1e3 for r in sel], marker="x",
                linestyle=":", label=f"generic ({isa})")
    sel = [r for r in rows if r["isa"] == isas[0]]
    ax.plot([r["B"] for r in sel], [r["roofline_s"] * 1e3 for r in sel], linestyle="--",
            color="k", label="matmul roofline")
    ax.set_xlabel("batch")
    ax.set_ylabel("ms per window (best)")
    ax.set_yscale("log")
    ax.set_title("CPU prefill, default model, T=60")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path_png, dpi=110)
    print(f"saved {path_png}")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--isa", nargs="+", default=["auto", "avx2"],
                    help="GLA_EXT_CPU_ISA values to run (auto = the CPU's best)")
    ap.add_argument("--out", default=RESULTS_DIR)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--cpu-time", action="store_true", help="thread CPU clock (needs --threads 1)")
    args = ap.parse_args()
    global _clock
    torch.set_num_threads(args.threads)
    if args.cpu_time:
        if args.threads != 1:
            ap.error("--cpu-time needs --threads 1 (the work must run on the calling thread)")
        _clock = time.thread_time
    lines = [f"threads {args.threads}, clock {'thread CPU time' if args.cpu_time else 'wall'}"]
    rows = []
    mm_avx2 = mm_rate_mkl_avx2(args.threads)
    lines.append(f"torch.mm with MKL held to AVX2: {mm_avx2 / 1e9:.0f} GFLOP/s (%roof2 = fused vs "
                 "the roofline at that rate, the bound of the avx2 path)")
    header = (f"{'isa':7} {'B':>2} {'T':>3} | {'fused ms':>9} {'generic ms':>10} {'speedup':>7} | "
              f"{'mm GF/s':>7} {'roof ms':>7} {'%roof':>6} {'%roof2':>6}")
    print("\n".join(lines + [header]))
    lines += [header, "-" * len(header)]
    for isa in args.isa:
        if isa == "auto":
            os.environ.pop("GLA_EXT_CPU_ISA", None)
        else:
            os.environ["GLA_EXT_CPU_ISA"] = isa
        for r in measure_prefill(args.batches, args.reps):
            r["isa"] = isa
            r["mm_flops_mkl_avx2"] = mm_avx2
            r["roofline_fraction_mkl_avx2"] = 2 * r["params"] * r["B"] * r["T"] / mm_avx2 / r["fused_s"]
            rows.append(r)
            line = (f"{isa:7} {r['B']:2d} {r['T']:3d} | {r['fused_s'] * 1e3:9.2f} "
                    f"{r['generic_s'] * 1e3:10.2f} {r['speedup_vs_generic']:6.1f}x | "
                    f"{r['mm_flops'] / 1e9:7.0f} {r['roofline_s'] * 1e3:7.2f} "
                    f"{r['roofline_fraction']:6.1%} {r['roofline_fraction_mkl_avx2']:6.1%}")
            print(line, flush=True)
            lines.append(line)
    os.environ.pop("GLA_EXT_CPU_ISA", None)
    note = ("fused = gla_ext.prefill (one C++ call, own packed GEMMs, no vendor BLAS, no "
            "vendor-specific code path); generic = GLA.forward with the fused path off; "
            "roofline = 2*params*B*T / torch.mm float32 rate (MKL, best of the interleaved runs)")
    lines += ["", note]
    path = save_results("bench_prefill_cpu" + ("_cputime" if args.cpu_time else ""), rows, "\n".join(lines),
                        {"note": note, "cpu_isa_auto": torch.backends.cpu.get_cpu_capability(),
                         "threads": args.threads, "cpu_time": args.cpu_time},
                        out_dir=args.out)
    print(f"saved {path}")
    plot(rows, path.replace(".json", ".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
