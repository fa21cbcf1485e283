"""Fused CPU decode: GLA.step runs the whole model step in one C++ call when it can.

This is an internal fast path of the same math as the generic step (not a backend): the
compiled gla_ext._C.CpuDecoder holds packed copies of the weights ([Wq; Wk; Wv; Wr; Wg] and
[W1; W3] per layer, in panels for gla_ext's own SIMD matrix-vector kernels, no vendor BLAS)
plus preallocated buffers per batch size, and runs every layer per token with one product
per matrix and vectorized loops for the rest (see csrc/cpu/decode.cpp). Weights stay in the
model's dtype: a model converted with model.to(torch.bfloat16) (or float16) streams half the
bytes; a model quantized with gla_ext.quantize_ ("int8" / "int4") streams its quantized
weights as stored (the int8 / int4 kernels of csrc/cpu/linear_qdot_impl.h, each row's group
scales kept; their inputs are rounded to int8 per group for integer dot products, see
docs/quantization.md); activations, accumulation and the state are float32, x_t and y_t have
the model's (float) dtype.

try_step(model, x_t, state) returns (y_t, new_state), or None when the generic path must run:
  - the extension is not built, or ENABLED is False;
  - the model's backend is not "auto" or "cpu";
  - the parameters are not all float32, all bfloat16 or all float16 CPU tensors (or one is a
    tensor subclass), x_t has another dtype, a state is not float32, or torch.compile /
    functorch transforms are active;
  - a block mixes float and quantized matrices, or quantization formats / group sizes;
  - autograd is needed: grad mode is on and a parameter, x_t or a state requires grad;
  - dropout is active (a block's Dropout in training mode with p > 0).
try_step_pool(model, x_t, pool_states, slots) does the same step for rows of a state pool,
in place (see its docstring).

The packed copies are cached per model (weakly: they go away with the model) and rebuilt
when a parameter (or a quantized layer's buffer) changes: an in-place write (its version
counter: load_state_dict too), new data or a new dtype/device (its data pointer), or a
parameter, buffer or submodule assigned anywhere (module registration hooks; then the
model's tensors are compared one by one); quantize_ drops the float model's copy. Not
seen: writes through `param.data` (a separate version counter), direct edits of
`module._parameters`, and changed module attributes (eps, gate_logit_normalizer), which
are read when packing; call clear_cache(model) after those. The kernels' instruction set is chosen when packing
(GLA_EXT_CPU_ISA=generic|avx2|avx512 forces one; clear_cache to repack).
"""
from __future__ import annotations

import torch
from torch import nn

from . import _ext
from ._packed_cache import PackedCache, collect_params
from .quantize import QuantizedLinear

__all__ = ["ENABLED", "try_step", "try_step_pool", "clear_cache", "is_cached", "decoder"]

# Set to False to make GLA.step always take the PyTorch layers (GLA.step_layers); which of
# the two runs where both can is gla_ext.engine_choice's measured per-shape choice.
ENABLED = True


def _kind(linear):
    """(format, group size) of a quantized layer, None for a float one."""
    return (linear.format, linear.group_size) if isinstance(linear, QuantizedLinear) else None


def _layer_tensors(block):
    """The parameters of one GLABlock in the slot order of csrc/cpu/decode.h (None = absent),
    or None when the block cannot be packed. A quantized matrix's slot holds its
    QuantizedLinear: all of a block's matrices must then share one format, and the matrices
    packed together one group size."""
    attn, ffn = block.attn, block.ffn
    if isinstance(attn.gk_proj, nn.Sequential):
        first, second = attn.gk_proj[0], attn.gk_proj[1]
    else:
        first, second = attn.gk_proj, None
    linears = [attn.q_proj, attn.k_proj, attn.v_proj, attn.g_proj, first, second,
               attn.o_proj, ffn.w1, ffn.w3, ffn.w2]
    packed_together = [linears[:5], linears[7:9]]   # [Wq; Wk; Wv; Wr; Wg], [W1 | W3]
    if (len({k and k[0] for k in map(_kind, filter(None, linears))}) != 1
            or any(len(set(map(_kind, filter(None, ms)))) != 1 for ms in packed_together)):
        return None
    quantized = isinstance(attn.q_proj, QuantizedLinear)
    q, k, v, r, wg, wg2, wo, w1, w3, w2 = (
        m if m is None or quantized else m.weight for m in linears)
    bg = (second if second is not None else first).bias
    return [block.attn_norm.weight, block.attn_norm.bias, q, k, v, r, wg, wg2, bg,
            None if attn.norm is None else attn.norm.weight, wo,
            block.ffn_norm.weight, block.ffn_norm.bias, w1, w3, w2]


def _pack(glob, layers, heads, head_dim, normalizer, eps):
    # A QuantizedLinear's slot passes its qweight; its scales / offsets go in the same slot
    # of two parallel lists (None elsewhere).
    def part(name):
        return [[getattr(m, name) if isinstance(m, QuantizedLinear) else (
            m if name == "qweight" else None) for m in layer] for layer in layers]
    return _ext._C.CpuDecoder(glob, part("qweight"), heads, head_dim, normalizer, eps,
                              head_dim ** -0.5, part("scales"), part("offsets"))


_cache = PackedCache(lambda model: collect_params(model, _layer_tensors), _pack)


def clear_cache(model=None) -> None:
    """Drops the packed weights of `model` (of every model when None)."""
    _cache.clear(model)


def is_cached(model) -> bool:
    """True when `model` has packed weights (its last step could take the fast path)."""
    return model in _cache


def decoder(model):
    """The packed gla_ext._C.CpuDecoder of `model` (built if needed), or None when the fused
    step cannot run it. For benchmarks and diagnostics (isa, weight_bytes, thread_limit)."""
    return None if _ext._C is None else getattr(_cache.get(model), "packed", None)


def _ready_entry(model, x_t, grad):
    """The cache entry whose decoder can run this step now, or None (generic path)."""
    if not ENABLED or _ext._C is None or model.config.backend not in ("auto", "cpu"):
        return None
    if type(x_t) is not torch.Tensor or x_t.device.type != "cpu" or (grad and x_t.requires_grad):
        return None
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return None
    if grad and model not in _cache and next(model.parameters()).requires_grad:
        return None     # training-style use: do not pack a copy of the weights for nothing
    entry = _cache.ready(model, grad)
    return entry if entry is not None and x_t.dtype == entry.dtype else None


def _plain_f32(t, grad):
    return (type(t) is torch.Tensor and t.dtype == torch.float32 and t.device.type == "cpu"
            and not (grad and t.requires_grad))


def try_step(model, x_t, state):
    """(y_t, new_state) from the fused C++ step, or None when GLA.step must take the generic
    path (see the module docstring). x_t is [B, 1, embed_dim] in the parameters' dtype; state
    a list of float32 tensors or None. Input errors raise the same messages as the generic
    path."""
    grad = torch.is_grad_enabled()
    entry = _ready_entry(model, x_t, grad)
    if entry is None:
        return None
    if state is None:
        states = []
    elif isinstance(state, (list, tuple)):
        for s in state:
            if not _plain_f32(s, grad):
                return None
        states = state if type(state) is list else list(state)
    else:
        return None     # the generic path reports it
    try:
        return entry.packed.step(x_t, states)
    except (RuntimeError, ValueError):
        # The generic path's checks give the messages users know; else the decoder's.
        model._check_input(x_t)
        model._check_state(state, x_t.shape[0])
        raise


def try_step_pool(model, x_t, pool_states, slots):
    """One fused step for the rows of a state pool, in place (TEAM interface 2).

    x_t [n, 1, embed_dim] (or [n, embed_dim]) in the parameters' dtype; pool_states: one
    contiguous float32 [P, H, D, D] tensor per layer; slots: int32/int64 [n], a negative slot
    marks a padding row (its output row is zero, no state is read or written). Row i advances
    pool_states[l][slots[i]] of every layer l in place; returns y_t [n, hidden_size], or None
    when the fused path cannot run (the conditions of try_step, or a pool that is not a
    contiguous float32 CPU tensor); then the caller takes the generic path. A slot >= P or
    the same slot twice raises ValueError.
    """
    grad = torch.is_grad_enabled()
    entry = _ready_entry(model, x_t, grad)
    if entry is None or not isinstance(pool_states, (list, tuple)):
        return None
    for s in pool_states:
        if not _plain_f32(s, grad) or not s.is_contiguous() or (grad and s.requires_grad):
            return None
    if type(slots) is not torch.Tensor or slots.device.type != "cpu":
        return None
    if x_t.dim() == 2:
        x_t = x_t.unsqueeze(1)
    model._check_input(x_t)
    return entry.packed.step_pool(x_t, list(pool_states), slots)
