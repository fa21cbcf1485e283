"""CPU benchmark (issue 3): gla_ext's C++ kernels vs the peers, in one run.

Compared, float32, median wall time:
  gla_ext chunk_gla (C++ chunked kernel) | reference chunked (gla_ext.reference) |
  naive Python-loop recurrence (gla_ext.reference) | fla-core's naive_recurrent_gla (when importable:
  PYTHONPATH holding fla-core 0.6.0 + einops) | SDPA is_causal on the same q/k/v |
  roofline = the chunked op's FLOP count / this machine's measured float32 matmul rate.
Also per-token decode latency of the default model at batch 1, C++ step vs reference step.
Writes bench_cpu.json / .md / .png under benchmarks/results (or --out).
Usage: python benchmarks/bench_cpu.py [--quick] [--out DIR]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from common import RESULTS_DIR, pyplot, save_results
from gla_ext import chunk_gla, fused_recurrent_gla
from gla_ext._timing import time_fn

CHUNK = 64   # chunk size the FLOP count assumes (the C++ kernel's default)
# Largest B*T at which each slow peer is timed: (forward, forward+backward).
SLOW_LIMITS = {"naive_loop": (4096, 1024), "fla_naive": (4096, 1024), "ref_chunk": (8192, 4096)}

try:
    from fla.ops.gla.naive import naive_recurrent_gla as fla_naive
    FLA_ERROR = None
except Exception as exc:  # noqa: BLE001 - report why the peer is missing
    fla_naive = None
    FLA_ERROR = f"{type(exc).__name__}: {exc}"


def matmul_rate() -> float:
    """float32 FLOP/s of a large torch.mm on this machine, measured now (best of 10 runs)."""
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(10):   # best of 10: the machine's peak, not a moment of contention
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best


def chunked_flops(B, T, H, D) -> float:
    """FLOPs of the chunked forward: scores + scores@V (full C x C tiles) + q@S + state update."""
    return B * H * (2 * T * CHUNK * D + 2 * T * CHUNK * D + 2 * T * D * D + 2 * T * D * D)


def inputs(B, T, H, D, grad=False):
    q, k, v = (torch.randn(B, T, H, D, requires_grad=grad) for _ in range(3))
    g = (F.logsigmoid(torch.randn(B, T, H, D)) / 16).requires_grad_(grad)
    return q, k, v, g


def run_case(fn, backward, reps):
    def call():
        out = fn()
        if backward:
            out.sum().backward()
    return time_fn(call, warmup=1, reps=reps)


def bench_ops(shapes, rate, rows, lines):
    impls = {
        "gla_ext": lambda q, k, v, g: chunk_gla(q, k, v, g, backend="cpu")[0],
        "ref_chunk": lambda q, k, v, g: chunk_gla(q, k, v, g, backend="reference")[0],
        "naive_loop": lambda q, k, v, g: fused_recurrent_gla(q, k, v, g, backend="reference")[0],
        "sdpa": lambda q, k, v, g: F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True),
    }
    if fla_naive is not None:
        impls["fla_naive"] = lambda q, k, v, g: fla_naive(q, k, v, g)[0]
    names = list(impls)
    header = (f"{'mode':7} {'B':>2} {'T':>5} {'D':>4} | " + " ".join(f"{n + ' ms':>13}" for n in names)
              + f" | {'%roof':>6} " + " ".join(f"{'x' + n:>11}" for n in names[1:]))
    lines += [header, "-" * len(header)]
    print(header, flush=True)
    for backward in (False, True):
        for B, T, H, D in shapes:
            times = {}
            for name, fn in impls.items():
                # the pure-PyTorch peers are too slow to time at every size (NaN = not run)
                limit = SLOW_LIMITS.get(name, (float("inf"), float("inf")))[int(backward)]
                too_slow = B * T > limit
                if too_slow:
                    times[name] = float("nan")
                    continue
                q, k, v, g = inputs(B, T, H, D, backward)
                reps = 5 if name in ("gla_ext", "sdpa") else 2
                times[name] = run_case(lambda: fn(q, k, v, g), backward, reps)
            mode = "fwd+bwd" if backward else "fwd"
            roof = (chunked_flops(B, T, H, D) / rate) / times["gla_ext"] if not backward else math.nan
            row = {"mode": mode, "B": B, "T": T, "H": H, "D": D, "roofline_fraction": roof,
                   **{f"{n}_s": t for n, t in times.items()}}
            rows.append(row)
            line = (f"{mode:7} {B:2d} {T:5d} {D:4d} | "
                    + " ".join(f"{times[n] * 1e3:13.2f}" for n in names)
                    + f" | {roof:6.1%} "
                    + " ".join(f"{times[n] / times['gla_ext']:10.1f}x" for n in names[1:]))
            lines.append(line)
            print(line, flush=True)


def bench_decode(rows, lines):
    """Per-token latency of model.step for the seed's default model at batch 1."""
    from gla_ext import GLA
    torch.manual_seed(0)
    results = {}
    for backend in ("cpu", "reference"):
        model = GLA.build(embed_dim=287, hidden_size=256, num_layers=6, num_heads=4,
                          backend=backend).eval()
        x = torch.randn(1, 287)
        with torch.no_grad():
            state = model.init_state(1)

            def step():
                nonlocal state
                _, state = model.step(x, state)
            results[backend] = time_fn(step, warmup=5, reps=50)
    line = (f"decode step, default model, batch 1: C++ {results['cpu'] * 1e3:.3f} ms, "
            f"reference {results['reference'] * 1e3:.3f} ms, "
            f"{results['reference'] / results['cpu']:.1f}x")
    rows.append({"mode": "decode", "B": 1, "cpu_step_s": results["cpu"],
                 "reference_step_s": results["reference"]})
    lines += ["", line]
    print("\n" + line, flush=True)


def plot(rows, path):
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        sel = [r for r in rows if r["mode"] == mode and r["B"] == 1 and r["D"] == 64]
        for key in [k for k in sel[0] if k.endswith("_s")] if sel else []:
            pts = [(r["T"], r[key]) for r in sel if not math.isnan(r[key])]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] * 1e3 for p in pts], marker="o", label=key[:-2])
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("T")
        ax.set_ylabel("ms (median)")
        ax.set_title(f"CPU float32 {mode}, B=1 H=4 K=V=64")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"saved {path}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="a few small shapes")
    parser.add_argument("--out", default=RESULTS_DIR)
    args = parser.parse_args()
    if FLA_ERROR:
        print(f"fla-core not importable ({FLA_ERROR}): no fla column")
    torch.manual_seed(0)
    rate = matmul_rate()
    print(f"float32 torch.mm rate: {rate / 1e9:.1f} GFLOP/s, {torch.get_num_threads()} threads, "
          f"GLA_EXT_CPU_ISA={os.environ.get('GLA_EXT_CPU_ISA', 'auto')}")
    if args.quick:
        shapes = [(1, 1024, 4, 64), (1, 4096, 4, 64)]
    else:
        shapes = [(B, T, 4, D) for D in (64, 128) for B in (1, 8) for T in (256, 1024, 4096)]
    rows, lines = [], [f"float32 torch.mm rate {rate / 1e9:.1f} GFLOP/s, "
                       f"GLA_EXT_CPU_ISA={os.environ.get('GLA_EXT_CPU_ISA', 'auto')}"]
    bench_ops(shapes, rate, rows, lines)
    bench_decode(rows, lines)
    # GLA_EXT_CPU_ISA=avx2 (e.g. on an AVX-512 machine) gets its own results file
    isa = os.environ.get("GLA_EXT_CPU_ISA", "")
    name = "bench_cpu" + ("_quick" if args.quick else "") + (f"_{isa}" if isa else "")
    path = save_results(name, rows, "\n".join(lines),
                        {"matmul_flops": rate, "fla": FLA_ERROR or "fla-core naive_recurrent_gla",
                         "chunk_flops_formula": "B*H*(4*T*C*D + 4*T*D*D), C=64",
                         "cpu_isa": isa or "auto (the CPU's best)"},
                        out_dir=args.out)
    print(f"saved {path}")
    plot(rows, path.replace(".json", ".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
