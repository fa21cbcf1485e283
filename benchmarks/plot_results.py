"""Draws the PNG of every committed result that has a plot, from its JSON alone (no re-run).

    python benchmarks/plot_results.py [NAME ...]     # default: every results/*.json

Each benchmark script owns its plot function (called after a run, and here on the saved rows);
this file only maps a result file to that function. Results with nothing to plot (static SASS
counts, GPU model estimates, a single-row run) are listed as skipped.
"""
from __future__ import annotations

import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import RESULTS_DIR  # noqa: E402


def _plot_cpu(data, png):
    import bench_cpu
    bench_cpu.plot(data["rows"], png)


def _plot_cpu_chunk(data, png):
    import bench_cpu_chunk
    bench_cpu_chunk.plot(data["rows"], png)


def _plot_prefill(data, png):
    import bench_prefill_cpu
    bench_prefill_cpu.plot(data["rows"], png)


def _plot_decode(data, png):
    import bench_decode_cpu
    bench_decode_cpu.plot(png, [r for r in data["rows"] if r["variant"] != "ratios"])


def _plot_lm(data, png):
    import bench_lm
    bench_lm.plot(data["rows"], data["matmul_flops_fp32"], png)


def _plot_serving(data, png):
    import bench_serving
    bench_serving.plot(data["rows"], data["roofline_tokens_per_s"],
                       os.path.basename(png)[:-len(".png")])


def _plot_cp(data, png):
    import bench_cp
    bench_cp.plot(data["rows"], png)


# result-file name prefix -> plotter; the longest matching prefix wins
PLOTTERS = {"bench_cpu_chunk": _plot_cpu_chunk, "bench_cpu": _plot_cpu,
            "bench_prefill_cpu": _plot_prefill, "decode_cpu": _plot_decode,
            "bench_lm": _plot_lm, "serving_cpu": _plot_serving, "cp_gloo": _plot_cp}


def plotter_for(name: str):
    matches = [p for p in PLOTTERS if name.startswith(p)]
    return PLOTTERS[max(matches, key=len)] if matches else None


def main(argv: list[str]) -> int:
    paths = ([os.path.join(RESULTS_DIR, n if n.endswith(".json") else n + ".json") for n in argv]
             or sorted(glob.glob(os.path.join(RESULTS_DIR, "*.json"))))
    for path in paths:
        name = os.path.basename(path)[:-len(".json")]
        fn = plotter_for(name)
        if fn is None:
            print(f"skipped {name}: no plot for this benchmark")
            continue
        with open(path) as f:
            fn(json.load(f), path[:-len(".json")] + ".png")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
