"""train_tiny's associative recall, trained over torch.distributed: data x context parallel.

    torchrun --nproc-per-node 4 examples/train_distributed.py           # 4-way data parallel (DDP)
    torchrun --nproc-per-node 4 examples/train_distributed.py --cp 2    # 2 (data) x 2 (context)

The N processes form a 2-D mesh, data (N / cp) x context (cp). The ranks of one context group
share a batch and each holds a consecutive slice of every sequence; the GLA layers exchange
their slices' states through gla_ext.distributed.chunk_gla_cp. The target is read at the last
position, so the loss lives on the last rank of each context group. CPU processes talk over
gloo, GPU processes (one GPU each) over NCCL. Progress bar on rank 0; exits 1 if the loss did
not fall.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.nn.parallel import DistributedDataParallel as DDP

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from train_tiny import progress, recall_batch  # noqa: E402  (same task and progress bar)

from gla_ext import GLA  # noqa: E402


class RecallModel(nn.Module):
    """Embedding -> GLA (every position) -> linear head on the last position of the slice."""

    def __init__(self, vocab: int, hidden: int):
        super().__init__()
        self.embed = nn.Embedding(2 * vocab, hidden)
        self.gla = GLA.build(embed_dim=hidden, hidden_size=hidden, num_layers=2, num_heads=2,
                             head_dim=32, dropout=0.0, seq_len=None)
        self.head = nn.Linear(hidden, vocab)

    def forward(self, tokens, cp_group=None):
        seq = self.gla(self.embed(tokens), cp_group=cp_group, return_sequence=True)
        return self.head(seq[:, -1])      # only the last context rank's is the real last position


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--cp", type=int, default=1, help="context-parallel size (divides N)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch", type=int, default=64, help="sequences per data-parallel rank")
    parser.add_argument("--pairs", type=int, default=8)
    parser.add_argument("--vocab", type=int, default=16)
    parser.add_argument("--lr", type=float, default=3e-3)
    args = parser.parse_args()

    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if world % args.cp:
        raise SystemExit(f"--cp {args.cp} must divide the number of processes ({world})")
    if use_cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    device = torch.device("cuda", torch.cuda.current_device()) if use_cuda else torch.device("cpu")
    dp = world // args.cp
    mesh = init_device_mesh(device.type, (dp, args.cp), mesh_dim_names=("data", "context"))
    cp_group = mesh.get_group("context")
    dp_rank, cp_rank = mesh.get_local_rank("data"), mesh.get_local_rank("context")
    seq_len = 2 * args.pairs + 1
    if args.cp > seq_len:
        raise SystemExit(f"--cp {args.cp} is more than the sequence length {seq_len}")

    torch.manual_seed(0)
    model = RecallModel(args.vocab, hidden=64).to(device)
    # DDP over all N ranks averages gradients over N; a context group's ranks hold parts of one
    # gradient (their sum), so the loss is scaled by cp to get the mean over data ranks.
    model = DDP(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    last_cp = cp_rank == args.cp - 1
    if rank == 0:
        print(f"associative recall on {world} processes ({dist.get_backend()}): mesh data {dp} x "
              f"context {args.cp}, {args.batch} sequences of {seq_len} tokens per data rank")
    started, first, ema = time.time(), None, None
    for step in range(1, args.steps + 1):
        torch.manual_seed(1000 * step + dp_rank)          # one batch per data rank
        tokens, target = recall_batch(args.batch, args.pairs, args.vocab, device)
        my_tokens = torch.tensor_split(tokens, args.cp, dim=1)[cp_rank]
        logits = model(my_tokens, cp_group=cp_group)
        # every rank backpropagates (the state gradients flow back through all of them)
        loss = F.cross_entropy(logits.float(), target) * (1.0 if last_cp else 0.0)
        opt.zero_grad(set_to_none=True)
        (loss * args.cp).backward()
        opt.step()
        if step % 5 == 0 or step == args.steps or step == 1:
            acc = (logits.argmax(-1) == target).float().mean() * (1.0 if last_cp else 0.0)
            stats = torch.stack([loss.detach(), acc]).to(device)
            dist.all_reduce(stats)                        # sum over the data ranks' last ranks
            mean_loss, mean_acc = (stats / dp).tolist()
            ema = mean_loss if ema is None else 0.7 * ema + 0.3 * mean_loss
            first = ema if first is None else first
            if rank == 0:
                progress(step, args.steps, ema, mean_acc, started)
    if rank == 0:
        print(f"\nloss {first:.3f} -> {ema:.3f} "
              f"(chance: {torch.log(torch.tensor(float(args.vocab))):.3f})")
    dist.destroy_process_group()
    return 0 if ema < first else 1


if __name__ == "__main__":
    sys.exit(main())
