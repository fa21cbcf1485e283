"""How far fla's GatedLinearAttention layer on gla_ext (accelerate) and on fla's own float32
reference ops are from its float64 run, next to the draw's conditioning: how far the float64
run moves when every input and parameter moves by one float32 rounding. The draws are those
of tests/test_fla_accelerate.py::test_gated_linear_attention_layer_alone; this sets its
bound max(1e-4, REF_FACTOR x fla's error, SENS_FACTOR x sensitivity). Not part of CI.

    python tools/fla_layer_conditioning.py --seeds 300 --out benchmarks/results/fla_layer_conditioning.md
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "tests")]


def layer_grads(layer, x, ctx, dtype, perturb=None):
    """[(name, tensor)] of the output, dx and every parameter gradient of one run (perturb:
    the seed of a float64 run moved by one float32 rounding, helpers.float64_perturbed_copy)."""
    from helpers import float64_perturbed_copy
    if perturb is None:
        run, xi = copy.deepcopy(layer).to(dtype), x.clone().to(dtype)
    else:
        run, xi = float64_perturbed_copy(layer, x, torch.Generator().manual_seed(perturb))
    xi.requires_grad_()
    with ctx():
        o, _, _ = run(xi)
        (o * torch.linspace(-1, 1, o.shape[-1], dtype=o.dtype)).sum().backward()
    return [("o", o.detach()), ("dx", xi.grad)] + [(n, p.grad.clone())
                                                   for n, p in run.named_parameters()]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=300)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import fla_models  # noqa: F401  (fla's import-time warnings, as in the tests)
    from fla.layers import GatedLinearAttention
    from helpers import rel_err
    from gla_ext.integrations import fla as gla_fla
    from gla_ext.integrations.fla_cpu_reference import fla_reference_ops
    modes = [("fused_chunk", True), ("fused_recurrent", False)]   # "chunk" takes fused_chunk's route
    rows = []
    for mode, fuse_norm in modes:
        for seed in range(args.seeds):
            torch.manual_seed(1000 + seed)
            layer = GatedLinearAttention(mode=mode, hidden_size=64, num_heads=2,
                                         fuse_norm=fuse_norm)
            with torch.no_grad():
                for p in layer.parameters():
                    p.add_(0.2 * torch.randn_like(p))
            x = torch.randn(2, 80, 64)
            runs = [layer_grads(layer, x, gla_fla.accelerated, torch.float32),
                    layer_grads(layer, x, fla_reference_ops, torch.float32),
                    layer_grads(layer, x, fla_reference_ops, torch.float64),
                    layer_grads(layer, x, fla_reference_ops, torch.float64, perturb=seed + 7)]
            for (name, ours), (_, fla32), (_, ref), (_, moved) in zip(*runs):
                rows.append(dict(mode=mode, seed=seed, tensor=name, ours=rel_err(ours, ref),
                                 fla32=rel_err(fla32, ref), sensitivity=rel_err(moved, ref)))
        print(mode, "done", file=sys.stderr)
    commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                if l.startswith("model name")), platform.processor())
    lines = ["# fla GatedLinearAttention layer: float32 errors vs the draw's conditioning", "",
             f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}, "
             f"commit {commit}, {cpu}, {args.seeds} draws per mode "
             "(tools/fla_layer_conditioning.py). Errors relative to fla's float64 run, per "
             "tensor (output, dx, every parameter gradient); sensitivity = the float64 run "
             "with inputs and parameters times (1 + 2^-24 n).", "",
             "| mode | bound | ours: worst ratio | at | fla float32: worst ratio |",
             "| --- | --- | ---: | --- | ---: |"]
    bounds = {"max(1e-4, 4 fla32)": lambda r: max(1e-4, 4 * r["fla32"]),
              "max(1e-4, 8 sens)": lambda r: max(1e-4, 8 * r["sensitivity"]),
              "max(1e-4, 4 fla32, 8 sens) (the test's)":
                  lambda r: max(1e-4, 4 * r["fla32"], 8 * r["sensitivity"])}
    for mode, _ in modes:
        mrows = [r for r in rows if r["mode"] == mode]
        for label, bound in bounds.items():
            worst = max(mrows, key=lambda r: r["ours"] / bound(r))
            fla_worst = max(r["fla32"] / bound(r) for r in mrows)
            lines.append(f"| {mode} | {label} | {worst['ours'] / bound(worst):.2f} | seed "
                         f"{worst['seed']} {worst['tensor']} (ours {worst['ours']:.2g}, fla "
                         f"{worst['fla32']:.2g}, sens {worst['sensitivity']:.2g}) | "
                         f"{fla_worst:.2f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        open(args.out, "w").write(text)
        # the draws where float32 is off by more than 1e-5 (the rest is float32 rounding)
        json.dump([r for r in rows if max(r["ours"], r["fla32"]) > 1e-5],
                  open(os.path.splitext(args.out)[0] + ".json", "w"))


if __name__ == "__main__":
    main()
