"""Fake (meta) kernels and autograd formulas for the compiled torch ops.

The C++ side defines torch.ops.gla_ext.{recurrent,chunk}_{fwd,bwd}; registering fake kernels
lets torch.compile trace them, and register_autograd makes the forward ops differentiable
with the backward ops (gradients for q, k, v, g, h0 and through the final state).
"""
from __future__ import annotations

import torch

from . import _ext

_REGISTERED = False


def _acc(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _num_seqs(q, cu_seqlens) -> int:
    return q.shape[0] if cu_seqlens is None else cu_seqlens.shape[0] - 1


def _fake_fwd(q, k, v, g, h0, cu_seqlens, scale, extra):
    B, T, H, K = q.shape
    V = v.shape[-1]
    return (v.new_empty(B, T, H, V),
            q.new_empty(_num_seqs(q, cu_seqlens), H, K, V, dtype=_acc(q.dtype)))


def _fake_fwd_state(q, k, v, g, h0, state_indices, cu_seqlens, scale, extra, v_first):
    B, T, H, K = q.shape
    V = v.shape[-1]
    last = (V, K) if v_first else (K, V)
    return (v.new_empty(B, T, H, V),
            q.new_empty(_num_seqs(q, cu_seqlens), H, *last, dtype=_acc(q.dtype)))


def _fake_fwd_inplace(q, k, v, g, pool, state_indices, cu_seqlens, scale, extra, v_first):
    B, T, H, K = q.shape
    return v.new_empty(B, T, H, v.shape[-1])


def _fake_bwd(q, k, v, g, dout, dht, h0, cu_seqlens, scale, extra):
    B, T, H, K = q.shape
    V = v.shape[-1]
    return (torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), torch.empty_like(g),
            q.new_empty(_num_seqs(q, cu_seqlens), H, K, V, dtype=g.dtype))


def _setup_context(ctx, inputs, output):
    q, k, v, g, h0, cu_seqlens, scale, extra = inputs
    ctx.save_for_backward(q, k, v, g, h0, cu_seqlens)
    ctx.scale = scale
    ctx.extra = extra          # reverse (recurrent) or chunk_size (chunked)


def _make_backward(bwd_op):
    def backward(ctx, grad_o, grad_ht):
        q, k, v, g, h0, cu_seqlens = ctx.saved_tensors
        if grad_o is None:
            grad_o = torch.zeros_like(v)
        dq, dk, dv, dg, dh0 = bwd_op(q, k, v, g, grad_o.contiguous(),
                                     None if grad_ht is None else grad_ht.contiguous(),
                                     h0, cu_seqlens, ctx.scale, ctx.extra)
        return dq, dk, dv, dg, (dh0 if h0 is not None else None), None, None, None
    return backward


def register() -> bool:
    """Registers fake kernels and autograd once; False when the extension is not loaded."""
    global _REGISTERED
    if _REGISTERED:
        return True
    if not _ext.loaded():
        return False
    ops = torch.ops.gla_ext
    for name in ("recurrent", "chunk"):
        torch.library.register_fake(f"gla_ext::{name}_fwd")(_fake_fwd)
        torch.library.register_fake(f"gla_ext::{name}_bwd")(_fake_bwd)
        # forward only (pools, in-place updates): no autograd formula
        torch.library.register_fake(f"gla_ext::{name}_fwd_state")(_fake_fwd_state)
        torch.library.register_fake(f"gla_ext::{name}_fwd_inplace")(_fake_fwd_inplace)
        torch.library.register_autograd(f"gla_ext::{name}_fwd",
                                        _make_backward(getattr(ops, f"{name}_bwd")),
                                        setup_context=_setup_context)
    _REGISTERED = True
    return True
