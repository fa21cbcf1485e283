"""The C++ fused recurrent kernel per CPU instruction-set path (GLA_EXT_CPU_ISA), on one thread.

Times are thread CPU seconds (time.thread_time), min of repeats, so a loaded shared machine
disturbs them less than wall time. Compare two builds by running this script with each on
PYTHONPATH, alternately, and saving under different --label values.
Usage: python benchmarks/bench_recurrent_isa.py [--label NAME] [--reps N] [--isa generic,avx2]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

from common import save_results, thread_cpu_min
import gla_ext
from gla_ext import fused_recurrent_gla

SHAPES = [(1, 512, 4, 64), (4, 256, 4, 64), (1, 256, 4, 128), (2, 256, 4, 100)]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--label", default="now", help="results name suffix (e.g. before/after)")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--isa", default="generic,avx2", help="comma-separated GLA_EXT_CPU_ISA values")
    parser.add_argument("--out-dir", default=None, help="where to save (default benchmarks/results)")
    args = parser.parse_args()
    torch.set_num_threads(1)  # parallel_for then runs in this thread: thread_time sees it all
    rows, lines = [], []
    header = f"{'isa':>8} {'B':>3} {'T':>5} {'H':>3} {'K=V':>4} | {'fwd ms':>8} {'fwd+bwd ms':>10}"
    lines += [header, "-" * len(header)]
    print(f"gla_ext from {os.path.dirname(gla_ext.__file__)}\n{header}\n{'-' * len(header)}")
    for isa in args.isa.split(","):
        os.environ["GLA_EXT_CPU_ISA"] = isa
        for B, T, H, D in SHAPES:
            gen = torch.Generator().manual_seed(0)
            q, k, v = (torch.randn(B, T, H, D, generator=gen) for _ in range(3))
            g = F.logsigmoid(torch.randn(B, T, H, D, generator=gen)) / 16
            leaves = [x.clone().requires_grad_() for x in (q, k, v, g)]

            def fwd():
                with torch.no_grad():
                    fused_recurrent_gla(q, k, v, g, backend="cpu")

            def fwd_bwd():
                fused_recurrent_gla(*leaves, backend="cpu")[0].sum().backward()

            fwd(), fwd_bwd()  # warm-up (allocations, first touch)
            f, fb = thread_cpu_min(fwd, args.reps), thread_cpu_min(fwd_bwd, args.reps)
            rows.append({"isa": isa, "B": B, "T": T, "H": H, "D": D, "fwd_s": f, "fwd_bwd_s": fb})
            line = f"{isa:>8} {B:3d} {T:5d} {H:3d} {D:4d} | {f * 1e3:8.2f} {fb * 1e3:10.2f}"
            lines.append(line)
            print(line, flush=True)
    path = save_results(f"recurrent_isa_{args.label}", rows, "\n".join(lines),
                        {"dtype": "float32", "gates": "logsigmoid(randn)/16",
                         "timing": f"thread CPU time, min of {args.reps}, 1 thread"},
                        out_dir=args.out_dir)
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
