"""One token per call for an FlaGLALM: the decode loop of generate().

Every matrix product goes through a linear object made once per model:
gla_ext.cpu_linear.PackedLinear on the CPU (own packed layout and SIMD kernels, weights read
once per step for the whole batch; float32 or bfloat16 weights, float32 activations) when it
is available, torch's matmul otherwise (GPU). Projections that read the same input are
concatenated into one matrix, so a step makes five products per block plus the lm_head:
    [Wq; Wk; Wv; Wg; Wgk0] h,  Wgk1 r + b,  Wo o,  [W_gate; W_up] h,  W_down a.

The recurrent state is kept per key/value head ([B, num_kv_heads, K, V] float32): the
query heads of one GQA group share k, v and gk, so they share the state too and each step
updates it once per group (o = q S for the group's queries in one batched product; the scale
is folded into the per-head RMSNorm, which it would otherwise only rescale).
Buffers are allocated once per batch size; a step allocates only small temporaries.

On the CPU with float32 activations (every product packed) the code between the products
is the fused engine's compiled row math (gla_ext._C.StepRows, csrc/cpu/engine/step_rows.cpp):
per layer an RMSNorm, the attention core (gate decay, state update in place, the GQA group's
outputs, per-head RMSNorm, swish output gate), an RMSNorm and SwiGLU, with the residual adds
accumulated by the Wo and W_down products. That replaces ~50 small torch ops per layer
(about 3 ms per token for the 12-layer 134M config, one thread of an AMD EPYC). Decoder(fused=False)
keeps the torch ops (tests compare the two).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _ext
from .fla_model import FlaGLALM

__all__ = ["Decoder", "make_linear", "packed_linear_available"]

try:  # gla_ext's own GEMV kernels (gla_ext.cpu_linear); they need the compiled extension
    from ..cpu_linear import PackedLinear as _PackedLinear
except ImportError:  # pragma: no cover - depends on the build
    _PackedLinear = None
if not _ext.loaded():
    _PackedLinear = None


def packed_linear_available() -> bool:
    return _PackedLinear is not None


class _TorchLinear:
    """y = x W^T (+ b) with torch's matmul, in the weight dtype (GPU, or CPU fallback)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.weight_t = weight.t()
        self.bias = None if bias is None else bias.to(weight.dtype)
        self.out_features = weight.shape[0]

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        wt = self.weight_t
        xin = x if x.dtype == wt.dtype else x.to(wt.dtype)
        if out is None or out.dtype != wt.dtype:
            y = torch.addmm(self.bias, xin, wt) if self.bias is not None else xin @ wt
            if out is None:
                return y
            return out.copy_(y)
        if self.bias is not None:
            return torch.addmm(self.bias, xin, wt, out=out)
        return torch.mm(xin, wt, out=out)


class _DequantLinear:
    """A quantized weight (gla_ext.quantize.QuantizedLinear) dequantized per call (GPU, or
    a CPU without the packed kernels): correct, not fast."""

    def __init__(self, qlin, bias: torch.Tensor | None = None):
        self.qlin, self.bias, self.out_features = qlin, bias, qlin.out_features

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        y = self.qlin(x)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y if out is None else out.copy_(y)


def make_linear(weight, bias: torch.Tensor | None = None, packed=None):
    """A decode-step linear for weight [out, in] (a tensor, or a QuantizedLinear after
    gla_ext.quantize_): PackedLinear on the CPU when available (packed=None: auto; True:
    required; False: torch / dequantize per call)."""
    quantized = not isinstance(weight, torch.Tensor)
    device = (weight.qweight if quantized else weight).device
    use_packed = (device.type == "cpu" and _PackedLinear is not None
                  if packed is None else packed)
    if not use_packed:
        return _DequantLinear(weight, bias) if quantized else _TorchLinear(weight, bias)
    if _PackedLinear is None:
        raise RuntimeError("packed=True needs gla_ext.cpu_linear.PackedLinear, which this "
                           "build does not have")
    b = None if bias is None else bias.float().contiguous()
    if quantized:   # int8 / int4 kernels reading the packed quantized weights
        return _StepPacked(_PackedLinear.from_quantized(weight, b))
    return _StepPacked(_PackedLinear(weight.contiguous(), b))


class _StepPacked:
    """A PackedLinear called from the decode step, whose inputs and buffers are already
    float32 [n, in] with contiguous rows (gk_up reads a column range of the projection) /
    contiguous [n, out]: it calls the compiled forward directly, skipping the per-call
    argument checks of PackedLinear.__call__ (about 15 us each, 61 calls a token at 12
    layers)."""

    __slots__ = ("lin", "forward", "out_features")

    def __init__(self, lin):
        self.lin, self.out_features = lin, lin.out_features
        self.forward = getattr(getattr(lin, "_impl", None), "forward", None)

    def __call__(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        if self.forward is None or out is None:
            return self.lin(x, out=out)
        self.forward(x, out)
        return out


class _BlockLinears:
    def __init__(self, blk, packed):
        self.split = blk.in_split
        # columns of q, k, v, the output gate's input (-1: none) and Wgk0's output in w_in's
        starts = [sum(blk.in_split[:i]) for i in range(len(blk.in_split))]
        self.q_col, self.k_col, self.v_col = starts[:3]
        self.r_col = starts[3] if len(starts) == 5 else -1
        self.gk0_col = starts[-1]
        self.in_proj = make_linear(blk.w_in, packed=packed)
        self.gk_up = make_linear(blk.wgk1, blk.bgk, packed=packed)
        self.o_proj = make_linear(blk.wo, packed=packed)
        self.gate_up = make_linear(blk.w_gate_up, packed=packed)
        self.down = make_linear(blk.w_down, packed=packed)
        self.attn_norm, self.mlp_norm, self.g_norm = blk.attn_norm, blk.mlp_norm, blk.g_norm


class Decoder:
    """Steps an FlaGLALM one token at a time from states [B, num_kv_heads, K, V]."""

    def __init__(self, lm: FlaGLALM, packed=None, activation_dtype=None, fused=None):
        """packed: see make_linear. activation_dtype: default the model's (float32 on the
        CPU, the weight dtype on a GPU); the state and the attention core stay float32.
        fused: the norms, the attention core and SwiGLU as the engine's compiled row math
        (gla_ext._C.StepRows, three calls per layer instead of ~50 torch ops) around the
        packed products; None: where it applies (float32 activations on the CPU, every
        product packed), True: required (ValueError where it does not apply), False: torch
        ops."""
        self.lm, self.s = lm, lm.settings
        self.act = lm.activation_dtype if activation_dtype is None else activation_dtype
        self.blocks = [_BlockLinears(blk, packed) for blk in lm.blocks]
        for b in self.blocks:   # the block norms run in the activation dtype
            b.attn_norm, b.mlp_norm = b.attn_norm.to(self.act), b.mlp_norm.to(self.act)
        self.final_norm = lm.norm.to(self.act)
        self.head = make_linear(lm.head_weight(), packed=packed)
        self._batch = None
        self.rows = self._row_ops(fused)

    def _row_ops(self, fused):
        linears = [self.head] + [getattr(b, n) for b in self.blocks
                                 for n in ("in_proj", "gk_up", "o_proj", "gate_up", "down")]
        applies = (self.act == torch.float32 and self.lm.device.type == "cpu"
                   and all(isinstance(lin, _StepPacked) for lin in linears))
        if fused and not applies:
            raise ValueError("Decoder(fused=True) needs float32 activations on the CPU and "
                             "every product packed (gla_ext.cpu_linear.PackedLinear)")
        return _ext._C.StepRows() if (applies if fused is None else fused) else None

    def kv_states(self, head_states: list[torch.Tensor]) -> list[torch.Tensor]:
        """Prefill states [B, H, K, V] -> decode states [B, H_kv, K, V] (the heads of a
        group hold the same state: keep the first of each group)."""
        g = self.s.kv_groups
        return [st[:, ::g].contiguous() if g > 1 else st.contiguous() for st in head_states]

    def head_states(self, kv_states: list[torch.Tensor]) -> list[torch.Tensor]:
        g = self.s.kv_groups
        return [st.repeat_interleave(g, dim=1) if g > 1 else st for st in kv_states]

    def _buffers(self, B: int):
        if self._batch == B:
            return
        s, dev, act = self.s, self.lm.device, self.act
        d = s.hidden_size
        def buf(*shape):
            return torch.empty(*shape, dtype=act, device=dev)
        self.x = buf(B, d)
        self.proj = buf(B, sum(self.blocks[0].split))
        self.gk = buf(B, s.num_kv_heads * s.head_k_dim)
        self.attn_out, self.mlp_out = buf(B, d), buf(B, d)
        self.gu = buf(B, 2 * s.intermediate_size)
        self.logits = torch.empty(B, s.vocab_size, dtype=torch.float32, device=dev)
        if self.rows is not None:   # the fused step's: normed rows, attention out, SwiGLU
            self.h, self.o = buf(B, d), buf(B, s.num_heads * s.head_v_dim)
            self.act_rows = buf(B, s.intermediate_size)
        self._batch = B

    def _embed(self, tokens: torch.Tensor, x: torch.Tensor) -> None:
        if self.lm.embed.dtype == x.dtype:
            torch.index_select(self.lm.embed, 0, tokens, out=x)
        else:
            x.copy_(self.lm.embed.index_select(0, tokens))

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, states: list[torch.Tensor]) -> torch.Tensor:
        """tokens [B] int64 -> logits [B, vocab] float32 (a buffer reused by the next call);
        advances every state in place."""
        s = self.s
        B = tokens.shape[0]
        self._buffers(B)
        if self.rows is not None:
            return self._fused_step(tokens, states)
        H, Hkv, G = s.num_heads, s.num_kv_heads, s.kv_groups
        K, V, d, eps = s.head_k_dim, s.head_v_dim, s.hidden_size, s.norm_eps
        # RMSNorm(scale * y) == y / sqrt(mean(y^2) + eps / scale^2): the attention scale
        # folds into the per-head norm's eps (one op less per layer)
        o_eps = eps / (self.lm.scale * self.lm.scale)
        x = self.x
        self._embed(tokens, x)
        for lin, S in zip(self.blocks, states):
            h = F.rms_norm(x, (d,), lin.attn_norm, eps)
            lin.in_proj(h, out=self.proj)
            parts = torch.split(self.proj, lin.split, dim=1)
            q, k, v = parts[0], parts[1], parts[2]
            lin.gk_up(parts[-1].contiguous(), out=self.gk)
            # forget gate in float32, as in the prefill
            gk = F.logsigmoid(self.gk.float()).div_(s.gate_logit_normalizer)
            if s.clamp_min is not None:
                gk.clamp_min_(s.clamp_min)
            # S = diag(exp(gk)) S + k^T v ; o = q S   (per kv head, GQA groups share S)
            S.mul_(gk.exp_().view(B, Hkv, K, 1))
            S.addcmul_(k.float().view(B, Hkv, K, 1), v.float().view(B, Hkv, 1, V))
            o = torch.matmul(q.float().view(B, Hkv, G, K), S).view(B, H, V)
            o = F.rms_norm(o, (V,), lin.g_norm, o_eps).view(B, H * V)
            if s.use_output_gate:
                o = o * F.silu(parts[3].float())
            o = o.to(self.act)
            lin.o_proj(o, out=self.attn_out)
            x.add_(self.attn_out)
            h = F.rms_norm(x, (d,), lin.mlp_norm, eps)
            lin.gate_up(h, out=self.gu)
            gate, up = self.gu.chunk(2, dim=1)
            lin.down(F.silu(gate).mul_(up), out=self.mlp_out)
            x.add_(self.mlp_out)
        h = F.rms_norm(x, (d,), self.final_norm, eps)
        if self.logits.dtype == self.act:
            self.head(h, out=self.logits)
        else:
            self.logits.copy_(self.head(h))
        return self.logits

    def _fused_step(self, tokens: torch.Tensor, states: list[torch.Tensor]) -> torch.Tensor:
        """step() with the compiled row math: per layer three StepRows calls and five packed
        products, the residual adds accumulated by the products (Wo, W_down) into x."""
        s, rows, x, h = self.s, self.rows, self.x, self.h
        eps, clamp = s.norm_eps, s.clamp_min
        self._embed(tokens, x)
        for lin, S in zip(self.blocks, states):
            # the op advances contiguous states in place; a view (a slice of a larger pool)
            # goes through a contiguous copy
            T = S if S.is_contiguous() else S.contiguous()
            rows.rms_norm(x, lin.attn_norm, eps, h)
            lin.in_proj.forward(h, self.proj)
            lin.gk_up.forward(self.proj[:, lin.gk0_col:], self.gk)
            rows.attention(self.proj, self.gk, T, self.o, lin.q_col, lin.k_col, lin.v_col,
                           lin.r_col, s.num_heads, lin.g_norm, s.gate_logit_normalizer, clamp,
                           self.lm.scale, eps)
            if T is not S:
                S.copy_(T)
            lin.o_proj.forward(self.o, x, True)
            rows.rms_norm(x, lin.mlp_norm, eps, h)
            lin.gate_up.forward(h, self.gu)
            rows.swiglu(self.gu, self.act_rows)
            lin.down.forward(self.act_rows, x, True)
        rows.rms_norm(x, self.final_norm, eps, h)
        self.head.forward(h, self.logits)
        return self.logits
