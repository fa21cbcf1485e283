"""Makes fla's own GLA model run on a CPU, the only way it can: its Triton-only pieces are
swapped for plain PyTorch (fla_torch_modules, the same ones accelerate() uses) and its GLA ops
for fla's naive reference recurrence (fla.ops.gla.naive.naive_recurrent_gla). For tests and
benchmarks that compare gla_ext with fla's model; needs fla installed. Use as a context
manager:

    with fla_reference_ops():
        logits = fla_model(input_ids).logits

Replaced while active (and restored after), wherever fla bound them: chunk_gla /
fused_recurrent_gla / fused_chunk_gla, fla's RMSNorm / gated RMSNorm functions, swiglu,
SwishFunction and the fused cross-entropy losses (see fla_accelerate.install_torch_modules).
"""
from __future__ import annotations

import contextlib

from .fla_patching import Patch

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


@contextlib.contextmanager
def fla_reference_ops():
    from .fla_accelerate import fla_gla_ops, install_torch_modules, is_accelerated
    if is_accelerated():   # its swaps would hide fla's originals from this one
        raise RuntimeError("fla_reference_ops: turn gla_ext's accelerate() off first")
    patch = Patch()
    try:
        for original in fla_gla_ops().values():
            patch.replace_function(original, _naive_gla)
        install_torch_modules(patch, use_torch=None)
        yield
    finally:
        patch.undo()
