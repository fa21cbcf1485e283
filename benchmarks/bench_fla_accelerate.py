"""fla's own GLA model under gla_ext's accelerate() on the CPU (issue 19).

Model: fla GLAForCausalLM with fla's defaults at hidden 768, 12 layers, vocab 32000 (4 heads,
expand_k 0.5, intermediate 2048, fuse_norm / fuse_swiglu / fuse_cross_entropy on: 134M
parameters), random weights, float32, torch threads as given (default 1).

  train   one training step, batch 1 x 512 tokens: model(ids, labels=ids).loss, backward,
          AdamW step. accelerate() against fla's model with its reference ops patched in
          (gla_ext.integrations.fla_cpu_reference: fla's naive GLA recurrence, the same
          PyTorch norms / MLP / loss). Target: >= 3x faster. Also printed: the matmul floor,
          6 FLOPs per matmul parameter per token at this machine's float32 GEMM rate, which
          both sides pay and which bounds the ratio.
  decode  per token at batch 1 after a 16-token prompt: fla's cached loop
          (model(token, past_key_values=cache)) under accelerate(), against
          gla_ext.integrations.fla.load's Decoder.step (the loader's fast path), and
          transformers' generate() under accelerate() (32 new tokens, prompt included).
          Target: accelerated loop <= 1.5x the loader's time per token.
Times: thread CPU time (time.thread_time; the machine is shared, CPU time is what the work
costs) and wall time, best of the repeats; the two sides of each ratio alternate.

Usage: python benchmarks/bench_fla_accelerate.py [--quick] [--threads N] [--repeats R]
Writes benchmarks/results/fla_accelerate{_quick}.{json,md}.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import save_results  # noqa: E402
from gla_ext.integrations import fla as gla_fla  # noqa: E402
from gla_ext.integrations.fla_cpu_reference import fla_reference_ops  # noqa: E402

CONFIG = dict(hidden_size=768, num_hidden_layers=12, vocab_size=32000)
QUICK = dict(hidden_size=128, num_hidden_layers=2, vocab_size=1000)


def measure(fn):
    """(thread CPU seconds, wall seconds) of one call."""
    c0, w0 = time.thread_time(), time.perf_counter()
    fn()
    return time.thread_time() - c0, time.perf_counter() - w0


def best(samples):
    return min(s[0] for s in samples), min(s[1] for s in samples)


def build(config):
    from fla.models import GLAConfig, GLAForCausalLM
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return GLAForCausalLM(GLAConfig(**config))


def train_step(model, opt, ids):
    def run():
        opt.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        opt.step()
    return run


def measured_in(ctx, fn):
    """measure(fn) with ctx entered outside the timing (switching patches costs ~0.1 s)."""
    with ctx():
        return measure(fn)


class CachedLoop:
    """fla's cached decoding (run under accelerate()): one model(token, cache) per step."""

    def __init__(self, model, prompt):
        self.model = model
        with gla_fla.accelerated(), torch.no_grad():
            self.out = model(prompt, use_cache=True)

    def step(self):
        with torch.no_grad():
            tok = self.out.logits[:, -1:].argmax(-1)
            self.out = self.model(tok, past_key_values=self.out.past_key_values,
                                  use_cache=True)


class LoaderSteps:
    """gla_ext's loader: Decoder.step per token on its packed weights."""

    def __init__(self, model, prompt):
        self.lm = gla_fla.load(model)
        logits, self.states = self.lm.prefill(prompt)
        self.tok = logits.argmax(-1)

    def step(self):
        self.tok = self.lm.decoder().step(self.tok, self.states).argmax(-1)


def per_token(stepper, n):
    def run():
        for _ in range(n):
            stepper.step()
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny model (a smoke run)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=16, help="decode tokens per timed round")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    config = QUICK if args.quick else CONFIG
    T = 64 if args.quick else 512
    gla_fla.accelerate(False)
    model = build(config)
    n_params = sum(p.numel() for p in model.parameters())
    rows, lines = [], []

    def row(what, impl, cpu, wall, unit, note=""):
        rows.append(dict(what=what, impl=impl, cpu_s=cpu, wall_s=wall, unit=unit, note=note))
        lines.append(f"{what:7s} {impl:44s} | {cpu * 1e3:10.1f} {wall * 1e3:10.1f} ms {unit:9s}"
                     f" | {note}")

    # training step: batch 1 x T; the two sides alternate
    ids = torch.randint(0, config["vocab_size"], (1, T))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    step = train_step(model, opt, ids)
    ours, ref = [], []
    for _ in range(args.repeats):
        ours.append(measured_in(gla_fla.accelerated, step))
        ref.append(measured_in(fla_reference_ops, step))
    ours_b, ref_b = best(ours), best(ref)
    row("train", "accelerate() (gla_ext ops, PyTorch modules)", *ours_b, "per step",
        f"{T / ours_b[0]:.0f} tok/s CPU time")
    row("train", "fla with its reference ops", *ref_b, "per step",
        f"{T / ref_b[0]:.0f} tok/s CPU time")
    train_ratio = ref_b[0] / ours_b[0]
    # the floor any torch-matmul implementation has: 6 FLOPs per matmul parameter per token
    # (forward 2, backward 4) at the rate torch reaches on a 2048^3 GEMM here
    a = torch.randn(2048, 2048)
    gemm = min(measure(lambda: a @ a)[0] for _ in range(3))
    rate = 2 * 2048 ** 3 / gemm
    mm_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    floor = 6 * mm_params * T / rate
    row("train", "matmul floor (6 x matmul params x tokens)", floor, float("nan"), "per step",
        f"{rate / 1e9:.0f} GFLOP/s fp32 GEMM; bounds the ratio at {ref_b[0] / floor:.2f}")

    # decode at batch 1
    model.eval()
    prompt = torch.randint(0, config["vocab_size"], (1, 16))
    loop, loader = CachedLoop(model, prompt), LoaderSteps(model, prompt)
    with gla_fla.accelerated():
        loop.step(), loader.step()    # warm-up (the loader packs its weights on first use)
    a, b = [], []
    n = args.tokens
    for _ in range(args.repeats + 1):
        a.append(measured_in(gla_fla.accelerated, per_token(loop, n)))
        b.append(measure(per_token(loader, n)))
    loop_b = tuple(x / n for x in best(a))
    loader_b = tuple(x / n for x in best(b))
    row("decode", "fla cached loop under accelerate()", *loop_b, "per token")
    row("decode", "gla_ext.integrations.fla.load (Decoder.step)", *loader_b, "per token")
    gen_new = 32 if not args.quick else 8
    with gla_fla.accelerated(), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        g = measure(lambda: model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                           max_new_tokens=gen_new, do_sample=False,
                                           pad_token_id=0))
    row("decode", "transformers generate() under accelerate()", g[0] / gen_new,
        g[1] / gen_new, "per token", f"{gen_new} new tokens, prefill included")
    decode_ratio = loop_b[0] / loader_b[0]
    gla_fla.accelerate(False)

    header = (f"{'what':7s} {'impl':44s} | {'CPU ms':>10s} {'wall ms':>10s}    {'':9s} | note\n"
              + "-" * 100)
    summary = [
        f"train: fla reference ops / accelerate() (CPU time) >= 3   {train_ratio:6.2f} "
        f"{'met' if train_ratio >= 3 else 'NOT met'}  (at most {ref_b[0] / floor:.2f} "
        "with torch's matmuls)",
        f"decode: accelerated loop / loader (CPU time) <= 1.5       {decode_ratio:6.2f} "
        f"{'met' if decode_ratio <= 1.5 else 'NOT met'}",
        f"model: {n_params / 1e6:.1f}M parameters, train batch 1 x {T}, "
        f"best of {args.repeats} steps / {args.repeats + 1} rounds of {n} tokens",
    ]
    table = "\n".join([header, *lines, "", *summary])
    print(table)
    name = "fla_accelerate" + ("_quick" if args.quick else "")
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    save_results(name, rows, table, extra=dict(config=config, train_tokens=T,
                                               train_ratio=train_ratio,
                                               train_matmul_floor_s=floor,
                                               decode_ratio=decode_ratio,
                                               load_average_1min=load))


if __name__ == "__main__":
    main()
