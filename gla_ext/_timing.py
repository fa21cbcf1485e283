"""Timing helpers shared by `python -m gla_ext bench`, the demo, the measured choices
(matmul16, quant_matmul, engine_choice) and benchmarks/: median or best of repeats, the
shape classes of a measured choice, and "is this route clearly faster"."""
from __future__ import annotations

import statistics
import time

import torch


def time_fn(fn, device: str = "cpu", warmup: int = 2, reps: int = 5, min_time: float = 0.0) -> float:
    """Median seconds per call of fn(), after warm-up; CUDA work is timed with events."""
    for _ in range(warmup):
        fn()
    times = []
    started = time.perf_counter()
    while len(times) < reps or (time.perf_counter() - started) < min_time:
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        if len(times) >= 1000:
            break
    return statistics.median(times)


def best_seconds(fn, repeats: int, clock=time.perf_counter) -> float:
    """Min over repeats of fn()'s seconds by `clock` (no warm-up: callers warm up first)."""
    best = float("inf")
    for _ in range(repeats):
        t0 = clock()
        fn()
        best = min(best, clock() - t0)
    return best


def shape_bucket(n: int, cap: int | None = None) -> int:
    """n rounded up to a power of 2 (at least 1), capped at `cap`: one measured choice serves
    every shape of its class."""
    b = 1 << max(0, int(n) - 1).bit_length()
    return b if cap is None else min(b, cap)


def clearly_faster(candidate, baseline, speedup: float) -> bool:
    """Whether candidate() beats baseline() by `speedup` (best of repeats, after one warm-up
    call each). The candidate gets one run first; more only when that one is not far behind
    (a 16-bit GEMM without hardware support runs 50x behind: no need to time it thrice).
    Times are this thread's CPU time on one torch thread (time descheduled on a shared
    machine does not count), else wall time."""
    clock = time.thread_time if torch.get_num_threads() == 1 else time.perf_counter
    candidate(), baseline()
    t_base = best_seconds(baseline, 3, clock)
    t_cand = best_seconds(candidate, 1, clock)
    if t_cand < 3 * t_base:
        t_cand = min(t_cand, best_seconds(candidate, 3, clock))
    return t_cand * speedup < t_base
