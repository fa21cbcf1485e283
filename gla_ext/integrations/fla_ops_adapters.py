"""fla's GLA op signatures (fla 0.6.0: chunk_gla, fused_recurrent_gla, fused_chunk_gla) on
gla_ext's ops. Tensors on a device we do not take stay with fla's own op (passed through
unchanged); `takes(tensor)` decides. fla's conventions map one to one: `g` / `gk` the log
forget gate, `scale` (default K ** -0.5), `initial_state` / final state [N, H, K, V] or
V-first [N, H, V, K] with state_v_first, `cu_seqlens` [N + 1] with B == 1. An argument with no
gla_ext meaning raises NotImplementedError naming it."""
from __future__ import annotations

import torch

from .. import ops as gla_ops

__all__ = ["make_adapters"]


def _reject(op_name, **unsupported):
    for name, value in unsupported.items():
        if value is not None:
            raise NotImplementedError(f"{op_name} (gla_ext accelerate): argument {name!r} is "
                                      "not supported by gla_ext's kernels")


def _extra_kwargs(op_name, kwargs):
    if kwargs:
        raise NotImplementedError(f"{op_name} (gla_ext accelerate): argument(s) "
                                  f"{sorted(kwargs)} are not supported by gla_ext's kernels")


def make_adapters(originals: dict, takes) -> dict:
    """{name: adapter} for the fla ops in `originals` ({name: fla function}); takes(q) says
    whether gla_ext runs a call (else fla's original does)."""
    fla_chunk = originals["chunk_gla"]
    fla_recurrent = originals["fused_recurrent_gla"]
    fla_fused_chunk = originals["fused_chunk_gla"]

    def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
                  state_v_first=False, cu_seqlens=None, cu_seqlens_cpu=None):
        if not takes(q):
            return fla_chunk(q, k, v, g, scale=scale, initial_state=initial_state,
                             output_final_state=output_final_state,
                             state_v_first=state_v_first, cu_seqlens=cu_seqlens,
                             cu_seqlens_cpu=cu_seqlens_cpu)
        # cu_seqlens_cpu is fla's host copy of cu_seqlens (a launch hint): same information
        return gla_ops.chunk_gla(q, k, v, g, scale=scale, initial_state=initial_state,
                                 output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                 state_v_first=state_v_first)

    def fused_recurrent_gla(q, k, v, gk=None, gv=None, scale=None, initial_state=None,
                            output_final_state=False, reverse=False, state_v_first=False,
                            cu_seqlens=None, **kwargs):
        if not takes(q):
            return fla_recurrent(q, k, v, gk, gv, scale=scale, initial_state=initial_state,
                                 output_final_state=output_final_state, reverse=reverse,
                                 state_v_first=state_v_first, cu_seqlens=cu_seqlens, **kwargs)
        if "transpose_state_layout" in kwargs:      # fla's deprecated name of state_v_first
            if state_v_first:
                raise ValueError("fused_recurrent_gla: pass state_v_first or the deprecated "
                                 "transpose_state_layout, not both")
            state_v_first = bool(kwargs.pop("transpose_state_layout"))
        _extra_kwargs("fused_recurrent_gla", kwargs)
        _reject("fused_recurrent_gla", gv=gv)
        if gk is None:           # no key gate: no decay, g = 0
            gk = torch.zeros(q.shape, dtype=torch.float32, device=q.device)
        return gla_ops.fused_recurrent_gla(q, k, v, gk, scale=scale,
                                           initial_state=initial_state,
                                           output_final_state=output_final_state,
                                           reverse=reverse, cu_seqlens=cu_seqlens,
                                           state_v_first=state_v_first)

    def fused_chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
                        state_v_first=False, cu_seqlens=None, **kwargs):
        """fla 0.6.0 deprecated this op (it raises); on gla_ext it is chunk_gla."""
        if not takes(q):
            return fla_fused_chunk(q=q, k=k, v=v, g=g, scale=scale,
                                   initial_state=initial_state,
                                   output_final_state=output_final_state,
                                   state_v_first=state_v_first, cu_seqlens=cu_seqlens,
                                   **kwargs)
        _extra_kwargs("fused_chunk_gla", kwargs)
        return gla_ops.chunk_gla(q, k, v, g, scale=scale, initial_state=initial_state,
                                 output_final_state=output_final_state, cu_seqlens=cu_seqlens,
                                 state_v_first=state_v_first)

    return {"chunk_gla": chunk_gla, "fused_recurrent_gla": fused_recurrent_gla,
            "fused_chunk_gla": fused_chunk_gla}
