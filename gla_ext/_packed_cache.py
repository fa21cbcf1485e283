"""The weak per-model cache of the fused CPU engine (gla_ext.cpu_engine) and its model checks.

The engine is a C++ object holding packed copies of a model's weights. This module holds the
model checks (one head layout, eps and gate normalizer for every layer; CPU parameters of one
supported dtype) and a weak cache that notices when the model's parameter set changes. The
C++ object itself notices in-place writes and new data (its status()); a parameter, buffer or
submodule registered anywhere (assignment included) bumps one process-wide generation,
after which the model's tensors are compared one by one.
A layer slot may hold a gla_ext.quantize.QuantizedLinear instead of a weight (the engine's
step reads quantized weights): its buffers are watched like parameters, and only the float
tensors need the common dtype.
"""
from __future__ import annotations

import weakref

import torch
from torch import nn

from . import _ext

READY, STALE, NEEDS_AUTOGRAD = 0, 1, 2   # status() of the packed C++ objects

# Parameter dtypes the fused paths take (16-bit weights: float32 math and state).
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

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
        nn.modules.module.register_module_buffer_registration_hook(_bump)
        _hooks_installed = True


def model_settings(model):
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


def _plain_cpu(t) -> bool:
    return (type(t) in (torch.Tensor, nn.Parameter) and t.device.type == "cpu"
            and not t.is_inference())


def common_dtype(floats, flat=()):
    """The float parameters' common dtype when a fused path can pack them (and every tensor
    of `flat` is a plain CPU tensor), else None."""
    dtype = floats[0].dtype
    if dtype not in DTYPES or not all(map(_plain_cpu, flat)):
        return None
    for p in floats:
        if not _plain_cpu(p) or p.dtype != dtype:
            return None
    return dtype


def quantized_tensors(layer):
    """The buffers of a QuantizedLinear (what a packed copy of it was made from)."""
    return tuple(t for t in (layer.qweight, layer.scales, layer.offsets) if t is not None)


def collect_params(model, layer_tensors):
    """(globals, layers, flat tensor tuple, float tensor tuple) of a model in the slot order
    of the C++ side, or None when its structure is not the fused one. layer_tensors(block)
    gives one block's tensors (None = not supported); a slot may hold a QuantizedLinear,
    whose buffers join `flat` but not the float tensors."""
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
            tensors = layer_tensors(block)
            if tensors is None:
                return None
            layers.append(tensors)
    except AttributeError:
        return None
    slots = [t for t in glob + [t for layer in layers for t in layer] if t is not None]
    floats = tuple(t for t in slots if isinstance(t, torch.Tensor))
    quantized = tuple(b for t in slots if not isinstance(t, torch.Tensor)
                      for b in quantized_tensors(t))
    return glob, layers, floats + quantized, floats


class Entry:
    __slots__ = ("packed", "params", "dropouts", "generation", "dtype")

    def __init__(self, packed, params, dropouts, generation, dtype):
        self.packed, self.params, self.dropouts = packed, params, dropouts
        self.generation, self.dtype = generation, dtype

    def dropout_active(self) -> bool:
        return any(d.training and d.p > 0 for d in self.dropouts)


class PackedCache:
    """Weakly keyed model -> Entry. collect(model) -> (globals, layers, flat) or None;
    pack(globals, layers, heads, head_dim, normalizer, eps) -> the C++ object."""

    def __init__(self, collect, pack):
        self._collect, self._pack = collect, pack
        self._entries: "weakref.WeakKeyDictionary[nn.Module, Entry]" = (
            weakref.WeakKeyDictionary())

    def clear(self, model=None) -> None:
        if model is None:
            self._entries.clear()
        else:
            self._entries.pop(model, None)

    def __contains__(self, model) -> bool:
        return model in self._entries

    def peek(self, model):
        """The model's entry as it is (None when there is none); builds nothing."""
        return self._entries.get(model)

    def build(self, model):
        """A fresh entry for model, or None when the fused path cannot run it."""
        _install_hooks()
        generation = _generation
        collected, settings = self._collect(model), model_settings(model)
        dtype = None if collected is None else common_dtype(collected[3], collected[2])
        if settings is None or dtype is None:
            self._entries.pop(model, None)
            return None
        glob, layers, flat, _ = collected
        entry = Entry(self._pack(glob, layers, *settings), flat,
                      tuple(b.dropout for b in model.blocks), generation, dtype)
        self._entries[model] = entry
        _ext.trim_heap()          # packing's temporaries
        return entry

    def get(self, model):
        """The model's entry, rebuilt when its parameter set changed; None if it cannot run."""
        entry = self._entries.get(model)
        if entry is None:
            return self.build(model)
        if entry.generation != _generation:
            # Some module registered a parameter or submodule: is it still our model's set?
            collected = self._collect(model)
            if collected is None or len(collected[2]) != len(entry.params) or any(
                    a is not b for a, b in zip(collected[2], entry.params)):
                return self.build(model)
            entry.dropouts = tuple(b.dropout for b in model.blocks)
            entry.generation = _generation
        return entry

    def ready(self, model, grad):
        """The entry whose packed object can run now (status READY, rebuilt once if STALE)."""
        entry = self.get(model)
        if entry is None or entry.dropout_active():
            return None
        status = entry.packed.status(grad)
        if status == STALE:
            entry = self.build(model)
            if entry is None:
                return None
            status = entry.packed.status(grad)
        return entry if status == READY else None
