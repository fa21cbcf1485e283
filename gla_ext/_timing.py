"""Timing helpers shared by `python -m gla_ext bench`, the demo, the measured choices
(matmul16, quant_matmul) and benchmarks/: median or best of repeats."""
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
