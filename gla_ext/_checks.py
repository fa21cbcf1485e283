"""Input validation for the ops: every bad input gets an error naming the argument and what was expected."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _is_tracing() -> bool:
    """Reading tensor values would break torch.compile tracing and CUDA-graph capture."""
    if torch.compiler.is_compiling():
        return True
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _require_tensor(x, name: str):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")


def check_inputs(op: str, q, k, v, g, initial_state, cu_seqlens, g_name: str = "g",
                 state_indices=None, inplace_final_state: bool = False,
                 state_v_first: bool = False) -> int:
    """Validates the ops' inputs; returns N, the number of sequences."""
    for x, name in ((q, "q"), (k, "k"), (v, "v"), (g, g_name)):
        _require_tensor(x, f"{op}: {name}")
        if x.dim() != 4:
            layout = "[B, T, H, V]" if name == "v" else "[B, T, H, K]"
            raise ValueError(f"{op}: {name} must be 4-D {layout}, got shape {tuple(x.shape)}")
        if x.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{op}: {name} must be a floating tensor (float32, float16, bfloat16), "
                             f"got {x.dtype}")
        if x.device != q.device:
            raise ValueError(f"{op}: {name} is on {x.device} but q is on {q.device}; "
                             "all inputs must be on one device")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"{op}: q, k and v must share one dtype, got q {q.dtype}, k {k.dtype}, "
                         f"v {v.dtype}")
    if k.shape != q.shape:
        raise ValueError(f"{op}: k must have the shape of q {tuple(q.shape)} [B, T, H, K], "
                         f"got {tuple(k.shape)}")
    if g.shape != q.shape:
        raise ValueError(f"{op}: {g_name} must have the shape of q {tuple(q.shape)} [B, T, H, K], "
                         f"got {tuple(g.shape)}")
    B, T, H, K = q.shape
    if v.shape[:3] != q.shape[:3]:
        raise ValueError(f"{op}: v must be [B, T, H, V] = [{B}, {T}, {H}, V], got {tuple(v.shape)}")
    if K == 0 or v.shape[3] == 0:
        raise ValueError(f"{op}: K and V must be at least 1, got K={K}, V={v.shape[3]}")
    N = B if cu_seqlens is None else _check_cu_seqlens(op, cu_seqlens, q)
    V = v.shape[3]
    if inplace_final_state and state_indices is None:
        raise ValueError(f"{op}: inplace_final_state=True needs state_indices (the pool rows "
                         "to update)")
    layout, last2 = ("[.., H, V, K]", (V, K)) if state_v_first else ("[.., H, K, V]", (K, V))
    if state_indices is not None:
        _check_pool(op, initial_state, state_indices, q, N, H, last2, layout)
    elif initial_state is not None:
        _require_tensor(initial_state, f"{op}: initial_state")
        if tuple(initial_state.shape) != (N, H) + last2:
            names = "[N, H, V, K]" if state_v_first else "[N, H, K, V]"
            raise ValueError(f"{op}: initial_state must have shape {names} = "
                             f"{list((N, H) + last2)}, got {tuple(initial_state.shape)}")
        if initial_state.dtype not in FLOAT_DTYPES:
            raise ValueError(f"{op}: initial_state must be floating (float32), "
                             f"got {initial_state.dtype}")
        if initial_state.device != q.device:
            raise ValueError(f"{op}: initial_state is on {initial_state.device} but q is on "
                             f"{q.device}")
    return N


def _check_pool(op, pool, idx, q, N, H, last2, layout):
    """state_indices [N] into a pool [P, H, K, V] (or V-first) of the accumulation dtype."""
    _require_tensor(idx, f"{op}: state_indices")
    if idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"{op}: state_indices must be int32 or int64, got {idx.dtype}")
    if idx.dim() != 1 or idx.numel() != N:
        raise ValueError(f"{op}: state_indices must be 1-D [N] with N={N} (one per sequence), "
                         f"got shape {tuple(idx.shape)}")
    if idx.device != q.device:
        raise ValueError(f"{op}: state_indices is on {idx.device} but q is on {q.device}")
    if pool is None:
        raise ValueError(f"{op}: state_indices needs initial_state: the pool [P, H, K, V] "
                         "float32 its entries index")
    _require_tensor(pool, f"{op}: initial_state")
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if pool.dim() != 4 or tuple(pool.shape[1:]) != (H,) + last2:
        raise ValueError(f"{op}: with state_indices, initial_state must be a pool [P, H, K, V] "
                         f"{layout} with H, K, V = {H}, {last2} ; got shape "
                         f"{tuple(pool.shape)}")
    if pool.dtype != acc:
        raise ValueError(f"{op}: the state pool (initial_state) must be {acc}, got {pool.dtype}")
    if pool.device != q.device:
        raise ValueError(f"{op}: the state pool (initial_state) is on {pool.device} but q is on "
                         f"{q.device}")
    if not pool.is_contiguous():
        raise ValueError(f"{op}: the state pool (initial_state) must be contiguous (its rows "
                         "are read and written in place)")
    if not _is_tracing():
        check_pool_rows(op, idx.tolist(), pool.shape[0], "state_indices", f"P={pool.shape[0]}")


def check_pool_rows(op: str, rows: list, P: int, name: str, bound: str,
                    allow_padding: bool = True) -> None:
    """The pool-row rule (csrc/gla.h pool_row): a row r < 0 is padding (when allowed), a live
    row must be < P and may appear once per call (a stream advances once per call). The one
    place that words these errors, for the ops (state_indices) and StatePool (slots)."""
    bad = [r for r in rows if r >= P or (r < 0 and not allow_padding)]
    if bad:
        low = "" if allow_padding else "0 <= "
        raise ValueError(f"{op}: {name} must be {low}< {bound} (out of range of the pool's "
                         f"rows), got {bad}")
    live = [r for r in rows if r >= 0]
    if len(set(live)) != len(live):
        seen, twice = set(), set()
        for r in live:
            (twice if r in seen else seen).add(r)
        raise ValueError(f"{op}: {name} must be distinct: rows {sorted(twice)} appear more than "
                         "once (each live row may appear once per call)")


def _check_cu_seqlens(op: str, cu, q) -> int:
    _require_tensor(cu, f"{op}: cu_seqlens")
    if cu.dim() != 1 or cu.numel() < 2:
        raise ValueError(f"{op}: cu_seqlens must be a 1-D tensor [N+1] with N >= 1, "
                         f"got shape {tuple(cu.shape)}")
    if cu.dtype.is_floating_point or cu.dtype.is_complex or cu.dtype == torch.bool:
        raise ValueError(f"{op}: cu_seqlens must be an integer tensor, got {cu.dtype}")
    if cu.device != q.device:
        raise ValueError(f"{op}: cu_seqlens is on {cu.device} but q is on {q.device}")
    if q.shape[0] != 1:
        raise ValueError(f"{op}: with cu_seqlens the batch size must be 1 (sequences packed "
                         f"along T), got B={q.shape[0]}")
    if not _is_tracing():
        offsets = cu.tolist()
        T = q.shape[1]
        if offsets[0] != 0:
            raise ValueError(f"{op}: cu_seqlens must start at 0, got {offsets[0]}")
        if any(b < a for a, b in zip(offsets, offsets[1:])):
            raise ValueError(f"{op}: cu_seqlens must be non-decreasing, got {offsets}")
        if offsets[-1] > T:  # less than T is a padded batch: the tail belongs to no sequence
            raise ValueError(f"{op}: cu_seqlens must end at T={T} or before, got {offsets[-1]}")
    return cu.numel() - 1
