"""Quantized prefill vs the bf16 and float32 models (issue 18: "prefill never slower than a
bf16 model"): GLA.forward over T tokens (batch 1) of the 50M GLA (embed = hidden 1024, 4
layers, 8 heads x 128) with float32, bfloat16, int8 and int4 weights; the quantized models
with QuantizedLinear's matmul mode "auto" (what users get), "float32" and "bf16" (forced).
Also records what "auto" chose on this CPU (gla_ext/quant_matmul.py's probe: float32 vs bf16
GEMM times). Thread CPU time of one call (min over repeats; bf16 GEMMs are ~300x slower than
float32 on an AVX2 CPU without AVX512-BF16 / AMX, so the forced-bf16 quantized cells run
once on a short window and are scaled per token; the bf16 model runs its fused engine).

    python benchmarks/bench_quant_prefill.py [--tokens 512] [--threads 1] [--repeats 3]
Writes benchmarks/results/quant_prefill.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_cpu_engine import GLA_MODELS  # noqa: E402
from common import save_results, thread_cpu_min  # noqa: E402
import gla_ext  # noqa: E402
from gla_ext import quant_matmul  # noqa: E402
from gla_ext.quantize import QuantizedLinear  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=512)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bf16-tokens", type=int, default=32,
                    help="tokens of the forced-bf16 quantized cells (scaled per token)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base = gla_ext.GLA.build(**GLA_MODELS["50M"]).eval()
    x = torch.randn(1, args.tokens, base.embed_dim)
    rows = []

    def run(name, model, xin, mode=None, repeats=args.repeats):
        for m in model.modules():
            if isinstance(m, QuantizedLinear):
                m.matmul = mode
        with torch.no_grad():
            t = thread_cpu_min(lambda: model(xin, return_sequence=True), repeats)
        rows.append(dict(weights=name, matmul=mode or "-", seconds=t, tokens=xin.shape[1]))
        print(f"{name:9} {mode or '-':8} {t:9.3f} s", flush=True)

    run("float32", base, x)
    for fmt in ("int8", "int4"):
        q = gla_ext.quantize_(gla_ext.GLA.build(**GLA_MODELS["50M"]).eval(), fmt)
        for mode in ("auto", "float32"):
            run(fmt, q, x, mode)
        # forced bf16 GEMMs, on the first args.bf16_tokens tokens only (slow on CPUs without
        # native bf16 GEMMs): scaled to the full window in the table (time per token)
        run(fmt, q, x[:, :args.bf16_tokens], "bf16", repeats=1)
        rows[-1]["tokens"] = args.bf16_tokens
    # min over repeats: the first call of a shape class also measures the fused engine
    # against the PyTorch layers (gla_ext.engine_choice), a one-off cost
    run("bfloat16", base.to(torch.bfloat16), x.bfloat16())
    choice = {str(k): v for k, v in quant_matmul._choice.items()}
    for r in rows:   # seconds for the whole window (per-token scaling for the short cells)
        r["seconds_window"] = r["seconds"] * args.tokens / r["tokens"]
    bf = next(r["seconds_window"] for r in rows if r["weights"] == "bfloat16")
    lines = [f"{'weights':9} {'matmul':8} {'tokens':>6} {'s':>9} {'s/window':>9} {'/ bf16':>7}"]
    lines += [f"{r['weights']:9} {r['matmul']:8} {r['tokens']:6d} {r['seconds']:9.3f} "
              f"{r['seconds_window']:9.3f} {r['seconds_window'] / bf:7.2f}" for r in rows]
    lines.append(f"\n50M GLA, prefill of {args.tokens} tokens (batch 1), {args.threads} thread(s), "
                 f"thread CPU time (min of {args.repeats}; forced-bf16 cells once); auto chose "
                 f"bf16 for (threads, in, out) classes: {choice}")
    table = "\n".join(lines)
    print(table)
    save_results("quant_prefill", rows, table,
                 extra=dict(tokens=args.tokens, threads=args.threads, auto_choice=choice,
                            load_average=os.getloadavg()))


if __name__ == "__main__":
    main()
