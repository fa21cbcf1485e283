"""Context parallelism for GLA over torch.distributed: each rank holds one slice of the sequence.

    o, final_state = chunk_gla_cp(q, k, v, g, initial_state=h0, output_final_state=True,
                                  group=group)

Rank i of `group` holds the i-th consecutive slice along T (lengths may differ, 0 allowed).
GLA's decay is diagonal, so the state entering rank i's slice is a combination of the earlier
slices' local final states L_j (each computed from a zero state) and their total log-decays
G_j = sum_t g_t over slice j:

    S_in_0 = 0,    S_in_{j+1} = diag(exp(G_j)) S_in_j + L_j        (rank 0's L includes h0)

Every factor exp(G_j) is <= 1 (never the exponential of a positive number), so gates down to
-inf stay finite. Rank i (> 0) then runs its slice again from S_in_i, which gives its outputs
and (last rank) the final state exactly as the single process would.

Communication: one all_gather of (L_i, G_i) forward and one of dS_in_i backward, O(B*H*K*V)
elements per rank and direction whatever the sequence length, plus an all_gather of a few
numbers in the forward that checks every rank passed matching shapes (so a mismatch raises on
every rank instead of hanging in the exchange). Works with gloo (CPU) and NCCL (GPU).
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ._checks import check_inputs
from .ops import chunk_gla, resolve_backend

__all__ = ["chunk_gla_cp", "check_cp_call"]

_DTYPE_CODES = {torch.float32: 1, torch.float16: 2, torch.bfloat16: 3, torch.float64: 4}


def _group_info(op: str, group):
    """(group, rank in it, its size); clear errors when torch.distributed is not set up."""
    if not dist.is_available():
        raise RuntimeError(f"{op}: torch.distributed is not available in this torch build")
    if not dist.is_initialized():
        raise RuntimeError(f"{op}: torch.distributed is not initialized; call "
                           "torch.distributed.init_process_group() first (e.g. under torchrun)")
    group = dist.group.WORLD if group is None else group
    rank = dist.get_rank(group)
    if rank < 0:
        raise ValueError(f"{op}: this process is not a member of the given group")
    return group, rank, dist.get_world_size(group)


def _comm_device(group, device) -> torch.device:
    """Where collectives of this group run: the tensors' GPU under NCCL, else the CPU (gloo)."""
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend:
        if device is not None and device.type == "cuda":
            return device
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _all_gather(t: torch.Tensor, group, world: int) -> torch.Tensor:
    """[world, *t.shape]: every rank's t, by one all_gather (moved to the group's device)."""
    dev = _comm_device(group, t.device)
    send = t.detach().contiguous().to(dev)
    out = [torch.empty_like(send) for _ in range(world)]
    dist.all_gather(out, send, group=group)
    return torch.stack(out).to(t.device)


def check_cp_call(op: str, group, device, error, fields: dict) -> None:
    """Every rank passes its local error (an exception or None) and the numbers that must agree.

    One all_gather of len(fields) + 1 numbers; then, on EVERY rank: the erring rank re-raises
    its own error, the others raise a ValueError naming it; or, when the fields differ between
    ranks, a ValueError listing each rank's values. So bad use never leaves a rank waiting in a
    collective the others skipped.
    """
    group, rank, world = _group_info(op, group)
    values = [0.0] * len(fields) if error is not None else [float(x) for x in fields.values()]
    dev = _comm_device(group, device)
    mine = torch.tensor([1.0 if error is not None else 0.0] + values, dtype=torch.float64,
                        device=dev)
    rows = _all_gather(mine, group, world).cpu().tolist()
    bad = [r for r, row in enumerate(rows) if row[0] != 0.0]
    if error is not None:
        raise error
    if bad:
        raise ValueError(f"{op}: rank(s) {bad} of the group rejected their arguments (see the "
                         f"error on those ranks); every rank raises so that none waits for them")
    if any(row != rows[0] for row in rows):
        names = list(fields)
        per_rank = "; ".join(
            f"rank {r}: " + ", ".join(f"{n}={_show(n, x)}" for n, x in zip(names, row[1:]))
            for r, row in enumerate(rows))
        raise ValueError(f"{op}: every rank of the group must pass the same "
                         f"{', '.join(names)}; got {per_rank}")


def _show(name: str, x: float):
    if name == "dtype":
        return {c: str(d).replace("torch.", "") for d, c in _DTYPE_CODES.items()}.get(int(x), x)
    return int(x) if float(x).is_integer() else x


class _StateExchange(torch.autograd.Function):
    """(L_i, G_i) on each rank -> S_in_i, the state entering rank i's slice.

    One all_gather forward, one all_gather backward (of dS_in); every rank issues both, so the
    collectives match across ranks whatever order autograd runs the other nodes in.
    """

    @staticmethod
    def forward(ctx, L, G, group, rank, world):
        n = L.numel()
        packed = torch.cat([L.reshape(-1), G.reshape(-1)])
        gathered = _all_gather(packed, group, world)
        Ls = gathered[:, :n].view((world,) + tuple(L.shape))
        Gs = gathered[:, n:].view((world,) + tuple(G.shape))
        S = torch.zeros_like(L)
        for j in range(rank):              # S_in_{j+1} = diag(exp(G_j)) S_in_j + L_j
            S = torch.exp(Gs[j]).unsqueeze(-1) * S + Ls[j]
        ctx.save_for_backward(Gs, S)
        ctx.group, ctx.rank, ctx.world = group, rank, world
        return S

    @staticmethod
    def backward(ctx, dS):
        Gs, S = ctx.saved_tensors
        rank, world = ctx.rank, ctx.world
        dS_all = _all_gather(dS, ctx.group, world)
        # dL_i = sum_{m > i} diag(exp(G_{i+1} + ... + G_{m-1})) dS_in_m  (reverse of the scan)
        dL = torch.zeros_like(S)
        for m in range(world - 1, rank, -1):
            dL = torch.exp(Gs[m]).unsqueeze(-1) * dL + dS_all[m]
        # G_i scales S_in_i on its way into every later slice: d/dG_i of <dL_i, exp(G_i) S_in_i>
        dG = (torch.exp(Gs[rank]).unsqueeze(-1) * S * dL).sum(-1)
        return dL, dG, None, None, None


def chunk_gla_cp(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
                 group=None, backend="auto"):
    """chunk_gla over a sequence split along T across the ranks of `group` (default: the world).

    q, k, g [B, T_i, H, K], v [B, T_i, H, V]: this rank's slice (T_i may be 0). initial_state
    [B, H, K, V] on rank 0 only; the final state (output_final_state=True) is returned on the
    last rank, None elsewhere. Returns (o [B, T_i, H, V], final_state or None), equal to the
    matching slice of chunk_gla on the whole sequence, and differentiable for q, k, v, g,
    initial_state and a gradient on the final state. Every rank must call it in the same
    order, and backpropagate through its o (a rank whose loss does not use it can add
    0 * o.sum()): forward and backward each issue collectives on `group`. Shapes (B, H, K,
    V), dtype, scale, output_final_state and whether gradients are needed must agree on all
    ranks; otherwise every rank raises a ValueError.
    """
    op = "chunk_gla_cp"
    group, rank, world = _group_info(op, group)
    error, fields = None, {}
    try:
        if initial_state is not None and rank != 0:
            raise ValueError(f"{op}: initial_state is the state before rank 0's slice; pass it "
                             f"on rank 0 only (None on the others), got a tensor on rank {rank}")
        check_inputs(op, q, k, v, g, initial_state, None)
        resolve_backend(backend, q.device, q.dtype, op)
        B, _, H, K = q.shape
        sc = K ** -0.5 if scale is None else float(scale)
        # a rank whose inputs need no gradient would skip the backward's collective
        needs_grad = torch.is_grad_enabled() and any(
            x is not None and x.requires_grad for x in (q, k, v, g, initial_state))
        fields = dict(B=B, H=H, K=K, V=v.shape[3], dtype=_DTYPE_CODES[q.dtype],
                      output_final_state=int(bool(output_final_state)), scale=sc,
                      requires_grad=int(needs_grad))
    except (ValueError, TypeError, RuntimeError) as e:
        error = e
    device = q.device if isinstance(q, torch.Tensor) else None
    check_cp_call(op, group, device, error, fields or dict(
        B=0, H=0, K=0, V=0, dtype=0, output_final_state=0, scale=0, requires_grad=0))

    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    last = rank == world - 1
    # Pass 1: this slice from a zero state (rank 0: from initial_state) for its final state L.
    o, L = chunk_gla(q, k, v, g, scale=sc, initial_state=initial_state,
                     output_final_state=True, backend=backend)
    G = g.to(acc).sum(dim=1)                                     # [B, H, K], <= 0
    S_in = _StateExchange.apply(L.to(acc), G, group, rank, world)
    if rank == 0:
        # S_in is zero here and o is already right, but S_in must stay in the graph: the
        # backward's all_gather runs only if autograd reaches the exchange on every rank.
        o = o + (S_in.sum() * 0).to(o.dtype)
        final = L if last else None
    else:
        # Pass 2: the slice again from its entering state, by the same kernel (its output and
        # its final state are exactly the single-process ones). A torch einsum/cumsum
        # correction of pass 1's output would do the same work outside the kernel; on CPUs
        # whose BLAS is slow for these shapes it cost 5-10x the kernel (see README).
        o, final = chunk_gla(q, k, v, g, scale=sc, initial_state=S_in,
                             output_final_state=last, backend=backend)
    final = final if output_final_state and last else None
    return o, final
