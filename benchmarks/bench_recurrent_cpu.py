"""C++ fused recurrent kernel vs the naive Python-loop reference on CPU (issue 2).

Prints a table of median times and the speed-up ratio, and saves it under benchmarks/results/.
Usage: python benchmarks/bench_recurrent_cpu.py [--quick]
"""
from __future__ import annotations

import argparse
import sys

import torch
import torch.nn.functional as F

from common import save_results
from gla_ext import fused_recurrent_gla
from gla_ext._timing import time_fn


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    args = parser.parse_args()
    shapes = [(1, 256, 4, 64), (4, 256, 4, 64), (1, 1024, 4, 64), (1, 256, 4, 128)]
    if args.quick:
        shapes = shapes[:1]
    rows, lines = [], []
    header = (f"{'B':>3} {'T':>6} {'H':>3} {'K=V':>4} | {'C++ fwd ms':>10} {'naive fwd ms':>12} "
              f"{'ratio':>7} | {'C++ f+b ms':>10} {'naive f+b ms':>12} {'ratio':>7}")
    lines += [header, "-" * len(header)]
    print(header)
    print("-" * len(header))
    for B, T, H, D in shapes:
        q, k = torch.randn(B, T, H, D), torch.randn(B, T, H, D)
        v = torch.randn(B, T, H, D)
        g = F.logsigmoid(torch.randn(B, T, H, D)) / 16
        res = {}
        for backend in ("cpu", "reference"):
            fwd = time_fn(lambda: fused_recurrent_gla(q, k, v, g, backend=backend), warmup=1, reps=3)
            leaves = [x.clone().requires_grad_() for x in (q, k, v, g)]
            fb = time_fn(lambda: fused_recurrent_gla(*leaves, backend=backend)[0].sum().backward(),
                         warmup=1, reps=3)
            res[backend] = (fwd, fb)
        row = {"B": B, "T": T, "H": H, "D": D,
               "cpp_fwd_s": res["cpu"][0], "naive_fwd_s": res["reference"][0],
               "cpp_fwdbwd_s": res["cpu"][1], "naive_fwdbwd_s": res["reference"][1]}
        rows.append(row)
        line = (f"{B:3d} {T:6d} {H:3d} {D:4d} | {res['cpu'][0]*1e3:10.2f} {res['reference'][0]*1e3:12.2f} "
                f"{res['reference'][0]/res['cpu'][0]:6.1f}x | {res['cpu'][1]*1e3:10.2f} "
                f"{res['reference'][1]*1e3:12.2f} {res['reference'][1]/res['cpu'][1]:6.1f}x")
        lines.append(line)
        print(line, flush=True)
    path = save_results("recurrent_cpu" + ("_quick" if args.quick else ""), rows, "\n".join(lines),
                        {"dtype": "float32", "gates": "logsigmoid(randn)/16"})
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
