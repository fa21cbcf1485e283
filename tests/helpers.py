"""Shared test helpers: fresh random inputs in DESIGN.md's distributions, error metrics."""
from __future__ import annotations

import torch
import torch.nn.functional as F

TOLERANCE = {  # DESIGN.md "Numerics": relative error vs the float64 reference
    ("cpu", torch.float32): 1e-5,
    ("cuda", torch.float32): 1e-3,
    ("cpu", torch.float16): 5e-3,
    ("cuda", torch.float16): 5e-3,
    ("cpu", torch.bfloat16): 1e-2,
    ("cuda", torch.bfloat16): 1e-2,
    ("cpu", torch.float64): 1e-10,
}


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    assert not torch.isnan(x).any(), "NaN in result"
    denom = ref.norm().item()
    diff = (x - ref).norm().item()
    return diff / denom if denom > 0 else diff


def make_inputs(B, T, H, K, V, dtype=torch.float32, device="cpu", normalizer=1.0, n_states=None,
                with_h0=True, gate=None):
    """q, k, v, g, h0 with gates logsigmoid(randn) / normalizer (or `gate` if given)."""
    q = torch.randn(B, T, H, K, device=device).to(dtype)
    k = torch.randn(B, T, H, K, device=device).to(dtype)
    v = torch.randn(B, T, H, V, device=device).to(dtype)
    if gate is None:
        g = F.logsigmoid(torch.randn(B, T, H, K, device=device, dtype=torch.float64)) / normalizer
    else:
        g = torch.full((B, T, H, K), float(gate), device=device, dtype=torch.float64)
    g = g.to(torch.float64 if dtype == torch.float64 else torch.float32)
    N = B if n_states is None else n_states
    h0 = torch.randn(N, H, K, V, device=device, dtype=g.dtype) if with_h0 else None
    return q, k, v, g, h0


def reference_grads(fn, inputs, grad_o, grad_ht, **kwargs):
    """Runs fn in float64 on copies of inputs; returns (o, ht, [grads of every non-None input])."""
    leaves = [None if x is None else x.detach().double().clone().requires_grad_() for x in inputs]
    q, k, v, g, h0 = leaves
    o, ht = fn(q, k, v, g, initial_state=h0, output_final_state=True, **kwargs)
    loss = (o * grad_o.double()).sum()
    if grad_ht is not None:
        loss = loss + (ht * grad_ht.double()).sum()
    loss.backward()
    return o.detach(), ht.detach(), [None if x is None else x.grad for x in leaves]
