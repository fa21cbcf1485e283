"""Loads the compiled extension gla_ext._C if it was built; importing gla_ext never fails without it."""
from __future__ import annotations

_C = None
LOAD_ERROR: str | None = None

try:
    from . import _C  # noqa: F401  (registers torch.ops.gla_ext.*)
except Exception as exc:  # missing build, or built against another torch
    _C = None
    LOAD_ERROR = f"{type(exc).__name__}: {exc}"


def loaded() -> bool:
    """True when gla_ext._C imported and its torch ops are registered."""
    return _C is not None


def build_info() -> dict:
    """What the compiled extension contains (empty when it is not loaded)."""
    if _C is None:
        return {}
    info = dict(_C.build_info())
    try:
        from . import _build_config as cfg
        info.update(torch_version_built=cfg.TORCH_VERSION, cuda_archs=list(cfg.CUDA_ARCHS),
                    cuda_skipped_because=cfg.CUDA_SKIPPED_BECAUSE)
    except ImportError:
        pass
    return info


def has_cpu() -> bool:
    return _C is not None


def has_cuda() -> bool:
    return _C is not None and bool(_C.build_info().get("cuda", False))


def trim_heap() -> None:
    """Gives the heap memory that one-off work freed (weight packing, the engine choice's
    first measurement) back to the OS, so RSS shows what the model holds (glibc only)."""
    if _C is not None:
        _C.trim_heap()
