"""An fla GLA language model on the CPU: gla_ext.integrations.fla vs fla's own model (issue 13).

Model: fla GLAForCausalLM, hidden 768, 12 layers, vocab 32000, fla's other defaults (4 heads,
expand_k 0.5, intermediate 2048, untied head: 134M parameters), random weights.

Measured in one run (medians; every ratio's two sides timed in interleaved rounds, so load
from other processes hits both alike):
  prefill    lm(input_ids) on 512 tokens (all 512 logits), float32 and bfloat16 weights:
             tokens/s and the fraction of the float32 matmul roofline, i.e.
             2 * matmul parameters * 512 FLOPs at the rate torch reaches on a 2048^3 GEMM
             in this run (timed next to each prefill repeat; median) (matmul parameters: every matrix a token multiplies, lm_head
             included, the embedding table excluded: a lookup)
  decode     one Decoder.step per token at batch 1 and 8 (what generate runs per token),
             float32 and bfloat16 weights, against the weight-read bound: one pass reading
             every weight buffer the step streams (a float32 sum over each buffer's bytes)
  fla        fla's model, run on the CPU the only way it can (its naive reference GLA ops and
             plain-PyTorch norms patched in, gla_ext.integrations.fla_cpu_reference), float32:
             prefill of 512 tokens; decode per token as a cached loop over its forward
             (prefill, then model(token, past_key_values=cache)); and transformers'
             generate() per new token, as a user would call it (with transformers 5.x fla
             0.6.0's generate passes the cache under a name the model ignores, so every step
             runs without its state: the timing of what a user gets, not correct output)
Targets (issue 13): decode batch 1 <= 1.5x the weight-read bound (float32); bf16 step
<= 0.6x the float32 step; prefill >= 50% of the float32 matmul roofline; batch 8 decode
<= 1.5x batch 1. Quantized rows (issue 18, --formats; gla_fla.load(quantize=...), float32
activations): int8 step <= 0.6x and int4 step <= 0.4x the bf16 step, each format's step
<= 1.3x its own weight read (packed int8 / int4 bytes + float16 scales), int8 batch 8 <= 1.5x
batch 1, prefill quantized <= 1.2x bf16.

--torch-ops adds, per format, the decode step with torch ops between the packed products
(Decoder(fused=False)) timed in the same rounds, and the ratio of the two.

Usage: python benchmarks/bench_lm.py [--quick] [--no-fla] [--torch-ops]
                                     [--formats float32,bfloat16,int8,int4]
Writes benchmarks/results/bench_lm{_quick}.{json,md,png}.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import pyplot, save_results  # noqa: E402
from gla_ext.integrations import fla as gla_fla  # noqa: E402
from gla_ext.integrations.fla_decode import Decoder, packed_linear_available  # noqa: E402

CONFIG = dict(hidden_size=768, num_hidden_layers=12, vocab_size=32000)
TORCH_OPS = "torch ops between products"
PREFILL_T = 512


def now():
    return time.perf_counter()


def timed(fn) -> float:
    t0 = now()
    fn()
    return now() - t0


def median(xs):
    return statistics.median(xs)


def matmul_rate(reps: int) -> float:
    """float32 FLOP/s torch reaches on a 2048^3 GEMM (best of reps, after a warm-up)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    return 2 * 2048 ** 3 / min(timed(lambda: a @ b) for _ in range(reps))


def weight_buffers(decoder) -> list[torch.Tensor]:
    """The matrices one decode step streams, in the decoder's dtype (the originals it packed:
    same byte count), as float32 views for a read pass."""
    lm = decoder.lm
    mats = []
    for blk in lm.blocks:
        for name in ("w_in", "wgk1", "wo", "w_gate_up", "w_down"):
            t = getattr(blk, name)
            if t is not None:
                mats.append(t)
    mats.append(lm.head_weight())
    views = []
    for t in mats:
        if not isinstance(t, torch.Tensor):   # a QuantizedLinear: its buffers, as float32 bits
            for buf in t.buffers():
                flat = buf.contiguous().view(-1).view(torch.uint8)
                views.append(flat[: flat.numel() // 4 * 4].view(torch.float32))
            continue
        flat = t.contiguous().view(-1)
        if flat.dtype != torch.float32:   # 16-bit weights: reinterpret pairs, same bytes
            flat = flat[: flat.numel() // 2 * 2].view(torch.float32)
        views.append(flat)
    return views


def read_pass(views) -> float:
    t0 = now()
    for v in views:
        v.sum()
    return now() - t0


def matmul_params(lm) -> int:
    n = sum(t.numel() for blk in lm.model.blocks for name, t in blk.named_buffers()
            if t is not None and t.dim() == 2)
    return n + lm.model.head_weight().numel()


class OursDecode:
    """One of our decode setups (dtype, batch): a prefilled state and its weight buffers."""

    def __init__(self, lm, batch: int, fused=None):
        self.dec = lm.decoder() if fused is None else Decoder(lm.model, fused=fused)
        ids = torch.randint(0, CONFIG["vocab_size"], (batch, 16))
        _, self.states = lm.prefill(ids)
        self.tok = ids[:, -1]
        self.views = weight_buffers(self.dec)
        self.nbytes = sum(v.numel() * 4 for v in self.views)
        for _ in range(3):
            self.step()
        read_pass(self.views)

    def step(self):
        self.dec.step(self.tok, self.states)


class FlaDecode:
    """fla's cached decode (prefill 16 tokens, then model(token, past_key_values=cache))."""

    def __init__(self, model, batch: int):
        from gla_ext.integrations.fla_cpu_reference import fla_reference_ops
        self.model, self.ops = model, fla_reference_ops
        ids = torch.randint(0, CONFIG["vocab_size"], (batch, 16))
        with self.ops(), torch.no_grad():
            self.out = model(ids, use_cache=True)
        self.step()

    def step(self):
        with self.ops(), torch.no_grad():
            tok = self.out.logits[:, -1:].argmax(-1)
            self.out = self.model(tok, past_key_values=self.out.past_key_values, use_cache=True)


def fla_model():
    from fla.models import GLAConfig, GLAForCausalLM
    torch.manual_seed(0)
    return GLAForCausalLM(GLAConfig(**CONFIG)).eval()


def fla_prefill(model, ids) -> float:
    from gla_ext.integrations.fla_cpu_reference import fla_reference_ops
    with fla_reference_ops(), torch.no_grad():
        return timed(lambda: model(ids))


def fla_generate(model, new_tokens: int) -> float:
    """transformers' generate on fla's model: seconds per new token (prefill of 16 included
    in the total, then divided by the new tokens; the prefill is small next to them)."""
    from gla_ext.integrations.fla_cpu_reference import fla_reference_ops
    ids = torch.randint(0, CONFIG["vocab_size"], (1, 16))
    with fla_reference_ops(), torch.no_grad():
        model.generate(ids, max_new_tokens=2, do_sample=False)   # warm-up
        return timed(lambda: model.generate(ids, max_new_tokens=new_tokens,
                                            do_sample=False)) / new_tokens


def plot(rows, rate, path_png):
    """Decode ms per step against the weight-read bound; prefill tokens/s against the float32
    matmul roofline at `rate` FLOP/s (also from saved JSON)."""
    plt = pyplot()
    if plt is None:
        return
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.5))
    dec_rows = [r for r in rows if r["what"] == "decode"]
    short = {"gla_ext": "ours", f"gla_ext, {TORCH_OPS}": "torch ops"}
    labels = [f"{short.get(r['impl'], 'fla')}\n{r['dtype'][:4]} b{r['batch']}" for r in dec_rows]
    colors = ["tab:blue" if r["impl"] == "gla_ext" else "tab:orange" if r["impl"] in short
              else "tab:gray" for r in dec_rows]
    ax1.bar(range(len(dec_rows)), [r["step_s"] * 1e3 for r in dec_rows], color=colors)
    for i, r in enumerate(dec_rows):
        if "weight_read_s" in r:
            ax1.plot([i - 0.4, i + 0.4], [r["weight_read_s"] * 1e3] * 2, color="k")
    ax1.set_xticks(range(len(dec_rows)), labels, fontsize=5, rotation=90)
    ax1.set_ylabel("ms per step (black: weight-read bound)")
    ax1.set_title("decode (blue: ours, orange: torch ops between products, gray: fla)",
                  fontsize=8)
    ax1.set_yscale("log")
    pre_rows = [r for r in rows if r["what"] == "prefill"]
    ax2.bar(range(len(pre_rows)), [r["tokens_per_s"] for r in pre_rows], color="tab:green")
    ax2.axhline(rate / (2 * next(r["matmul_params"] for r in pre_rows if "matmul_params" in r)),
                color="k", linestyle="--", label="fp32 matmul roofline")
    ax2.set_xticks(range(len(pre_rows)),
                   [f"{r['impl'].split(' (')[0]}\n{r['dtype']}" for r in pre_rows], fontsize=7)
    ax2.set_ylabel(f"prefill tokens/s ({PREFILL_T} tokens)")
    ax2.legend(fontsize=7)
    ax2.set_title("prefill")
    fig.suptitle("fla GLA 134M on CPU: gla_ext vs fla (reference ops)")
    fig.tight_layout()
    fig.savefig(path_png, dpi=110)
    print(f"saved {path_png}")


def quant_targets(rows, results) -> list:
    """Issue 18's ratios for the quantized formats that ran (vs bf16, vs their own read)."""
    out = []
    if ("decode", "bfloat16", 1) not in results:
        return out
    s16 = results[("decode", "bfloat16", 1)][0]
    pre = {r["dtype"]: r["seconds"] for r in rows
           if r["what"] == "prefill" and r["impl"] == "gla_ext"}
    for fmt, goal in (("int8", 0.6), ("int4", 0.4)):
        if ("decode", fmt, 1) not in results:
            continue
        st, rd = results[("decode", fmt, 1)]
        out.append((f"{fmt} step / bf16 step (b1) <= {goal}", st / s16, st / s16 <= goal))
        out.append((f"{fmt} step / its weight read (b1) <= 1.3", st / rd, st / rd <= 1.3))
        if ("decode", fmt, 8) in results:
            r8 = results[("decode", fmt, 8)][0] / st
            out.append((f"{fmt} batch 8 / batch 1 <= 1.5", r8, r8 <= 1.5 if fmt == "int8" else None))
        if fmt in pre and "bfloat16" in pre:
            r = pre[fmt] / pre["bfloat16"]
            out.append((f"prefill {PREFILL_T} {fmt} / bf16 <= 1.2", r, r <= 1.2))
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a few minutes)")
    parser.add_argument("--no-fla", action="store_true", help="skip fla's model")
    parser.add_argument("--formats", default="float32,bfloat16,int8,int4",
                        help="weight formats to run (float32 and bfloat16 are needed for the "
                        "targets)")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: "
                        "torch's); gla_ext's kernels use the same pool")
    parser.add_argument("--torch-ops", action="store_true", help="also time each decode step "
                        "with torch ops between the packed products (Decoder(fused=False), the "
                        "step before gla_ext._C.StepRows) in the same rounds")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    quick = args.quick
    rounds, steps = (3, 5) if quick else (8, 10)
    prefill_reps = 2 if quick else 4
    warnings.filterwarnings("ignore")

    try:
        model = fla_model()     # the weights come from fla's own model class
    except ImportError as exc:
        print(f"fla not importable ({exc}): install fla-core/flash-linear-attention 0.6.0")
        return 1
    torch.manual_seed(1)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters; "
          f"PackedLinear: {packed_linear_available()}; {torch.get_num_threads()} threads")

    rows, results = [], {}
    ids = torch.randint(0, CONFIG["vocab_size"], (1, PREFILL_T))
    formats = args.formats.split(",")
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16}
    lms = {name: (gla_fla.load(model, dtype=dtypes[name]) if name in dtypes
                  else gla_fla.load(model, dtype=torch.float32, quantize=name))
           for name in formats}
    with_fla = not args.no_fla

    # Prefill: every variant and the roofline GEMM once per round, rounds repeated.
    for lm in lms.values():
        lm(ids)   # warm-up
    pre_t = {name: [] for name in lms}
    fla_pre_t, rates = [], []
    for _ in range(prefill_reps):
        rates.append(matmul_rate(1))
        for name, lm in lms.items():
            pre_t[name].append(timed(lambda: lm(ids)))
        if with_fla:
            fla_pre_t.append(fla_prefill(model, ids))
    rate = median(rates)
    P = matmul_params(lms["float32"])
    roof = 2 * P * PREFILL_T / rate
    for name in lms:
        pre = median(pre_t[name])
        rows.append({"what": "prefill", "impl": "gla_ext", "dtype": name, "batch": 1,
                     "tokens": PREFILL_T, "seconds": pre, "seconds_min": min(pre_t[name]),
                     "tokens_per_s": PREFILL_T / pre, "roofline_fraction": roof / pre,
                     "matmul_params": P, "matmul_flops": rate})
        print(f"prefill {name:8} {PREFILL_T} tokens {pre:.3f} s = {PREFILL_T / pre:7.1f} tok/s, "
              f"{roof / pre:.0%} of the float32 matmul roofline ({roof:.3f} s)")
    if with_fla:
        fla_pre = median(fla_pre_t)
        rows.append({"what": "prefill", "impl": "fla (reference ops)", "dtype": "float32",
                     "batch": 1, "tokens": PREFILL_T, "seconds": fla_pre,
                     "seconds_min": min(fla_pre_t), "tokens_per_s": PREFILL_T / fla_pre})
        print(f"fla prefill {PREFILL_T} tokens {fla_pre:.2f} s")

    # Decode: per batch, rounds of [our fp32 steps, fp32 read pass, bf16 steps, bf16 read
    # pass, fla steps], so load from other processes hits every variant alike.
    for batch in (1, 8):
        ours = {name: OursDecode(lm, batch) for name, lm in lms.items()}
        if args.torch_ops:
            ours.update({f"{name} {TORCH_OPS}": OursDecode(lm, batch, fused=False)
                         for name, lm in lms.items()})
        fla_dec = FlaDecode(model, batch) if with_fla else None
        step_t = {name: [] for name in ours}
        read_t = {name: [] for name in ours}
        fla_t = []
        for _ in range(rounds):
            for name, o in ours.items():
                for _ in range(steps):
                    step_t[name].append(timed(o.step))
                read_t[name].append(read_pass(o.views))
            if fla_dec is not None:
                for _ in range(max(2, steps // 3)):
                    fla_t.append(timed(fla_dec.step))
        for key, o in ours.items():
            name, impl = key.split(" ")[0], "gla_ext" if " " not in key else f"gla_ext, {TORCH_OPS}"
            st, rd = median(step_t[key]), median(read_t[key])
            best, rbest = min(step_t[key]), min(read_t[key])
            rows.append({"what": "decode", "impl": impl, "dtype": name, "batch": batch,
                         "step_s": st, "step_min_s": best, "weight_read_s": rd,
                         "weight_read_min_s": rbest, "min_vs_weight_read": best / rbest,
                         "weight_bytes": o.nbytes, "tokens_per_s": batch / st,
                         "vs_weight_read": st / rd})
            results[("decode", key, batch)] = (st, rd)
            print(f"decode  {key:8} batch {batch}: {st * 1e3:7.2f} ms/step (min "
                  f"{best * 1e3:.2f}), {batch / st:7.1f} tok/s, weight read {rd * 1e3:.2f} ms "
                  f"({o.nbytes / 1e6:.0f} MB) -> {st / rd:.2f}x the bound")
        if fla_t:
            fs = median(fla_t)
            rows.append({"what": "decode", "impl": "fla cached loop (reference ops)",
                         "dtype": "float32", "batch": batch, "step_s": fs,
                         "step_min_s": min(fla_t), "tokens_per_s": batch / fs})
            results[("fla_decode", batch)] = fs
            print(f"fla decode batch {batch}: {fs * 1e3:.1f} ms/token (cached loop)")
        del ours, fla_dec

    if with_fla:
        g = fla_generate(model, 8 if quick else 32)
        rows.append({"what": "decode", "impl": "fla generate via transformers (reference ops; "
                     "cache dropped, see docstring)", "dtype": "float32", "batch": 1,
                     "step_s": g, "tokens_per_s": 1 / g})
        results["fla_generate"] = g
        print(f"fla generate: {g * 1e3:.1f} ms/new token")

    # Targets
    s32, r32 = results[("decode", "float32", 1)]
    s16, _ = results[("decode", "bfloat16", 1)]
    s32b8, _ = results[("decode", "float32", 8)]
    pre32 = [r for r in rows if r["what"] == "prefill" and r["impl"] == "gla_ext"
             and r["dtype"] == "float32"][0]
    targets = [
        ("decode b1 fp32 / weight read <= 1.5", s32 / r32, s32 / r32 <= 1.5),
        ("bf16 step / fp32 step <= 0.6", s16 / s32, s16 / s32 <= 0.6),
        ("prefill fp32 roofline fraction >= 0.5", pre32["roofline_fraction"],
         pre32["roofline_fraction"] >= 0.5),
        ("decode b8 / b1 (fp32) <= 1.5", s32b8 / s32, s32b8 / s32 <= 1.5),
    ]
    best = {(r["dtype"], r["batch"]): r for r in rows
            if r["what"] == "decode" and r["impl"] == "gla_ext"}
    targets += [
        ("  same, best steps: b1 fp32 / best read", best[("float32", 1)]["min_vs_weight_read"], None),
        ("  same, best steps: bf16 / fp32 (b1)",
         best[("bfloat16", 1)]["step_min_s"] / best[("float32", 1)]["step_min_s"], None),
        ("  same, best steps: b8 / b1 (fp32)",
         best[("float32", 8)]["step_min_s"] / best[("float32", 1)]["step_min_s"], None),
    ]
    targets += quant_targets(rows, results)
    for name in lms:   # the compiled row math against torch ops between the same products
        for batch in (1, 8):
            other = results.get(("decode", f"{name} {TORCH_OPS}", batch))
            if other:
                targets.append((f"{name} b{batch} step / torch-ops step",
                                results[("decode", name, batch)][0] / other[0], None))
    fla_pre_rows = [r for r in rows if r["what"] == "prefill" and r["impl"].startswith("fla")]
    if fla_pre_rows:
        targets.append(("fla prefill / ours (fp32)",
                        fla_pre_rows[0]["seconds"] / pre32["seconds"], None))
    if ("fla_decode", 1) in results:
        targets.append(("fla decode / ours (fp32, b1)", results[("fla_decode", 1)] / s32, None))
    if "fla_generate" in results:
        targets.append(("fla generate / ours (fp32, b1)", results["fla_generate"] / s32, None))

    lines = [f"{'what':8} {'impl':48} {'dtype':8} {'B':>2} | {'ms':>9} {'tok/s':>8} | note"]
    lines.append("-" * len(lines[0]))
    for r in rows:
        ms = (r.get("seconds") or r.get("step_s")) * 1e3
        note = ""
        if "roofline_fraction" in r:
            note = f"{r['roofline_fraction']:.0%} of fp32 matmul roofline"
        if "vs_weight_read" in r:
            note = (f"{r['vs_weight_read']:.2f}x weight read ({r['weight_read_s'] * 1e3:.2f} ms); "
                    f"best of each: {r['step_min_s'] * 1e3:.2f} ms, "
                    f"{r['min_vs_weight_read']:.2f}x")
        lines.append(f"{r['what']:8} {r['impl'][:48]:48} {r['dtype']:8} {r['batch']:2d} | "
                     f"{ms:9.2f} {r['tokens_per_s']:8.1f} | {note}")
    lines.append("")
    for label, value, ok in targets:
        verdict = "" if ok is None else ("met" if ok else "NOT met")
        lines.append(f"{label:42} {value:6.2f} {verdict}")
    table = "\n".join(lines)
    print(table)

    try:
        from gla_ext.cpu_linear import isa
        cpu_isa = isa()
    except Exception:  # noqa: BLE001 - informational only
        cpu_isa = "unknown"
    name = "bench_lm_quick" if quick else "bench_lm"
    if args.threads:
        name += f"_t{args.threads}"
    extra = {"config": CONFIG, "matmul_flops_fp32": rate, "packed_linear": packed_linear_available(),
             "isa": cpu_isa, "load_average": os.getloadavg(),
             "targets": [{"target": t, "value": v, "met": ok} for t, v, ok in targets]}
    path = save_results(name, rows, table, extra)
    plot(rows, rate, path.replace(".json", ".png"))
    print(f"saved {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
