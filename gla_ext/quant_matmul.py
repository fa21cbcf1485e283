"""Which matrix engine a QuantizedLinear's per-call product uses (prefill, large batches).

QuantizedLinear.forward dequantizes its weight per call and multiplies. With float32
activations that is a float32 GEMM; on a CPU whose bf16 GEMM is several times faster (Intel
AMX: oneDNN's bf16 path) a quantized float32 model would then prefill slower than the bf16
model of the same weights. So the product may run in bf16: W dequantized into bf16, x rounded
to bf16, oneDNN's bf16 GEMM (float32 accumulation), its bf16 output widened back to float32.
That rounds x and y like a bf16 model does (docs/quantization.md gives the measured error).

    matmul mode    "float32": always x's dtype (the dequantized weight in x's dtype)
                   "bf16":     the bf16 product above (float32 x on any device)
                   "auto":     bf16 where x is float32 on the CPU, has >= AUTO_MIN_ROWS rows,
                               and a one-off timing in this process shows the bf16 GEMM
                               faster than float32 for this thread count and shape class
The mode: QuantizedLinear.matmul if set, else the environment variable GLA_EXT_QUANT_MATMUL,
else "auto". bf16 rounding only applies to float32 inputs; other dtypes run as they are.
"""
from __future__ import annotations

import os

import torch

from ._timing import clearly_faster, shape_bucket

MODES = ("auto", "float32", "bf16")
ENV = "GLA_EXT_QUANT_MATMUL"
AUTO_MIN_ROWS = 256    # fewer rows: decode-like calls, float32 (and the fused engine) serve
_PROBE_ROWS, _PROBE_MAX_DIM = 256, 512
_SPEEDUP = 1.25        # bf16 must beat float32 by this much to be chosen

_choice: dict[tuple, bool] = {}


def check_mode(mode, name: str = "matmul") -> str:
    if mode not in MODES:
        raise ValueError(f"{name} must be one of {MODES}, got {mode!r}")
    return mode


def resolve_mode(module_mode) -> str:
    """The mode in force: the module's setting, else the environment, else "auto"."""
    if module_mode is not None:
        return check_mode(module_mode, "QuantizedLinear.matmul")
    return check_mode(os.environ.get(ENV, "auto"), ENV)


def bf16_faster(in_features: int, out_features: int) -> bool:
    """Whether this CPU's bf16 GEMM beats float32 for this shape class (measured once per
    process, thread count and class: the dims rounded up to a power of 2, capped at 512)."""
    key = (torch.get_num_threads(), shape_bucket(in_features, _PROBE_MAX_DIM),
           shape_bucket(out_features, _PROBE_MAX_DIM))
    if key not in _choice:
        with torch.no_grad():
            g = torch.Generator().manual_seed(0)
            a = torch.randn(_PROBE_ROWS, key[1], generator=g)
            b = torch.randn(key[2], key[1], generator=g)
            a16, b16 = a.bfloat16(), b.bfloat16()
            linear = torch.nn.functional.linear
            _choice[key] = clearly_faster(lambda: linear(a16, b16), lambda: linear(a, b),
                                          _SPEEDUP)
    return _choice[key]


def use_bf16(mode: str, x: torch.Tensor, in_features: int, out_features: int) -> bool:
    if x.dtype != torch.float32 or mode == "float32":
        return False
    if mode == "bf16":
        return True
    rows = x.numel() // max(in_features, 1)
    return (x.device.type == "cpu" and rows >= AUTO_MIN_ROWS
            and bf16_faster(in_features, out_features))
