"""The packed CPU matrix kernels per weight format (float32, bf16, int8, int4), measured in
thread CPU time (time.thread_time, one torch thread) so that other processes on a shared
machine distort them less than wall time: min over repeats of one product y = x W^T for the
matrices of the 12 blocks of the fla GLA 134M config (hidden 768, per block: [Wq; Wk; Wv; Wg; Wgk0] 2320 x 768, Wo 768 x
768, [W_gate; W_up] 4096 x 768, W_down 768 x 2048) at batch 1 and 8, next to a read pass over
the same bytes (a float32 sum over the packed buffers, also thread CPU time).
Where the quantized kernels use VNNI (vpdpbusd; `python -m gla_ext info`), the rows
"int8 noVNNI" / "int4 noVNNI" (packed with GLA_EXT_CPU_VNNI=off) run next to the auto rows in
the same process, so an AVX512-VNNI / AVX-VNNI machine reports both.

    python benchmarks/bench_quant_kernels.py [--isa avx2|generic] [--repeats 30]
Writes benchmarks/results/quant_kernels{_isa}.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import save_results, thread_cpu_min  # noqa: E402
from gla_ext import _ext  # noqa: E402
from gla_ext.cpu_linear import PackedLinear  # noqa: E402
from gla_ext.quantize import QuantizedLinear  # noqa: E402

SHAPES = [(2320, 768), (768, 768), (4096, 768), (768, 2048)]
LAYERS = 12
FORMATS = ("float32", "bfloat16", "int8", "int4")


def make(fmt, src):
    """A PackedLinear of a float weight or a QuantizedLinear (a fresh packed copy each call);
    fmt "int8 noVNNI" / "int4 noVNNI": packed with the VNNI kernels turned off."""
    if fmt in ("float32", "bfloat16"):
        return PackedLinear(src)
    old = os.environ.get("GLA_EXT_CPU_VNNI")
    os.environ["GLA_EXT_CPU_VNNI"] = "off" if fmt.endswith("noVNNI") else (old or "auto")
    try:
        return PackedLinear.from_quantized(src)
    finally:
        if old is None:
            del os.environ["GLA_EXT_CPU_VNNI"]
        else:
            os.environ["GLA_EXT_CPU_VNNI"] = old


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--isa", default=None, help="GLA_EXT_CPU_ISA for the packed kernels")
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    if args.isa:
        os.environ["GLA_EXT_CPU_ISA"] = args.isa
    torch.set_num_threads(1)
    torch.manual_seed(0)
    kernels = _ext._C.linear_qdot_kernels()
    formats = FORMATS + (("int8 noVNNI", "int4 noVNNI") if _ext._C.linear_vnni() else ())
    weights = [torch.randn(o, i) * 0.02 for o, i in SHAPES]
    # LAYERS packed copies of each: the weights stream from DRAM, as in a real decode step
    # (one block's matrices would sit in the L3 cache)
    lins = {}
    for f in formats:
        src = ([w.to(getattr(torch, f)) for w in weights] if f in ("float32", "bfloat16")
               else [QuantizedLinear.from_weight(w, f.split()[0], 32) for w in weights])
        lins[f] = [make(f, t) for _ in range(LAYERS) for t in src]
    isa = lins["int8"][0].isa
    # read pass: the packed bytes of each format, as float32 words
    reads = {f: [torch.empty(lin.weight_bytes // 4, dtype=torch.float32).uniform_()
                 for lin in lins[f]] for f in formats}
    rows = []
    for batch in (1, 8):
        xs = [torch.randn(batch, i) for _, i in SHAPES] * LAYERS
        outs = [torch.empty(batch, o) for o, _ in SHAPES] * LAYERS
        for f in formats:
            def step():
                for lin, x, y in zip(lins[f], xs, outs):
                    lin._impl.forward(x, y)
            def read():
                for r in reads[f]:
                    r.sum()
            step(), read()
            t_step, t_read = thread_cpu_min(step, args.repeats), thread_cpu_min(read, args.repeats)
            nbytes = sum(lin.weight_bytes for lin in lins[f])
            rows.append(dict(format=f, batch=batch, step_cpu_s=t_step, read_cpu_s=t_read,
                             bytes=nbytes, step_vs_read=t_step / t_read))
    bf = {r["batch"]: r["step_cpu_s"] for r in rows if r["format"] == "bfloat16"}
    b1 = {r["format"]: r["step_cpu_s"] for r in rows if r["batch"] == 1}
    lines = [f"{'format':11} {'B':>2} {'MB':>6} {'step us':>9} {'read us':>9} {'step/read':>9} "
             f"{'vs bf16':>8} {'vs B=1':>7}"]
    for r in rows:
        lines.append(f"{r['format']:11} {r['batch']:2d} {r['bytes'] / 1e6:6.2f} "
                     f"{r['step_cpu_s'] * 1e6:9.0f} {r['read_cpu_s'] * 1e6:9.0f} "
                     f"{r['step_vs_read']:9.2f} {r['step_cpu_s'] / bf[r['batch']]:8.2f} "
                     f"{r['step_cpu_s'] / b1[r['format']]:7.2f}")
    lines.append(f"\nkernels: {isa}, quantized: {kernels}; thread CPU time, min of "
                 f"{args.repeats}; the 12 "
                 "blocks' matrices of the fla GLA 134M config (no head); int8 / int4 at group 32")
    table = "\n".join(lines)
    print(table)
    save_results("quant_kernels" + (f"_{args.isa}" if args.isa else ""), rows, table,
                 extra=dict(isa=isa, qdot_kernels=kernels, shapes=SHAPES,
                            load_average=os.getloadavg()))


if __name__ == "__main__":
    main()
