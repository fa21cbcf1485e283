"""Per-token CPU decode latency of the seed's default model (issue 3).

Compares, for batch 1 and 8, under torch.no_grad() in eval mode:
  fused      GLA.step taking the fused C++ step (gla_ext.decode)
  generic    the same model with the fast path switched off (per-layer PyTorch + C++ recurrence)
  reference  the same weights built with backend="reference" (the generic path on the
             pure-PyTorch ops)
Each step feeds the state back. The three variants are timed in interleaved rounds so that
load from other processes hits them alike; the table shows the median per token.
Usage: python benchmarks/bench_decode_cpu.py [--quick]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from common import save_results
from gla_ext import GLA
from gla_ext import decode as dec

OPTIONS = dict(embed_dim=287, hidden_size=256, num_layers=6, num_heads=4)


def token_times(model, xs, fused: bool) -> list[float]:
    """Seconds per step for each x_t in xs, state carried over."""
    dec.ENABLED = fused
    try:
        state = model.init_state(xs[0].shape[0])
        times = []
        for x_t in xs:
            t0 = time.perf_counter()
            _, state = model.step(x_t, state)
            times.append(time.perf_counter() - t0)
        return times
    finally:
        dec.ENABLED = True


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--tokens", type=int, default=20, help="steps per variant and round")
    args = parser.parse_args()
    rounds = args.rounds or (2 if args.quick else 8)

    torch.manual_seed(0)
    model = GLA.build(**OPTIONS).eval()
    reference = GLA.build(**OPTIONS, backend="reference").eval()
    reference.load_state_dict(model.state_dict())
    variants = {"fused": (model, True), "generic": (model, False), "reference": (reference, False)}

    rows, lines = [], []
    header = (f"{'batch':>5} | {'fused ms':>9} {'generic ms':>10} {'reference ms':>12} | "
              f"{'generic/fused':>13} {'reference/fused':>15}")
    lines += [header, "-" * len(header)]
    print(header)
    print("-" * len(header))
    for batch in (1, 8):
        xs = [torch.randn(batch, OPTIONS["embed_dim"]) for _ in range(args.tokens)]
        times = {name: [] for name in variants}
        with torch.no_grad():
            for name, (m, fused) in variants.items():      # warm-up (and the fused cache)
                token_times(m, xs[:3], fused)
            for _ in range(rounds):
                for name, (m, fused) in variants.items():
                    times[name] += token_times(m, xs, fused)
        med = {name: statistics.median(t) for name, t in times.items()}
        row = {"batch": batch, "tokens": len(times["fused"]),
               **{f"{name}_s": med[name] for name in variants},
               "generic_over_fused": med["generic"] / med["fused"],
               "reference_over_fused": med["reference"] / med["fused"]}
        rows.append(row)
        line = (f"{batch:5d} | {med['fused']*1e3:9.3f} {med['generic']*1e3:10.3f} "
                f"{med['reference']*1e3:12.3f} | {row['generic_over_fused']:12.2f}x "
                f"{row['reference_over_fused']:14.2f}x")
        lines.append(line)
        print(line, flush=True)
    path = save_results("decode_cpu" + ("_quick" if args.quick else ""), rows, "\n".join(lines),
                        {"model": OPTIONS, "dtype": "float32", "mode": "eval, torch.no_grad()",
                         "rounds": rounds, "tokens_per_round": args.tokens})
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
