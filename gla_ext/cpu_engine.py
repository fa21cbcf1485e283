"""The fused CPU engine of a GLA model: one gla_ext._C.CpuEngine per model, cached here.

One engine object serves GLA.step, StatePool.step (gla_ext.decode) and GLA.forward over a
window, right-padded rows and StatePool.prefill (gla_ext.prefill): one validated parameter
list (low-rank gates and quantized matrices included), one parameter watcher and one packed
copy of each weight matrix in its stored format (float32, bfloat16, float16, int8 / int4),
made per kind of product the first time the engine's own kernels run it; a product run on
the vendor GEMM reads the parameter itself (16-bit weights in their dtype or widened to
float32 per block, as gla_ext.matmul16 measured this CPU when the engine was built).
Layout and rules: docs/cpu_engine.md.

The cache is weak (an engine goes away with its model) and rebuilds an engine when a
parameter (or a quantized layer's buffer) changes: an in-place write (its version counter:
load_state_dict too), new data or a new dtype/device (its data pointer), or a parameter,
buffer or submodule assigned anywhere (module registration hooks). Not seen: writes through
`param.data`, direct edits of `module._parameters`, changed module attributes (eps,
gate_logit_normalizer): call clear_cache(model) after those. The kernels' instruction set is
fixed when the engine is built (GLA_EXT_CPU_ISA=generic|avx2|avx512 forces one; clear_cache
to rebuild).
"""
from __future__ import annotations

import torch
from torch import nn

from . import _ext, matmul16
from ._packed_cache import PackedCache, collect_params
from .quantize import QuantizedLinear

__all__ = ["GEMMS", "clear_cache", "is_cached", "engine", "peek", "ready_entry", "gemm_code"]

# Matrix engine of the products ("auto": measured per kind and rows bucket; "own": the
# engine's kernels; "vendor": at::mm on the parameters) -> the C++ code.
GEMMS = {"auto": 0, "own": 1, "vendor": 2}


def gemm_code(value, name):
    if value not in GEMMS:
        raise ValueError(f"{name} must be one of {tuple(GEMMS)}, got {value!r}")
    return GEMMS[value]


def _kind(linear):
    """(format, group size) of a quantized layer, None for a float one."""
    return (linear.format, linear.group_size) if isinstance(linear, QuantizedLinear) else None


def _layer_tensors(block):
    """The parameters of one GLABlock in the slot order of csrc/cpu/engine/engine.h (None =
    absent), or None when the block cannot be packed. A quantized matrix's slot holds its
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
    eng = _ext._C.CpuEngine(glob, part("qweight"), heads, head_dim, normalizer, eps,
                            head_dim ** -0.5, part("scales"), part("offsets"))
    # 16-bit weights on the vendor GEMM: in their dtype or widened (a property of the CPU);
    # a quantized engine has no vendor route
    if not eng.quantized:
        eng.widen16 = matmul16.widen_weights(layers[0][0].dtype)
    return eng


_cache = PackedCache(lambda model: collect_params(model, _layer_tensors), _pack)


def clear_cache(model=None) -> None:
    """Drops the engine of `model` (of every model when None)."""
    _cache.clear(model)


def is_cached(model) -> bool:
    """True when `model` has an engine (its last call could take the fused path)."""
    return model in _cache


def engine(model):
    """The CpuEngine of `model` (built if needed), or None when the engine cannot run it."""
    return None if _ext._C is None else getattr(_cache.get(model), "packed", None)


def peek(model):
    """The model's engine as it is (None when there is none); builds nothing."""
    entry = _cache.peek(model)
    return None if entry is None else entry.packed


def ready_entry(model, x, grad):
    """The cache entry whose engine can run a call on x now, or None (PyTorch path): the
    extension is built, the backend is auto/cpu, x is a plain CPU tensor of the parameters'
    dtype that needs no autograd, no compile / functorch transform is active, and the engine
    is ready (parameters unchanged, no autograd needed, no active dropout)."""
    if _ext._C is None or model.config.backend not in ("auto", "cpu"):
        return None
    if type(x) is not torch.Tensor or x.device.type != "cpu" or (grad and x.requires_grad):
        return None
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return None
    if grad and model not in _cache and next(model.parameters()).requires_grad:
        return None     # training-style use: do not pack a copy of the weights for nothing
    entry = _cache.ready(model, grad)
    return entry if entry is not None and x.dtype == entry.dtype else None


def plain_states(states, grad):
    """True when every state is a plain float32 CPU tensor needing no autograd."""
    return all(type(s) is torch.Tensor and s.dtype == torch.float32 and s.device.type == "cpu"
               and not (grad and s.requires_grad) for s in states)
