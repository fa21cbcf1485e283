"""Fine-tune a flash-linear-attention (fla) GLA model on a CPU, with fla's own code unchanged.

fla's kernels are Triton-only, so on a machine without a GPU its models fail at the first
kernel. gla_ext.integrations.fla.accelerate() swaps fla's GLA ops for gla_ext's C++ kernels
and fla's Triton norms / MLP / fused loss for PyTorch on CPU tensors; everything below is
ordinary fla + PyTorch code (model, loss, backward, optimizer, generate).

    python examples/fla_cpu_finetune.py                      # a small random fla GLA model
    python examples/fla_cpu_finetune.py --model path/to/fla-gla-checkpoint --steps 200

Data: byte-level text (the paragraph below, or --text FILE), random windows of --seq-len
bytes; with a checkpoint whose vocabulary is not bytes the ids are still valid (< 256) but
the task is only a demonstration. Needs fla-core / flash-linear-attention and transformers.
"""
from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch

from gla_ext.integrations import fla as gla_fla

TEXT = (
    "Gated linear attention keeps one matrix-valued state per head and updates it with a "
    "data-dependent forget gate, so a language model built from it runs in linear time and "
    "decodes with constant memory per token. Training uses a chunked form: inside a chunk "
    "the work is dense matrix products, between chunks only the state is carried. "
)


def progress(step, total, loss, start):
    width = 30
    done = int(width * step / total)
    rate = step / max(time.perf_counter() - start, 1e-9)
    sys.stderr.write(f"\rfine-tune [{'#' * done}{'.' * (width - done)}] {step}/{total} "
                     f"loss {loss:.3f}  {rate:.2f} steps/s")
    if step == total:
        sys.stderr.write("\n")
    sys.stderr.flush()


def batches(data: torch.Tensor, batch: int, seq_len: int, gen: torch.Generator):
    while True:
        starts = torch.randint(0, data.numel() - seq_len, (batch,), generator=gen)
        yield torch.stack([data[s:s + seq_len] for s in starts.tolist()])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", help="an fla GLA checkpoint directory (default: a small "
                                    "random GLAConfig model)")
    ap.add_argument("--text", help="a UTF-8 text file to fine-tune on")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=96)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--save", help="save the fine-tuned model here (save_pretrained)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    gla_fla.accelerate()              # the only gla_ext line: fla's code below is unchanged
    from fla.models import GLAConfig, GLAForCausalLM

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if args.model:
            model = GLAForCausalLM.from_pretrained(args.model)
        else:               # fla's defaults (fused norm, swiglu and cross entropy on)
            model = GLAForCausalLM(GLAConfig(hidden_size=128, num_hidden_layers=2,
                                             num_heads=2, vocab_size=256))
    text = open(args.text, encoding="utf-8").read() if args.text else TEXT * 4
    data = torch.tensor(list(text.encode("utf-8")), dtype=torch.int64)
    data = data.clamp(max=model.config.vocab_size - 1)
    print(f"model: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, "
          f"{len(data)} bytes of text, {args.steps} steps of {args.batch} x {args.seq_len}")

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    gen = torch.Generator().manual_seed(0)
    model.train()
    losses, start = [], time.perf_counter()
    for step, ids in zip(range(1, args.steps + 1), batches(data, args.batch, args.seq_len, gen)):
        loss = model(ids, labels=ids).loss       # fla's fused cross entropy, on the CPU
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        progress(step, args.steps, losses[-1], start)

    k = max(1, min(5, len(losses) // 4))
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    print(f"loss: {first:.3f} (first {k} steps) -> {last:.3f} (last {k} steps)")

    model.eval()
    prompt = data[:24].unsqueeze(0)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                             max_new_tokens=48, do_sample=False, pad_token_id=0)
    sample = bytes(out[0].tolist()).decode("utf-8", errors="replace")
    print(f"greedy sample: {sample!r}")
    if args.save:
        model.save_pretrained(args.save)
        print(f"saved to {args.save}")
    gla_fla.accelerate(False)
    return 0 if last < first else 1


if __name__ == "__main__":
    sys.exit(main())
