"""GPU benchmark: gla_ext vs fla-core's Triton kernels, SDPA (flash) and the memory roofline.

Prefill forward and forward+backward (bf16) at the issue's shapes with peak memory per case,
the float32 forward at both tf32 precisions vs fla and bf16 with its error against float64
(bench_gpu_f32.py), the chunked forward's fused vs split paths, decode steps at B*H in
{32, 256, 1024}, and per-token latency of the default model (eager vs CUDA graph); median of
CUDA-event timings after warm-up.
Writes bench_gpu.json / .md / .png into --out (default benchmarks/results).
Usage: python benchmarks/bench_gpu.py [--out DIR] [--quick] [--sections f32 decode ...]
       python benchmarks/bench_gpu.py --dry-run   (no GPU: the plan, and the float32 section's
                                                   code run on the CPU at a tiny shape)
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F

import bench_gpu_f32
from common import RESULTS_DIR, pyplot, save_results
from gla_ext import chunk_gla, fused_recurrent_gla
from gla_ext._timing import time_fn
from gla_ext.reference import naive_recurrent_gla

PREFILL_SHAPES = [(4, 2048, 16, 128), (8, 1024, 8, 64), (2, 16384, 16, 128), (1, 8192, 96, 128)]
DECODE_BH = [32, 256, 1024]
SECTIONS = ["prefill", "f32", "paths", "decode", "model"]  # run in this order

try:  # the peer; install fla-core==0.6.0 to compare (see benchmarks/gpu_check.sh)
    from fla.ops.gla import chunk_gla as fla_chunk_gla
    from fla.ops.gla import fused_recurrent_gla as fla_fused_recurrent_gla
    FLA_ERROR = None
except Exception as exc:  # noqa: BLE001 - report why the peer is missing
    fla_chunk_gla = fla_fused_recurrent_gla = None
    FLA_ERROR = f"{type(exc).__name__}: {exc}"


def copy_bandwidth() -> float:
    """Bytes/s of a large device-to-device copy (read + write), the memory roofline's rate."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), "cuda", warmup=3, reps=10)
    return 2 * src.numel() / t


def timed(fn, backward: bool):
    """(median seconds, peak bytes) of fn() or of fn() + backward of its first output."""
    def run():
        out = fn()
        if backward:
            out.float().sum().backward()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    try:
        t = time_fn(run, "cuda", warmup=2, reps=10)
    except Exception as exc:  # noqa: BLE001 - a failing peer is reported, not fatal
        print(f"    failed: {type(exc).__name__}: {exc}", flush=True)
        return float("nan"), float("nan")
    return t, torch.cuda.max_memory_allocated() - base


def prefill_inputs(B, T, H, D, grad):
    dt = torch.bfloat16
    q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=dt, requires_grad=grad)
               for _ in range(3))
    g = (F.logsigmoid(torch.randn(B, T, H, D, device="cuda")) / 16).requires_grad_(grad)
    return q, k, v, g


def bench_prefill(shapes, bandwidth, rows, lines, save=lambda: None):
    header = (f"{'mode':8} {'B':>2} {'T':>6} {'H':>3} {'D':>4} | {'gla_ext ms':>10} {'fla ms':>8} "
              f"{'sdpa ms':>8} | {'vs fla':>6} {'vs sdpa':>7} {'roofline':>8} | "
              f"{'mem MB':>7} {'fla MB':>7}")
    lines += [header, "-" * len(header)]
    print(header, flush=True)
    for B, T, H, D in shapes:        # shape by shape: a run cut short still has both modes
        for backward in (False, True):
            q, k, v, g = prefill_inputs(B, T, H, D, backward)
            ours = timed(lambda: chunk_gla(q, k, v, g, backend="cuda")[0], backward)
            fla = (timed(lambda: fla_chunk_gla(q, k, v, g)[0], backward)
                   if fla_chunk_gla else (float("nan"), float("nan")))
            qs, ks, vs = (x.transpose(1, 2) for x in (q, k, v))    # SDPA wants [B, H, T, D]
            with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.FLASH_ATTENTION):
                sdpa = timed(lambda: F.scaled_dot_product_attention(qs, ks, vs, is_causal=True),
                             backward)
            # minimal bytes: read q, k, v (bf16) and g (fp32), write o (bf16); x3 with backward
            min_bytes = B * T * H * D * (2 * 3 + 4 + 2) * (3 if backward else 1)
            roof = (min_bytes / bandwidth) / ours[0]
            mode = "fwd+bwd" if backward else "fwd"
            rows.append({"mode": mode, "B": B, "T": T, "H": H, "D": D, "gla_ext_s": ours[0],
                         "fla_s": fla[0], "sdpa_flash_s": sdpa[0], "roofline_fraction": roof,
                         "gla_ext_peak_bytes": ours[1], "fla_peak_bytes": fla[1],
                         "sdpa_peak_bytes": sdpa[1]})
            line = (f"{mode:8} {B:2d} {T:6d} {H:3d} {D:4d} | {ours[0]*1e3:10.3f} {fla[0]*1e3:8.3f} "
                    f"{sdpa[0]*1e3:8.3f} | {fla[0]/ours[0]:5.2f}x {sdpa[0]/ours[0]:6.2f}x "
                    f"{roof:7.1%} | {ours[1]/2**20:7.0f} {fla[1]/2**20:7.0f}")
            lines.append(line)
            print(line, flush=True)
            save()  # every row: the peers' first calls compile (Triton), a timeout may follow
            del q, k, v, g
            torch.cuda.empty_cache()


def bench_forward_paths(shapes, bandwidth, rows, lines, save=lambda: None):
    """The chunked forward's two execution paths (GLA_EXT_CHUNK_FWD=fused|split) head to head,
    and which one "auto" picks: evidence for the grid-size rule in csrc/cuda/chunk_fwd.cu."""
    header = (f"{'fwd path':8} {'B':>2} {'T':>6} {'H':>3} {'D':>4} | {'fused ms':>9} "
              f"{'split ms':>9} {'auto ms':>8} | {'split/fused':>11}")
    lines += ["", header, "-" * len(header)]
    print(header, flush=True)
    previous = os.environ.get("GLA_EXT_CHUNK_FWD")
    try:
        for B, T, H, D in shapes:
            q, k, v, g = prefill_inputs(B, T, H, D, False)
            times = {}
            for path in ("fused", "split", "auto"):
                os.environ["GLA_EXT_CHUNK_FWD"] = path
                times[path] = timed(lambda: chunk_gla(q, k, v, g, backend="cuda")[0], False)[0]
            rows.append({"mode": "fwd-path", "B": B, "T": T, "H": H, "D": D,
                         "fused_s": times["fused"], "split_s": times["split"],
                         "auto_s": times["auto"]})
            line = (f"{'':8} {B:2d} {T:6d} {H:3d} {D:4d} | {times['fused']*1e3:9.3f} "
                    f"{times['split']*1e3:9.3f} {times['auto']*1e3:8.3f} | "
                    f"{times['split']/times['fused']:10.2f}x")
            lines.append(line)
            print(line, flush=True)
            save()
            del q, k, v, g
            torch.cuda.empty_cache()
    finally:
        if previous is None:
            os.environ.pop("GLA_EXT_CHUNK_FWD", None)
        else:
            os.environ["GLA_EXT_CHUNK_FWD"] = previous


def bench_decode(bandwidth, rows, lines):
    header = (f"{'decode':8} {'B*H':>6} | {'gla_ext us':>10} {'fla us':>8} | {'vs fla':>6} "
              f"{'of HBM bw':>9}")
    lines += ["", header, "-" * len(header)]
    print("\n" + header, flush=True)
    H, D = 8, 128
    for bh in DECODE_BH:
        B = bh // H
        q, k, v = (torch.randn(B, 1, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        g = F.logsigmoid(torch.randn(B, 1, H, D, device="cuda")) / 16
        h0 = torch.randn(B, H, D, D, device="cuda")
        ours = timed(lambda: fused_recurrent_gla(q, k, v, g, initial_state=h0,
                                                 output_final_state=True, backend="cuda")[0], False)
        fla = (timed(lambda: fla_fused_recurrent_gla(q, k, v, g, initial_state=h0,
                                                     output_final_state=True)[0], False)
               if fla_fused_recurrent_gla else (float("nan"), float("nan")))
        state_bytes = 2 * B * H * D * D * 4          # read and write the float32 state
        frac = (state_bytes / ours[0]) / bandwidth
        rows.append({"mode": "decode", "BH": bh, "D": D, "gla_ext_s": ours[0], "fla_s": fla[0],
                     "hbm_fraction": frac})
        line = (f"{'decode':8} {bh:6d} | {ours[0]*1e6:10.1f} {fla[0]*1e6:8.1f} | "
                f"{fla[0]/ours[0]:5.2f}x {frac:8.1%}")
        lines.append(line)
        print(line, flush=True)


def bench_model_decode(rows, lines):
    """Per-token latency of the seed's default model: eager step() vs the CUDA-graph step."""
    from gla_ext import GLA
    header = f"{'model decode':12} {'batch':>5} | {'eager us':>9} {'graph us':>9} {'speed-up':>8}"
    lines += ["", header, "-" * len(header)]
    print("\n" + header, flush=True)
    model = GLA.build(embed_dim=287, hidden_size=256, num_layers=6, num_heads=4).cuda().eval()
    for batch in (1, 32):
        x = torch.randn(batch, 287, device="cuda")
        with torch.no_grad():
            state = model.init_state(batch, device="cuda")
            eager = timed(lambda: model.step(x, state)[0], False)[0]
            decoder = model.cuda_graph_step(batch)
            graph = timed(lambda: decoder(x), False)[0]
        rows.append({"mode": "model_decode", "batch": batch, "eager_s": eager, "graph_s": graph})
        line = f"{'model decode':12} {batch:5d} | {eager*1e6:9.1f} {graph*1e6:9.1f} {eager/graph:7.1f}x"
        lines.append(line)
        print(line, flush=True)


def plot(rows, path):
    plt = pyplot()
    if plt is None:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, mode in zip(axes, ("fwd", "fwd+bwd")):
        sel = [r for r in rows if r["mode"] == mode]
        labels = [f"{r['B']}x{r['T']}x{r['H']}x{r['D']}" for r in sel]
        for key, name in (("gla_ext_s", "gla_ext"), ("fla_s", "fla chunk_gla"),
                          ("sdpa_flash_s", "SDPA flash")):
            ax.plot(labels, [r[key] * 1e3 for r in sel], marker="o", label=name)
        ax.set_yscale("log")
        ax.set_title(f"bf16 {mode}")
        ax.set_ylabel("ms (median)")
        ax.tick_params(axis="x", rotation=20)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"saved {path}")


def dry_run(args) -> int:
    """What a GPU run would do, and the float32 section's code on the CPU (tiny shape, CPU
    kernels, no fla: it needs Triton on a GPU); nothing is saved."""
    shapes = PREFILL_SHAPES[:1] if args.quick else PREFILL_SHAPES
    f32_shapes = bench_gpu_f32.SHAPES[:1] if args.quick else bench_gpu_f32.SHAPES
    print(f"sections: {' '.join(args.sections)}; prefill shapes {shapes}; float32 shapes "
          f"{f32_shapes}; decode B*H {DECODE_BH}; out {args.out}")
    print(f"fla: {FLA_ERROR or 'importable'}; GPU: {torch.cuda.is_available()}")
    rows, lines = [], []
    cpu_timer = lambda fn: (time_fn(fn, "cpu"), 0)  # noqa: E731
    for bench in (bench_gpu_f32.bench_f32, bench_gpu_f32.bench_f32_bwd):
        bench([(1, 80, 2, 16)], cpu_timer, rows, lines, fla=None,
              fla_error="dry run: fla runs on the GPU only", device="cpu")
        # the peer's code path, with gla_ext's float32 recurrent reference standing in for fla
        print("(fla columns below: gla_ext.reference.naive_recurrent_gla standing in for fla)")
        bench([(1, 80, 2, 16)], cpu_timer, rows, lines, fla=naive_recurrent_gla, device="cpu")
    bad = [k for r in rows for k, x in r.items() if "err" in k and "fla" not in k and
           not x < 1e-4]
    print("dry run: " + ("float32 section ran on the CPU" if not bad else f"errors {bad}"))
    return 1 if bad else 0


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=RESULTS_DIR)
    parser.add_argument("--quick", action="store_true", help="first prefill shape only")
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=SECTIONS,
                        help="what to run (default: all, in the order listed)")
    parser.add_argument("--dry-run", action="store_true",
                        help="no GPU needed: print the plan and run the float32 section's "
                             "code on the CPU at a tiny shape")
    args = parser.parse_args()
    if args.dry_run:
        return dry_run(args)
    if not torch.cuda.is_available():
        print("no GPU: nothing to benchmark")
        return 1
    if FLA_ERROR:
        print(f"fla not importable ({FLA_ERROR}): its columns are NaN")
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    rows, lines = [], [f"copy bandwidth {bandwidth / 1e12:.2f} TB/s"]
    shapes = PREFILL_SHAPES[:1] if args.quick else PREFILL_SHAPES

    def save():  # after every section: a run cut short still leaves what it measured
        return save_results("bench_gpu", rows, "\n".join(lines),
                            {"copy_bandwidth_Bps": bandwidth, "fla": FLA_ERROR or "fla-core"},
                            out_dir=args.out)

    run = set(args.sections)
    if "prefill" in run:
        bench_prefill(shapes, bandwidth, rows, lines, save)
    if "f32" in run:  # after the bf16 rows: the float32 kernels' first GPU numbers
        f32_shapes = bench_gpu_f32.SHAPES[:1] if args.quick else bench_gpu_f32.SHAPES
        for bench in (bench_gpu_f32.bench_f32, bench_gpu_f32.bench_f32_bwd):
            bench(f32_shapes, lambda fn: timed(fn, False), rows, lines, fla_chunk_gla,
                  FLA_ERROR, "cuda", save)
    if "paths" in run:
        bench_forward_paths(shapes, bandwidth, rows, lines, save)
    if "decode" in run:
        bench_decode(bandwidth, rows, lines)
        save()
    if "model" in run:
        bench_model_decode(rows, lines)
    path = save()
    print(f"saved {path}")
    plot([r for r in rows if r["mode"] in ("fwd", "fwd+bwd")], path.replace(".json", ".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
