"""Estimated H200 times of the CUDA kernels, from the static SASS counts of sass_stats.py and
the bytes each kernel moves (no GPU needed), so the first GPU run can compare prediction and
measurement kernel by kernel (benchmarks/bench_gpu.py measures the same shapes).

    python benchmarks/gpu_model.py [--stats benchmarks/results/sass_stats.json] [--name gpu_model]

Per kernel launch, time = launch overhead + the largest of these bounds:
  issue:   every warp issues at most one instruction per clock, and an SM's 4 schedulers one
           each: a block's warps run at min(1, 4 / resident warps) instructions per clock;
           waves = ceil(blocks / (SMs x blocks per SM)); time = waves x per-warp count / rate.
  MUFU:    thread-level exp2 / (SMs x 16 per clock).
  tensor:  mma.sync m16n8k16 (8192 flops each) at MMA_TFLOPS (mma.sync on Hopper reaches about
           two thirds of the wgmma dense peak; 989 TFLOPS bf16 dense for H200).
  memory:  bytes moved / HBM bandwidth (4.3 TB/s).
The per-warp counts are the per-chunk figures of sass_stats.py (x the chunks a block walks,
plus its fixed part). Assumptions are in ASSUMPTIONS and saved with the results.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import subprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ASSUMPTIONS = {
    "sms": 132,
    "clock_ghz": 1.755,
    "issue_per_clk_per_sm": 4,
    "issue_per_clk_per_warp": 1,
    "mufu_per_clk_per_sm": 16,
    "mma_tflops": 660.0,
    "hbm_tb_s": 4.3,
    "launch_us": 2.0,
    "kC": 64,
}
PREFILL = [(4, 2048, 16, 128), (8, 1024, 8, 64), (2, 16384, 16, 128), (1, 8192, 96, 128)]
DECODE_BH = [32, 256, 1024]


def find(stats, kernel, ints=None, bools=None, dtype="bf16"):
    """The row of one instantiation; bools may be a prefix (the scans' all-vector variant,
    a trailing True, is preferred: it is what aligned inputs run)."""
    match = [r for r in stats["rows"] if r["kernel"] == kernel and r["dtype"] == dtype and
             (ints is None or r["template"]["ints"] == ints) and
             (bools is None or r["template"]["bools"][:len(bools)] == bools)]
    if not match:
        raise KeyError(f"{kernel} {dtype} {ints} {bools} not in the stats")
    exact = [r for r in match if bools is None or len(r["template"]["bools"]) == len(bools)]
    vec = [r for r in match if r["template"]["bools"][len(bools or []):] == [True]]
    return (exact or vec or match)[0]


def scan_cols(row):
    """V columns one scan block covers: 16 per warp (64 with 4 warps before, 128 after)."""
    return 16 * row["threads"] // 32


def kernel_time(name, row, blocks, per_warp, bytes_moved, A, per_warp_scale=1.0):
    """per_warp: dict of per-warp counts for one block (all the chunks it walks)."""
    f = A["clock_ghz"] * 1e9
    warps = row["threads"] // 32
    occ = max(1, row["blocks_per_sm"])
    resident = min(occ, math.ceil(blocks / A["sms"])) * warps
    rate = min(A["issue_per_clk_per_warp"], A["issue_per_clk_per_sm"] / max(resident, 1))
    waves = math.ceil(blocks / (A["sms"] * occ))
    t_issue = waves * per_warp["all"] * per_warp_scale / rate / f
    ex2 = per_warp["MUFU.EX2"] * per_warp_scale * warps * blocks * 32
    t_mufu = ex2 / (A["sms"] * A["mufu_per_clk_per_sm"] * f)
    hmma = per_warp["HMMA"] * per_warp_scale * warps * blocks
    t_tensor = hmma * 8192 / (A["mma_tflops"] * 1e12)
    t_mem = bytes_moved / (A["hbm_tb_s"] * 1e12)
    bounds = {"issue": t_issue, "mufu": t_mufu, "tensor": t_tensor, "memory": t_mem}
    bound = max(bounds, key=bounds.get)
    total = bounds[bound] + A["launch_us"] * 1e-6
    return {"kernel": name, "blocks": blocks, "blocks_per_sm": occ, "waves": waves,
            "bytes": bytes_moved, "ms": total * 1e3, "bound": bound,
            **{f"{k}_ms": v * 1e3 for k, v in bounds.items()}}


def per_block(row, chunks):
    """Per-warp counts of one block walking `chunks` chunks (or doing one, chunks=1)."""
    pc, fx = row["per_warp_per_chunk"], row.get("per_warp_fixed", {})
    return {k: pc[k] * chunks + fx.get(k, 0.0) for k in pc}


def forward(stats, B, T, H, K, A, esz=2):
    """Split path (what the launcher picks for all four shapes: fewer than 2 fused blocks per
    SM); the fused path is modelled too."""
    V = K
    KT = 64 if K <= 64 else 128
    kc = A["kC"]
    cpr = math.ceil(T / kc)
    chunks = B * cpr
    kt, vt = math.ceil(K / 64), math.ceil(V / 64)
    tok = B * T * H
    io = tok * (2 * K * esz + 4 * K + V * esz)       # q, k, g (float32), v read
    out = tok * V * esz                              # o written
    state = chunks * H * K * V * esz                 # workspace states, 16-bit
    final = B * H * K * V * 4                        # ht (float32)
    fused_blocks = B * H * vt
    split = fused_blocks < 2 * A["sms"] and cpr >= 2
    res = {"path": "split" if split else "fused"}
    scan = find(stats, "gla_chunk_state_scan_kernel", [], [False])
    svt = math.ceil(V / scan_cols(scan))
    scan_blocks = B * H * kt * svt
    # each scan block reads its 64 key dims of k, g and its V columns of v
    scan_bytes = tok * (svt * (K * esz + 4 * K) + kt * V * esz) + state + final
    sp = find(stats, "gla_chunk_fwd_kernel", [KT], [True])
    split_kernels = [
        kernel_time("state_scan", scan, scan_blocks, per_block(scan, cpr), scan_bytes, A),
        kernel_time("chunk_fwd (split)", sp, chunks * H, per_block(sp, 1),
                    io + out + state, A),
    ]
    fu = find(stats, "gla_chunk_fwd_kernel", [KT], [False])
    fused_kernels = [kernel_time("chunk_fwd (fused)", fu, fused_blocks, per_block(fu, cpr),
                                 tok * (vt * (2 * K * esz + 4 * K)) + io - tok * (2 * K * esz + 4 * K)
                                 + out + final, A)]
    res["split"] = split_kernels
    res["fused"] = fused_kernels
    res["split_ms"] = sum(k["ms"] for k in split_kernels)
    res["fused_ms"] = sum(k["ms"] for k in fused_kernels)
    res["ms"] = res["split_ms"] if split else res["fused_ms"]
    res["roofline_ms"] = (io + out) / (A["hbm_tb_s"] * 1e12) * 1e3
    return res


def backward(stats, B, T, H, K, A, esz=2):
    V = K
    KT = 64 if K <= 64 else 128
    cpr = math.ceil(T / A["kC"])
    chunks = B * cpr
    kt, vt = math.ceil(K / 64), math.ceil(V / 64)
    tok = B * T * H
    state = chunks * H * K * V * esz
    scans = find(stats, "gla_chunk_state_scans_kernel", [], [])
    svt = math.ceil(V / scan_cols(scans))
    scans_blocks = 2 * B * H * kt * svt
    scans_bytes = tok * 2 * (svt * (K * esz + 4 * K) + kt * V * esz) + 2 * state + \
        2 * B * H * K * V * 4
    bw = find(stats, "gla_chunk_bwd_kernel", [KT], [])
    bw_bytes = tok * (2 * K * esz + 4 * K + 2 * V * esz) + 2 * state + \
        tok * (2 * K * esz + 4 * K + V * esz)
    ks = [kernel_time("state_scans (fwd + grad)", scans, scans_blocks, per_block(scans, cpr),
                      scans_bytes, A, per_warp_scale=0.5),  # each block runs one half
          kernel_time("chunk_bwd", bw, chunks * H, per_block(bw, 1), bw_bytes, A)]
    io = tok * (2 * K * esz + 4 * K + 2 * V * esz) + tok * (2 * K * esz + 4 * K + V * esz)
    return {"kernels": ks, "ms": sum(k["ms"] for k in ks),
            "roofline_ms": io / (A["hbm_tb_s"] * 1e12) * 1e3}


def decode(BH, K, A, esz=2):
    """fused_recurrent_gla, one token: the float32 state is read and written once; memory
    bound (its per-token work is a few hundred instructions per state column)."""
    V = K
    bytes_moved = BH * (K * V * 4 * 2 + (2 * K * esz + 4 * K + 2 * V * esz))
    t = bytes_moved / (A["hbm_tb_s"] * 1e12) + A["launch_us"] * 1e-6
    return {"BH": BH, "K": K, "V": V, "bytes": bytes_moved, "ms": t * 1e3,
            "memory_ms": bytes_moved / (A["hbm_tb_s"] * 1e12) * 1e3}


def git(*args):
    r = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT)
    return r.stdout.strip() if r.returncode == 0 else "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--stats", default=os.path.join(ROOT, "benchmarks", "results",
                                                    "sass_stats.json"))
    ap.add_argument("--name", default="gpu_model")
    args = ap.parse_args()
    with open(args.stats) as f:
        stats = json.load(f)
    A = ASSUMPTIONS
    rows, lines = [], []
    lines.append(f"{'shape (B,T,H,K=V)':<22}{'mode':<9}{'path':<7}{'model ms':>9}{'roof ms':>9}"
                 f"{'x roof':>7}  kernels (ms, bound)")
    for B, T, H, K in PREFILL:
        fw = forward(stats, B, T, H, K, A)
        bw = backward(stats, B, T, H, K, A)
        fb = fw["ms"] + bw["ms"]
        ks = fw["split"] if fw["path"] == "split" else fw["fused"]
        desc = "; ".join(f"{k['kernel']} {k['ms']:.3f} {k['bound']}" for k in ks)
        lines.append(f"{str((B, T, H, K)):<22}{'fwd':<9}{fw['path']:<7}{fw['ms']:>9.3f}"
                     f"{fw['roofline_ms']:>9.3f}{fw['ms'] / fw['roofline_ms']:>7.2f}  {desc}")
        other = "fused" if fw["path"] == "split" else "split"
        lines.append(f"{'':<22}{'fwd':<9}{other:<7}{fw[other + '_ms']:>9.3f}")
        desc = "; ".join(f"{k['kernel']} {k['ms']:.3f} {k['bound']}" for k in bw["kernels"])
        roof = fw["roofline_ms"] + bw["roofline_ms"]
        lines.append(f"{'':<22}{'fwd+bwd':<9}{fw['path']:<7}{fb:>9.3f}{roof:>9.3f}"
                     f"{fb / roof:>7.2f}  bwd: {desc}")
        rows.append({"shape": [B, T, H, K, K], "dtype": "bf16", "forward": fw, "backward": bw,
                     "forward_ms": fw["ms"], "forward_backward_ms": fb})
    lines.append("")
    lines.append(f"{'decode B*H':<12}{'K=V':>5}{'model ms':>10}{'bytes':>12}")
    for bh in DECODE_BH:
        d = decode(bh, 128, A)
        lines.append(f"{bh:<12}{128:>5}{d['ms']:>10.4f}{d['bytes']:>12}")
        rows.append({"decode": d})
    lines.append("")
    lines.append("assumptions: " + ", ".join(f"{k}={v}" for k, v in A.items()))
    text = "\n".join(lines)
    print(text)
    meta = {"benchmark": args.name,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": git("rev-parse", "--short", "HEAD"), "stats": os.path.relpath(args.stats, ROOT),
            "stats_commit": stats.get("commit"), "assumptions": A, "method": __doc__}
    out_dir = os.path.join(ROOT, "benchmarks", "results")
    with open(os.path.join(out_dir, args.name + ".json"), "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)
    with open(os.path.join(out_dir, args.name + ".md"), "w") as f:
        f.write(f"# {args.name}\n\n{meta['date']}, commit {meta['commit']}, counts from "
                f"{meta['stats']} (commit {meta['stats_commit']}). Estimated H200 times, bf16, "
                f"no GPU run; method: benchmarks/gpu_model.py docstring.\n\n```\n{text}\n```\n")


if __name__ == "__main__":
    main()
