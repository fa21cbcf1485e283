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


def _gla(op_name, kernel_name, q, k, v, g, scale, initial_state, output_final_state,
         cu_seqlens, backend, extra, g_name, reverse):
    check_inputs(op_name, q, k, v, g, initial_state, cu_seqlens, g_name)
    if scale is None:
        scale = q.shape[-1] ** -0.5
    scale = float(scale)
    chosen = resolve_backend(backend, q.device, q.dtype, op_name)
    if chosen == "reference":
        if kernel_name == "chunk":
            o, ht = reference.chunk_gla_reference(q, k, v, g, scale, initial_state,
                                                  output_final_state, cu_seqlens)
        else:
            o, ht = reference.naive_recurrent_gla(q, k, v, g, scale, initial_state,
                                                  output_final_state, reverse, cu_seqlens)
        return o, ht
    fwd_op = getattr(torch.ops.gla_ext, f"{kernel_name}_fwd")
    q, k, v, g, h0, cu = _prepare(q, k, v, g, initial_state, cu_seqlens)
    max_k = _cuda_max_k(kernel_name, q.dtype, q.device) if chosen == "cuda" else None
    o, ht = _run_kernel(fwd_op, q, k, v, g, h0, cu, scale, extra, max_k)
    return o, (ht if output_final_state else None)


def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False,
              cu_seqlens=None, backend="auto"):
    """Chunked GLA (prefill / training). Returns (o [B, T, H, V], final_state [N, H, K, V] or None).

    g is the log-space forget gate (<= 0), one value per key dimension.
    """
    return _gla("chunk_gla", "chunk", q, k, v, g, scale, initial_state, output_final_state,
                cu_seqlens, backend, _DEFAULT_CHUNK, "g", False)


def fused_recurrent_gla(q, k, v, gk, scale=None, initial_state=None, output_final_state=False,
                        reverse=False, cu_seqlens=None, backend="auto"):
    """Token-by-token GLA (decode / short inputs); reverse=True runs from the last token back.

    Returns (o [B, T, H, V], final_state [N, H, K, V] or None).
    """
    return _gla("fused_recurrent_gla", "recurrent", q, k, v, gk, scale, initial_state,
                output_final_state, cu_seqlens, backend, bool(reverse), "gk", bool(reverse))
