"""The float32 chunked forward on the GPU (issue 20; docs/cuda_float32.md): gla_ext's chunk_gla
on float32 q/k/v under torch's matmul precision "highest" (3xTF32) and "high" (one tf32 pass)
against fla's chunk_gla on the same float32 inputs and against gla_ext's own bf16 forward, and
every output's error against float64 in the same run.

Used by bench_gpu.py (its "f32" section). Rows per shape: median forward times, the ratios the
issue targets (float32 / bf16: "high" <= 1.6x, "highest" <= 3x), the speed-up over fla, and the
relative errors ||x - ref|| / ||ref|| of o and the final state against
gla_ext.reference.chunk_gla_reference in float64 (bounds: "highest" 1e-5, "high" 1e-3, the
emulator tests' bounds; fla's error is reported without a bound). Without fla the fla columns
are skipped with a message; everything else still runs.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from gla_ext import chunk_gla
from gla_ext.reference import chunk_gla_reference

SHAPES = [(4, 2048, 16, 128), (2, 16384, 16, 128)]
# precision -> (bound on time / the bf16 forward's, bound on the relative error vs float64)
TARGETS = {"highest": (3.0, 1e-5), "high": (1.6, 1e-3)}


def f32_inputs(B, T, H, D, device):
    """float32 q, k, v and gates log-sigmoid / 16 (as bench_gpu's bf16 inputs)."""
    q, k, v = (torch.randn(B, T, H, D, device=device) for _ in range(3))
    g = F.logsigmoid(torch.randn(B, T, H, D, device=device)) / 16
    return q, k, v, g


def rel_err(x, ref) -> float:
    """||x - ref|| / ||ref|| in float64; inf when x holds NaN or inf (unwritten, overflowed)."""
    x = x.detach().double()
    if not torch.isfinite(x).all():
        return math.inf
    return ((x - ref).norm() / ref.norm()).item()


def at_precision(precision, fn):
    """fn() under torch.set_float32_matmul_precision(precision), restored afterwards (the CUDA
    float32 forward reads it at every call)."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        return fn()
    finally:
        torch.set_float32_matmul_precision(previous)


def header() -> list[str]:
    h = (f"{'f32 fwd':8} {'B':>2} {'T':>6} {'H':>3} {'D':>4} | {'bf16 ms':>8} {'highest':>8} "
         f"{'high':>8} {'fla f32':>8} | {'hi/bf16':>7} {'high/bf16':>9} {'fla/hi':>6} | "
         f"{'err hi o':>8} {'ht':>8} {'err high o':>10} {'ht':>8} {'fla o':>8} {'ht':>8}")
    return [h, "-" * len(h)]


def verdicts(row) -> str:
    """The issue's targets for one row: time ratios and error bounds, met or missed."""
    out = []
    for prec, (ratio, err) in TARGETS.items():
        r = row[f"{prec}_over_bf16"]
        e = max(row[f"{prec}_err_o"], row[f"{prec}_err_ht"])
        out.append(f"{prec}: {r:.2f}x bf16 ({'met' if r <= ratio else 'MISSED'} <= {ratio:g}x), "
                   f"error {e:.1e} ({'ok' if e <= err else 'ABOVE'} <= {err:g})")
    return "    " + "; ".join(out)


def measure(shape, timer, fla, device):
    """One row: times, ratios and errors at one shape (fla's columns NaN without it or when it
    fails; the failure is printed)."""
    B, T, H, D = shape
    backend = "cuda" if device == "cuda" else "cpu"
    q, k, v, g = f32_inputs(B, T, H, D, device)
    ref_o, ref_h = chunk_gla_reference(q.double(), k.double(), v.double(), g.double(),
                                       output_final_state=True, chunk_size=64)
    row = {"mode": "f32-fwd", "B": B, "T": T, "H": H, "D": D}

    def ours(final=False):
        return chunk_gla(q, k, v, g, output_final_state=final, backend=backend)
    for prec in TARGETS:
        o, ht = at_precision(prec, lambda: ours(True))
        row[f"{prec}_err_o"], row[f"{prec}_err_ht"] = rel_err(o, ref_o), rel_err(ht, ref_h)
        del o, ht
        row[f"{prec}_s"] = at_precision(prec, lambda: timer(lambda: ours()[0]))[0]
    row["fla_s"] = row["fla_err_o"] = row["fla_err_ht"] = math.nan
    if fla is not None:
        try:
            o, ht = fla(q, k, v, g, output_final_state=True)
            row["fla_err_o"], row["fla_err_ht"] = rel_err(o, ref_o), rel_err(ht, ref_h)
            del o, ht
            row["fla_s"] = timer(lambda: fla(q, k, v, g)[0])[0]
        except Exception as exc:  # noqa: BLE001 - a failing peer is reported, not fatal
            print(f"    fla failed: {type(exc).__name__}: {exc}", flush=True)
    del ref_o, ref_h
    qb, kb, vb = (x.bfloat16() for x in (q, k, v))
    row["bf16_s"] = timer(lambda: chunk_gla(qb, kb, vb, g, backend=backend)[0])[0]
    for prec in TARGETS:
        row[f"{prec}_over_bf16"] = row[f"{prec}_s"] / row["bf16_s"]
    return row


def bench_f32(shapes, timer, rows, lines, fla=None, fla_error=None, device="cuda",
              save=lambda: None):
    """Times and checks one row per shape; timer(fn) -> (seconds, peak bytes). A shape that
    fails is reported and the next one runs."""
    lines += [""] + header()
    print("\n" + "\n".join(header()), flush=True)
    if fla is None:
        msg = f"    fla not importable ({fla_error}): fla columns skipped"
        lines.append(msg)
        print(msg, flush=True)
    for B, T, H, D in shapes:
        try:
            row = measure((B, T, H, D), timer, fla, device)
        except Exception as exc:  # noqa: BLE001 - later sections still run
            msg = f"    {(B, T, H, D)}: failed: {type(exc).__name__}: {exc}"
            lines.append(msg)
            print(msg, flush=True)
            continue
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        line = (f"{'':8} {B:2d} {T:6d} {H:3d} {D:4d} | {row['bf16_s'] * 1e3:8.3f} "
                f"{row['highest_s'] * 1e3:8.3f} {row['high_s'] * 1e3:8.3f} "
                f"{row['fla_s'] * 1e3:8.3f} | {row['highest_over_bf16']:6.2f}x "
                f"{row['high_over_bf16']:8.2f}x {row['fla_s'] / row['highest_s']:5.2f}x | "
                f"{row['highest_err_o']:8.1e} {row['highest_err_ht']:8.1e} "
                f"{row['high_err_o']:10.1e} {row['high_err_ht']:8.1e} "
                f"{row['fla_err_o']:8.1e} {row['fla_err_ht']:8.1e}")
        lines += [line, verdicts(row)]
        print(line + "\n" + verdicts(row), flush=True)
        save()
