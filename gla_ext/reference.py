"""Pure-PyTorch GLA: the oracle every kernel is checked against.

Both functions are differentiable, take the docs/design.md layouts
(q, k, g: [B, T, H, K]; v: [B, T, H, V]; state [N, H, K, V]) and compute in
float32, or float64 when the inputs are float64. They are written to be
obviously right, not fast.

    S_t = diag(exp(g_t)) S_{t-1} + k_t^T v_t
    o_t = scale * q_t S_t
"""
from __future__ import annotations

import torch

__all__ = ["naive_recurrent_gla", "chunk_gla_reference", "segments"]


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def segments(cu_seqlens, B: int, T: int):
    """(batch row, start, end) of every sequence: rows of the batch, or packed pieces of row 0."""
    if cu_seqlens is None:
        return [(b, 0, T) for b in range(B)]
    offsets = [int(x) for x in cu_seqlens.tolist()]
    return [(0, offsets[n], offsets[n + 1]) for n in range(len(offsets) - 1)]


def _run_sequences(step_fn, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens,
                   state_indices=None, inplace_final_state=False, state_v_first=False):
    """Apply step_fn(q, k, v, g, h0) -> (o, hT) to each sequence ([T, H, *] slices).

    With state_indices, initial_state is a pool and sequence n starts from
    pool[state_indices[n]] (index < 0: padding, o = 0, no state read or written); with
    inplace_final_state its final state is written back into that pool row. state_v_first:
    states are [.., H, V, K]. Tokens past cu_seqlens[-1] belong to no sequence (o = 0).
    """
    B, T, H, K = q.shape
    V = v.shape[-1]
    acc = _acc_dtype(q)
    if scale is None:
        scale = K ** -0.5
    pieces = segments(cu_seqlens, B, T)
    slots = None if state_indices is None else [int(x) for x in state_indices.tolist()]
    outs = [[] for _ in range(B)]
    finals = []
    for n, (b, start, end) in enumerate(pieces):
        slot = n if slots is None else slots[n]
        if slot < 0:  # padding row: zero outputs, zero (returned) final state
            outs[b].append(q.new_zeros(end - start, H, V, dtype=acc))
            finals.append(q.new_zeros(H, K, V, dtype=acc))
            continue
        if initial_state is None:
            h0 = q.new_zeros(H, K, V, dtype=acc)
        else:
            h0 = initial_state[slot].to(acc)
            if state_v_first:
                h0 = h0.transpose(-1, -2)
        o, hT = step_fn(q[b, start:end].to(acc), k[b, start:end].to(acc),
                        v[b, start:end].to(acc), g[b, start:end].to(acc), h0, scale)
        outs[b].append(o)
        finals.append(hT)
    if cu_seqlens is not None and pieces[-1][2] < T:  # padded tail of the packed row
        outs[0].append(q.new_zeros(T - pieces[-1][2], H, V, dtype=acc))
    o = torch.stack([torch.cat(rows, 0) if rows else q.new_zeros(0, H, V, dtype=acc)
                     for rows in outs], 0).to(v.dtype)
    if state_v_first:
        finals = [f.transpose(-1, -2) for f in finals]
    if inplace_final_state:
        with torch.no_grad():
            for slot, f in zip(slots, finals):
                if slot >= 0:
                    initial_state[slot].copy_(f)
        return o, None
    final = torch.stack(finals, 0) if output_final_state else None
    return o, final


def _recurrent_one(q, k, v, g, h0, scale, reverse=False):
    """One sequence, one token at a time. q, k, g: [T, H, K]; v: [T, H, V]; h0: [H, K, V]."""
    S = h0
    T = q.shape[0]
    order = range(T - 1, -1, -1) if reverse else range(T)
    o = [None] * T
    for t in order:
        S = torch.exp(g[t]).unsqueeze(-1) * S + k[t].unsqueeze(-1) * v[t].unsqueeze(-2)
        o[t] = scale * torch.einsum("hk,hkv->hv", q[t], S)
    o = torch.stack(o, 0) if T else q.new_zeros(0, q.shape[1], v.shape[-1])
    return o, S


def naive_recurrent_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
                        reverse=False, cu_seqlens=None, state_indices=None,
                        inplace_final_state=False, state_v_first=False):
    """Token-by-token recurrence. Returns (o, final_state or None)."""
    def step(q_, k_, v_, g_, h0, s):
        return _recurrent_one(q_, k_, v_, g_, h0, s, reverse)
    return _run_sequences(step, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens,
                          state_indices, inplace_final_state, state_v_first)


def _segsum(g):
    """E[..., t, s, :] = sum of g[r] for s < r <= t (t >= s), -inf above the diagonal.

    Built by masking then summing, never as a difference of cumulative sums, so
    g = -inf (full forget) gives exact zeros instead of NaN and every exponent is <= 0.
    g: [C, H, K] -> [C, C, H, K].
    """
    C = g.shape[0]
    rep = g.unsqueeze(1).expand(C, C, *g.shape[1:])          # rep[r, s] = g[r]
    r_idx = torch.arange(C, device=g.device)
    keep = (r_idx.view(C, 1) > r_idx.view(1, C))             # r > s
    keep = keep.view(C, C, *([1] * (g.dim() - 1)))
    rep = torch.where(keep, rep, torch.zeros((), dtype=g.dtype, device=g.device))
    E = torch.cumsum(rep, dim=0)                              # E[t, s] = sum_{s < r <= t} g[r]
    lower = (r_idx.view(C, 1) >= r_idx.view(1, C)).view(C, C, *([1] * (g.dim() - 1)))
    return torch.where(lower, E, torch.full((), float("-inf"), dtype=g.dtype, device=g.device))


def _chunked_one(q, k, v, g, h0, scale, chunk_size):
    """One sequence in chunks: intra-chunk attention with gated weights, state carried between chunks."""
    T = q.shape[0]
    S = h0
    outs = []
    for start in range(0, T, chunk_size):
        end = min(start + chunk_size, T)
        qc, kc, vc, gc = q[start:end], k[start:end], v[start:end], g[start:end]
        E = _segsum(gc)                                       # [C, C, H, K], <= 0 or -inf
        W = torch.exp(E)
        A = torch.einsum("thk,shk,tshk->hts", qc, kc, W)      # gated scores, zero for s > t
        o_intra = torch.einsum("hts,shv->thv", A, vc)
        # decay from the chunk start up to and including t (-inf stays -inf: no NaN)
        prefix = torch.cumsum(gc, dim=0)                      # sums of non-positive values: <= 0
        o_inter = torch.einsum("thk,hkv->thv", qc * torch.exp(prefix), S)
        outs.append(scale * (o_intra + o_inter))
        to_end = torch.exp(E[-1])                             # decay from s (exclusive) to chunk end
        S = torch.exp(prefix[-1]).unsqueeze(-1) * S + torch.einsum("shk,shv->hkv", kc * to_end, vc)
    o = torch.cat(outs, 0) if outs else q.new_zeros(0, q.shape[1], v.shape[-1])
    return o, S


def chunk_gla_reference(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
                        cu_seqlens=None, chunk_size=16, state_indices=None,
                        inplace_final_state=False, state_v_first=False):
    """Chunked (parallel within chunks) GLA in log space. Returns (o, final_state or None)."""
    def step(q_, k_, v_, g_, h0, s):
        return _chunked_one(q_, k_, v_, g_, h0, s, chunk_size)
    return _run_sequences(step, q, k, v, g, scale, initial_state, output_final_state, cu_seqlens,
                          state_indices, inplace_final_state, state_v_first)
