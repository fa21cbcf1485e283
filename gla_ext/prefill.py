"""Fused CPU prefill: GLA.forward runs the whole model over a window in one C++ call when it can.

An internal fast path of the same math as the generic forward (not a backend): the compiled
gla_ext._C.CpuPrefill holds packed copies of the weights and runs every layer over all
B*T positions in one parallel region, with the chunked kernel's loop for the attention core
(see csrc/cpu/prefill_impl.h). It pays most for short windows (window_size 60), where the
generic path's per-op overhead and thread wake-ups dominate.

Each matrix product (input projection, q/k/v/r/gate, output, W1|W3, W2) runs on the engine's
own kernel or on the vendor GEMM (at::mm on the model's own weight: MKL / oneDNN), whichever
was measured faster for the call's rows on this machine (csrc/cpu/prefill.cpp); GEMM forces
one. float32 weights are packed once for the own kernel (only the kinds it runs); bf16 /
float16 weights are never copied (widened per block as they are used).

try_forward(model, x, state, return_state, return_sequence, lengths) returns what
GLA.forward would, or None when the generic path must run. Same eligibility as gla_ext.decode.try_step:
  - the extension is not built, or ENABLED is False; the model's backend is not auto/cpu;
  - x or a parameter is not a CPU tensor of one dtype (float32, or bfloat16 / float16 weights:
    then x has that dtype too, the math runs in float32 and y comes back in that dtype), a
    state is not a float32 CPU tensor, a tensor is a subclass, or torch.compile / functorch
    transforms are active;
  - autograd is needed (grad mode on and x, a state or a parameter requires grad);
  - dropout is active (a block's Dropout in training mode with p > 0);
  - the model is not the structure the fused code implements (low-rank gate, swapped
    submodules, differing eps or normalizers between layers).
Packed copies are cached per model (weakly) and rebuilt when a parameter changes (version
counter or data pointer) or a parameter or submodule is registered anywhere; after writes
through `param.data` call clear_cache(model).
"""
from __future__ import annotations

import os

import torch
from torch import nn

from . import _ext
from ._packed_cache import DTYPES, PackedCache, collect_params

__all__ = ["ENABLED", "GEMM", "try_forward", "clear_cache", "is_cached", "engine_of"]

# Set to False to make GLA.forward always take the PyTorch layers (GLA.forward_layers); which
# of the two runs where both can is gla_ext.engine_choice's measured per-shape choice.
ENABLED = True

# The matrix engine inside the fused prefill (or GLA_EXT_PREFILL_GEMM, read at import):
#   "auto"   measured per kind of product and rows bucket on first use (default);
#   "own"    the engine's own kernels for every product;
#   "vendor" the vendor GEMM (at::mm) for every product.
GEMM = os.environ.get("GLA_EXT_PREFILL_GEMM", "auto")
_GEMMS = {"auto": 0, "own": 1, "vendor": 2}
# what CpuPrefill.last_vendor() lists, in order
MATRIX_KINDS = ("input", "proj", "wo", "w13", "w2")


def _layer_tensors(block):
    """One GLABlock's parameters in the slot order of csrc/cpu/prefill.h, or None (low-rank gate)."""
    attn, ffn = block.attn, block.ffn
    if not isinstance(attn.gk_proj, nn.Linear) or attn.gk_proj.bias is None:
        return None
    return [block.attn_norm.weight, block.attn_norm.bias,
            attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight,
            None if attn.g_proj is None else attn.g_proj.weight,
            attn.gk_proj.weight, attn.gk_proj.bias,
            None if attn.norm is None else attn.norm.weight,
            attn.o_proj.weight,
            block.ffn_norm.weight, block.ffn_norm.bias,
            ffn.w1.weight, ffn.w3.weight, ffn.w2.weight]


def _pack(glob, layers, heads, head_dim, normalizer, eps):
    return _ext._C.CpuPrefill(glob, layers, heads, head_dim, normalizer, eps, head_dim ** -0.5)


_cache = PackedCache(
    lambda model: collect_params(model, _layer_tensors, proj_needs_bias=True), _pack)


def clear_cache(model=None) -> None:
    """Drops the packed weights of `model` (of every model when None)."""
    _cache.clear(model)


def is_cached(model) -> bool:
    """True when `model` has packed prefill weights (its last forward could take the fast path)."""
    return model in _cache


def _gemm_code():
    if GEMM not in _GEMMS:
        raise ValueError(f"gla_ext.prefill.GEMM must be one of {tuple(_GEMMS)}, got {GEMM!r}")
    return _GEMMS[GEMM]


def engine_of(model):
    """{matrix kind: "own" | "vendor"} of the model's last fused prefill, or None (none ran)."""
    entry = _cache.peek(model)
    if entry is None:
        return None
    return {k: "vendor" if v else "own"
            for k, v in zip(MATRIX_KINDS, entry.packed.last_vendor())}


def try_forward(model, x, state, return_state, return_sequence, lengths=None):
    """GLA.forward's result from the fused C++ prefill, or None (see the module docstring).
    Inputs (lengths too: int64 [B] in 1..T) are already checked by GLA.forward; padded rows
    with return_sequence take the generic path."""
    gemm = _gemm_code()
    if not ENABLED or _ext._C is None or not hasattr(_ext._C, "CpuPrefill"):
        return None
    if lengths is not None and (return_sequence or lengths.device.type != "cpu"):
        return None
    if model.config.backend not in ("auto", "cpu"):
        return None
    if type(x) is not torch.Tensor or x.dtype not in DTYPES or x.device.type != "cpu":
        return None
    if x.dtype != model.norm.weight.dtype:
        return None     # mixed dtypes: the generic path decides what that means
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return None
    grad = torch.is_grad_enabled()
    if grad and x.requires_grad:
        return None
    if state is not None:
        for s in state:
            if (type(s) is not torch.Tensor or s.dtype != torch.float32
                    or s.device.type != "cpu" or (grad and s.requires_grad)):
                return None
    if grad and model not in _cache and next(model.parameters()).requires_grad:
        return None     # training-style use: no packed copy of the weights for nothing
    entry = _cache.ready(model, grad)
    if entry is None:
        return None
    y, new_state = entry.packed.forward(x, [] if state is None else list(state),
                                        bool(return_state), bool(return_sequence), lengths,
                                        gemm)
    return (y, new_state) if return_state else y
