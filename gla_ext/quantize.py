"""Quantized weights for inference: gla_ext.quantize_(model, "int8" | "int4", group_size=None).

    gla_ext.quantize_(model, "int8")                 # a gla_ext.GLA model, in place
    gla_ext.quantize_(lm, "int4", group_size=32)     # an fla LM from gla_ext.integrations.fla
    m = GLA.build(**opts); gla_ext.quantize_(m, "int8"); m.load_state_dict(saved)

Every linear map of the blocks (and an fla LM's head) becomes a QuantizedLinear whose weight
is stored as buffers (not trained; the biases, norms and embeddings stay parameters / as they
were). A group is `group_size` consecutive input columns of one output row (default 32);
a layer with fewer input columns than group_size has one group per row.

  "int8": w = s * q, q int8 in [-127, 127], s float16 per group (group <= 32: <= 8.5 bits
          per weight). s = max|w| / 127 (round to nearest).
  "int4": w = s * q + m, q in [0, 15] packed two per byte (column 2j in the low nibble,
          2j + 1 in the high one), s and m float16 per group (group <= 64: <= 5 bits per
          weight at 32, 4.5 at 64). s and m start from the group's min / max and are refit by
          least squares on the chosen q a few times (the best fit of each group is kept),
          which lowers the error of plain min/max (or symmetric) rounding.

The dequantized weight (float32, computed as above in float32) is the definition: every
path agrees with it. Off the fused CPU engine a QuantizedLinear dequantizes per call
(correct on every backend, CUDA included, but not faster than the float model there).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .quant_matmul import resolve_mode, use_bf16

__all__ = ["FORMATS", "QuantizedLinear", "quantize_", "check_format", "is_quantized",
           "quantize_weight", "dequantize_weight"]

# format -> (default group size, largest group size the contract allows)
FORMATS = {"int8": (32, 32), "int4": (32, 64)}
_LSQ_ROUNDS = 4   # least-squares refits of an int4 group's scale and offset


def check_format(fmt, group_size=None) -> int:
    """The group size to use for `fmt`; ValueError naming the bad argument."""
    if fmt not in FORMATS:
        raise ValueError(f"quantize_: format must be one of {sorted(FORMATS)}, got {fmt!r}")
    default, largest = FORMATS[fmt]
    if group_size is None:
        return default
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"quantize_: group_size must be a positive int, got {group_size!r}")
    if group_size > largest:
        raise ValueError(f"quantize_: group_size={group_size} is larger than {largest}, the "
                         f"largest group of format {fmt!r}")
    if fmt == "int4" and group_size % 2:
        raise ValueError(f"quantize_: group_size={group_size} must be even for 'int4' "
                         "(two columns share a byte)")
    return group_size


def _layer_group(fmt: str, group_size: int, in_features: int, name: str) -> int:
    group = min(group_size, in_features)
    if in_features % group:
        raise ValueError(f"quantize_: group_size={group_size} does not divide in_features="
                         f"{in_features} of {name}")
    if fmt == "int4" and group % 2:
        raise ValueError(f"quantize_: 'int4' needs an even number of input columns per group; "
                         f"{name} has in_features={in_features}")
    return group


# ---- the formats ------------------------------------------------------------------------

def _half(t: torch.Tensor) -> torch.Tensor:
    """float32 -> float16 without overflow (the scales of huge weights saturate)."""
    return t.clamp(-65504.0, 65504.0).to(torch.float16)


def _int8(w: torch.Tensor, group: int):
    rows, cols = w.shape
    wg = w.reshape(rows, cols // group, group)
    amax = wg.abs().amax(-1)
    s = _half(amax / 127.0)
    # float16 may round the scale down; then the group's largest weight would clip at 127 by
    # more than half a step. Take the next float16 up there, so |w| / s <= 127 always.
    low = s.float() * 127.0 < amax
    s = torch.where(low & (s < 65504.0), torch.nextafter(s, torch.full_like(s, float("inf"))), s)
    sf = s.float()[..., None]
    q = torch.where(sf > 0, wg / torch.where(sf > 0, sf, 1.0), 0.0).round().clamp(-127, 127)
    return q.to(torch.int8).reshape(rows, cols), s, None


def _fit_int4(wg: torch.Tensor, s: torch.Tensor, m: torch.Tensor):
    """(q, squared error per group) for scale s and offset m, both rounded to float16 first."""
    s, m = _half(s).float(), _half(m).float()
    safe = torch.where(s > 0, s, 1.0)
    q = ((wg - m[..., None]) / safe[..., None]).round().clamp(0, 15)
    q = torch.where(s[..., None] > 0, q, 0.0)
    err = (q * s[..., None] + m[..., None] - wg).square().sum(-1)
    return q, err


def _int4(w: torch.Tensor, group: int):
    rows, cols = w.shape
    wg = w.reshape(rows, cols // group, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    s, m = (hi - lo) / 15.0, lo
    q, err = _fit_int4(wg, s, m)
    best_s, best_m, best_err = s, m, err
    for _ in range(_LSQ_ROUNDS):
        # least squares w ~ s q + m over the group for the current q
        n = float(group)
        sq, sq2 = q.sum(-1), q.square().sum(-1)
        sw, sqw = wg.sum(-1), (q * wg).sum(-1)
        det = n * sq2 - sq * sq
        ok = det > 0
        s = torch.where(ok, (n * sqw - sq * sw) / torch.where(ok, det, 1.0), best_s)
        m = torch.where(ok, (sw - s * sq) / n, best_m)
        s = s.clamp_min(0)
        q, err = _fit_int4(wg, s, m)
        better = err < best_err
        best_s, best_m = torch.where(better, s, best_s), torch.where(better, m, best_m)
        best_err = torch.where(better, err, best_err)
        q, _ = _fit_int4(wg, best_s, best_m)
    q, _ = _fit_int4(wg, best_s, best_m)
    q = q.to(torch.uint8).reshape(rows, cols)
    packed = q[:, 0::2] | (q[:, 1::2] << 4)
    return packed, _half(best_s), _half(best_m)


def quantize_weight(w: torch.Tensor, fmt: str, group: int):
    """(qweight, scales, offsets or None) of a float weight [out, in] (see the module doc)."""
    with torch.no_grad():
        wf = w.detach().to(torch.float32)
        return (_int8 if fmt == "int8" else _int4)(wf, group)


def dequantize_weight(qweight, scales, offsets, fmt: str, group: int,
                      dtype=torch.float32) -> torch.Tensor:
    """The float weight [out, in] a quantized one stands for (computed in float32)."""
    if fmt == "int8":
        q = qweight.to(torch.float32)
    else:
        q = torch.stack([qweight & 15, qweight >> 4], -1).flatten(-2).to(torch.float32)
    rows, cols = q.shape
    w = q.view(rows, cols // group, group) * scales.to(torch.float32)[..., None]
    if offsets is not None:
        w = w + offsets.to(torch.float32)[..., None]
    return w.view(rows, cols).to(dtype)


class QuantizedLinear(nn.Module):
    """y = x W^T (+ b) with W stored in a quantized format (buffers qweight, scales, offsets).

    forward dequantizes W to x's dtype per call (every backend; float32 prefill may run as a
    bf16 GEMM where that is faster, see `matmul` and gla_ext/quant_matmul.py); the fused CPU
    engine reads the packed buffers directly. The bias (if any) stays a trainable parameter. Converting
    the module's dtype (model.to(torch.bfloat16)) changes the bias, not the stored weight.
    """

    def __init__(self, in_features: int, out_features: int, fmt: str, group_size: int,
                 bias: torch.Tensor | None = None, device=None):
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.format, self.group_size = fmt, int(group_size)
        groups = self.in_features // self.group_size
        qcols = self.in_features if fmt == "int8" else self.in_features // 2
        qdtype = torch.int8 if fmt == "int8" else torch.uint8
        self.register_buffer("qweight", torch.zeros(out_features, qcols, dtype=qdtype,
                                                    device=device))
        self.register_buffer("scales", torch.zeros(out_features, groups, dtype=torch.float16,
                                                   device=device))
        self.register_buffer("offsets", None if fmt == "int8" else
                             torch.zeros(out_features, groups, dtype=torch.float16,
                                         device=device))
        self.bias = bias

    @classmethod
    def from_weight(cls, weight: torch.Tensor, fmt: str, group: int,
                    bias: torch.Tensor | None = None) -> "QuantizedLinear":
        out_features, in_features = weight.shape
        mod = cls(in_features, out_features, fmt, group, bias, device=weight.device)
        q, s, m = quantize_weight(weight, fmt, group)
        mod.qweight.copy_(q)
        mod.scales.copy_(s)
        if m is not None:
            mod.offsets.copy_(m)
        return mod

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize_weight(self.qweight, self.scales, self.offsets, self.format,
                                 self.group_size, dtype)

    # the per-call product's engine, "auto" | "float32" | "bf16" (None: GLA_EXT_QUANT_MATMUL,
    # else "auto"); see gla_ext/quant_matmul.py
    matmul: str | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if use_bf16(resolve_mode(self.matmul), x, self.in_features, self.out_features):
            # bf16 GEMM (float32 accumulation), its bf16 output widened; bias in float32
            y = F.linear(x.to(torch.bfloat16), self.dequantize(torch.bfloat16)).to(x.dtype)
            return y if self.bias is None else y + self.bias.to(x.dtype)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantize(x.dtype), bias)

    @property
    def bits_per_weight(self) -> float:
        per_group = 16 * (1 if self.offsets is None else 2)
        return (8 if self.format == "int8" else 4) + per_group / self.group_size

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.format!r}, group_size={self.group_size}, "
                f"bias={self.bias is not None}")

    # The stored weight keeps its format whatever dtype the model is converted to.
    def _apply(self, fn, recurse=True):
        kept = {n: t for n, t in self._buffers.items() if n in ("scales", "offsets")
                and t is not None}
        super()._apply(fn, recurse)
        for n, t in kept.items():
            new = self._buffers[n]
            if new.dtype != t.dtype:
                self._buffers[n] = t.to(device=new.device)
        return self

    # ---- state_dict: the format travels with it and is checked on load ----
    def get_extra_state(self):
        return {"format": self.format, "group_size": self.group_size}

    def set_extra_state(self, state):
        pass   # checked by check_state before anything is loaded

    def _expected(self):
        return {n: (tuple(t.shape), t.dtype) for n, t in self._buffers.items() if t is not None}

    def check_state(self, state_dict, prefix: str, strict: bool = True) -> None:
        """ValueError naming the first entry of state_dict that does not fit this layer."""
        if prefix + "weight" in state_dict:
            raise ValueError(f"load_state_dict: state_dict has a float weight {prefix}weight, "
                             f"but this layer is quantized ({self.format!r}); load it into an "
                             "unquantized model, or quantize_ the model it came from")
        extra = state_dict.get(prefix + "_extra_state")
        if extra is not None and extra != self.get_extra_state():
            raise ValueError(f"load_state_dict: {prefix}_extra_state is {extra}, this layer is "
                             f"{self.get_extra_state()} (quantize_ with the same format and "
                             "group_size)")
        for name, (shape, dtype) in self._expected().items():
            t = state_dict.get(prefix + name)
            if t is None:
                if strict:
                    raise ValueError(f"load_state_dict: state_dict lacks {prefix}{name} of "
                                     f"quantized layer {prefix[:-1] or '(root)'}")
                continue
            if tuple(t.shape) != shape or t.dtype != dtype:
                raise ValueError(f"load_state_dict: {prefix}{name} is {t.dtype} "
                                 f"{tuple(t.shape)}, this layer needs {dtype} {shape} "
                                 f"({self.format!r}, group_size={self.group_size})")
        if self.offsets is None and prefix + "offsets" in state_dict:
            raise ValueError(f"load_state_dict: {prefix}offsets belongs to an 'int4' layer; "
                             f"this one is {self.format!r}")

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        self.check_state(state_dict, prefix, strict)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLinear) for m in model.modules())


def _check_whole_state(root: nn.Module, state_dict, prefix, local_metadata, strict, *_):
    """load_state_dict pre-hook of a quantized model: every quantized layer checks its entries
    before any tensor is copied."""
    for name, mod in root.named_modules():
        if isinstance(mod, QuantizedLinear):
            mod.check_state(state_dict, prefix + (name + "." if name else ""), strict)


# ---- what gets quantized ----------------------------------------------------------------

def _gla_targets(model):
    """(parent module, attribute, weight, bias, name) of every block linear of a GLA model."""
    out = []
    for bname, block in model.blocks.named_children():
        for name, mod in block.named_modules():
            if isinstance(mod, nn.Linear):
                parent_name, _, attr = name.rpartition(".")
                parent = block.get_submodule(parent_name) if parent_name else block
                out.append((parent, attr, mod.weight, mod.bias, f"blocks.{bname}.{name}"))
    return out


def _fla_targets(lm):
    """The same for an fla LM (gla_ext.integrations.fla_model.FlaGLALM): the block matrices
    (stored as buffers) and the head (the tied embedding's copy when tied)."""
    out = []
    for i, blk in enumerate(lm.blocks):
        for attr in ("w_in", "wgk1", "wo", "w_gate_up", "w_down"):
            out.append((blk, attr, getattr(blk, attr), None, f"blocks.{i}.{attr}"))
    out.append((lm, "lm_head", lm.head_weight(), None, "lm_head"))
    return out


def quantize_(model, fmt: str, group_size: int | None = None):
    """Quantizes the weights of `model` in place and returns it (see the module doc).

    model: a gla_ext.GLA, or an fla LM loaded by gla_ext.integrations.fla (its
    FlaGLALanguageModel or the FlaGLALM inside). fmt: "int8" or "int4". group_size: input
    columns per scale (default 32; at most 32 for int8, 64 for int4). Every argument is
    checked before anything changes (ValueError naming it).
    """
    from .model import GLA
    from .integrations.fla import FlaGLALanguageModel
    from .integrations.fla_model import FlaGLALM
    group_size = check_format(fmt, group_size)
    wrapper = model if isinstance(model, FlaGLALanguageModel) else None
    target = wrapper.model if wrapper is not None else model
    if isinstance(target, GLA):
        found = _gla_targets(target)
    elif isinstance(target, FlaGLALM):
        found = _fla_targets(target)
    else:
        raise ValueError("quantize_: model must be a gla_ext.GLA or an fla LM loaded by "
                         f"gla_ext.integrations.fla, got {type(model).__name__}")
    if is_quantized(target):
        raise ValueError("quantize_: model is already quantized (quantize_ a float model once)")
    groups = []
    for _parent, _attr, w, _b, name in found:
        if not w.dtype.is_floating_point:
            raise ValueError(f"quantize_: {name} has dtype {w.dtype}; need a float weight")
        groups.append(_layer_group(fmt, group_size, w.shape[1], name))
    # everything checked: now replace the layers
    for (parent, attr, w, b, _name), group in zip(found, groups):
        setattr(parent, attr, QuantizedLinear.from_weight(w, fmt, group, b))
    target.register_load_state_dict_pre_hook(_check_whole_state)
    _forget_packed(target, wrapper)
    return model


def _forget_packed(target, wrapper) -> None:
    """Drops packed copies of the old float weights held by the fused paths."""
    from . import decode, prefill
    decode.clear_cache(target)
    prefill.clear_cache(target)
    if wrapper is not None:
        wrapper._decoder = None
