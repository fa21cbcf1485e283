"""Train a tiny GLA model on synthetic associative recall and watch the loss fall.

Each example is a list of (key, value) token pairs followed by one of the keys; the target
is that key's value. Runs on CUDA when available (and the extension has CUDA), else CPU.

    python examples/train_tiny.py [--steps 300] [--device cpu|cuda] [--dtype float32|bfloat16]
"""
from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from gla_ext import GLA


def recall_batch(batch: int, pairs: int, vocab: int, device):
    """Tokens [batch, 2*pairs+1] (keys in [0, vocab), values in [vocab, 2*vocab)), target value."""
    keys = torch.stack([torch.randperm(vocab, device=device)[:pairs] for _ in range(batch)])
    values = torch.randint(vocab, 2 * vocab, (batch, pairs), device=device)
    seq = torch.stack([keys, values], dim=2).flatten(1)                    # k0 v0 k1 v1 ...
    pick = torch.randint(0, pairs, (batch,), device=device)
    query = keys[torch.arange(batch, device=device), pick]
    tokens = torch.cat([seq, query[:, None]], dim=1)
    target = values[torch.arange(batch, device=device), pick] - vocab
    return tokens, target


class RecallModel(nn.Module):
    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(2 * vocab, hidden)
        self.gla = GLA.build(embed_dim=hidden, hidden_size=hidden, num_layers=2, num_heads=2,
                             head_dim=32, dropout=0.0, seq_len=None)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens):
        return self.head(self.gla(self.embed(tokens)))


def progress(step: int, total: int, loss: float, acc: float, started: float):
    width = 30
    done = int(width * step / total)
    rate = step / max(time.time() - started, 1e-9)
    sys.stdout.write(f"\r[{'#' * done}{'.' * (width - done)}] {step}/{total} "
                     f"loss {loss:.3f} acc {acc:.2f} ({rate:.1f} it/s)")
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=16)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="parameter dtype; default bfloat16 on CUDA (the tensor-core chunked "
                             "kernels), float32 on CPU")
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda")
                                          else "float32"))
    torch.manual_seed(0)
    model = RecallModel(args.vocab, hidden=64).to(args.device, dtype)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    print(f"associative recall: {args.pairs} pairs, vocab {args.vocab}, {args.device} {dtype}, "
          f"{sum(p.numel() for p in model.parameters()):,} parameters")
    started, first, ema = time.time(), None, None
    for step in range(1, args.steps + 1):
        tokens, target = recall_batch(args.batch, args.pairs, args.vocab, args.device)
        logits = model(tokens)
        loss = F.cross_entropy(logits.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        acc = (logits.argmax(-1) == target).float().mean().item()
        ema = loss.item() if ema is None else 0.9 * ema + 0.1 * loss.item()
        first = ema if first is None else first
        if step % 5 == 0 or step == args.steps:
            progress(step, args.steps, ema, acc, started)
    print(f"\nloss {first:.3f} -> {ema:.3f} (chance: {torch.log(torch.tensor(float(args.vocab))):.3f})")
    return 0 if ema < first else 1


if __name__ == "__main__":
    sys.exit(main())
