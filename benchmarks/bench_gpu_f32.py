"""The float32 chunked forward and backward on the GPU (issue 20; docs/cuda_float32.md):
gla_ext's chunk_gla on float32 q/k/v under torch's matmul precision "highest" (3xTF32) and
"high" (one tf32 pass) against fla's chunk_gla on the same float32 inputs and against
gla_ext's own bf16 path, and every output's (every gradient's) error against float64 in the
same run.

Used by bench_gpu.py (its "f32" section: bench_f32, then bench_f32_bwd for forward + backward
through autograd with a random gradient on o; its error column is the largest relative error
of dq, dk, dv, dg). Rows per shape: median forward times, the ratios the
issue targets (float32 / bf16: "high" <= 1.6x, "highest" <= 3x), the speed-up over fla, and the
relative errors ||x - ref|| / ||ref|| of o and the final state against
gla_ext.reference.chunk_gla_reference in float64 (bounds: "highest" 1e-5, "high" 1e-3, the
emulator tests' bounds; fla's error is reported without a bound). Without fla the fla columns
are skipped with a message; everything else still runs. A "paths" line per forward row
times both forward paths forced (GLA_EXT_CHUNK_FWD=fused|split) and checks that the split path
gives the fused path's bits.
"""
from __future__ import annotations

import math
import os

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


def at_path(path, fn):
    """fn() with the chunked forward forced fused or split (GLA_EXT_CHUNK_FWD, read at every
    call by the launcher's rule; restored afterwards)."""
    previous = os.environ.get("GLA_EXT_CHUNK_FWD")
    os.environ["GLA_EXT_CHUNK_FWD"] = path
    try:
        return fn()
    finally:
        if previous is None:
            del os.environ["GLA_EXT_CHUNK_FWD"]
        else:
            os.environ["GLA_EXT_CHUNK_FWD"] = previous


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


def paths(row) -> str:
    """Both forward paths forced (GLA_EXT_CHUNK_FWD): times, and whether split gave the fused
    path's bits (the emulator tests' claim)."""
    return "    paths " + "; ".join(
        f"{p}: fused {row[p + '_fused_s'] * 1e3:.3f} ms, split {row[p + '_split_s'] * 1e3:.3f} "
        f"ms, split error {row[p + '_split_err_o']:.1e}, split == fused bitwise: "
        f"{'yes' if row[p + '_split_equal'] else 'NO'}" for p in TARGETS)


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
    for prec in TARGETS:  # both paths forced: times, split == fused bitwise, split's error
        found = {}
        for path in ("fused", "split"):
            found[path] = at_path(path, lambda: at_precision(prec, lambda: ours(True)))
            row[f"{prec}_{path}_s"] = at_path(path, lambda: at_precision(
                prec, lambda: timer(lambda: ours()[0])))[0]
        row[f"{prec}_split_equal"] = all(torch.equal(a, b) for a, b in
                                         zip(found["fused"], found["split"]))
        row[f"{prec}_split_err_o"] = rel_err(found["split"][0], ref_o)
        del found
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


def _rows(shapes, measure_fn, head, format_fn, timer, rows, lines, fla, fla_error, device,
          save):
    """One row per shape (a shape that fails is reported and the next one runs)."""
    lines += [""] + head
    print("\n" + "\n".join(head), flush=True)
    if fla is None:
        msg = f"    fla not importable ({fla_error}): fla columns skipped"
        lines.append(msg)
        print(msg, flush=True)
    for shape in shapes:
        try:
            row = measure_fn(shape, timer, fla, device)
        except Exception as exc:  # noqa: BLE001 - later sections still run
            msg = f"    {shape}: failed: {type(exc).__name__}: {exc}"
            lines.append(msg)
            print(msg, flush=True)
            continue
        finally:
            if device == "cuda":
                torch.cuda.empty_cache()
        rows.append(row)
        out = format_fn(row)
        lines += out
        print("\n".join(out), flush=True)
        save()


def bench_f32(shapes, timer, rows, lines, fla=None, fla_error=None, device="cuda",
              save=lambda: None):
    """Times and checks the forward, one row per shape; timer(fn) -> (seconds, peak bytes)."""
    def fmt(row):
        B, T, H, D = (row[x] for x in "BTHD")
        return [(f"{'':8} {B:2d} {T:6d} {H:3d} {D:4d} | {row['bf16_s'] * 1e3:8.3f} "
                 f"{row['highest_s'] * 1e3:8.3f} {row['high_s'] * 1e3:8.3f} "
                 f"{row['fla_s'] * 1e3:8.3f} | {row['highest_over_bf16']:6.2f}x "
                 f"{row['high_over_bf16']:8.2f}x {row['fla_s'] / row['highest_s']:5.2f}x | "
                 f"{row['highest_err_o']:8.1e} {row['highest_err_ht']:8.1e} "
                 f"{row['high_err_o']:10.1e} {row['high_err_ht']:8.1e} "
                 f"{row['fla_err_o']:8.1e} {row['fla_err_ht']:8.1e}"), paths(row),
                verdicts(row)]
    _rows(shapes, measure, header(), fmt, timer, rows, lines, fla, fla_error, device, save)


# ---- forward + backward --------------------------------------------------------------------

def grads(fn, inputs, do):
    """d(o . do) / d(q, k, v, g) through autograd, o = fn(q, k, v, g)."""
    leaves = [x.detach().clone().requires_grad_() for x in inputs]
    return torch.autograd.grad(fn(*leaves), leaves, do)


def max_grad_err(found, refs) -> float:
    return max(rel_err(x, ref) for x, ref in zip(found, refs))


def measure_bwd(shape, timer, fla, device):
    """One forward + backward row: times of the whole step, the largest gradient error
    against float64 (NaN when the float64 reference does not fit)."""
    B, T, H, D = shape
    backend = "cuda" if device == "cuda" else "cpu"
    inputs = f32_inputs(B, T, H, D, device)
    do = torch.randn_like(inputs[2])
    row = {"mode": "f32-fwd+bwd", "B": B, "T": T, "H": H, "D": D}
    try:
        refs = grads(lambda *x: chunk_gla_reference(*x, chunk_size=64)[0],
                     [x.double() for x in inputs], do.double())
    except torch.cuda.OutOfMemoryError:
        refs = None
        print(f"    {shape}: the float64 reference gradients do not fit: errors NaN", flush=True)

    def ours(x=inputs, d=do):
        return grads(lambda *t: chunk_gla(*t, backend=backend)[0], x, d)
    for prec in TARGETS:
        found = at_precision(prec, ours)
        row[f"{prec}_err"] = max_grad_err(found, refs) if refs is not None else math.nan
        del found
        row[f"{prec}_s"] = at_precision(prec, lambda: timer(ours))[0]
    row["fla_s"] = row["fla_err"] = math.nan
    if fla is not None:
        try:
            def peer():
                return grads(lambda *t: fla(*t)[0], inputs, do)
            found = peer()
            row["fla_err"] = max_grad_err(found, refs) if refs is not None else math.nan
            del found
            row["fla_s"] = timer(peer)[0]
        except Exception as exc:  # noqa: BLE001 - a failing peer is reported, not fatal
            print(f"    fla failed: {type(exc).__name__}: {exc}", flush=True)
    del refs
    low = [x.bfloat16() for x in inputs[:3]] + [inputs[3]]
    row["bf16_s"] = timer(lambda: ours(low, do.bfloat16()))[0]
    for prec in TARGETS:
        row[f"{prec}_over_bf16"] = row[f"{prec}_s"] / row["bf16_s"]
    return row


def bench_f32_bwd(shapes, timer, rows, lines, fla=None, fla_error=None, device="cuda",
                  save=lambda: None):
    """Times and checks forward + backward, one row per shape."""
    h = (f"{'f32 f+b':8} {'B':>2} {'T':>6} {'H':>3} {'D':>4} | {'bf16 ms':>8} {'highest':>8} "
         f"{'high':>8} {'fla f32':>8} | {'hi/bf16':>7} {'high/bf16':>9} {'fla/hi':>6} | "
         f"{'err hi':>8} {'err high':>8} {'err fla':>8}")

    def fmt(row):
        B, T, H, D = (row[x] for x in "BTHD")
        verdict = "    bwd " + "; ".join(
            f"{p}: {row[p + '_over_bf16']:.2f}x bf16 fwd+bwd, gradient error "
            f"{row[p + '_err']:.1e} ({'ok' if row[p + '_err'] <= e else 'ABOVE'} <= {e:g})"
            for p, (_, e) in TARGETS.items())
        return [(f"{'':8} {B:2d} {T:6d} {H:3d} {D:4d} | {row['bf16_s'] * 1e3:8.3f} "
                 f"{row['highest_s'] * 1e3:8.3f} {row['high_s'] * 1e3:8.3f} "
                 f"{row['fla_s'] * 1e3:8.3f} | {row['highest_over_bf16']:6.2f}x "
                 f"{row['high_over_bf16']:8.2f}x {row['fla_s'] / row['highest_s']:5.2f}x | "
                 f"{row['highest_err']:8.1e} {row['high_err']:8.1e} {row['fla_err']:8.1e}"),
                verdict]
    _rows(shapes, measure_bwd, [h, "-" * len(h)], fmt, timer, rows, lines, fla, fla_error,
          device, save)
