"""Makes fla's own GLA model run on a CPU, the only way it can: its Triton-only pieces are
swapped for plain PyTorch and its GLA ops for fla's naive reference recurrence
(fla.ops.gla.naive.naive_recurrent_gla). For tests and benchmarks that compare gla_ext with
fla's model; needs fla installed. Use as a context manager:

    with fla_reference_ops():
        logits = fla_model(input_ids).logits

Replaced while active (and restored after): chunk_gla / fused_recurrent_gla /
fused_chunk_gla as fla.layers.gla sees them, fla's RMSNorm and FusedRMSNormGated forwards,
the fused SwiGLU (+ linear) of fla's GatedMLP and its Triton swish (the unfused output gate).
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

__all__ = ["fla_reference_ops"]


def _naive_gla(q, k, v, g=None, gk=None, scale=None, initial_state=None,
               output_final_state=False, state_v_first=False, cu_seqlens=None, **_unused):
    from fla.ops.gla.naive import naive_recurrent_gla
    gate = gk if gk is not None else g
    if cu_seqlens is not None:
        raise NotImplementedError("fla_reference_ops: cu_seqlens is not supported")
    if scale is not None and abs(scale - q.shape[-1] ** -0.5) > 1e-12:
        q = q * (scale / q.shape[-1] ** -0.5)     # the naive op always uses K ** -0.5
    h0 = initial_state
    if h0 is not None and state_v_first:
        h0 = h0.transpose(-1, -2)
    o, ht = naive_recurrent_gla(q, k, v, gate, initial_state=h0,
                                output_final_state=output_final_state)
    if ht is not None and state_v_first:
        ht = ht.transpose(-1, -2).contiguous()
    return o, ht


def _rms(x, weight, bias, eps):
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y


def _rms_norm_forward(self, x, residual=None, prenorm=False, residual_in_fp32=False):
    if residual is not None:
        x = (x.float() + residual.float()) if residual_in_fp32 else x + residual
    y = _rms(x, self.weight, self.bias, self.eps).to(x.dtype)
    return (y, x) if prenorm else y


def _rms_norm_gated_forward(self, x, g, residual=None, prenorm=False, residual_in_fp32=False):
    if residual is not None:
        x = (x.float() + residual.float()) if residual_in_fp32 else x + residual
    y = _rms(x, self.weight, self.bias, self.eps)
    gf = g.float()
    y = y * (F.silu(gf) if self.activation in ("swish", "silu") else torch.sigmoid(gf))
    y = y.to(x.dtype)
    return (y, x) if prenorm else y


def _swiglu_linear_forward(self, x, y, weight, bias):
    return F.linear(F.silu(x) * y, weight, bias)


@contextlib.contextmanager
def fla_reference_ops():
    import fla.layers.gla as fla_gla_layer
    import fla.modules.mlp as fla_mlp
    from fla.modules import FusedRMSNormGated, RMSNorm
    from fla.modules.activations.ops import SwishFunction

    saved = []

    def swap(obj, name, value):
        saved.append((obj, name, getattr(obj, name)))
        setattr(obj, name, value)

    try:
        for op in ("chunk_gla", "fused_recurrent_gla", "fused_chunk_gla"):
            swap(fla_gla_layer, op, _naive_gla)
        swap(RMSNorm, "forward", _rms_norm_forward)
        swap(FusedRMSNormGated, "forward", _rms_norm_gated_forward)
        swap(fla_mlp.SwiGLULinear, "forward", _swiglu_linear_forward)
        swap(fla_mlp, "swiglu", lambda x, y: F.silu(x) * y)
        # the output gate of unfused layers (gate_fn = ACT2FN['swish'] = SwishFunction.apply)
        swap(SwishFunction, "forward", staticmethod(lambda ctx, x: F.silu(x)))
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)
