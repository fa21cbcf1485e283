"""Accuracy of quantized weights on a real trained model (issue 18).

Trains a small byte-level GLA language model (fla's GLA config, CONFIG below: 3.6M parameters,
the size issue 18 quotes its baseline for; a fixed number of steps, so the model does not depend
on the machine's load; trained with gla_ext's own model code: gla_ext.integrations.fla_model on
the CPU kernels) on
the CPython standard-library sources of the running Python (every 10th file, by sorted name,
held out), caches the trained weights outside git, and reports held-out bits per byte for
float32, bf16, int8 and int4 at several group sizes, plus plain symmetric int4 rounding as
the baseline to beat: once through the forward (dequantized weights, float activations) and
once token by token through the packed decode step (int8 / int4: int8 activations).

    python benchmarks/quant_accuracy.py [--train-steps 1200] [--cache DIR] [--retrain]

The trained weights are cached under --cache in a file named after the config and the step
count, so a different setting never loads (or overwrites) another setting's model.
"""
from __future__ import annotations

import argparse
import copy
import glob
import math
import os
import sys
import sysconfig
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gla_ext  # noqa: E402
from gla_ext.integrations import fla as gla_fla  # noqa: E402
from gla_ext.quantize import QuantizedLinear  # noqa: E402
from common import save_results  # noqa: E402

CONFIG = dict(hidden_size=256, num_hidden_layers=4, num_heads=4, vocab_size=256,
              tie_word_embeddings=False)
SEQ, BATCH, LR = 256, 16, 3e-3
MATRICES = ("w_in", "wgk1", "wo", "w_gate_up", "w_down")


def corpus():
    """(train bytes, held-out bytes) of the stdlib's top-level .py files."""
    files = sorted(glob.glob(os.path.join(sysconfig.get_paths()["stdlib"], "*.py")))
    train, held = bytearray(), bytearray()
    for i, f in enumerate(files):
        with open(f, "rb") as fh:
            (held if i % 10 == 0 else train).extend(fh.read())
    return (torch.frombuffer(bytes(train), dtype=torch.uint8).long(),
            torch.frombuffer(bytes(held), dtype=torch.uint8).long(), len(files))


def fresh_model(seed=0):
    from fla.models import GLAConfig, GLAForCausalLM
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = GLAForCausalLM(GLAConfig(**CONFIG))
    return gla_fla.load(src, dtype=torch.float32).model


def loss_of(model, ids):
    """Mean next-byte cross entropy (nats) of ids [B, T]."""
    hidden, _ = model.hidden_states(ids[:, :-1])
    logits = model.logits(hidden)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def train(model, data, steps, log):
    params = [t for t in model.buffers() if t is not None and t.dtype == torch.float32]
    for t in params:
        t.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=0.01, betas=(0.9, 0.95))
    gen = torch.Generator().manual_seed(1)
    start = time.perf_counter()
    for step in range(steps):
        frac = step / steps
        for g in opt.param_groups:   # warmup then cosine to 10 %
            g["lr"] = LR * min(1.0, (step + 1) / 50) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
        starts = torch.randint(0, data.numel() - SEQ - 1, (BATCH,), generator=gen)
        ids = torch.stack([data[s:s + SEQ + 1] for s in starts.tolist()])
        loss = loss_of(model, ids)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if (step + 1) % 50 == 0 or step + 1 == steps:
            log(f"step {step + 1}/{steps}, {time.perf_counter() - start:.0f} s, "
                f"loss {loss.item() / math.log(2):.3f} bits/byte", flush=True)
    for t in params:
        t.requires_grad_(False)


@torch.no_grad()
def bits_per_byte(model, held, window=512, limit=None):
    data = held[: limit] if limit else held
    n = (data.numel() - 1) // window
    ids = data[: n * window + 1]
    total, count = 0.0, 0
    for i in range(0, n, 16):   # 16 windows per call, each from a zero state
        rows = [ids[j * window: j * window + window + 1] for j in range(i, min(n, i + 16))]
        batch = torch.stack(rows)
        total += loss_of(model, batch).item() * batch.shape[0] * window
        count += batch.shape[0] * window
    return total / count / math.log(2)


@torch.no_grad()
def bits_per_byte_decode(model, held, window=512, limit=None):
    """bits_per_byte's windows token by token through the fla decode step (Decoder: the packed
    CPU kernels; for int8 / int4 the integer dot products on int8 activations of
    csrc/cpu/linear_qdot_impl.h), all windows as one batch from zero states."""
    from gla_ext.integrations.fla_decode import Decoder
    data = held[: limit] if limit else held
    n = (data.numel() - 1) // window
    batch = torch.stack([data[j * window: j * window + window + 1] for j in range(n)])
    dec, s = Decoder(model), model.settings
    states = [torch.zeros(n, s.num_kv_heads, s.head_k_dim, s.head_v_dim) for _ in model.blocks]
    total = 0.0
    for t in range(window):
        logits = dec.step(batch[:, t], states)
        total += F.cross_entropy(logits, batch[:, t + 1], reduction="sum").item()
    return total / (n * window) / math.log(2)


def to_bf16(model):
    m = copy.deepcopy(model)
    for blk in m.blocks:   # matrices bf16, norms and the gate bias float32 (as load(dtype=bf16))
        for name in MATRICES:
            setattr(blk, name, getattr(blk, name).to(torch.bfloat16))
    m.embed = m.embed.to(torch.bfloat16)
    if m.lm_head is not None:
        m.lm_head = m.lm_head.to(torch.bfloat16)
    return m


def symmetric_int4(model, group):
    """Baseline: plain symmetric rounding w = s q, q in [-8, 7], s = max|w| / 7 (fp16) per group,
    as dequantized float weights."""
    m = copy.deepcopy(model)
    def fake(w):
        rows, cols = w.shape
        g = min(group, cols)
        wg = w.reshape(rows, cols // g, g)
        s = (wg.abs().amax(-1, keepdim=True) / 7).half().float()
        q = torch.where(s > 0, wg / torch.where(s > 0, s, 1), 0).round().clamp(-8, 7)
        return (q * s).reshape(rows, cols)
    for blk in m.blocks:
        for name in MATRICES:
            setattr(blk, name, fake(getattr(blk, name)))
    m.lm_head = fake(m.head_weight())
    return m


def quantized(model, fmt, group):
    m = copy.deepcopy(model)
    gla_ext.quantize_(m, fmt, group_size=group)
    return m


def _fmt_bits(bits):
    return "-" if bits is None else f"{bits:.2f}"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--train-steps", type=int, default=1200)
    ap.add_argument("--cache", default=os.path.join(os.path.expanduser("~"), ".cache", "gla_ext"))
    ap.add_argument("--retrain", action="store_true")
    ap.add_argument("--eval-bytes", type=int, default=200_000)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    train_data, held, nfiles = corpus()
    print(f"stdlib {sysconfig.get_paths()['stdlib']}: {nfiles} files, {train_data.numel()} "
          f"training bytes, {held.numel()} held-out bytes (every 10th file)")
    os.makedirs(args.cache, exist_ok=True)
    path = os.path.join(args.cache, f"quant_accuracy_lm_h{CONFIG['hidden_size']}_l"
                        f"{CONFIG['num_hidden_layers']}_b{BATCH}x{SEQ}_{args.train_steps}steps.pt")
    model = fresh_model()
    info = {}
    if os.path.exists(path) and not args.retrain:
        saved = torch.load(path)
        model.load_state_dict(saved["state"])
        info = saved["info"]
        print(f"trained weights from {path} ({info})")
    else:
        t0 = time.perf_counter()
        train(model, train_data, args.train_steps, print)
        info = dict(steps=args.train_steps, train_seconds=round(time.perf_counter() - t0),
                    threads=torch.get_num_threads(),
                    batch=BATCH, seq=SEQ, lr=LR, python=sysconfig.get_python_version())
        torch.save({"state": model.state_dict(), "info": info}, path)
        print(f"trained {args.train_steps} steps; weights cached at {path}")
    n_params = sum(t.numel() for t in model.buffers() if t is not None)
    variants = [("float32", None, model), ("bf16", None, to_bf16(model))]
    for g in (16, 32):
        variants.append(("int8", g, quantized(model, "int8", g)))
    for g in (16, 32, 64):
        variants.append(("int4", g, quantized(model, "int4", g)))
        variants.append(("int4 symmetric (baseline)", g, symmetric_int4(model, g)))
    rows, base, base_dec = [], None, None
    for name, g, m in variants:
        bpb = bits_per_byte(m, held, limit=args.eval_bytes)
        bpb_dec = bits_per_byte_decode(m, held, limit=args.eval_bytes)
        base = bpb if base is None else base
        base_dec = bpb_dec if base_dec is None else base_dec
        bits = next((q.bits_per_weight for q in m.modules() if isinstance(q, QuantizedLinear)
                     and q.group_size == g), None)
        rows.append(dict(format=name, group_size=g, bits_per_weight=bits, bits_per_byte=bpb,
                         vs_float32_percent=100 * (bpb / base - 1), decode_bits_per_byte=bpb_dec,
                         decode_vs_float32_percent=100 * (bpb_dec / base_dec - 1)))
        print(f"{name:28} group {str(g):4} {bpb:.4f} bits/byte ({rows[-1]['vs_float32_percent']:+.3f} %),"
              f" decode {bpb_dec:.4f} ({rows[-1]['decode_vs_float32_percent']:+.3f} %)", flush=True)
    table = "\n".join([f"{'format':28} {'group':>5} {'bits/w':>6} {'bits/byte':>9} {'vs f32':>8} "
                       f"{'decode':>9} {'vs f32':>8}"] + [
        f"{r['format']:28} {str(r['group_size']):>5} "
        f"{_fmt_bits(r['bits_per_weight']):>6} "
        f"{r['bits_per_byte']:9.4f} {r['vs_float32_percent']:+7.3f}% "
        f"{r['decode_bits_per_byte']:9.4f} {r['decode_vs_float32_percent']:+7.3f}%" for r in rows])
    save_results("quant_accuracy", rows, table, extra=dict(
        model=dict(CONFIG, parameters=n_params), training=info,
        held_out=f"every 10th stdlib top-level .py file, first {args.eval_bytes} bytes, "
                 "windows of 512 from a zero state",
        columns="bits/byte: the forward (prefill path: quantized weights dequantized per call, "
                "float activations); decode: the same windows token by token through the packed "
                "decode step (int8 / int4: int8 activations per group, integer dot products)"))
    print(table)


if __name__ == "__main__":
    main()
