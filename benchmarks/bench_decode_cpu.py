"""Per-token CPU decode of the seed's default model against its physical bound (issues 3, 10).

In one run, under torch.no_grad() in eval mode, state fed back every step:
  read bound   time to read the model's weight bytes once (torch.sum over a buffer of that
               many bytes; float32 and bfloat16 sizes), best of one thread and all threads
  fused        GLA.step on the fused C++ step (gla_ext.decode, own SIMD kernels), float32 and
               bfloat16 weights (model.to(torch.bfloat16)), batch 1 / 8 / 32: the threading
               policy's pick, and one thread / all threads forced (thread_limit)
  generic      the same model with the fast path off (per-layer PyTorch + C++ recurrence)
  compiled     torch.compile of the generic step (what a user would otherwise do)
Variants are timed in interleaved rounds (load from other processes hits them alike); the
table shows the median per token, wall time and the timing thread's CPU time; with
--threads 1 the ratios use CPU time (not counting time spent descheduled by other processes). Ratios: fused vs read bound, bf16 vs fp32, batch 8 vs 1,
compiled / generic vs fused. GLA_EXT_CPU_ISA=avx2|generic forces the kernels' ISA (the file
name then says so). Adding a section: write a function (rows, lines, args) and list it in
SECTIONS.
Usage: python benchmarks/bench_decode_cpu.py [--quick] [--no-compile] [--tokens N] [--rounds N]
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch

from common import pyplot, save_results
from gla_ext import GLA
from gla_ext import decode as dec
from gla_ext import engine_choice as choice

OPTIONS = dict(embed_dim=287, hidden_size=256, num_layers=6, num_heads=4)
BATCHES = (1, 8, 32)
NOTE = ("The decode kernels are gla_ext's own (csrc/cpu/linear_impl.h, engine/step_impl.h): "
        "the same AVX-512 / AVX2+FMA / generic code on Intel and AMD CPUs, picked from the "
        "CPU's feature flags only, no vendor BLAS and no vendor-specific path.")


class Clock:
    """Wall time and this thread's CPU time (time.thread_time: not counting the time the
    thread waits descheduled, the robust figure on a shared machine for one-thread runs)."""

    def __enter__(self):
        self.wall, self.cpu = time.perf_counter(), time.thread_time()
        return self

    def __exit__(self, *exc):
        self.wall, self.cpu = time.perf_counter() - self.wall, time.thread_time() - self.cpu


def run_rounds(variants, rounds, tokens):
    """variants: name -> callable(tokens) returning [(wall s, cpu s)] per step. Interleaved
    rounds; returns name -> (median wall ms, median cpu ms)."""
    times = {name: [] for name in variants}
    for name, fn in variants.items():       # warm-up (packing, threading probe, compile)
        fn(12)
    for _ in range(rounds):
        for name, fn in variants.items():
            times[name] += fn(tokens)
    return {name: (statistics.median(w for w, _ in t) * 1e3, statistics.median(c for _, c in t) * 1e3)
            for name, t in times.items()}


def step_timer(model, batch, fused=True, step=None):
    """callable(tokens) -> seconds per step of model.step (or `step`) with the state fed back."""
    x = [torch.randn(batch, 1, OPTIONS["embed_dim"]).to(model.norm.weight.dtype)
         for _ in range(4)]

    def run(tokens):
        # explicit paths: the fused engine forced, or the PyTorch layers only
        saved, choice.MODE = choice.MODE, "fused" if fused else "pytorch"
        try:
            state, out = model.init_state(batch), []
            for i in range(tokens):
                with Clock() as c:
                    if step is None:
                        _, state = model.step(x[i % 4], state)
                    else:
                        _, state = step(x[i % 4], state)
                out.append((c.wall, c.cpu))
            return out
        finally:
            choice.MODE = saved
    return run


def read_timer(nbytes, threads):
    buf = torch.randn(nbytes // 4)

    def run(tokens):
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            out = []
            for _ in range(tokens):
                with Clock() as c:
                    buf.sum()
                out.append((c.wall, c.cpu))
            return out
        finally:
            torch.set_num_threads(saved)
    return run


def limited(model, limit, timer):
    """timer with the model's decoder forced to at most `limit` threads (0 = policy)."""
    decoder = dec.decoder(model)

    def run(tokens):
        decoder.thread_limit = limit
        try:
            return timer(tokens)
        finally:
            decoder.thread_limit = 0
    return run


def bench_steps(rows, lines, args):
    torch.manual_seed(0)
    m32 = GLA.build(**OPTIONS).eval()
    m16 = copy.deepcopy(m32).to(torch.bfloat16)
    fp32_bytes = sum(p.numel() * 4 for p in m32.parameters())
    bf16_bytes = fp32_bytes // 2
    threads = torch.get_num_threads()
    d32, d16 = dec.decoder(m32), dec.decoder(m16)
    rounds, tokens = args.rounds, args.tokens

    variants = {("read", "fp32", 0, t): read_timer(fp32_bytes, t) for t in sorted({1, threads})}
    variants.update({("read", "bf16", 0, t): read_timer(bf16_bytes, t)
                     for t in sorted({1, threads})})
    for B in BATCHES:
        for name, m in (("fp32", m32), ("bf16", m16)):
            variants[("fused", name, B, 0)] = step_timer(m, B)
            if threads > 1:
                for t in (1, threads):
                    variants[("fused", name, B, t)] = limited(m, t, step_timer(m, B))
        variants[("generic", "fp32", B, 0)] = step_timer(m32, B, fused=False)
    if not args.no_compile:
        def generic(x, state):
            return m32.forward_layers(x, state=state, return_state=True)
        compiled = torch.compile(generic, dynamic=False)
        for B in BATCHES[:2]:
            variants[("compiled", "fp32", B, 0)] = step_timer(m32, B, fused=False, step=compiled)

    with torch.no_grad():
        med = run_rounds(variants, rounds, tokens)
        picked = {(name, B): d.threads_for(B) for name, d in (("fp32", d32), ("bf16", d16))
                  for B in BATCHES}

    one_thread = threads == 1
    # Figures the ratios use: CPU time when everything ran on one thread (robust against other
    # processes), else wall time.
    fig = {k: (v[1] if one_thread else v[0]) for k, v in med.items()}
    bound = {dt: min(v for k, v in fig.items() if k[0] == "read" and k[1] == dt)
             for dt in ("fp32", "bf16")}
    header = (f"{'variant':9} {'dtype':5} {'batch':>5} {'threads':>9} | {'wall ms':>8} "
              f"{'cpu ms':>7} | {'x fp32 bound':>12} {'x own bound':>11}")
    lines += [f"ratios from {'CPU' if one_thread else 'wall'} time (torch threads: {threads})",
              header, "-" * len(header)]
    for (kind, dt, B, t), (wall, cpu) in med.items():
        ms = fig[(kind, dt, B, t)]
        shown_t = t if t else (picked.get((dt, B), "auto") if kind == "fused" else "torch")
        if kind == "fused" and t == 0:
            shown_t = f"policy:{shown_t}"
        row = {"variant": kind, "dtype": dt, "batch": B, "threads": shown_t, "wall_ms": wall,
               "cpu_ms": cpu, "ms": ms, "over_fp32_read_bound": ms / bound["fp32"],
               "over_own_read_bound": ms / bound[dt]}
        rows.append(row)
        lines.append(f"{kind:9} {dt:5} {B:5d} {str(shown_t):>9} | {wall:8.3f} {cpu:7.3f} | "
                     f"{row['over_fp32_read_bound']:11.2f}x {row['over_own_read_bound']:10.2f}x")

    def f(dt, B, kind="fused"):
        return fig[(kind, dt, B, 0)]
    ratios = {
        "fp32_b1_over_fp32_read_bound": f("fp32", 1) / bound["fp32"],
        "bf16_b1_over_fp32_b1": f("bf16", 1) / f("fp32", 1),
        "fp32_b8_over_b1": f("fp32", 8) / f("fp32", 1),
        "bf16_b8_over_b1": f("bf16", 8) / f("bf16", 1),
        "generic_b1_over_fused_b1": f("fp32", 1, "generic") / f("fp32", 1),
        "generic_b8_over_fused_b8": f("fp32", 8, "generic") / f("fp32", 8),
    }
    if not args.no_compile:
        ratios["compiled_b1_over_fused_b1"] = f("fp32", 1, "compiled") / f("fp32", 1)
        ratios["compiled_b8_over_fused_b8"] = f("fp32", 8, "compiled") / f("fp32", 8)
    targets = {"fp32_b1_over_fp32_read_bound": ("<=", 1.5), "bf16_b1_over_fp32_b1": ("<=", 0.6),
               "fp32_b8_over_b1": ("<=", 1.5), "compiled_b1_over_fused_b1": (">=", 3.0)}
    lines.append("")
    lines.append(f"read bound: fp32 {fp32_bytes / 1e6:.1f} MB {bound['fp32']:.3f} ms, "
                 f"bf16 {bf16_bytes / 1e6:.1f} MB {bound['bf16']:.3f} ms; "
                 f"packed weights streamed per step: fp32 {d32.weight_bytes / 1e6:.1f} MB, "
                 f"bf16 {d16.weight_bytes / 1e6:.1f} MB; kernels: {d32.isa}")
    for key, value in ratios.items():
        goal = targets.get(key)
        met = "" if goal is None else (
            f"  (target {goal[0]} {goal[1]}: "
            f"{'met' if (value <= goal[1] if goal[0] == '<=' else value >= goal[1]) else 'NOT met'})")
        lines.append(f"{key:32} {value:6.2f}{met}")
    rows.append({"variant": "ratios", "from": "cpu" if one_thread else "wall", **ratios})
    args.meta.update(isa=d32.isa, fp32_weight_bytes=fp32_bytes, bf16_weight_bytes=bf16_bytes,
                     packed_weight_bytes={"fp32": d32.weight_bytes, "bf16": d16.weight_bytes},
                     threads_picked={f"{k[0]}_b{k[1]}": v for k, v in picked.items()})
    args.plot_rows = [r for r in rows if r["variant"] != "ratios"]


# One function per section, (rows, lines, args); add the window-prefill rows here.
SECTIONS = [bench_steps]


def plot(path_png, rows):
    plt = pyplot()
    if plt is None:
        return
    labels = [f"{r['variant']} {r['dtype']} b{r['batch']} t{r['threads']}" for r in rows]
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(rows) + 1.5))
    ax.barh(range(len(rows)), [r["ms"] for r in rows],
            color=["tab:gray" if r["variant"] == "read" else "tab:blue" if r["variant"] == "fused"
                   else "tab:orange" for r in rows])
    ax.set_yticks(range(len(rows)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("ms per token (median), log scale")
    ax.set_title("GLA decode step, default model (4.8M params), CPU")
    fig.tight_layout()
    fig.savefig(path_png, dpi=120)
    print(f"saved {path_png}")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=20, help="steps per variant and round")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads for the whole run (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.rounds = args.rounds or (2 if args.quick else 8)
    args.meta = {"model": OPTIONS, "mode": "eval, torch.no_grad()", "rounds": args.rounds,
                 "tokens_per_round": args.tokens, "note": NOTE,
                 "GLA_EXT_CPU_ISA": os.environ.get("GLA_EXT_CPU_ISA", "")}
    rows, lines = [], []
    for section in SECTIONS:
        section(rows, lines, args)
    table = "\n".join(lines)
    print(table)
    forced = os.environ.get("GLA_EXT_CPU_ISA", "")
    threads = torch.get_num_threads()
    name = ("decode_cpu" + (f"_{forced}" if forced else "") + (f"_t{threads}" if threads > 1 else "")
            + ("_quick" if args.quick else ""))
    path = save_results(name, rows, table + "\n\n" + NOTE, args.meta)
    print(f"saved {path}")
    plot(path[:-5] + ".png", getattr(args, "plot_rows", []))
    return 0


if __name__ == "__main__":
    sys.exit(main())
