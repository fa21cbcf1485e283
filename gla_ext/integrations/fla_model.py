"""fla's GLA language model math on gla_ext's kernels (inference only).

Per block, as fla.models.gla (0.6.0) computes it:
    h = RMSNorm(x)                                  (attn_norm)
    q, k, v = h Wq, h Wk, h Wv                      (k, v: num_kv_heads heads, shared by
                                                     num_heads / num_kv_heads query heads)
    gk = logsigmoid((h Wgk0) Wgk1 + b) / 16         (low-rank gate), clamped at clamp_min
    o = GLA(q, k, v, gk), scale head_k_dim ** -0.5  (gla_ext.chunk_gla, one state per layer)
    o = RMSNorm_per_head(o) [* silu(h Wg)]          (g_norm, swish output gate)
    x = x + o Wo
    x = x + W_down(silu(RMSNorm(x) W_gate) * (RMSNorm(x) W_up))     (mlp_norm, SwiGLU)
then RMSNorm (norm) and lm_head (tied to the embeddings or not).
RMSNorm(x) = x / sqrt(mean(x^2) + eps) * weight, in float32.

Activations are float32 on the CPU whatever the weight dtype and the weight dtype on a GPU;
recurrent states are float32 [B, num_heads, head_k_dim, head_v_dim]. With bf16 / fp16 weights
on the CPU each matrix product either rounds its input to the weights' dtype (torch's 16-bit
GEMM: AMX / AVX512-BF16) or widens the weights to float32 a block at a time, whichever this
CPU runs faster (gla_ext.matmul16, measured once per shape class).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import matmul16
from ..ops import chunk_gla
from .fla_config import FlaGLASettings
from .fla_weights import ModelWeights

__all__ = ["FlaGLALM", "rms_norm"]


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight
    return y.to(x.dtype)


def _linear(x: torch.Tensor, w, b: torch.Tensor | None = None) -> torch.Tensor:
    if not isinstance(w, torch.Tensor):   # a gla_ext.quantize.QuantizedLinear (dequantizes)
        y = w(x)
        return y if b is None else y + b.to(y.dtype)
    if w.dtype == x.dtype:
        return F.linear(x, w, None if b is None else b.to(x.dtype))
    return matmul16.linear(x, w, b)   # float32 x, 16-bit w (CPU): native or widened, measured


class _Block(nn.Module):
    """One block's tensors as buffers (inference only: nothing here is trained). The
    projections that read the same input are stored concatenated, one matrix product each:
    w_in = [Wq; Wk; Wv; (Wg); Wgk0] (split sizes in in_split), w_gate_up = [W_gate; W_up]."""

    def __init__(self, lw, matrix_dtype, use_output_gate: bool):
        super().__init__()
        def mat(t):
            return t.detach().to(matrix_dtype)
        def vec(t):   # norms and the gate bias: float32, they are tiny
            return None if t is None else t.detach().to(torch.float32).clone()
        parts = [lw["wq"], lw["wk"], lw["wv"]] + ([lw["wg"]] if use_output_gate else []) \
            + [lw["wgk0"]]
        self.in_split = [t.shape[0] for t in parts]
        self.register_buffer("w_in", torch.cat([mat(t) for t in parts], 0))
        self.register_buffer("w_gate_up", torch.cat([mat(lw["w_gate"]), mat(lw["w_up"])], 0))
        for name in ("wgk1", "wo", "w_down"):
            self.register_buffer(name, mat(lw[name]).clone())
        for name in ("bgk", "attn_norm", "mlp_norm", "g_norm"):
            self.register_buffer(name, vec(lw[name]))


class FlaGLALM(nn.Module):
    """The model. Call it with input_ids [B, T] -> logits [B, T, vocab] (float32)."""

    def __init__(self, settings: FlaGLASettings, weights: ModelWeights, dtype: torch.dtype):
        super().__init__()
        self.settings = s = settings
        self.register_buffer("embed", weights.embed.detach().to(dtype).clone())
        self.register_buffer("norm", weights.norm.detach().to(torch.float32).clone())
        self.tied = s.tie_word_embeddings
        self.register_buffer("lm_head", None if self.tied
                             else weights.lm_head.detach().to(dtype).clone())
        self.blocks = nn.ModuleList(_Block(lw, dtype, s.use_output_gate)
                                    for lw in weights.layers)
        self.scale = s.head_k_dim ** -0.5

    # -- helpers ------------------------------------------------------------------------
    @property
    def weight_dtype(self) -> torch.dtype:
        return self.embed.dtype

    @property
    def device(self) -> torch.device:
        return self.embed.device

    @property
    def activation_dtype(self) -> torch.dtype:
        return torch.float32 if self.device.type == "cpu" else self.weight_dtype

    def head_weight(self):
        """The head's weight: a tensor, or a QuantizedLinear after gla_ext.quantize_ (which
        gives a tied head its own quantized copy; the embedding stays as it was)."""
        return self.embed if self.lm_head is None else self.lm_head

    def embed_tokens(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.embed).to(self.activation_dtype)

    def zero_states(self, batch: int) -> list[torch.Tensor]:
        s = self.settings
        return [torch.zeros(batch, s.num_heads, s.head_k_dim, s.head_v_dim,
                            dtype=torch.float32, device=self.device) for _ in self.blocks]

    def _expand_kv(self, t: torch.Tensor) -> torch.Tensor:
        """[B, T, kv_heads, D] -> [B, T, heads, D]: kv head j serves query heads
        j*G .. j*G+G-1 (fla repeats '(h d) -> (h g) d')."""
        g = self.settings.kv_groups
        return t if g == 1 else t.repeat_interleave(g, dim=2)

    # -- one block over a sequence ------------------------------------------------------
    def _attention(self, blk: _Block, h: torch.Tensor, state, backend: str):
        s = self.settings
        B, T, _ = h.shape
        parts = torch.split(_linear(h, blk.w_in), blk.in_split, dim=-1)
        q = parts[0].reshape(B, T, s.num_heads, s.head_k_dim)
        k = self._expand_kv(parts[1].reshape(B, T, s.num_kv_heads, s.head_k_dim))
        v = self._expand_kv(parts[2].reshape(B, T, s.num_kv_heads, s.head_v_dim))
        gk = _linear(parts[-1], blk.wgk1, blk.bgk).float()
        gk = F.logsigmoid(gk) / s.gate_logit_normalizer
        if s.clamp_min is not None:
            gk = gk.clamp_min(s.clamp_min)
        gk = self._expand_kv(gk.view(B, T, s.num_kv_heads, s.head_k_dim))
        o, new_state = chunk_gla(q, k, v, gk, scale=self.scale, initial_state=state,
                                 output_final_state=True, backend=backend)
        o = rms_norm(o, blk.g_norm, s.norm_eps)
        o = o.reshape(B, T, s.num_heads * s.head_v_dim)
        if s.use_output_gate:
            o = o * F.silu(parts[3])
        return _linear(o, blk.wo), new_state

    def _mlp(self, blk: _Block, h: torch.Tensor) -> torch.Tensor:
        gate, up = _linear(h, blk.w_gate_up).chunk(2, dim=-1)
        return _linear(F.silu(gate) * up, blk.w_down)

    def hidden_states(self, input_ids: torch.Tensor, states=None, backend: str = "auto"):
        """(final-normed hidden states [B, T, hidden], new states list)."""
        eps = self.settings.norm_eps
        x = self.embed_tokens(input_ids)
        new_states = []
        for i, blk in enumerate(self.blocks):
            a, st = self._attention(blk, rms_norm(x, blk.attn_norm, eps),
                                    None if states is None else states[i], backend)
            x = x + a
            x = x + self._mlp(blk, rms_norm(x, blk.mlp_norm, eps))
            new_states.append(st)
        return rms_norm(x, self.norm, eps), new_states

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return _linear(hidden, self.head_weight()).float()

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, states=None, return_states: bool = False,
                backend: str = "auto"):
        hidden, new_states = self.hidden_states(input_ids, states, backend)
        logits = self.logits(hidden)
        return (logits, new_states) if return_states else logits
