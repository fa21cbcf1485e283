"""Fused CPU decode: GLA.step and StatePool.step run the whole model step in one C++ call.

An internal fast path of the same math as the generic step (not a backend), run by the
model's one fused CPU engine (gla_ext.cpu_engine, csrc/cpu/engine/; docs/cpu_engine.md). Its
products run on gla_ext's own SIMD matrix-vector kernels reading one packed copy of each
weight in the model's stored format: float32, bfloat16 / float16 (model.to(...): half the
bytes), or int8 / int4 after gla_ext.quantize_ (the integer kernels of
csrc/cpu/linear_qdot_impl.h; their inputs are rounded to int8 per group, see
docs/quantization.md). From 16 rows on (e.g. a 256-row pool step) each kind of product may
run on the vendor GEMM instead (at::mm on the parameter), whichever was measured faster
(GEMM forces one; quantized weights stay on the own kernels). Activations, accumulation and
the state are float32, x_t and y_t have the model's (float) dtype.

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
in place (see its docstring). The engine cache (rebuilds, clear_cache) is gla_ext.cpu_engine's.
"""
from __future__ import annotations

import os

import torch

from . import cpu_engine

__all__ = ["ENABLED", "GEMM", "try_step", "try_step_pool", "clear_cache", "is_cached", "decoder"]

# Set to False to make GLA.step always take the PyTorch layers (GLA.step_layers); which of
# the two runs where both can is gla_ext.engine_choice's measured per-shape choice.
ENABLED = True


# The matrix engine of a step's products (or GLA_EXT_STEP_GEMM, read at import): "auto"
# (own kernels below 16 rows, else measured per kind and rows bucket), "own", "vendor".
GEMM = os.environ.get("GLA_EXT_STEP_GEMM", "auto")

clear_cache = cpu_engine.clear_cache
is_cached = cpu_engine.is_cached


def decoder(model):
    """The model's gla_ext._C.CpuEngine (built if needed), or None when the fused step cannot
    run it. For benchmarks and diagnostics (isa, weight_bytes, thread_limit)."""
    return cpu_engine.engine(model)


def _ready_entry(model, x_t, grad):
    return cpu_engine.ready_entry(model, x_t, grad) if ENABLED else None


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
        if not cpu_engine.plain_states(state, grad):
            return None
        states = state if type(state) is list else list(state)
    else:
        return None     # the generic path reports it
    gemm = cpu_engine.gemm_code(GEMM, "gla_ext.decode.GEMM")
    try:
        return entry.packed.step(x_t, states, gemm)
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
    if not cpu_engine.plain_states(pool_states, grad) or not all(
            s.is_contiguous() for s in pool_states):
        return None
    if type(slots) is not torch.Tensor or slots.device.type != "cpu":
        return None
    if x_t.dim() == 2:
        x_t = x_t.unsqueeze(1)
    model._check_input(x_t)
    gemm = cpu_engine.gemm_code(GEMM, "gla_ext.decode.GEMM")
    return entry.packed.step_pool(x_t, list(pool_states), slots, gemm)
