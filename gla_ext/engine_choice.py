"""Which CPU path runs a model call: the fused C++ engine or the plain PyTorch layers.

The fused engine (gla_ext.decode, gla_ext.prefill) streams packed weights through its own
GEMV / skinny-matrix kernels: far ahead where few rows make a call memory- or overhead-bound
(decode, short windows), behind the vendor GEMM (MKL / oneDNN, what nn.Linear calls; bf16
on AMX) where many rows make it compute-bound. Where the crossover lies depends on the CPU,
the dtype and the model, so it is measured on this machine at first use, per shape class,
as the decoder's thread policy is: the first eligible call of a class runs both paths
(interleaved, best of a few), returns the fused result, and records the faster path for
the class. The rule it enforces: the fused engine never runs where it measured slower
than the PyTorch path of the same model.

A shape class is (kind, rows bucket (next power of two), dtype, threads, kind-specific
key): "step" classes are keyed by batch size, "prefill" classes by batch size and window
length. When the PyTorch path wins every class that was measured, the model's engine (one
for steps and prefills, gla_ext.cpu_engine) is dropped (no weight copy is kept for nothing).

MODE (or the environment variable GLA_EXT_CPU_ENGINE, read at import):
  "auto"    measure per shape class (default);
  "fused"   the fused engine wherever it can run (tests of the engine itself);
  "pytorch" never the fused engine.
"""
from __future__ import annotations

import os
import time
import weakref

import torch

from . import _ext
from ._timing import shape_bucket
from ._checks import _is_tracing

__all__ = ["MODE", "run", "prefer_fused", "decisions", "forget"]

MODE = os.environ.get("GLA_EXT_CPU_ENGINE", "auto")
_MODES = ("auto", "fused", "pytorch")

# per model: {class key: "fused" | "pytorch"}; weak so the table goes with the model
_table: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()

_MIN_REPS, _MAX_REPS, _MIN_SECONDS = 3, 12, 0.02
# Calls of more rows are measured on their first _PROBE_ROWS; before that, the plain path on
# _TINY_ROWS rows, scaled up, more than _FAR_BEHIND times the fused call's time settles it
# (a vendor GEMM without native support for the dtype can be 100x behind).
_PROBE_ROWS, _TINY_ROWS, _FAR_BEHIND = 2048, 64, 10.0


def _class_key(model, kind, key):
    dtype = next(model.parameters()).dtype
    return (kind, tuple(shape_bucket(k) if isinstance(k, int) and not isinstance(k, bool) else k
                        for k in key), dtype, torch.get_num_threads())


def decisions(model) -> dict:
    """{shape class: "fused" | "pytorch"} measured so far for `model` (a copy)."""
    return dict(_table.get(model, {}))


def forget(model=None) -> None:
    """Drops the measured choices of `model` (of every model when None): measure again."""
    if model is None:
        _table.clear()
    else:
        _table.pop(model, None)


def _measure(fused, plain, fused_first=float("inf")):
    """(fused seconds, plain seconds): best of interleaved runs after one warm run each.
    fused_first: the time of the fused call that has just run (packing included): a plain
    warm run far slower than it settles the choice without repeats."""
    best = [float("inf"), float("inf")]
    t0 = time.perf_counter()
    plain()                                   # warm (the fused one has just run)
    warm = time.perf_counter() - t0
    if warm > 3 * fused_first and warm > 0.05:
        return fused_first, warm
    started, reps = time.perf_counter(), 0
    while reps < _MIN_REPS or (reps < _MAX_REPS and time.perf_counter() - started < _MIN_SECONDS):
        for i, fn in enumerate((fused, plain)):
            t0 = time.perf_counter()
            fn()
            best[i] = min(best[i], time.perf_counter() - t0)
        reps += 1
        # one path far behind after the first pair: no need to confirm it
        if reps == 1 and max(best) > 3 * min(best) and max(best) > 0.05:
            break
    return best


def _drop_unused_copy(model, kind, table):
    """Frees the model's engine (gla_ext.cpu_engine: one for steps and prefills) when no
    measured class of any kind runs fused."""
    if any(v == "fused" for v in table.values()):
        return
    from . import cpu_engine
    cpu_engine.clear_cache(model)


def _check_mode():
    if MODE not in _MODES:
        raise ValueError(f"gla_ext.engine_choice.MODE must be one of {_MODES}, got {MODE!r}")
    return MODE


def _record(model, ck, fused, plain, fused_first=float("inf")):
    """Measures both paths for class ck (the fused one just ran), records and returns the
    faster ("fused" on a tie)."""
    table = _table.setdefault(model, {})
    t_fused, t_plain = _measure(fused, plain, fused_first)
    table[ck] = "fused" if t_fused <= t_plain else "pytorch"
    if table[ck] == "pytorch":
        _drop_unused_copy(model, ck[0], table)
    _ext.trim_heap()              # the losing path's one-off buffers
    return table[ck]


def run(model, kind: str, key: tuple, fused, plain, probes=None):
    """fused() (None when the engine cannot run this call) or plain(), as MODE and the
    measured choice for this call's shape class say. Both must be free of side effects on
    their inputs (they return new tensors), so the first call of a class can run both.
    probes: None, or rows -> (fused_probe, plain_probe, share): the same call cut to about
    `rows` rows and its share of the call's rows (bounds the first call's cost where the
    plain path is very slow)."""
    mode = _check_mode()
    if mode == "pytorch" or _is_tracing():   # (compiled / captured: plain PyTorch ops)
        return plain()
    ck = _class_key(model, kind, key)
    choice = _table.get(model, {}).get(ck) if mode == "auto" else "fused"
    if choice == "pytorch":
        return plain()
    t0 = time.perf_counter()
    out = fused()
    t_fused = time.perf_counter() - t0
    if out is None:
        return plain()
    if choice is None:
        pair = (fused, plain)
        if probes is not None:
            _, tiny, share = probes(_TINY_ROWS)
            if share < 1:
                t0 = time.perf_counter()
                tiny()
                if (time.perf_counter() - t0) / share > _FAR_BEHIND * t_fused:
                    _table.setdefault(model, {})[ck] = "fused"
                    return out
            fused_probe, plain_probe, share = probes(_PROBE_ROWS)
            if share < 1:
                pair = (fused_probe, plain_probe)
        _record(model, ck, *pair, t_fused)
    return out


def prefer_fused(model, kind: str, key: tuple, fused_probe, plain_probe) -> bool:
    """Whether a call that cannot be repeated (it writes in place, like a pool step) should
    try the fused engine; an unmeasured class is measured with the side-effect-free probes
    (the equivalent dense call), which share the class of `kind` and `key`."""
    mode = _check_mode()
    if mode != "auto":
        return mode == "fused"
    ck = _class_key(model, kind, key)
    choice = _table.get(model, {}).get(ck)
    if choice is None:
        t0 = time.perf_counter()
        if fused_probe() is None:
            return True                      # the engine declines: the caller sees it too
        choice = _record(model, ck, fused_probe, plain_probe, time.perf_counter() - t0)
    return choice == "fused"
