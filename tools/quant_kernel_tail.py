"""Tail of tests/test_quantize_kernels.py::test_packed_quantized_vs_float64's activation-rounding
check, by Monte Carlo of the test's own draws (not part of CI).

The packed int8 / int4 product rounds its activations to int8 per group; the test checks its
distance to the format's definition (dequantized weights, float activations) against
ACT_QUANT_KERNEL_BOUND, on fresh weights and inputs drawn as the test draws them, for
n = 1, 2, 3, 5, 8, 9, 17 input rows. The kernel sits within 1e-6 of the float64 emulation
(asserted separately), so that distance is the emulation's: this script draws the test's
inputs many times and reports how often the worst of the 7 row counts passes a threshold, i.e.
the probability that one CI run of the case fails. Small products (8 outputs x 16 inputs) have
a heavy tail: a draw whose outputs happen to nearly cancel has a small ||x W^T||, and the
rounding error is relative to it.

    python tools/quant_kernel_tail.py --draws 20000 --out 8 --inp 16 --group 16 --seed 1
"""
import argparse
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]

from gla_ext.quantize import QuantizedLinear  # noqa: E402
from helpers import ACT_QUANT_KERNEL_BOUND, qdot_linear_float64  # noqa: E402
from test_quantize_kernels import _qlin  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--draws", type=int, default=20000)
    ap.add_argument("--format", default="int8", choices=["int8", "int4"])
    ap.add_argument("--out", type=int, default=8)
    ap.add_argument("--inp", type=int, default=16)
    ap.add_argument("--group", type=int, default=16)
    ap.add_argument("--bias", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    worst = []
    for _ in range(args.draws):
        q = _qlin(args.format, args.out, args.inp, args.group, args.bias)
        assert isinstance(q, QuantizedLinear)
        w64 = q.dequantize(torch.float64)
        m = 0.0
        for n in (1, 2, 3, 5, 8, 9, 17):
            x = torch.randn(n, args.inp)
            ref = x.double() @ w64.t() + (q.bias.double() if args.bias else 0)
            m = max(m, ((qdot_linear_float64(x, q) - ref).norm() / ref.norm()).item())
        worst.append(m)
    t = torch.tensor(worst, dtype=torch.float64)
    print(f"{args.format} out={args.out} inp={args.inp} group={args.group} bias={args.bias} "
          f"draws={args.draws} seed={args.seed}: median {t.median().item():.2e}, "
          f"max {t.max().item():.2e}")
    for frac in (0.2, 0.4, 0.5, 0.6, 0.8, 1.0):
        thr = frac * ACT_QUANT_KERNEL_BOUND
        print(f"  P(worst of the 7 row counts > {thr:.3g} = {frac:g} x the bound) = "
              f"{(t > thr).double().mean().item():.2e}")


if __name__ == "__main__":
    main()
