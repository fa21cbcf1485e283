"""Fused CPU decode: GLA.step runs the whole model step in one C++ call when it can.

This is an internal fast path of the same math as the generic step (not a backend): the
compiled gla_ext._C.CpuDecoder holds packed copies of the weights ([Wq; Wk; Wv; Wr; Wg] and
[W1; W3] per layer, in panels for gla_ext's own SIMD matrix-vector kernels, no vendor BLAS)
plus preallocated buffers per batch size, and runs every layer per token with one product
per matrix and vectorized loops for the rest (see csrc/cpu/decode.cpp). Weights stay in the
model's dtype: a model converted with model.to(torch.bfloat16) (or float16) streams half the
bytes; activations, accumulation and the state are float32, x_t and y_t have the model's dtype.

try_step(model, x_t, state) returns (y_t, new_state), or None when the generic path must run:
  - the extension is not built, or ENABLED is False;
  - the model's backend is not "auto" or "cpu";
  - the parameters are not all float32, all bfloat16 or all float16 CPU tensors (or one is a
    tensor subclass), x_t has another dtype, a state is not float32, or torch.compile /
    functorch transforms are active;
  - autograd is needed: grad mode is on and a parameter, x_t or a state requires grad;
  - dropout is active (a block's Dropout in training mode with p > 0).
try_step_pool(model, x_t, pool_states, slots) does the same step for rows of a state pool,
in place (see its docstring).

The packed copies are cached per model (weakly: they go away with the model) and rebuilt
when a parameter changes: an in-place write (its version counter), new data or a new
dtype/device (its data pointer), or a parameter or submodule assigned anywhere (module
registration hooks; then the model's parameters are compared one by one). Not seen: writes
through `param.data` (a separate version counter), direct edits of `module._parameters`, and
changed module attributes (eps, gate_logit_normalizer), which are read when packing; call
clear_cache(model) after those. The kernels' instruction set is chosen when packing
(GLA_EXT_CPU_ISA=generic|avx2|avx512 forces one; clear_cache to repack).
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from . import _ext

__all__ = ["ENABLED", "try_step", "try_step_pool", "clear_cache", "is_cached", "decoder"]

# Set to False to make GLA.step always take the generic path (tests compare the two).
ENABLED = True

_READY, _STALE, _NEEDS_AUTOGRAD = 0, 1, 2

# Bumped whenever any module anywhere registers a parameter or a submodule (assignment
# included); the hooks are installed with the first cache entry.
_generation = 0
_hooks_installed = False


def _bump(*_args):
    global _generation
    _generation += 1


def _install_hooks():
    global _hooks_installed
    if not _hooks_installed:
        nn.modules.module.register_module_parameter_registration_hook(_bump)
        nn.modules.module.register_module_module_registration_hook(_bump)
        _hooks_installed = True


class _Entry:
    __slots__ = ("decoder", "params", "dropouts", "generation", "dtype")

    def __init__(self, decoder, params, dropouts, generation, dtype):
        self.decoder, self.params, self.dropouts = decoder, params, dropouts
        self.generation, self.dtype = generation, dtype


_cache: "weakref.WeakKeyDictionary[nn.Module, _Entry]" = weakref.WeakKeyDictionary()


def clear_cache(model=None) -> None:
    """Drops the packed weights of `model` (of every model when None)."""
    if model is None:
        _cache.clear()
    else:
        _cache.pop(model, None)


def is_cached(model) -> bool:
    """True when `model` has packed weights (its last step could take the fast path)."""
    return model in _cache


def decoder(model):
    """The packed gla_ext._C.CpuDecoder of `model` (built if needed), or None when the fused
    step cannot run it. For benchmarks and diagnostics (isa, weight_bytes, thread_limit)."""
    return None if _ext._C is None else getattr(_entry(model), "decoder", None)


def _layer_tensors(block):
    """The parameters of one GLABlock in the slot order of csrc/cpu/decode.h (None = absent)."""
    attn, ffn = block.attn, block.ffn
    if isinstance(attn.gk_proj, nn.Sequential):
        first, second = attn.gk_proj[0], attn.gk_proj[1]
        wg, wg2, bg = first.weight, second.weight, second.bias
    else:
        wg, wg2, bg = attn.gk_proj.weight, None, attn.gk_proj.bias
    return [block.attn_norm.weight, block.attn_norm.bias,
            attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight,
            None if attn.g_proj is None else attn.g_proj.weight,
            wg, wg2, bg,
            None if attn.norm is None else attn.norm.weight,
            attn.o_proj.weight,
            block.ffn_norm.weight, block.ffn_norm.bias,
            ffn.w1.weight, ffn.w3.weight, ffn.w2.weight]


def _collect(model):
    """(globals, layers, flat parameter list) of a model, or None if its structure is not the one
    the fused step implements (e.g. a submodule was swapped for something else)."""
    proj = model.input_proj
    if isinstance(proj, nn.Identity):
        glob = [None, None]
    elif isinstance(proj, nn.Linear):
        glob = [proj.weight, proj.bias]
    else:
        return None
    glob += [model.norm.weight, model.norm.bias]
    layers = []
    try:
        for block in model.blocks:
            layers.append(_layer_tensors(block))
    except AttributeError:
        return None
    flat = tuple(t for t in glob + [t for layer in layers for t in layer] if t is not None)
    return glob, layers, flat


def _settings(model):
    """(num_heads, head_dim, gate normalizer, eps) shared by every layer, or None."""
    c = model.config
    eps = {model.norm.eps}
    normalizers = set()
    for block in model.blocks:
        attn = block.attn
        if (attn.num_heads, attn.head_dim) != (c.num_heads, c.head_dim):
            return None
        if attn.backend not in ("auto", "cpu"):
            return None
        normalizers.add(float(attn.gate_logit_normalizer))
        eps |= {block.attn_norm.eps, block.ffn_norm.eps}
        if attn.norm is not None:
            eps.add(attn.norm.eps)
    if len(eps) != 1 or len(normalizers) != 1 or None in eps:
        return None
    return c.num_heads, c.head_dim, normalizers.pop(), float(eps.pop())


_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _eligible(flat):
    """The parameters' common dtype when the fused step can pack them, else None."""
    dtype = flat[0].dtype
    if dtype not in _DTYPES:
        return None
    for p in flat:
        if (type(p) not in (torch.Tensor, nn.Parameter) or p.dtype != dtype
                or p.device.type != "cpu" or p.is_inference()):
            return None
    return dtype


def _build(model):
    """A fresh cache entry for model, or None when the fused step cannot run it."""
    _install_hooks()
    generation = _generation
    collected = _collect(model)
    settings = _settings(model)
    dtype = None if collected is None else _eligible(collected[2])
    if settings is None or dtype is None:
        _cache.pop(model, None)
        return None
    glob, layers, flat = collected
    heads, head_dim, normalizer, eps = settings
    decoder = _ext._C.CpuDecoder(glob, layers, heads, head_dim, normalizer, eps,
                                 head_dim ** -0.5)
    dropouts = tuple(b.dropout for b in model.blocks)
    entry = _Entry(decoder, flat, dropouts, generation, dtype)
    _cache[model] = entry
    return entry


def _entry(model):
    entry = _cache.get(model)
    if entry is None:
        return _build(model)
    if entry.generation != _generation:
        # Some module registered a parameter or submodule: is it still our model's set?
        collected = _collect(model)
        if collected is None or len(collected[2]) != len(entry.params) or any(
                a is not b for a, b in zip(collected[2], entry.params)):
            return _build(model)
        entry.dropouts = tuple(b.dropout for b in model.blocks)
        entry.generation = _generation
    return entry


def _ready_entry(model, x_t, grad):
    """The cache entry whose decoder can run this step now, or None (generic path)."""
    if not ENABLED or _ext._C is None or model.config.backend not in ("auto", "cpu"):
        return None
    if type(x_t) is not torch.Tensor or x_t.device.type != "cpu" or (grad and x_t.requires_grad):
        return None
    if torch.compiler.is_compiling() or torch._C._are_functorch_transforms_active():
        return None
    entry = _cache.get(model)
    if entry is None or entry.generation != _generation:
        if entry is None and grad and next(model.parameters()).requires_grad:
            return None     # training-style use: do not pack a copy of the weights for nothing
        entry = _entry(model)
        if entry is None:
            return None
    if x_t.dtype != entry.dtype:
        return None
    for d in entry.dropouts:
        if d.training and d.p > 0:
            return None
    status = entry.decoder.status(grad)
    if status == _STALE:
        entry = _build(model)
        if entry is None or x_t.dtype != entry.dtype:
            return None
        status = entry.decoder.status(grad)
    return entry if status == _READY else None


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
        return entry.decoder.step(x_t, states)
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
    return entry.decoder.step_pool(x_t, list(pool_states), slots)
