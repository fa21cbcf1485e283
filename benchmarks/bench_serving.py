"""Continuous batching on the CPU: gla_ext.StatePool vs a per-stream loop (issue 11).

The default model (GLA.build(embed_dim=287), eval, float32, torch.no_grad()). S streams arrive
over the first ticks of the run with prompts of random length (10..200 tokens) and then decode
a random number of tokens (10..200). Each engine tick runs
  pool     one pool.prefill for the streams arriving at that tick (right-padded, lengths) and
           one pool.step for the streams already running; finished streams close their slot;
  loop     the same schedule the way a user does it today: model(prompt, state=...,
           return_state=True) per arriving stream, model.step(x_t, state) per running one.
Inputs are random embeddings (no sampling: decode inputs do not depend on outputs), fixed per
stream so both engines see the same tokens, and the outputs of the two are compared.

Reported per S: tokens/s (prompt + decoded tokens over the engine's wall time), p50/p99 tick
latency, and tokens/s as a fraction of the matmul roofline: 2 x parameters FLOPs per token
at the rate of the best of 10 torch.mm of a [512, 256] x [256, 1024] float32 product
(the shape of the pool's projections) on the same threads. Pool and loop runs alternate
(--repeats, default 2) and the best of each is reported; every run's tokens/s is in the notes
and the json, to show how noisy the machine was.

When S is larger than --loop-streams the loop runs only a random subset of the streams on the
same schedule (its calls are batch-1, so a stream's cost does not depend on the others), and
its tokens/s is that subset's; its tick latencies are the subset's, marked as such. "bound"
is roofline / loop tokens/s: the largest speedup over the loop any engine could reach.

Usage: python benchmarks/bench_serving.py [--quick] [--streams 16 64 256] [--threads N]
"""
from __future__ import annotations

import argparse
import os
import random
import statistics
import subprocess
import sys
import time

import torch

from common import pyplot, save_results, RESULTS_DIR
from gla_ext import GLA

OPTIONS = dict(embed_dim=287)
PROMPT = (10, 200)
DECODE = (10, 200)
MM_SHAPE = (512, 256, 1024)


class Workload:
    """Arrival tick, prompt [len, E] and decode inputs [n, E] of each of S streams."""

    def __init__(self, S: int, arrival_ticks: int, seed: int, embed_dim: int):
        rng = random.Random(seed)
        gen = torch.Generator().manual_seed(seed)
        self.arrival = sorted(rng.randrange(arrival_ticks) for _ in range(S))
        self.prompts = [torch.randn(rng.randint(*PROMPT), embed_dim, generator=gen)
                        for _ in range(S)]
        self.decodes = [torch.randn(rng.randint(*DECODE), embed_dim, generator=gen)
                        for _ in range(S)]
        self.tokens = sum(len(p) for p in self.prompts) + sum(len(d) for d in self.decodes)


def run_engine(workload: Workload, streams, tick_fn_prefill, tick_fn_step, finish):
    """Drives the schedule for `streams`; returns (seconds per tick with work, last outputs,
    wall seconds). tick_fn_prefill(ids) / tick_fn_step(ids, rows) do the work and return
    outputs per stream id; finish(id) frees a stream."""
    pending = sorted(streams, key=lambda i: workload.arrival[i])
    running = {}       # id -> next decode row
    last = {}
    tick_times = []
    tick = 0
    t_start = time.perf_counter()
    while pending or running:
        t0 = time.perf_counter()
        arrivals = []
        while pending and workload.arrival[pending[0]] <= tick:
            arrivals.append(pending.pop(0))
        stepping = list(running)
        if arrivals:
            last.update(tick_fn_prefill(arrivals))
        if stepping:
            rows = [running[i] for i in stepping]
            last.update(tick_fn_step(stepping, rows))
            for i in stepping:
                running[i] += 1
                if running[i] == len(workload.decodes[i]):
                    del running[i]
                    finish(i)
        for i in arrivals:
            running[i] = 0
        if arrivals or stepping:
            tick_times.append(time.perf_counter() - t0)
        tick += 1
    return tick_times, last, time.perf_counter() - t_start


def pool_engine(model, workload: Workload, streams):
    pool = model.state_pool(len(streams))
    slot_of = {}
    E = model.embed_dim

    def prefill(ids):
        for i in ids:
            slot_of[i] = pool.open()
        lengths = [len(workload.prompts[i]) for i in ids]
        x = torch.zeros(len(ids), max(lengths), E)
        for r, i in enumerate(ids):
            x[r, :lengths[r]] = workload.prompts[i]
        y = pool.prefill(x, torch.tensor([slot_of[i] for i in ids]),
                         lengths=torch.tensor(lengths))
        return dict(zip(ids, y))

    def step(ids, rows):
        x_t = torch.stack([workload.decodes[i][r] for i, r in zip(ids, rows)])
        y = pool.step(x_t, torch.tensor([slot_of[i] for i in ids]))
        return dict(zip(ids, y))

    def finish(i):
        pool.close(slot_of.pop(i))

    return run_engine(workload, streams, prefill, step, finish)


def loop_engine(model, workload: Workload, streams):
    states = {}

    def prefill(ids):
        out = {}
        for i in ids:
            y, states[i] = model(workload.prompts[i][None], state=model.init_state(1),
                                 return_state=True)
            out[i] = y[0]
        return out

    def step(ids, rows):
        out = {}
        for i, r in zip(ids, rows):
            y, states[i] = model.step(workload.decodes[i][r:r + 1], states[i])
            out[i] = y[0]
        return out

    def finish(i):
        del states[i]

    return run_engine(workload, streams, prefill, step, finish)


def matmul_rate() -> float:
    """FLOP/s of the best of 10 torch.mm of MM_SHAPE (float32)."""
    M, K, N = MM_SHAPE
    a, b = torch.randn(M, K), torch.randn(K, N)
    torch.mm(a, b)
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * M * K * N / best


def percentile(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def isa() -> str:
    try:
        flags = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return "unknown"
    found = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f" {f}" in flags]
    return " ".join(found) or "unknown"


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="S = 16, 64 with short arrival "
                        "window, one repeat, loop on 16 streams")
    parser.add_argument("--streams", type=int, nargs="+", default=None)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: "
                        "torch's)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="interleaved pool and loop runs per S (the best of each is kept)")
    parser.add_argument("--loop-streams", type=int, default=None,
                        help="largest number of streams the per-stream loop runs (default 64, "
                        "quick 16)")
    parser.add_argument("--arrival-ticks", type=int, default=64,
                        help="streams arrive uniformly over this many ticks")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    streams_list = args.streams or ([16, 64] if args.quick else [16, 64, 256])
    repeats = args.repeats or (1 if args.quick else 2)
    loop_cap = args.loop_streams or (16 if args.quick else 64)
    load_before = os.getloadavg()

    torch.manual_seed(args.seed)
    model = GLA.build(**OPTIONS).eval()
    params = sum(p.numel() for p in model.parameters())
    rate = matmul_rate()
    roofline = rate / (2 * params)
    print(f"{params} parameters, torch.mm {MM_SHAPE}: {rate / 1e9:.1f} GFLOP/s -> roofline "
          f"{roofline:.0f} tokens/s; {torch.get_num_threads()} threads", flush=True)

    rows, lines = [], []
    header = (f"{'S':>4} {'tokens':>7} | {'pool tok/s':>10} {'p50 ms':>7} {'p99 ms':>7} "
              f"{'roofline':>8} | {'loop tok/s':>10} {'p50 ms':>7} {'p99 ms':>7} | "
              f"{'speedup':>7} {'bound':>6} {'max rel err':>11}")
    lines += [header, "-" * len(header)]
    with torch.no_grad():
        # warm-up: packs the fused decode's weights, first-call allocations
        warm = Workload(4, 2, args.seed + 999, model.embed_dim)
        pool_engine(model, warm, list(range(4)))
        loop_engine(model, warm, list(range(4)))
        for S in streams_list:
            work = Workload(S, args.arrival_ticks, args.seed + S, model.embed_dim)
            subset = list(range(S)) if S <= loop_cap else sorted(
                random.Random(args.seed).sample(range(S), loop_cap))
            sub_tokens = sum(len(work.prompts[i]) + len(work.decodes[i]) for i in subset)
            # pool and loop runs interleaved, so that load from other processes hits both alike
            runs, loop_runs = [], []
            for r in range(repeats):
                print(f"S={S} ({work.tokens} tokens) run {r + 1}/{repeats}: pool engine, then "
                      f"the per-stream loop on {len(subset)} streams ...", file=sys.stderr,
                      flush=True)
                runs.append(pool_engine(model, work, list(range(S))))
                loop_runs.append(loop_engine(model, work, subset))
            tick_times, pool_last, wall = min(runs, key=lambda r: r[2])
            pool_tps = [work.tokens / r[2] for r in runs]
            loop_ticks, loop_last, loop_wall = min(loop_runs, key=lambda r: r[2])
            loop_tps = [sub_tokens / r[2] for r in loop_runs]
            err = max(((pool_last[i].double() - loop_last[i].double()).norm()
                       / loop_last[i].double().norm()).item() for i in subset)
            row = {"S": S, "tokens": work.tokens, "ticks": len(tick_times),
                   "pool_tokens_per_s": work.tokens / wall, "pool_tokens_per_s_runs": pool_tps,
                   "pool_p50_tick_ms": statistics.median(tick_times) * 1e3,
                   "pool_p99_tick_ms": percentile(tick_times, 0.99) * 1e3,
                   "roofline_fraction": work.tokens / wall / roofline,
                   "loop_streams": len(subset), "loop_tokens": sub_tokens,
                   "loop_tokens_per_s": sub_tokens / loop_wall, "loop_tokens_per_s_runs": loop_tps,
                   "loop_p50_tick_ms": statistics.median(loop_ticks) * 1e3,
                   "loop_p99_tick_ms": percentile(loop_ticks, 0.99) * 1e3,
                   "max_rel_err_last_output": err}
            row["speedup"] = row["pool_tokens_per_s"] / row["loop_tokens_per_s"]
            # the most any engine could gain over the loop: running at 100% of the roofline
            row["speedup_bound"] = roofline / row["loop_tokens_per_s"]
            rows.append(row)
            mark = "" if len(subset) == S else f" (loop: {len(subset)} of {S} streams)"
            line = (f"{S:4d} {work.tokens:7d} | {row['pool_tokens_per_s']:10.0f} "
                    f"{row['pool_p50_tick_ms']:7.1f} {row['pool_p99_tick_ms']:7.1f} "
                    f"{row['roofline_fraction']:7.1%} | {row['loop_tokens_per_s']:10.0f} "
                    f"{row['loop_p50_tick_ms']:7.1f} {row['loop_p99_tick_ms']:7.1f} | "
                    f"{row['speedup']:6.1f}x {row['speedup_bound']:5.1f}x {err:11.1e}{mark}")
            lines.append(line)
            print(line, flush=True)
    load_after = os.getloadavg()
    notes = [f"S={r['S']}: tokens/s of every run, pool " + " ".join(
        f"{t:.0f}" for t in r["pool_tokens_per_s_runs"]) + ", loop " + " ".join(
        f"{t:.0f}" for t in r["loop_tokens_per_s_runs"]) for r in rows]
    notes += [f"roofline: {params} parameters, 2 x parameters FLOPs per token, torch.mm "
             f"{MM_SHAPE} best of 10: {rate / 1e9:.1f} GFLOP/s = {roofline:.0f} tokens/s",
             f"load average (1 min) before / after: {load_before[0]:.2f} / {load_after[0]:.2f} "
             f"on {os.cpu_count()} CPUs (other processes share the machine)",
             "tick latency: wall time of one tick (prefill of the arrivals + one step of the "
             "running streams), ticks with work only",
             "bound: roofline tokens/s / loop tokens/s, the largest speedup over the loop that "
             "any engine could reach (at 100% of the roofline)",
             "max rel err: last output of each stream the loop ran, pool vs loop"]
    table = "\n".join(lines + [""] + notes)
    print("\n".join(notes))
    name = ("serving_cpu" + (f"_t{args.threads}" if args.threads else "")
            + ("_quick" if args.quick else ""))
    path = save_results(name, rows, table, {
        "model": OPTIONS, "parameters": params, "dtype": "float32",
        "mode": "eval, torch.no_grad()", "isa": isa(), "threads": torch.get_num_threads(),
        "prompt_tokens": PROMPT, "decode_tokens": DECODE, "arrival_ticks": args.arrival_ticks,
        "repeats": repeats, "matmul_shape": MM_SHAPE, "matmul_flops": rate,
        "roofline_tokens_per_s": roofline, "loadavg_before": load_before,
        "loadavg_after": load_after, "seed": args.seed})
    print(f"saved {path}")
    plot(rows, roofline, name)
    return 0


def plot(rows, roofline, name):
    plt = pyplot()
    if plt is None:
        return
    S = [str(r["S"]) for r in rows]
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    xs = range(len(rows))
    a.bar([x - 0.2 for x in xs], [r["pool_tokens_per_s"] for r in rows], 0.4, label="StatePool")
    a.bar([x + 0.2 for x in xs], [r["loop_tokens_per_s"] for r in rows], 0.4,
          label="per-stream loop")
    a.axhline(roofline, color="k", ls="--", lw=1, label="matmul roofline")
    a.axhline(0.3 * roofline, color="gray", ls=":", lw=1, label="30% of roofline")
    a.set_xticks(list(xs), S)
    a.set_xlabel("streams S")
    a.set_ylabel("tokens/s")
    a.set_yscale("log")
    a.legend(fontsize=8)
    a.set_title("continuous batching, default model, CPU")
    b.bar([x - 0.2 for x in xs], [r["pool_p50_tick_ms"] for r in rows], 0.4, label="p50")
    b.bar([x + 0.2 for x in xs], [r["pool_p99_tick_ms"] for r in rows], 0.4, label="p99")
    b.set_xticks(list(xs), S)
    b.set_xlabel("streams S")
    b.set_ylabel("StatePool tick latency (ms)")
    b.legend(fontsize=8)
    fig.tight_layout()
    out = os.path.join(RESULTS_DIR, f"{name}.png")
    fig.savefig(out, dpi=100)
    print(f"saved {out}")


if __name__ == "__main__":
    sys.exit(main())
