"""Products of float32 activations with 16-bit (bf16 / fp16) weights on the CPU.

fla language models loaded with bf16 or fp16 weights keep float32 activations on the CPU
(gla_ext.integrations.fla_model), and so does the fused CPU engine of a GLA model, whose
products on the vendor GEMM read the parameters themselves (csrc/cpu/engine/engine_gemm.cpp).
Each product x W^T can then run two ways:

    native    x rounded to W's dtype, torch's GEMM in that dtype (oneDNN: AMX / AVX512-BF16
              where the CPU has them), the output widened to float32
    widened   W widened to float32 a block of rows at a time (SCRATCH_FLOATS of scratch per
              block; no whole float32 copy is kept), torch's float32 GEMM; x is not rounded,
              so the product is float32 math on the stored weights

Which is faster is a property of the CPU, not of the model: on a CPU without bf16 hardware
torch's bf16 GEMM runs at about 1 GFLOP/s (an AMD EPYC with AVX2: 5-7x behind the widened
product, docs/benchmarks.md), with AMX it is several times ahead of float32. So it is measured
once per process, thread count, weight dtype and shape class (rows, in and out features
rounded up to a power of 2 and capped), as gla_ext.quant_matmul does for quantized weights.
"auto" takes the native product only where it is clearly (1.25x) faster: the widened one is
the more accurate, and a near tie would otherwise pick by timing noise. A timed choice can
differ between runs where the two are close to 1.25x apart: set the mode to pin the route
where results must be reproducible.

The mode: the environment variable GLA_EXT_MATMUL16 ("auto" default, "native", "widened"),
read at each call (an engine: when it is built); MODE overrides it when set (tests,
benchmarks).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from ._timing import clearly_faster, shape_bucket

__all__ = ["linear", "widened_linear", "native_linear", "widened_faster", "widen_weights",
           "MODES", "ENV"]

MODES = ("auto", "native", "widened")
ENV = "GLA_EXT_MATMUL16"
MODE: str | None = None
# float32 weight rows per block of the widened product: SCRATCH_FLOATS (1 MB; 2048 x 1024 x
# 5632 on the AMD EPYC, 1 thread: 1.06x the float32 GEMM on a whole float32 copy, 4 MB blocks
# 1.14x), but at least MIN_BLOCK_ROWS: on wide inputs 1 MB is a few dozen rows, and each
# block's GEMM re-reads all of x (2048 rows, in 11008 -> out 1024: 23-row blocks 4.2x the
# float32 GEMM, 256-row blocks 1.2x). The C++ engine's vendor route uses the same two numbers
# (csrc/cpu/engine/engine_gemm.cpp).
SCRATCH_FLOATS = 1 << 18
MIN_BLOCK_ROWS = 256
_PROBE_MAX_ROWS, _PROBE_MAX_DIM = 256, 512
_SPEEDUP = 1.25              # native must beat widened by this much to be chosen

_choice: dict[tuple, bool] = {}


def mode() -> str:
    value = MODE if MODE is not None else os.environ.get(ENV, "auto")
    if value not in MODES:
        name = "gla_ext.matmul16.MODE" if MODE is not None else ENV
        raise ValueError(f"{name} must be one of {MODES}, got {value!r}")
    return value


def widened_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None):
    """x [..., in] float32, w [out, in] 16-bit -> x W^T (+ bias) float32, W widened per block."""
    out_f, in_f = w.shape
    x2 = x.reshape(-1, in_f)
    step = max(MIN_BLOCK_ROWS, SCRATCH_FLOATS // max(in_f, 1))
    if step >= out_f or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):
        # one product (autograd cannot record the blocks' out= products)
        y = F.linear(x2, w.float())
    else:
        y = torch.empty(x2.shape[0], out_f, dtype=torch.float32, device=x.device)
        for r0 in range(0, out_f, step):
            torch.mm(x2, w[r0:r0 + step].float().t(), out=y[:, r0:r0 + step])
    if bias is not None:
        y += bias.to(torch.float32)
    return y.reshape(*x.shape[:-1], out_f)


def native_linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None):
    """x rounded to w's dtype, the product in that dtype, widened back to x's dtype."""
    y = F.linear(x.to(w.dtype), w).to(x.dtype)
    return y if bias is None else y + bias.to(x.dtype)


def widened_faster(dtype: torch.dtype, rows: int, in_features: int, out_features: int) -> bool:
    """Whether the widened product should serve this shape class on this CPU: unless the
    native one is clearly (_SPEEDUP) faster, since the widened one is the more accurate
    (measured once per process, thread count, dtype and class; conversion time included)."""
    key = (torch.get_num_threads(), dtype, shape_bucket(rows, _PROBE_MAX_ROWS),
           shape_bucket(in_features, _PROBE_MAX_DIM), shape_bucket(out_features, _PROBE_MAX_DIM))
    if key not in _choice:
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            x = torch.randn(key[2], key[3], generator=g)
            w = torch.randn(key[4], key[3], generator=g).to(dtype)
            _choice[key] = not clearly_faster(lambda: native_linear(x, w),
                                              lambda: widened_linear(x, w), _SPEEDUP)
    return _choice[key]


def widen_weights(dtype: torch.dtype) -> bool:
    """Whether products with `dtype` weights should take the widened route on this CPU (the
    fused CPU engine's vendor GEMM, set when an engine is built): the mode, or the
    measurement on the probe class (256 rows, 512 x 512)."""
    if dtype not in (torch.bfloat16, torch.float16):
        return False
    m = mode()
    return m == "widened" or (m == "auto" and widened_faster(
        dtype, _PROBE_MAX_ROWS, _PROBE_MAX_DIM, _PROBE_MAX_DIM))


def linear(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x W^T (+ bias) for float32 x and a 16-bit w: the widened or the native product, by the
    mode (module docstring). Other dtypes or devices: the native product."""
    if (x.dtype != torch.float32 or w.dtype not in (torch.bfloat16, torch.float16)
            or x.device.type != "cpu"):
        return native_linear(x, w, bias)
    m = mode()
    if m == "native":
        return native_linear(x, w, bias)
    rows = x.numel() // max(w.shape[1], 1)
    if m == "widened" or widened_faster(w.dtype, rows, w.shape[1], w.shape[0]):
        return widened_linear(x, w, bias)
    return native_linear(x, w, bias)
