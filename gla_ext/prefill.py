"""Fused CPU prefill: GLA.forward runs the whole model over a window in one C++ call when it can.

An internal fast path of the same math as the generic forward (not a backend), run by the
model's one fused CPU engine (gla_ext.cpu_engine, csrc/cpu/engine/; docs/cpu_engine.md): all
B*T positions per layer in parallel regions, with the chunked kernel's loop for the
attention core. It pays most for short windows (window_size 60), where the generic path's
per-op overhead and thread wake-ups dominate.

Each matrix product (input projection, q/k/v/r/gate with a low-rank gate's second half,
output, W1|W3, W2) runs on the engine's own kernel (reading the engine's packed copy in the
stored format, packed on first use; bf16 / float16 widened per block) or on the vendor GEMM
(at::mm on the model's own weight: MKL / oneDNN), whichever was measured faster for the
call's rows on this machine; GEMM forces one.

try_forward(model, x, state, return_state, return_sequence, lengths) returns what
GLA.forward would, or None when the generic path must run. Same eligibility as gla_ext.decode.try_step:
  - the extension is not built, or ENABLED is False; the model's backend is not auto/cpu;
  - x or a parameter is not a CPU tensor of one dtype (float32, or bfloat16 / float16 weights:
    then x has that dtype too, the math runs in float32 and y comes back in that dtype), a
    state is not a float32 CPU tensor, a tensor is a subclass, or torch.compile /
    functorch transforms are active;
  - autograd is needed (grad mode on and x, a state or a parameter requires grad);
  - dropout is active (a block's Dropout in training mode with p > 0);
  - the model is quantized (gla_ext.quantize_: the PyTorch layers run it), or not the
    structure the engine implements (swapped submodules, differing eps or normalizers
    between layers).
The engine cache (rebuilds, clear_cache) is gla_ext.cpu_engine's.
"""
from __future__ import annotations

import os

import torch

from . import cpu_engine
from ._packed_cache import DTYPES

__all__ = ["ENABLED", "GEMM", "try_forward", "clear_cache", "is_cached", "engine_of"]

# Set to False to make GLA.forward always take the PyTorch layers (GLA.forward_layers); which
# of the two runs where both can is gla_ext.engine_choice's measured per-shape choice.
ENABLED = True

# The matrix engine inside the fused prefill (or GLA_EXT_PREFILL_GEMM, read at import):
#   "auto"   measured per kind of product and rows bucket on first use (default);
#   "own"    the engine's own kernels for every product;
#   "vendor" the vendor GEMM (at::mm) for every product.
GEMM = os.environ.get("GLA_EXT_PREFILL_GEMM", "auto")
# what CpuEngine.last_vendor() lists, in order
MATRIX_KINDS = ("input", "proj", "wo", "w13", "w2")


clear_cache = cpu_engine.clear_cache
is_cached = cpu_engine.is_cached


def engine_of(model):
    """{matrix kind: "own" | "vendor"} of the model's last fused prefill, or None (none ran)."""
    engine = cpu_engine.peek(model)
    if engine is None or engine.quantized:
        return None
    return {k: "vendor" if v else "own" for k, v in zip(MATRIX_KINDS, engine.last_vendor())}


def try_forward(model, x, state, return_state, return_sequence, lengths=None):
    """GLA.forward's result from the fused C++ prefill, or None (see the module docstring).
    Inputs (lengths too: int64 [B] in 1..T) are already checked by GLA.forward; padded rows
    with return_sequence take the generic path."""
    gemm = cpu_engine.gemm_code(GEMM, "gla_ext.prefill.GEMM")
    if not ENABLED or (lengths is not None and (return_sequence or lengths.device.type != "cpu")):
        return None
    if type(x) is not torch.Tensor or x.dtype not in DTYPES:
        return None
    grad = torch.is_grad_enabled()
    if state is not None and not cpu_engine.plain_states(state, grad):
        return None
    entry = cpu_engine.ready_entry(model, x, grad)
    if entry is None or entry.packed.quantized:
        return None
    y, new_state = entry.packed.forward(x, [] if state is None else list(state),
                                        bool(return_state), bool(return_sequence), lengths,
                                        gemm)
    return (y, new_state) if return_state else y
