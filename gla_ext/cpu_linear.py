"""PackedLinear: y = x W^T (+ b) on the CPU with gla_ext's own SIMD kernels (no vendor BLAS).

    lin = PackedLinear(weight, bias=None)   # weight [out, in] float32 | bfloat16 | float16, CPU
    y = lin(x)                              # x [n, in] (or [..., in]) float32 -> [n, out] float32
    lin(x, out=buf)                         # writes into a preallocated [n, out] float32 buffer

The weight is packed once (a copy; later changes to `weight` are not seen) into panels of
output rows laid out for the kernels of csrc/cpu/linear_impl.h: register-blocked
matrix-vector / skinny-matrix products that read the weights once per call for all n rows,
widen bf16/fp16 weights to float32 in registers and accumulate in float32. The kernels are
picked at packing time for AVX-512, AVX2+FMA or plain SIMD (GLA_EXT_CPU_ISA=generic|avx2|
avx512 forces one; the same code runs on Intel and AMD CPUs). Made for the few-row products
of inference (decode batches, short windows); the panels are split across threads only when
a call has enough work to pay for waking them.
"""
from __future__ import annotations

import torch

from . import _ext

__all__ = ["PackedLinear", "isa"]

_WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def isa() -> str:
    """The instruction set a PackedLinear packed now would use: "avx512", "avx2" or "generic"."""
    _require_extension()
    return _ext._C.linear_isa()


def _require_extension():
    if _ext._C is None:
        raise RuntimeError("gla_ext.cpu_linear needs the compiled extension gla_ext._C, which "
                           f"is not loaded ({_ext.LOAD_ERROR})")


class PackedLinear:
    """A packed copy of one linear layer's weight (and bias) for fast CPU inference."""

    __slots__ = ("_impl", "in_features", "out_features", "weight_dtype")

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        _require_extension()
        if not isinstance(weight, torch.Tensor):
            raise TypeError(f"PackedLinear: weight must be a torch.Tensor, got {type(weight).__name__}")
        if weight.dim() != 2:
            raise ValueError(f"PackedLinear: weight must be 2-D [out, in], got shape {tuple(weight.shape)}")
        if weight.device.type != "cpu":
            raise ValueError(f"PackedLinear: weight must be a CPU tensor, got device {weight.device}")
        if weight.dtype not in _WEIGHT_DTYPES:
            raise ValueError(f"PackedLinear: weight must be float32, bfloat16 or float16, got {weight.dtype}")
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or bias.dim() != 1 or bias.shape[0] != weight.shape[0]:
                got = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
                raise ValueError(f"PackedLinear: bias must be a tensor [{weight.shape[0]}], got {got}")
            if bias.device.type != "cpu" or not bias.dtype.is_floating_point:
                raise ValueError(f"PackedLinear: bias must be a floating CPU tensor, got "
                                 f"{bias.dtype} on {bias.device}")
        with torch.no_grad():
            self._impl = _ext._C.PackedLinear(weight.detach(), None if bias is None else bias.detach())
        self.out_features, self.in_features = int(weight.shape[0]), int(weight.shape[1])
        self.weight_dtype = weight.dtype

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> "PackedLinear":
        """The packed copy of an nn.Linear (its weight dtype kept)."""
        return cls(linear.weight, linear.bias)

    @classmethod
    def from_quantized(cls, qlin, bias: torch.Tensor | None = None) -> "PackedLinear":
        """The packed copy of a gla_ext.quantize.QuantizedLinear (int8 / int4 weights, read by
        the integer dot-product kernels of csrc/cpu/linear_qdot_impl.h); `bias` overrides the
        layer's own. A call rounds its input rows to int8 per group (scale max|x| / 127) and
        sums integer products: the float32 product with the dequantized weight up to that
        rounding (~0.5 % relative; docs/quantization.md)."""
        _require_extension()
        if bias is None:
            bias = qlin.bias
        if qlin.qweight.device.type != "cpu":
            raise ValueError(f"PackedLinear: the quantized weight must be on the CPU, got "
                             f"{qlin.qweight.device}")
        self = cls.__new__(cls)
        with torch.no_grad():
            self._impl = _ext._C.PackedLinear(qlin.qweight, qlin.scales, qlin.offsets,
                                              qlin.group_size,
                                              None if bias is None else bias.detach())
        self.out_features, self.in_features = qlin.out_features, qlin.in_features
        self.weight_dtype = qlin.format
        return self

    @property
    def isa(self) -> str:
        """Instruction set of the kernels this matrix was packed for."""
        return self._impl.isa

    @property
    def weight_bytes(self) -> int:
        """Bytes of packed weights one call streams."""
        return self._impl.weight_bytes

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """x [n, in] (or [..., in]) float32 CPU -> [n, out] float32 (the shape of x with the last
        dim replaced); with `out`, written into it (contiguous float32 of that shape) and returned.
        Other float dtypes and non-contiguous x are converted (a copy) first."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"PackedLinear: x must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() < 1 or x.shape[-1] != self.in_features:
            raise ValueError(f"PackedLinear: x must be [n, in={self.in_features}], got shape "
                             f"{tuple(x.shape)}")
        if x.device.type != "cpu" or not x.dtype.is_floating_point:
            raise ValueError(f"PackedLinear: x must be a floating CPU tensor, got {x.dtype} on {x.device}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.dtype != torch.float32 or not x2.is_contiguous():
            x2 = x2.to(torch.float32).contiguous()
        if out is None:
            return self._impl.forward(x2).reshape(*lead, self.out_features)
        if (not isinstance(out, torch.Tensor) or out.dtype != torch.float32 or out.device.type != "cpu"
                or tuple(out.shape) not in ((*lead, self.out_features), (x2.shape[0], self.out_features))
                or not out.is_contiguous()):
            got = (f"{out.dtype} {tuple(out.shape)}" if isinstance(out, torch.Tensor)
                   else type(out).__name__)
            raise ValueError(f"PackedLinear: out must be a contiguous float32 CPU tensor "
                             f"{[*lead, self.out_features]}, got {got}")
        self._impl.forward(x2, out.view(x2.shape[0], self.out_features))
        return out

    def __repr__(self) -> str:
        return (f"PackedLinear(in_features={self.in_features}, out_features={self.out_features}, "
                f"weight_dtype={self.weight_dtype}, bias={self._impl.has_bias}, isa={self.isa!r})")
