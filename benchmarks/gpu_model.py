"""Estimated H200 times of the CUDA kernels, from the static SASS counts of sass_stats.py and
the bytes each kernel moves (no GPU needed), so the first GPU run can compare prediction and
measurement kernel by kernel (benchmarks/bench_gpu.py measures the same shapes).

    python benchmarks/gpu_model.py [--stats benchmarks/results/sass_stats.json] [--name gpu_model]

Per kernel launch, time = launch overhead + the largest of these bounds:
  issue:   every warp issues at most one instruction per clock, and an SM's 4 schedulers one
           each: a block's warps run at min(1, 4 / resident warps) instructions per clock;
           waves = ceil(blocks / (SMs x blocks per SM)); time = waves x per-warp count / rate.
  MUFU:    the busiest SM's thread-level exp2 (ceil(blocks / SMs) blocks) / 16 per clock.
  tensor:  the busiest SM's mma.sync: m16n8k16 16-bit (8192 flops each) at mma_tflops (mma.sync
           on Hopper reaches about two thirds of the wgmma dense peak; 989 TFLOPS bf16 dense
           for H200), m16n8k8 tf32 (2048 flops) at mma_tflops_tf32 (two thirds of 495).
  memory:  bytes moved / HBM bandwidth (4.3 TB/s).
The per-warp counts are the per-chunk figures of sass_stats.py (x the chunks a block walks,
plus its fixed part). Assumptions are in ASSUMPTIONS and saved with the results.

The float32 forward (fused gla_chunk_fwd_f32_kernel: one block per sequence, head and 64 V
columns walks all the chunks; split: gla_chunk_state_scan_f32_kernel +
gla_chunk_fwd_f32_split_kernel, on the shapes where the launcher's rule picks it, as for bf16)
is modelled at both precisions and compared with the bf16 forward the launcher picks for the
same shape (issue 20's targets: "high" <= 1.6x,
"highest" <= 3x; TARGETS). The issue bound assumes a warp issues every clock: optimistic for
a kernel with one 4-warp block per SM (one warp per scheduler hides no latency).

The float32 backward (gla_chunk_state_scans_f32_kernel + gla_chunk_bwd_f32_kernel, float32
states in the workspace) is modelled at both precisions; forward + backward is compared with
the bf16 forward + backward, and the backward workspaces (bf16, float32 chunked, float32
recurrent: what float32 ran before) are given in bytes at the issue's shapes (target:
float32 chunked <= 2x bf16).
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
    "mma_tflops_tf32": 330.0,
    "hbm_tb_s": 4.3,
    "launch_us": 2.0,
    "kC": 64,
}
PREFILL = [(4, 2048, 16, 128), (8, 1024, 8, 64), (2, 16384, 16, 128), (1, 8192, 96, 128)]
DECODE_BH = [32, 256, 1024]
# float32 forward: precision -> (tf32 passes, issue 20's bound on its time / the bf16 forward's)
TARGETS = {"highest": (3, 3.0), "high": (1, 1.6)}
TARGET_SHAPES = [(4, 2048, 16, 128), (2, 16384, 16, 128)]
# issue 20's table names (4, 2048, 16, 128) for "high"'s bound and no shape for "highest"'s
TARGET_SHAPES_BY_PRECISION = {"highest": TARGET_SHAPES, "high": TARGET_SHAPES[:1]}


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
    busiest = math.ceil(blocks / A["sms"])  # blocks on the busiest SM (fewer blocks than SMs:
    # the MUFU and tensor cores of the idle SMs do not help)
    ex2 = per_warp["MUFU.EX2"] * per_warp_scale * warps * busiest * 32
    t_mufu = ex2 / (A["mufu_per_clk_per_sm"] * f)
    tf32 = per_warp.get("HMMA.TF32", 0.0) * per_warp_scale * warps * busiest
    hmma = per_warp["HMMA"] * per_warp_scale * warps * busiest - tf32
    t_tensor = (hmma * 8192 / A["mma_tflops"] + tf32 * 2048 / A["mma_tflops_tf32"]) * \
        A["sms"] / 1e12
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


F32_SPLIT_BELOW_FILL = 0.8  # chunk_fwd.cu's kF32SplitBelowFill


def picks_split(B, H, V, cpr, A, f32_blocks_per_sm=None):
    """chunk_fwd.cu's want_split: sequences of at least two chunks, and 16-bit: fewer than two
    fused blocks (N x H x ceil(V / 64)) per SM; float32 (f32_blocks_per_sm given: the fused
    float32 kernel's resident blocks per SM): the fused grid fills under 0.8 of the block slots
    over its waves."""
    fused = B * H * math.ceil(V / 64)
    if cpr < 2:
        return False
    if f32_blocks_per_sm is None:
        return fused < 2 * A["sms"]
    slots = A["sms"] * f32_blocks_per_sm
    return fused / (math.ceil(fused / slots) * slots) < F32_SPLIT_BELOW_FILL


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
    split = picks_split(B, H, V, cpr, A)
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


def forward_f32(stats, B, T, H, K, passes, A):
    """The float32 forward on the path the launcher picks (picks_split's float32 rule), both
    modelled:
    fused: one block per sequence, head and 64 V columns; each reads the q, k, g of all its
      tokens and its V columns of v, and writes o and the final state;
    split (when the stats have it): the float32 state scan (one block per sequence, head, 64
      key dims and 64 V columns, walking the chunks; writes every chunk's start state in
      float32 and the final state), then one block per (chunk, head) over all V tiles (reads
      q, k, g, v and the chunk's state, writes o)."""
    V = K
    KT = 64 if K <= 64 else 128
    cpr = math.ceil(T / A["kC"])
    chunks = B * cpr
    kt, vt = math.ceil(K / 64), math.ceil(V / 64)
    tok = B * T * H
    row = find(stats, "gla_chunk_fwd_f32_kernel", [KT, passes], [], dtype="f32")
    io = tok * (2 * K * 4 + 4 * K + V * 4)  # q, k, g, v read once
    final = B * H * K * V * 4
    out = tok * V * 4 + final               # o, ht written
    moved = io + tok * (vt - 1) * (2 * K * 4 + 4 * K) + out  # q, k, g again per V tile
    k = kernel_time(f"chunk_fwd_f32 ({passes}xtf32)", row, B * H * vt, per_block(row, cpr),
                    moved, A)
    res = {"fused": [k], "fused_ms": k["ms"], "passes": passes,
           "roofline_ms": (io + out) / (A["hbm_tb_s"] * 1e12) * 1e3}
    has_split = any(r["kernel"] == "gla_chunk_fwd_f32_split_kernel" for r in stats["rows"])
    if has_split:
        state = chunks * H * K * V * 4  # float32 chunk states
        scan = find(stats, "gla_chunk_state_scan_f32_kernel", [passes], [], dtype="f32")
        # a scan block reads k and g of its 64 key dims and v of its 64 columns
        scan_bytes = tok * (vt * 2 * K * 4 + kt * V * 4) + state + final
        sp = find(stats, "gla_chunk_fwd_f32_split_kernel", [KT, passes], [], dtype="f32")
        res["split"] = [
            kernel_time(f"state_scan_f32 ({passes}xtf32)", scan, B * H * kt * vt,
                        per_block(scan, cpr), scan_bytes, A),
            kernel_time(f"chunk_fwd_f32_split ({passes}xtf32)", sp, chunks * H,
                        per_block(sp, 1), io + tok * V * 4 + state, A)]
        res["split_ms"] = sum(x["ms"] for x in res["split"])
    res["path"] = ("split" if has_split and picks_split(B, H, V, cpr, A, k["blocks_per_sm"])
                   else "fused")
    res["kernels"] = res[res["path"]]
    res["ms"] = res[res["path"] + "_ms"]
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


def backward_f32(stats, B, T, H, K, passes, A):
    """The float32 backward: both state scans in one grid (2 x N x H x ceil(V / 64) blocks of
    4 warps, each walking all the chunks of its sequence), then one block per (chunk, head)."""
    V = K
    KT = 64 if K <= 64 else 128
    cpr = math.ceil(T / A["kC"])
    chunks = B * cpr
    vt = math.ceil(V / 64)
    tok = B * T * H
    state = chunks * H * K * V * 4  # one float32 workspace state array
    scans = find(stats, "gla_chunk_state_scans_f32_kernel", [KT, passes], [], dtype="f32")
    # each scan block reads its sequence's key-side tile and gates (all K) and its 64 V columns
    scans_bytes = 2 * tok * (vt * 2 * K * 4 + V * 4) + 2 * state + B * H * K * V * 4 * 2
    bw = find(stats, "gla_chunk_bwd_f32_kernel", [KT, passes], [], dtype="f32")
    # q (twice), k, g, v, dO read; both states read; dq, dk, dg, dv written
    bw_bytes = tok * (4 * K * 4 + 2 * V * 4) + 2 * state + tok * (3 * K * 4 + V * 4)
    ks = [kernel_time(f"state_scans_f32 ({passes}xtf32)", scans, 2 * B * H * vt,
                      per_block(scans, cpr), scans_bytes, A, per_warp_scale=0.5),
          kernel_time(f"chunk_bwd_f32 ({passes}xtf32)", bw, chunks * H, per_block(bw, 1),
                      bw_bytes, A)]
    io = tok * (3 * K * 4 + 2 * V * 4) + tok * (3 * K * 4 + V * 4)
    return {"kernels": ks, "ms": sum(k["ms"] for k in ks),
            "roofline_ms": io / (A["hbm_tb_s"] * 1e12) * 1e3, "passes": passes}


def bwd_workspace_bytes(B, T, H, K, A):
    """Backward workspaces in bytes (dense inputs): the 16-bit chunked backward's two 16-bit
    states per chunk and head, the float32 chunked backward's two float32 ones, and the float32
    recurrent backward's (what float32 ran before; recurrent_bwd_cuda_workspace_floats: dq and
    dk partials per 32-column V tile, plus rowsum partials)."""
    V = K
    chunks = B * math.ceil(T / A["kC"])
    nt = math.ceil(V / 32)
    return {"bf16": 2 * chunks * H * K * V * 2, "f32_chunked": 2 * chunks * H * K * V * 4,
            "f32_recurrent": 4 * nt * (2 * B * T * H * K + B * H * K)}


def f32_backward_lines(stats, rows, A):
    if not any(r["kernel"] == "gla_chunk_bwd_f32_kernel" for r in stats["rows"]):
        return ["(no float32 backward in the stats: rerun sass_stats.py)"]
    bf = {tuple(r["shape"][:4]): r for r in rows if r.get("dtype") == "bf16"}
    out = ["float32 forward + backward vs the bf16 forward + backward above",
           f"{'shape (B,T,H,K=V)':<22}{'precision':<10}{'bwd ms':>8}{'fwd+bwd':>9}"
           f"{'x bf16':>8}  backward kernels (ms, bound)"]
    for B, T, H, K in TARGET_SHAPES:
        for prec, (passes, _) in TARGETS.items():
            fw = forward_f32(stats, B, T, H, K, passes, A)
            bw = backward_f32(stats, B, T, H, K, passes, A)
            fb = fw["ms"] + bw["ms"]
            ref = bf[(B, T, H, K)]["forward_backward_ms"]
            desc = "; ".join(f"{k['kernel']} {k['ms']:.3f} {k['bound']}" for k in bw["kernels"])
            out.append(f"{str((B, T, H, K)):<22}{prec:<10}{bw['ms']:>8.3f}{fb:>9.3f}"
                       f"{fb / ref:>8.2f}  {desc}")
            rows.append({"shape": [B, T, H, K, K], "dtype": "f32", "precision": prec,
                         "backward": bw, "backward_ms": bw["ms"], "forward_backward_ms": fb,
                         "bf16_forward_backward_ms": ref, "fwd_bwd_ratio_vs_bf16": fb / ref})
    out.append("")
    out.append(f"{'backward workspace (bytes)':<28}{'bf16':>14}{'f32 chunked':>14}{'x bf16':>8}"
               f"  {'(target <= 2x)':<16}{'f32 recurrent':>14}")
    for B, T, H, K in TARGET_SHAPES:
        ws = bwd_workspace_bytes(B, T, H, K, A)
        ratio = ws["f32_chunked"] / ws["bf16"]
        out.append(f"{str((B, T, H, K)):<28}{ws['bf16']:>14}{ws['f32_chunked']:>14}"
                   f"{ratio:>8.2f}  {'met' if ratio <= 2 else 'missed':<16}"
                   f"{ws['f32_recurrent']:>14}")
        rows.append({"shape": [B, T, H, K, K], "workspace_bytes": ws})
    return out


def decode(BH, K, A, esz=2):
    """fused_recurrent_gla, one token: the float32 state is read and written once; memory
    bound (its per-token work is a few hundred instructions per state column)."""
    V = K
    bytes_moved = BH * (K * V * 4 * 2 + (2 * K * esz + 4 * K + 2 * V * esz))
    t = bytes_moved / (A["hbm_tb_s"] * 1e12) + A["launch_us"] * 1e-6
    return {"BH": BH, "K": K, "V": V, "bytes": bytes_moved, "ms": t * 1e3,
            "memory_ms": bytes_moved / (A["hbm_tb_s"] * 1e12) * 1e3}


def f32_lines(stats, rows, A):
    """The float32 forward at both precisions next to the bf16 forward of the same shape."""
    if not any(r["kernel"] == "gla_chunk_fwd_f32_kernel" for r in stats["rows"]):
        return ["(no float32 forward in the stats: rerun sass_stats.py)"]
    bf = {tuple(r["shape"][:4]): r["forward_ms"] for r in rows if r.get("dtype") == "bf16"}
    out = [f"float32 forward (the path the launcher picks) vs the bf16 forward above; target: "
           f"issue 20, at {', '.join(map(str, TARGET_SHAPES))}",
           f"{'shape (B,T,H,K=V)':<22}{'precision':<10}{'path':<7}{'model ms':>9}{'roof ms':>9}"
           f"{'x bf16':>8}  {'target':<15} kernels: ms, bound (issue / mufu / tensor / memory)"]
    desc = lambda k: (f"{k['kernel']} {k['ms']:.3f} {k['bound']} ({k['issue_ms']:.3f} / "  # noqa: E731
                      f"{k['mufu_ms']:.3f} / {k['tensor_ms']:.3f} / {k['memory_ms']:.3f}; "
                      f"{k['blocks']} blocks)")
    for B, T, H, K in PREFILL:
        for prec, (passes, bound) in TARGETS.items():
            fw = forward_f32(stats, B, T, H, K, passes, A)
            ratio = fw["ms"] / bf[(B, T, H, K)]
            aimed = (B, T, H, K) in TARGET_SHAPES_BY_PRECISION[prec]
            verdict = ("met" if ratio <= bound else "missed") if aimed else "-"
            out.append(f"{str((B, T, H, K)):<22}{prec:<10}{fw['path']:<7}{fw['ms']:>9.3f}"
                       f"{fw['roofline_ms']:>9.3f}{ratio:>8.2f}  "
                       f"{(f'<= {bound:g}x ' + verdict) if aimed else '-':<15} "
                       + "; ".join(desc(k) for k in fw["kernels"]))
            other = "fused" if fw["path"] == "split" else "split"
            if other in fw:
                out.append(f"{'':<32}{other:<7}{fw[other + '_ms']:>9.3f}{'':>9}"
                           f"{fw[other + '_ms'] / bf[(B, T, H, K)]:>8.2f}  {'':<15} "
                           + "; ".join(desc(k) for k in fw[other]))
            rows.append({"shape": [B, T, H, K, K], "dtype": "f32", "precision": prec,
                         "forward": fw, "forward_ms": fw["ms"], "bf16_forward_ms":
                         bf[(B, T, H, K)], "ratio_vs_bf16": ratio, "target_ratio": bound,
                         "target_met": ratio <= bound if aimed else None})
    out.append("")
    out += f32_phase_lines(stats, TARGET_SHAPES[0], A)
    return out


def f32_phase_lines(stats, shape, A):
    """The float32 forward's issue time at one shape, by phase (sass_stats.py's PHASES)."""
    B, T, H, K = shape
    KT = 64 if K <= 64 else 128
    chunks = math.ceil(T / A["kC"])
    ph = {}
    for prec, (passes, _) in TARGETS.items():
        row = find(stats, "gla_chunk_fwd_f32_kernel", [KT, passes], [], dtype="f32")
        ph[prec] = row.get("phases_per_warp_per_chunk", {})
    if not all(ph.values()):
        return []
    out = [f"float32 forward at {shape}: issue time by phase, ms (share); a block's warps walk "
           f"{chunks} chunks at 1 instruction per clock",
           f"  {'phase':<58}" + "".join(f"{p:>16}" for p in ph)]
    ms = {p: {lb: d["all"] * chunks / (A["clock_ghz"] * 1e9) * 1e3 for lb, d in v.items()}
          for p, v in ph.items()}
    tot = {p: sum(v.values()) for p, v in ms.items()}
    for lb in ph["highest"]:
        out.append(f"  {lb:<58}" + "".join(f"{ms[p][lb]:>9.3f} ({ms[p][lb] / tot[p]:>3.0%})"
                                            for p in ph))
    cvt = {p: sum(d["tf32_cvt"] for d in v.values()) * chunks / (A["clock_ghz"] * 1e9) * 1e3
           for p, v in ph.items()}
    out.append(f"  {'of all phases: tf32 operand rounding':<58}" +
               "".join(f"{cvt[p]:>9.3f} ({cvt[p] / tot[p]:>3.0%})" for p in ph))
    return out


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
    lines += f32_lines(stats, rows, A)
    lines.append("")
    lines += f32_backward_lines(stats, rows, A)
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
                f"{meta['stats']} (commit {meta['stats_commit']}). Estimated H200 times, bf16 "
                f"forward + backward and the float32 forward and backward, no GPU run; method: "
                f"benchmarks/gpu_model.py docstring.\n\n```\n{text}\n```\n")


if __name__ == "__main__":
    main()
