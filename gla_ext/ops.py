"""Public ops: chunk_gla (prefill / training) and fused_recurrent_gla (decode / short inputs).

Layouts follow flash-linear-attention: q, k, g [B, T, H, K]; v, o [B, T, H, V];
states [N, H, K, V] float32 (N = B, or the number of packed sequences with cu_seqlens).
Both ops compute the same thing and are differentiable for q, k, v, g and initial_state,
including a gradient arriving on the final state.
"""
from __future__ import annotations

import torch

from . import _ext, _registration, reference
from ._checks import check_inputs

__all__ = ["chunk_gla", "fused_recurrent_gla", "resolve_backend", "BACKENDS"]

BACKENDS = ("auto", "cuda", "cpu", "reference")

# Widest K the CUDA kernels take in one pass; wider K is split here (rows of the state are
# independent, so outputs of K-slices add up and final states concatenate).
_CUDA_RECURRENT_MAX_K = 256
_CUDA_CHUNK_MAX_K = 128      # tensor-core chunked forward and backward (bf16/fp16)
# shared memory per block the K=128 chunked backward needs (read once from the build)
_CHUNK_BWD_SMEM_K128 = int(_ext.build_info().get("chunk_bwd_smem_bytes_k128", 0))


def _chunk_max_k(device: torch.device) -> int:
    """128, or 64 on GPUs whose per-block shared memory cannot hold the K=128 backward
    (sm_86/sm_89). From the device properties, which torch.compile can trace; the byte count
    comes from the build."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    optin = getattr(torch.cuda.get_device_properties(index), "shared_memory_per_block_optin",
                    None)
    if optin is None:  # older torch without the property: ask the extension (eager only)
        return int(_ext._C.cuda_chunk_max_k(index))
    return _CUDA_CHUNK_MAX_K if optin >= _CHUNK_BWD_SMEM_K128 else 64


def _cuda_max_k(kernel_name: str, dtype: torch.dtype, device: torch.device) -> int:
    if kernel_name == "chunk" and dtype in (torch.float16, torch.bfloat16):
        return _chunk_max_k(device)
    return _CUDA_RECURRENT_MAX_K


_DEFAULT_CHUNK = 0  # 0 = the kernel's own choice

# Fake kernels and autograd are registered at import, so the first call may already be
# inside torch.compile without breaking the graph.
_registration.register()


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, op: str) -> str:
    """The backend that will run: explicit requests are honoured or refused, never swapped."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "reference":
        return "reference"
    kind = device.type
    if backend == "auto":
        if kind == "cpu" and _ext.has_cpu():
            return "cpu"
        if kind == "cuda" and _ext.has_cuda() and dtype != torch.float64:
            return "cuda"
        return "reference"
    if not _ext.loaded():
        raise RuntimeError(f"{op}: backend={backend!r} needs the compiled extension gla_ext._C, "
                           f"which is not available ({_ext.LOAD_ERROR}); build it with "
                           "`pip install --no-build-isolation .`, or use backend='reference'")
    if backend == "cuda":
        if not _ext.has_cuda():
            raise RuntimeError(f"{op}: backend='cuda' but gla_ext._C was built without CUDA "
                               "kernels (see `python -m gla_ext info`)")
        if kind != "cuda":
            raise RuntimeError(f"{op}: backend='cuda' needs CUDA tensors, got tensors on {device}")
        if dtype == torch.float64:
            raise RuntimeError(f"{op}: backend='cuda' supports float32, float16 and bfloat16, "
                               "not float64")
        return "cuda"
    if kind != "cpu":
        raise RuntimeError(f"{op}: backend='cpu' needs CPU tensors, got tensors on {device}")
    return "cpu"


def _prepare(q, k, v, g, initial_state, cu_seqlens):
    """Contiguous inputs; gates and state in the accumulation dtype; int64 offsets."""
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    h0 = None if initial_state is None else initial_state.to(acc).contiguous()
    cu = None if cu_seqlens is None else cu_seqlens.to(torch.int64).contiguous()
    return (q.contiguous(), k.contiguous(), v.contiguous(), g.to(acc).contiguous(), h0, cu)


def _run_kernel(fwd_op, q, k, v, g, h0, cu, scale, extra, max_k=None):
    """Calls a forward op, splitting K into slices of at most max_k when needed."""
    K = q.shape[-1]
    if max_k is None or K <= max_k:
        return fwd_op(q, k, v, g, h0, cu, scale, extra)
    o, finals = None, []
    for lo in range(0, K, max_k):
        hi = min(lo + max_k, K)
        part_h0 = None if h0 is None else h0[:, :, lo:hi].contiguous()
        o_part, ht_part = fwd_op(q[..., lo:hi].contiguous(), k[..., lo:hi].contiguous(), v,
                                 g[..., lo:hi].contiguous(), part_h0, cu, scale, extra)
        o = o_part if o is None else o + o_part
        finals.append(ht_part)
    return o, torch.cat(finals, dim=2)


_CUDA_STATE_KERNELS = None   # whether this build registered CUDA kernels for the pool ops


def _has_cuda_state_kernels() -> bool:
    global _CUDA_STATE_KERNELS
    if _CUDA_STATE_KERNELS is None:
        try:
            _CUDA_STATE_KERNELS = bool(torch._C._dispatch_has_kernel_for_dispatch_key(
                "gla_ext::recurrent_fwd_inplace", "CUDA"))
        except (RuntimeError, AttributeError):
            _CUDA_STATE_KERNELS = False
    return _CUDA_STATE_KERNELS


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _live_rows(state_indices):
    """[N] bool: which sequences have a pool row (index >= 0)."""
    return state_indices >= 0


def _token_mask(live, cu_seqlens, B, T):
    """[B, T, 1, 1] bool: tokens of live sequences (padding rows and a padded tail are False).
    Device-side only (no host read), so it also works under capture."""
    if cu_seqlens is None:
        return live.view(B, 1, 1, 1).expand(B, T, 1, 1)
    cu = cu_seqlens.to(torch.int64)
    seq = torch.searchsorted(cu[1:], torch.arange(T, device=cu.device), right=True)
    live_ext = torch.cat([live, live.new_zeros(1)])   # index N: past cu_seqlens[-1]
    return live_ext[seq].view(1, T, 1, 1)


def _dense(fwd_op, chosen, kernel_name, q, k, v, g, initial_state, cu_seqlens, scale, extra,
           state_indices, state_v_first):
    """The differentiable path: pool rows gathered (only the N named ones), V-first states
    transposed in the wrapper, then the dense op. Returns (o, final [N, H, K, V] K-first)."""
    h0 = initial_state
    live = None
    if state_indices is not None:
        idx = state_indices.to(torch.int64)
        live = _live_rows(idx)
        h0 = initial_state.index_select(0, idx.clamp(min=0))
        h0 = torch.where(live.view(-1, 1, 1, 1), h0, torch.zeros((), dtype=h0.dtype,
                                                                   device=h0.device))
    if state_v_first and h0 is not None:
        h0 = h0.transpose(-1, -2)
    q, k, v, g, h0, cu = _prepare(q, k, v, g, h0, cu_seqlens)
    max_k = _cuda_max_k(kernel_name, q.dtype, q.device) if chosen == "cuda" else None
    o, ht = _run_kernel(fwd_op, q, k, v, g, h0, cu, scale, extra, max_k)
    if live is not None:
        B, T = q.shape[:2]
        o = torch.where(_token_mask(live, cu, B, T), o, torch.zeros((), dtype=o.dtype,
                                                                      device=o.device))
        ht = torch.where(live.view(-1, 1, 1, 1), ht, torch.zeros((), dtype=ht.dtype,
                                                                   device=ht.device))
    return o, ht


def _state_kernel(kernel_name, chosen, q, k, v, g, initial_state, cu_seqlens, scale, extra,
                  state_indices, inplace, state_v_first):
    """Forward-only kernels that read (and with inplace write) pool rows through the index
    pointer and take V-first states by strides. None when K is too wide for one CUDA pass."""
    K = q.shape[-1]
    if chosen == "cuda":
        if not _has_cuda_state_kernels():
            return None
        if kernel_name == "chunk" and K > _cuda_max_k("chunk", q.dtype, q.device):
            kernel_name, extra = "recurrent", False   # same math, one pass up to K=256
        if K > _CUDA_RECURRENT_MAX_K:
            return None
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    h0 = initial_state
    if h0 is not None and state_indices is None:
        h0 = h0.to(acc).contiguous()          # a dense [N, ..] state, not a pool
    idx = None if state_indices is None else state_indices.to(torch.int64).contiguous()
    cu = None if cu_seqlens is None else cu_seqlens.to(torch.int64).contiguous()
    args = (q.contiguous(), k.contiguous(), v.contiguous(), g.to(acc).contiguous(), h0, idx,
            cu, scale, extra, bool(state_v_first))
    if inplace:
        return getattr(torch.ops.gla_ext, f"{kernel_name}_fwd_inplace")(*args), None
    return getattr(torch.ops.gla_ext, f"{kernel_name}_fwd_state")(*args)


def _gla(op_name, kernel_name, q, k, v, g, scale, initial_state, output_final_state,
         cu_seqlens, backend, extra, g_name, reverse, state_indices=None,
         inplace_final_state=False, state_v_first=False):
    check_inputs(op_name, q, k, v, g, initial_state, cu_seqlens, g_name, state_indices,
                 inplace_final_state, state_v_first)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scale = float(scale)
    chosen = resolve_backend(backend, q.device, q.dtype, op_name)
    needs_grad = _needs_grad(q, k, v, g, initial_state)
    if inplace_final_state and needs_grad:
        raise RuntimeError(f"{op_name}: inplace_final_state=True is inference only, but grad "
                           "mode is on and an input requires grad; run it under "
                           "torch.no_grad() / torch.inference_mode(), or detach the inputs")
    if chosen == "reference":
        pool_kwargs = dict(state_indices=state_indices, inplace_final_state=inplace_final_state,
                           state_v_first=state_v_first)
        if kernel_name == "chunk":
            return reference.chunk_gla_reference(q, k, v, g, scale, initial_state,
                                                 output_final_state, cu_seqlens, **pool_kwargs)
        return reference.naive_recurrent_gla(q, k, v, g, scale, initial_state,
                                             output_final_state, reverse, cu_seqlens,
                                             **pool_kwargs)
    fwd_op = getattr(torch.ops.gla_ext, f"{kernel_name}_fwd")
    if state_indices is None and not state_v_first:
        q, k, v, g, h0, cu = _prepare(q, k, v, g, initial_state, cu_seqlens)
        max_k = _cuda_max_k(kernel_name, q.dtype, q.device) if chosen == "cuda" else None
        o, ht = _run_kernel(fwd_op, q, k, v, g, h0, cu, scale, extra, max_k)
        return o, (ht if output_final_state else None)
    if not needs_grad:
        out = _state_kernel(kernel_name, chosen, q, k, v, g, initial_state, cu_seqlens, scale,
                            extra, state_indices, inplace_final_state, state_v_first)
        if out is not None:
            o, ht = out
            return o, (ht if output_final_state and not inplace_final_state else None)
    o, ht = _dense(fwd_op, chosen, kernel_name, q, k, v, g, initial_state, cu_seqlens, scale,
                   extra, state_indices, state_v_first)
    if state_v_first:
        ht = ht.transpose(-1, -2).contiguous()
    if inplace_final_state:
        # only reached for K too wide for one CUDA pass: write back the named rows alone
        idx = state_indices.to(torch.int64)
        live = _live_rows(idx)
        with torch.no_grad():
            initial_state.index_copy_(0, idx[live], ht[live].to(initial_state.dtype))
        return o, None
    return o, (ht if output_final_state else None)


def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
              cu_seqlens=None, backend="auto", state_indices=None, inplace_final_state=False,
              state_v_first=False):
    """Chunked GLA (prefill / training). Returns (o [B, T, H, V], final_state [N, H, K, V] or None).

    g is the log-space forget gate (<= 0), one value per key dimension. State pools
    (docs/design.md "State pools"): with state_indices [N], initial_state is a pool
    [P, H, K, V] and sequence n starts from pool[state_indices[n]] (< 0: padding row, zero
    outputs, no state read or written); inplace_final_state=True writes the final states back
    into those rows and returns (o, None); state_v_first=True: states are [.., H, V, K].
    Each live pool row may appear at most once in state_indices. This is checked here except
    while tracing (torch.compile, CUDA graph capture) and not at all in direct torch.ops
    calls: on CUDA a row named twice with inplace_final_state=True is then read and written
    by two blocks in no order, so its contents are unspecified (docs/cuda_float32.md).
    """
    return _gla("chunk_gla", "chunk", q, k, v, g, scale, initial_state, output_final_state,
                cu_seqlens, backend, _DEFAULT_CHUNK, "g", False, state_indices,
                inplace_final_state, state_v_first)


def fused_recurrent_gla(q, k, v, gk, scale=None, initial_state=None, output_final_state=False,
                        reverse=False, cu_seqlens=None, backend="auto", state_indices=None,
                        inplace_final_state=False, state_v_first=False):
    """Token-by-token GLA (decode / short inputs); reverse=True runs from the last token back.

    Returns (o [B, T, H, V], final_state [N, H, K, V] or None). state_indices,
    inplace_final_state and state_v_first as for chunk_gla.
    """
    return _gla("fused_recurrent_gla", "recurrent", q, k, v, gk, scale, initial_state,
                output_final_state, cu_seqlens, backend, bool(reverse), "gk", bool(reverse),
                state_indices, inplace_final_state, state_v_first)
