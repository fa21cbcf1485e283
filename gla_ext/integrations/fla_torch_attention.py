"""PyTorch stand-ins for what fla's softmax attention layer (fla.layers.attn.Attention, the
`attn` layers of hybrid configs) takes from flash-attn and from fla's Triton rotary kernel, so
hybrid GLA models run on a CPU under accelerate():

    flash_attn_func / flash_attn_varlen_func   flash-attn's API (causal alignment to the
                                               bottom-right corner, window_size, GQA) on
                                               torch's scaled_dot_product_attention
    rotary_embedding                           fla.modules.rotary.rotary_embedding (position
                                               offsets per sequence, cu_seqlens)
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "rotary_embedding"]


def _reject(name, **args):
    for key, value in args.items():
        if value:
            raise NotImplementedError(f"accelerate: {name} argument {key!r} has no CPU version")


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False,
                    window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                    deterministic=False, return_attn_probs=False, **kwargs):
    """q [B, Tq, H, D], k / v [B, Tk, Hk, D] (H a multiple of Hk) -> [B, Tq, H, D]. As in
    flash-attn, query i sits at key position Tk - Tq + i (the causal mask is aligned to the
    bottom-right corner) and window_size (left, right) limits the keys it sees (-1: no limit)."""
    _reject("flash_attn_func", dropout_p=dropout_p, softcap=softcap,
            alibi_slopes=alibi_slopes is not None, return_attn_probs=return_attn_probs,
            **{k_: True for k_ in kwargs})
    Tq, H, Tk, Hk = q.shape[1], q.shape[2], k.shape[1], k.shape[2]
    if H != Hk:
        k, v = (x.repeat_interleave(H // Hk, dim=2) for x in (k, v))
    pos_q = torch.arange(Tq, device=q.device).unsqueeze(1) + (Tk - Tq)
    pos_k = torch.arange(Tk, device=q.device).unsqueeze(0)
    allowed = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device)
    left, right = window_size
    if causal:
        right = 0
    if right >= 0:
        allowed &= pos_k <= pos_q + right
    if left >= 0:
        allowed &= pos_k >= pos_q - left
    o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                       attn_mask=allowed, scale=softmax_scale)
    return o.transpose(1, 2)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q=None,
                           max_seqlen_k=None, dropout_p=0.0, softmax_scale=None, causal=False,
                           window_size=(-1, -1), **kwargs):
    """Packed sequences: q [total_q, H, D], k / v [total_k, Hk, D]; sequence n is
    q[cu_seqlens_q[n]:cu_seqlens_q[n+1]] against k[cu_seqlens_k[n]:cu_seqlens_k[n+1]]."""
    cq, ck = cu_seqlens_q.tolist(), cu_seqlens_k.tolist()
    o = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    for n in range(len(cq) - 1):
        if cq[n + 1] == cq[n]:
            continue
        o[cq[n]:cq[n + 1]] = flash_attn_func(
            q[None, cq[n]:cq[n + 1]], k[None, ck[n]:ck[n + 1]], v[None, ck[n]:ck[n + 1]],
            dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
            window_size=window_size, **kwargs)[0]
    return o


def rotary_embedding(x, cos, sin, interleaved=False, inplace=False, seqlen_offsets=0,
                     cu_seqlens=None, chunk_indices=None):
    """x [B, T, H, D] rotated by the angles of its positions (cos / sin tables [TR, R / 2],
    the first R of D channels): position t + offset (offset an int or one per sequence), or,
    with cu_seqlens, the position inside its packed sequence plus that sequence's offset."""
    B, T = x.shape[:2]
    t = torch.arange(T, device=x.device)
    offsets = torch.as_tensor(seqlen_offsets, device=x.device).to(torch.int64)
    if cu_seqlens is None:
        pos = t.unsqueeze(0) + offsets.reshape(-1, 1)                 # [B or 1, T]
    else:
        cu = cu_seqlens.to(device=x.device, dtype=torch.int64)
        seq = torch.searchsorted(cu[1:], t, right=True).clamp(max=cu.numel() - 2)
        off = offsets[seq] if offsets.dim() else offsets
        pos = (t - cu[seq] + off).unsqueeze(0)
    pos = pos.clamp(min=0, max=cos.shape[0] - 1)
    c, s = cos[pos].unsqueeze(2), sin[pos].unsqueeze(2)              # [B, T, 1, R/2]
    R = c.shape[-1] * 2
    xr = x[..., :R].float()
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rot = torch.stack([x1 * c - x2 * s, x1 * s + x2 * c], -1).flatten(-2)
    else:
        x1, x2 = xr[..., :R // 2], xr[..., R // 2:]
        rot = torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], -1)
    return torch.cat([rot.to(x.dtype), x[..., R:]], -1)
