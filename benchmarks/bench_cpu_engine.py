"""The CPU engine grid (issue 17): fused engine vs plain PyTorch path vs the machine's rates.

Models: the default GLA (embed_dim=287), a 50M GLA (embed_dim=hidden=1024, 4 layers,
8 heads x 128) and fla's 134M GLA config (hidden 768, 12 layers, vocab 32000) through
gla_ext.integrations.fla; float32 and bfloat16 weights. Cells: prefill [1, 60] and
[4, 512]; decode batch 1, 8, 64; pool step at 256 rows (GLA models).

Each cell times, interleaved, best of repeats:
  fused    the fused engine forced (gla_ext.engine_choice.MODE = "fused"; for fla: the
           integration's Decoder with its own GEMVs; fla prefill has no fused path: n/a)
  pytorch  the plain PyTorch path of the same model (GLA.forward_layers / step_layers /
           the pool's layer path; fla: FlaGLALM.hidden_states + logits, its products with
           16-bit weights in their dtype: gla_ext.matmul16 forced "native")
  auto     what GLA.forward / step / pool.step run by default (engine_choice measured per
           shape class on this machine; its choice is printed); fla prefill: FlaGLALM's
           default, whose 16-bit products take matmul16's measured choice ("widened": the
           weights widened to float32 on this CPU)
Prefill cells also time the fused engine with every matrix product forced onto its own
kernels and onto the vendor GEMM (gla_ext.prefill.GEMM = "own" / "vendor"; vendor skipped
where estimated > 20 s; 16-bit weights on its widened route, gla_ext.matmul16, are estimated
at the float32 rate), and list the engine's measured choice per product kind.
With one thread (--threads 1) times are this thread's CPU time (time.thread_time: time spent
descheduled on a shared machine does not count), else wall time.
It reports auto / pytorch (the rule: <= 1.05) and the best time as a fraction of the
matching rate: torch.mm's FLOP/s in the weights' dtype (measured in this run) for cells
with many rows, the weight-read time (weight bytes / measured read bandwidth) for batch 1.

    python benchmarks/bench_cpu_engine.py            # the whole grid (many minutes)
    python benchmarks/bench_cpu_engine.py --quick    # default + 50M, small cells only
    python benchmarks/bench_cpu_engine.py --quant    # decode b1/b8 in fp32/bf16/int8/int4

--quant (issue 18): the fused decode step of the default and 50M GLA with float32, bfloat16,
int8 and int4 weights (gla_ext.quantize_, group 32), each beside its own weight-read time
(the decoder's packed bytes / measured read bandwidth) and the bf16 step of the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import machine, save_results  # noqa: E402

import gla_ext  # noqa: E402
from gla_ext import GLA  # noqa: E402
from gla_ext import cpu_engine  # noqa: E402
from gla_ext import decode as dec  # noqa: E402
from gla_ext import engine_choice as choice  # noqa: E402
from gla_ext._timing import shape_bucket  # noqa: E402
from gla_ext import matmul16  # noqa: E402
from gla_ext import prefill as pf  # noqa: E402

GLA_MODELS = {
    "default": dict(embed_dim=287),
    "50M": dict(embed_dim=1024, hidden_size=1024, num_layers=4, num_heads=8, head_dim=128,
                dropout=0.0),
}
FLA_134M = dict(hidden_size=768, num_hidden_layers=12, vocab_size=32000)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
PREFILL = [(1, 60), (4, 512)]
DECODE = [1, 8, 64]
POOL_ROWS = 256
CLOCK = {"fn": time.perf_counter, "name": "wall time"}   # main() sets thread time for 1 thread


def best_of(fns, min_reps=3, max_reps=100, min_seconds=0.5, clock=None):
    """Best seconds per call of each fn, interleaved (so load changes hit all alike); a fn
    that is None (skipped) gives NaN. clock=time.thread_time: CPU time of this thread (for
    single-threaded calls on a shared machine: time spent descheduled does not count);
    default: CLOCK."""
    clock = clock or CLOCK["fn"]
    for fn in fns:
        if fn is not None:
            fn()                              # warm: packing, oneDNN primitives, choices
    best = [float("inf") if fn is not None else float("nan") for fn in fns]
    started, reps = time.perf_counter(), 0
    while reps < min_reps or (reps < max_reps and time.perf_counter() - started < min_seconds):
        for i, fn in enumerate(fns):
            if fn is not None:
                t0 = clock()
                fn()
                best[i] = min(best[i], clock() - t0)
        reps += 1
    return best


# Cells whose PyTorch path would take longer than this per call (estimated from the model's
# FLOPs and torch.mm's measured rate in the dtype) time the fused engine only.
MAX_PLAIN_SECONDS = 20.0
RATES = {}


def affordable(flops, dtype_name):
    return flops / RATES[dtype_name] <= MAX_PLAIN_SECONDS


def mm_rate(dtype, n):
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    (t,) = best_of([lambda: torch.mm(a, b)], min_reps=3, min_seconds=0.5)
    return 2 * n ** 3 / t


def read_bandwidth(clock=None):
    big = torch.ones(64 * 2 ** 20)            # 256 MB float32, well past the caches
    (t,) = best_of([lambda: big.sum()], min_reps=5, clock=clock)
    return big.numel() * 4 / t


def matrix_params(model):
    return sum(p.numel() for p in model.parameters() if p.dim() == 2)


def weight_bytes(model):
    return sum(p.numel() * p.element_size() for p in model.parameters())


def setting(module, name, value, fn):
    """fn with module.name set to value while it runs."""
    def run():
        saved = getattr(module, name)
        setattr(module, name, value)
        try:
            return fn()
        finally:
            setattr(module, name, saved)
    return run


def forced(mode, fn):
    """fn with gla_ext.engine_choice.MODE forced."""
    return setting(choice, "MODE", mode, fn)


def gemm_forced(gemm, fn):
    """fn with the fused prefill's matrix engine forced (gla_ext.prefill.GEMM)."""
    return setting(pf, "GEMM", gemm, fn)


def gla_cells(name, dtype_name, quick):
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    model = GLA.build(**GLA_MODELS[name]).eval().to(dtype)
    E = model.embed_dim
    flops_per_row = 2 * matrix_params(model)
    cells = []
    with torch.no_grad():
        for B, T in PREFILL:
            if quick and B * T > 256:
                continue
            x = torch.randn(B, T, E).to(dtype)
            fused = forced("fused", lambda: pf.try_forward(model, x, None, False, False))
            ok = affordable(flops_per_row * B * T, dtype_name)
            times = best_of([fused, (lambda: model.forward_layers(x)) if ok else None,
                             (lambda: model(x)) if ok else None])
            fused()
            engines = pf.engine_of(model)
            # the vendor route of 16-bit weights widened (gla_ext.matmul16) runs at the
            # float32 rate, not at the 16-bit GEMM's
            vendor_ok = ok or (cpu_engine.peek(model).widen16
                               and affordable(flops_per_row * B * T, "fp32"))
            own, vendor = best_of([gemm_forced("own", fused),
                                   gemm_forced("vendor", fused) if vendor_ok else None],
                                  min_reps=2)
            cells.append(dict(cell=f"prefill [{B},{T}]", rows=B * T, kind="prefill",
                              times=times, flops=flops_per_row * B * T,
                              choice=_choice_of(model, "prefill", B, T),
                              own_ms=own * 1e3, vendor_ms=vendor * 1e3,
                              engines=" ".join(f"{k}:{v[0]}" for k, v in engines.items())))
        for B in DECODE:
            if quick and B > 8:
                continue
            x = torch.randn(B, 1, E).to(dtype)
            state = [0.1 * s.normal_() for s in model.init_state(B)]
            fused = forced("fused", lambda: dec.try_step(model, x, state))
            ok = affordable(flops_per_row * B, dtype_name)
            times = best_of([fused, (lambda: model.step_layers(x, state)) if ok else None,
                             (lambda: model.step(x, state)) if ok else None])
            cells.append(dict(cell=f"decode b{B}", rows=B, kind="step", times=times,
                              flops=flops_per_row * B, choice=_choice_of(model, "step", B)))
        if not quick:
            pool = model.state_pool(POOL_ROWS)
            slots = torch.tensor([pool.open() for _ in range(POOL_ROWS)])
            x = torch.randn(POOL_ROWS, 1, E).to(dtype)
            fused = forced("fused", lambda: dec.try_step_pool(model, x, pool.states, slots))
            ok = affordable(flops_per_row * POOL_ROWS, dtype_name)
            times = best_of([fused, (lambda: pool._generic_step(x, slots)) if ok else None,
                             (lambda: pool.step(x, slots)) if ok else None])
            cells.append(dict(cell=f"pool step {POOL_ROWS}", rows=POOL_ROWS, kind="step",
                              times=times, flops=flops_per_row * POOL_ROWS,
                              choice=_choice_of(model, "step", POOL_ROWS)))
            del pool
    return weight_bytes(model), cells


def _choice_of(model, kind, *shape):
    """The measured choice of the class of `shape` ((batch,) or (batch, T)), or "-"."""
    key = tuple(shape_bucket(n) for n in shape)
    picked = [v for k, v in choice.decisions(model).items()
              if k[0] == kind and k[1][:len(key)] == key]
    return picked[-1] if picked else "-"


def fla_cells(dtype_name, quick):
    from fla.models import GLAConfig, GLAForCausalLM

    from gla_ext.integrations import fla as gla_fla
    dtype = DTYPES[dtype_name]
    torch.manual_seed(0)
    lm = gla_fla.load(GLAForCausalLM(GLAConfig(**FLA_134M)).eval(), dtype=dtype)
    inner, vocab = lm.model, FLA_134M["vocab_size"]
    # the matrices a token streams (the embedding is a lookup)
    mats = [w for blk in inner.blocks for w in blk.buffers() if w.dim() == 2] \
        + [inner.head_weight()]
    flops_per_row = 2 * sum(w.numel() for w in mats)
    cells = []
    with torch.inference_mode():
        for B, T in PREFILL:
            if quick and B * T > 256:
                continue
            ids = torch.randint(vocab, (B, T))
            run = lambda: inner.logits(inner.hidden_states(ids)[0][:, -1])  # noqa: E731
            native = setting(matmul16, "MODE", "native", run)   # 16-bit products in their dtype
            times = best_of([native if affordable(flops_per_row * B * T, dtype_name) else None,
                             run])
            route = matmul16.mode()
            widened = route == "widened" or (route == "auto" and any(
                v for k, v in matmul16._choice.items() if k[1] == dtype))
            cells.append(dict(cell=f"prefill [{B},{T}]", rows=B * T, kind="prefill",
                              times=[float("nan"), times[0], times[1]],
                              flops=flops_per_row * B * T,
                              choice="pytorch, widened" if widened else "pytorch (no fused)"))
        decoder = lm.decoder()
        for B in DECODE:
            if quick and B > 8:
                continue
            tok = torch.randint(vocab, (B,))
            kv = decoder.kv_states(inner.zero_states(B))
            heads = inner.zero_states(B)
            plain = lambda: inner.logits(inner.hidden_states(tok[:, None], heads)[0][:, -1])  # noqa: E731
            times = best_of([lambda: decoder.step(tok, kv),
                             plain if affordable(flops_per_row * B, dtype_name) else None])
            cells.append(dict(cell=f"decode b{B}", rows=B, kind="step",
                              times=[times[0], times[1], times[0]], flops=flops_per_row * B,
                              choice="fused (always)"))
    return sum(w.numel() * w.element_size() for w in mats), cells


QUANT_FORMATS = ["fp32", "bf16", "int8", "int4"]
QUANT_DECODE = [1, 8]


def quant_model(name, fmt):
    torch.manual_seed(0)
    model = GLA.build(**GLA_MODELS[name]).eval()
    if fmt in DTYPES:
        return model.to(DTYPES[fmt])
    return gla_ext.quantize_(model, fmt, group_size=32)


def quant_rows(models, bandwidth, clock):
    """One row per (model, format, batch): fused step, PyTorch step, weight-read time."""
    rows = []
    for name in models:
        for fmt in QUANT_FORMATS:
            model = quant_model(name, fmt)
            dtype = next(model.parameters()).dtype
            decoder = dec.decoder(model)
            assert decoder.weight_format == {"fp32": "float32", "bf16": "bfloat16"}.get(fmt, fmt)
            read_s = decoder.weight_bytes / bandwidth
            for B in QUANT_DECODE:
                x = torch.randn(B, 1, model.embed_dim).to(dtype)
                state = [0.1 * s.normal_() for s in model.init_state(B)]
                with torch.no_grad():
                    fused, plain = best_of([lambda: dec.try_step(model, x, state),
                                            lambda: model.step_layers(x, state)], clock=clock)
                rows.append(dict(model=name, format=fmt, batch=B, fused_ms=fused * 1e3,
                                 pytorch_ms=plain * 1e3, weight_bytes=decoder.weight_bytes,
                                 read_ms=read_s * 1e3, isa=decoder.isa,
                                 threads=decoder.threads_for(B)))
                print(rows[-1], flush=True)
    by = {(r["model"], r["format"], r["batch"]): r for r in rows}
    for r in rows:
        r["over_bf16"] = r["fused_ms"] / by[(r["model"], "bf16", r["batch"])]["fused_ms"]
        r["over_read"] = r["fused_ms"] / r["read_ms"]
        r["over_b1"] = r["fused_ms"] / by[(r["model"], r["format"], 1)]["fused_ms"]
    return rows


def quant_table(rows, bandwidth, clock_name):
    head = (f"read bandwidth {bandwidth / 1e9:.1f} GB/s; threads {torch.get_num_threads()}; "
            f"load average {os.getloadavg()[0]:.1f}; times: {clock_name}\n")
    cols = (f"{'model':8} {'format':6} {'batch':>5} {'fused ms':>9} {'pytorch ms':>10} "
            f"{'MB read':>8} {'read ms':>8} {'/bf16':>6} {'/read':>6} {'/b1':>5}")
    lines = [head, cols, "-" * len(cols)]
    for r in rows:
        lines.append(f"{r['model']:8} {r['format']:6} {r['batch']:5} {r['fused_ms']:9.3f} "
                     f"{r['pytorch_ms']:10.3f} {r['weight_bytes'] / 1e6:8.2f} "
                     f"{r['read_ms']:8.3f} {r['over_bf16']:6.2f} {r['over_read']:6.2f} "
                     f"{r['over_b1']:5.2f}")
    lines.append("\nfused: the fused decode step (best of repeats); pytorch: GLA.step_layers "
                 "(dequantizes per call for int8/int4); read ms: the decoder's packed weight "
                 "bytes / read bandwidth; /bf16: fused over the bf16 model's fused step (same "
                 "batch); /read: fused over its own read time; /b1: over its batch-1 step. "
                 "Targets (issue 18, Intel): int8/bf16 <= 0.6, int4/bf16 <= 0.4, /read <= 1.3, "
                 "int8 b8/b1 <= 1.5")
    return "\n".join(lines)


def rss_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_growth(B=4, T=512):
    """RSS growth of a 50M bf16 model over one prefill [B, T] + one step (default path), in
    units of its bf16 parameter bytes; run in a fresh process (--rss) for a clean number."""
    torch.manual_seed(0)
    model = GLA.build(**GLA_MODELS["50M"]).eval().to(torch.bfloat16)
    x = torch.randn(B, T, model.embed_dim).to(torch.bfloat16)
    x_t = torch.randn(B, model.embed_dim).to(torch.bfloat16)
    before = rss_bytes()
    with torch.no_grad():
        _, state = model(x, return_state=True)
        model.step(x_t, state)
    grown = rss_bytes() - before
    return dict(rss_growth_bytes=grown, param_bytes=weight_bytes(model),
                rss_growth_over_params=grown / weight_bytes(model),
                choices={f"{k[0]} {k[1]}": v for k, v in choice.decisions(model).items()})


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="default + 50M, small cells only")
    ap.add_argument("--models", default=None, help="comma list of default,50M,fla134M")
    ap.add_argument("--name", default=None, help="results file name")
    ap.add_argument("--rss", action="store_true", help="only the bf16 50M RSS-growth check")
    ap.add_argument("--quant", action="store_true",
                    help="decode b1/b8 with fp32/bf16/int8/int4 weights vs weight-read time")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if torch.get_num_threads() == 1:
        CLOCK.update(fn=time.thread_time, name="thread CPU time")
    if not gla_ext.extension_loaded():
        sys.exit("gla_ext._C is not built: the fused engine needs it")
    if args.rss:
        print(json.dumps(rss_growth()))
        return
    if args.quant:
        models = args.models.split(",") if args.models else ["default", "50M"]
        # one thread: CPU time of this thread (the step runs on it), else wall time
        one = torch.get_num_threads() == 1
        clock = time.thread_time if one else time.perf_counter
        clock_name = "thread CPU time" if one else "wall time"
        bandwidth = read_bandwidth(clock)
        rows = quant_rows(models, bandwidth, clock)
        bandwidth = max(bandwidth, read_bandwidth(clock))   # the machine's best
        for r in rows:
            r["read_ms"] = r["weight_bytes"] / bandwidth * 1e3
            r["over_read"] = r["fused_ms"] / r["read_ms"]
        table = quant_table(rows, bandwidth, clock_name)
        print(table)
        path = save_results(args.name or "cpu_engine_quant", rows, table,
                            {"read_bandwidth_Bps": bandwidth, "load_average": os.getloadavg(),
                             "isa": os.environ.get("GLA_EXT_CPU_ISA", "auto"),
                             "clock": clock_name})
        print("saved", path)
        return
    models = (args.models.split(",") if args.models
              else ["default", "50M"] if args.quick else ["default", "50M", "fla134M"])
    mm_n = 1024 if args.quick else 2048
    rates = {k: mm_rate(d, mm_n if d == torch.float32 else 256) for k, d in DTYPES.items()}
    RATES.update(rates)
    bandwidth = read_bandwidth()
    rows = []
    for name in models:
        for dname in DTYPES:
            choice.forget()
            wbytes, cells = (fla_cells(dname, args.quick) if name == "fla134M"
                             else gla_cells(name, dname, args.quick))
            for c in cells:
                fused, plain, auto = c.pop("times")
                best = min([t for t in (fused, plain, auto) if t == t] or [float("nan")])
                frac_mm = c["flops"] / best / rates[dname]
                row = dict(model=name, dtype=dname, **c, fused_ms=fused * 1e3,
                           pytorch_ms=plain * 1e3, auto_ms=auto * 1e3,
                           auto_over_pytorch=auto / plain, fused_over_pytorch=fused / plain,
                           mm_fraction=frac_mm, best_ms=best * 1e3)
                if c["rows"] == 1:
                    row["read_time_fraction"] = (wbytes / bandwidth) / best
                rows.append(row)
                print(_line(row), flush=True)
    rates_after = {k: mm_rate(d, mm_n if d == torch.float32 else 256) for k, d in DTYPES.items()}
    rates = {k: max(rates[k], rates_after[k]) for k in rates}   # the machine's best
    for r in rows:
        r["mm_fraction"] = r["flops"] / (r["best_ms"] / 1e3) / rates[r["dtype"]]
    table = _table(rows, rates, bandwidth)
    print(table)
    name = args.name or ("cpu_engine_quick" if args.quick else "cpu_engine")
    rss = None
    if "50M" in models and not args.quick:
        rss = json.loads(subprocess.run(
            [sys.executable, os.path.abspath(__file__), "--rss", "--threads",
             str(torch.get_num_threads())], capture_output=True, text=True, check=True).stdout)
        print("bf16 50M RSS growth over prefill [4,512] + one step:", rss)
    extra = {"rss_check": rss, "mm_flops": rates, "mm_n": mm_n, "read_bandwidth_Bps": bandwidth,
             "load_average": os.getloadavg(), "isa": os.environ.get("GLA_EXT_CPU_ISA", "auto")}
    path = save_results(name, rows, table, extra)
    _plot(rows, path.replace(".json", ".png"))
    print("saved", path)


def _line(r):
    rt = f" read {r['read_time_fraction']:.2f}x" if "read_time_fraction" in r else ""
    return (f"{r['model']:8} {r['dtype']:5} {r['cell']:16} fused {r['fused_ms']:9.2f} ms  "
            f"pytorch {r['pytorch_ms']:9.2f} ms  auto {r['auto_ms']:9.2f} ms  "
            f"auto/pytorch {r['auto_over_pytorch']:5.2f}  mm {100 * r['mm_fraction']:5.1f}%"
            f"{rt}  [{r['choice']}]")


def _table(rows, rates, bandwidth):
    head = (f"torch.mm: fp32 {rates['fp32'] / 1e9:.1f} GFLOP/s, bf16 {rates['bf16'] / 1e9:.1f} "
            f"GFLOP/s; read bandwidth {bandwidth / 1e9:.1f} GB/s; threads "
            f"{torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f}; times: "
            f"{CLOCK['name']}\n")
    cols = (f"{'model':8} {'dtype':5} {'cell':16} {'fused ms':>10} {'pytorch ms':>10} "
            f"{'auto ms':>10} {'auto/pt':>7} {'fused/pt':>8} {'mm %':>6} {'read x':>6}  choice")
    lines = [head, cols, "-" * len(cols)]
    for r in rows:
        rt = f"{r['read_time_fraction']:6.2f}" if "read_time_fraction" in r else f"{'':6}"
        lines.append(f"{r['model']:8} {r['dtype']:5} {r['cell']:16} {r['fused_ms']:10.2f} "
                     f"{r['pytorch_ms']:10.2f} {r['auto_ms']:10.2f} "
                     f"{r['auto_over_pytorch']:7.2f} {r['fused_over_pytorch']:8.2f} "
                     f"{100 * r['mm_fraction']:6.1f} {rt}  {r['choice']}")
    pre = [r for r in rows if "own_ms" in r]
    if pre:
        lines.append("\nfused prefill by matrix engine (own / vendor: every product forced onto "
                     "one; fused: the measured choice per kind, o = own, v = vendor)")
        cols = (f"{'model':8} {'dtype':5} {'cell':16} {'own ms':>10} {'vendor ms':>10} "
                f"{'fused ms':>10} {'fused/pt':>8}  kinds")
        lines += [cols, "-" * len(cols)]
        for r in pre:
            lines.append(f"{r['model']:8} {r['dtype']:5} {r['cell']:16} {r['own_ms']:10.2f} "
                         f"{r['vendor_ms']:10.2f} {r['fused_ms']:10.2f} "
                         f"{r['fused_over_pytorch']:8.2f}  {r['engines']}")
    lines.append("\nauto/pt: the default path over the plain PyTorch path (rule: <= 1.05); "
                 "mm %: model FLOPs per second of the fastest path over torch.mm's rate in "
                 "the same dtype; read x: weight-read time over the fastest path's time "
                 "(batch 1; 1.0 = streaming the weights at the measured bandwidth); nan: "
                 f"PyTorch path not timed (estimated > {MAX_PLAIN_SECONDS:.0f} s per call at "
                 "torch.mm's rate)")
    return "\n".join(lines)


def _plot(rows, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    labels = [f"{r['model']} {r['dtype']} {r['cell']}" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(rows) + 1.5))
    ys = range(len(rows))
    ax.barh([y + 0.2 for y in ys], [r["fused_over_pytorch"] for r in rows], 0.4,
            label="fused engine forced")
    ax.barh([y - 0.2 for y in ys], [r["auto_over_pytorch"] for r in rows], 0.4,
            label="default (measured choice)")
    ax.axvline(1.0, color="k", lw=0.8)
    ax.axvline(1.05, color="r", lw=0.8, ls=":")
    ax.set_yticks(list(ys), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("time / plain PyTorch path time (lower is better)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
