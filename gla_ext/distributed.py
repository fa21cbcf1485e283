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

Backward: each rank's local gradient on its entering state is all_gathered, every rank scans
the later ranks' ones back into the gradient on its own final state, and one kernel backward
of the second pass gives all its inputs' gradients (see _ChunkGLACP).

Communication: one all_gather of (L_i, G_i) forward and one of the entering-state gradients
backward, O(B*H*K*V) elements per rank and direction whatever the sequence length, plus an
all_gather of a few numbers in the forward that checks every rank passed matching shapes (so a
mismatch raises on every rank instead of hanging in the exchange). Works with gloo (CPU) and
NCCL (GPU).
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
    """Where this group's collectives run: the tensors' GPU under NCCL, the CPU under gloo
    (also for CUDA tensors when the group has no NCCL), the GPU for CPU tensors under NCCL
    alone; other backends get the tensors' own device."""
    backend = str(dist.get_backend(group)).lower()
    cuda = device is not None and device.type == "cuda"
    if "nccl" in backend and cuda:
        return device
    if "gloo" in backend:
        return torch.device("cpu")
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return device if device is not None else torch.device("cpu")


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


def _cumsum_t(g: torch.Tensor, block: int = 64) -> torch.Tensor:
    """Inclusive cumulative sum of g [B, T, H, K] over T: torch.cumsum along a non-inner dim is
    a slow scalar loop on CPU, so sums inside 64-step blocks are one matmul with a triangular
    matrix and the block offsets (accumulated in float64) are added after."""
    B, T, H, K = g.shape
    n = -(-T // block)
    # -inf (full forget) would make 0 * -inf = NaN in the matmul; any C <= -1e4 gives the same
    # exp(C) = 0, and every later C stays below it (g <= 0).
    g = g.clamp(min=-1e4)
    if n * block != T:
        g = torch.nn.functional.pad(g, (0, 0, 0, 0, 0, n * block - T))
    tril = torch.ones(block, block, dtype=g.dtype, device=g.device).tril_()
    inner = torch.matmul(tril, g.reshape(B, n, block, H * K))          # [B, n, block, H*K]
    totals = inner[:, :, -1].to(torch.float64)
    offsets = (torch.cumsum(totals, dim=1) - totals).to(g.dtype)       # sum of earlier blocks
    return (inner + offsets[:, :, None]).reshape(B, n * block, H, K)[:, :T]


def _entering_state_grad(q, g, dO, scale: float) -> torch.Tensor:
    """d loss / d S_in through this slice's outputs: scale * sum_t (q_t * exp(C_t))^T dO_t.

    C_t = g_1 + ... + g_t inside the slice (<= 0). Factors below e^-80 (float32; e^-700 in
    float64) are taken as 0: their products are denormal numbers, slow on CPUs, and below
    anything a float32 sum of the other terms can hold. The sum over t is one batched matmul
    in the layout [B*H, T, K].
    """
    B, T, H, K = q.shape
    V = dO.shape[-1]
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    C = _cumsum_t(g.to(acc))
    low = -700.0 if acc == torch.float64 else -80.0
    decay = torch.exp(C.clamp(min=low)).masked_fill_(C < low, 0.0)   # exp never makes denormals
    qd = (q.to(acc) * decay).permute(0, 2, 1, 3).reshape(B * H, T, K)
    do = dO.to(acc).permute(0, 2, 1, 3).reshape(B * H, T, V)
    return (torch.bmm(qd.transpose(1, 2), do) * scale).view(B, H, K, V)


class _ChunkGLACP(torch.autograd.Function):
    """One rank's slice of chunk_gla_cp; one all_gather forward and one backward.

    Forward: pass 1 (no graph) gives this slice's final state L from a zero state; the
    all_gather of (L, G) gives S_in (the scan in the module docstring); pass 2 runs the slice
    from S_in (rank 0: from initial_state, and pass 1 is skipped) with a graph kept for the
    backward. Its outputs o and F (the true state after this slice) are the single-process
    ones. The later ranks depend on this slice only through F = S_in of the next rank.
    Backward: every rank's local gradient on its S_in, a = d<dO, o>/dS_in (+ exp(G) dF on the
    last rank), is all_gathered; the gradient arriving on F from the later ranks is
    dF_ext = sum_{m > i} diag(exp(G_{i+1} + ... + G_{m-1})) a_m, and ONE kernel backward of pass
    2 with (dO, dF + dF_ext) gives every input's gradient (and initial_state's on rank 0).
    """

    @staticmethod
    def forward(ctx, q, k, v, g, h0, scale, group, rank, world, backend, needs_grad):
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        G = g.to(acc).sum(dim=1)                                   # [B, H, K], <= 0
        if rank == 0:
            L = None
        else:
            with torch.no_grad():
                _, L = chunk_gla(q, k, v, g, scale=scale, output_final_state=True,
                                 backend=backend)
        # pass 2's graph is built only for the inputs that need gradients
        leaves = [x.detach().requires_grad_(needs_grad and x.requires_grad) for x in (q, k, v, g)]
        h0_leaf = (None if h0 is None else
                   h0.detach().requires_grad_(needs_grad and h0.requires_grad))
        with torch.enable_grad():
            if rank == 0:
                o, F = chunk_gla(*leaves, scale=scale, initial_state=h0_leaf,
                                 output_final_state=True, backend=backend)
                L = F.detach()
            # exchange (L, G): S_in_{j+1} = diag(exp(G_j)) S_in_j + L_j
            n = L.numel()
            gathered = _all_gather(torch.cat([L.reshape(-1).to(acc), G.reshape(-1)]),
                                   group, world)
            Ls = gathered[:, :n].view((world,) + tuple(L.shape))
            Gs = gathered[:, n:].view((world,) + tuple(G.shape))
            if rank > 0:
                S_in = torch.zeros_like(Ls[0])
                for j in range(rank):
                    S_in = torch.exp(Gs[j]).unsqueeze(-1) * S_in + Ls[j]
                o, F = chunk_gla(*leaves, scale=scale, initial_state=S_in,
                                 output_final_state=True, backend=backend)
        ctx.graph = (o, F, leaves, h0_leaf)
        ctx.save_for_backward(Gs)
        ctx.scale, ctx.group, ctx.rank, ctx.world = scale, group, rank, world
        return o.detach(), F.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dO, dF):
        (Gs,) = ctx.saved_tensors
        o, F, leaves, h0_leaf = ctx.graph
        rank, world = ctx.rank, ctx.world
        q, _, _, g = leaves
        a = torch.zeros_like(F) if rank == 0 else _entering_state_grad(q, g, dO, ctx.scale)
        a = a + torch.exp(Gs[rank]).unsqueeze(-1) * dF        # dF is zero except on the last rank
        a_all = _all_gather(a, ctx.group, world)
        dF_ext = torch.zeros_like(F)
        for m in range(world - 1, rank, -1):
            dF_ext = torch.exp(Gs[m]).unsqueeze(-1) * dF_ext + a_all[m]
        wanted = [x for x in leaves + [h0_leaf] if x is not None and x.requires_grad]
        grads = iter(torch.autograd.grad((o, F), wanted, (dO, dF + dF_ext), allow_unused=True))
        out = [next(grads) if x is not None and x.requires_grad else None
               for x in leaves + [h0_leaf]]
        ctx.graph = None
        return (*out, None, None, None, None, None, None)


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
    V), dtype, scale and whether gradients are needed must agree on all ranks; otherwise
    every rank raises a ValueError. output_final_state is read on the last rank only.
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
        # (output_final_state matters on the last rank only, so it need not agree)
        fields = dict(B=B, H=H, K=K, V=v.shape[3], dtype=_DTYPE_CODES[q.dtype], scale=sc,
                      requires_grad=int(needs_grad))
    except (ValueError, TypeError, RuntimeError) as e:
        error = e
    device = q.device if isinstance(q, torch.Tensor) else None
    check_cp_call(op, group, device, error, fields or dict(
        B=0, H=0, K=0, V=0, dtype=0, scale=0, requires_grad=0))

    o, final = _ChunkGLACP.apply(q, k, v, g, initial_state, sc, group, rank, world, backend,
                                 needs_grad)
    return o, (final if output_final_state and rank == world - 1 else None)
