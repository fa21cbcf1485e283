"""GLA building blocks: the GatedLinearAttention layer, the SwiGLU GatedFFN and the pre-norm GLABlock.

Shapes: x is [batch, T, hidden_size] throughout. A recurrent state is [batch, num_heads,
head_dim, head_dim] float32 (one per attention layer). `mask` ([batch, T] bool, True = valid)
marks right padding: padded positions leave the state untouched, so the state returned
for a padded batch is each row's state after its last valid position.

Build these with build_gla_layer / build_gla_block (validated keyword options); the
constructors trust their arguments.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .ops import chunk_gla, fused_recurrent_gla
from .options import GLAConfig, make_config

__all__ = ["GatedLinearAttention", "GatedFFN", "GLABlock", "build_gla_layer", "build_gla_block"]


class GatedLinearAttention(nn.Module):
    """Multi-head gated linear attention (Yang et al. 2024) on top of gla_ext.ops.

    q, k, v = W_q x, W_k x, W_v x                 (hidden -> num_heads * head_dim, no bias)
    g = logsigmoid(W_g x + b_g) / gate_logit_normalizer   (full or low-rank W_g)
    o = GLA recurrence(q, k, v, g)                 (chunk_gla for sequences, fused_recurrent_gla for one step)
    o = RMSNorm(o) * silu(W_r x)                   (each part switchable)
    out = W_o o                                    (num_heads * head_dim -> hidden, no bias)
    """

    def __init__(self, config: GLAConfig):
        super().__init__()
        d, a = config.hidden_size, config.attn_dim
        self.num_heads, self.head_dim = config.num_heads, config.head_dim
        self.gate_logit_normalizer = float(config.gate_logit_normalizer)
        self.backend = config.backend
        self.q_proj = nn.Linear(d, a, bias=False)
        self.k_proj = nn.Linear(d, a, bias=False)
        self.v_proj = nn.Linear(d, a, bias=False)
        if config.gate_low_rank_dim is None:
            self.gk_proj = nn.Linear(d, a, bias=True)
        else:  # the paper's low-rank gate: hidden -> r -> heads * head_dim, bias at the end
            r = config.gate_low_rank_dim
            self.gk_proj = nn.Sequential(nn.Linear(d, r, bias=False), nn.Linear(r, a, bias=True))
        self.norm = nn.RMSNorm(config.head_dim, eps=config.norm_eps) if config.use_norm else None
        self.g_proj = nn.Linear(d, a, bias=False) if config.use_output_gate else None
        self.o_proj = nn.Linear(a, d, bias=False)

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (self.num_heads, self.head_dim))   # [B, T, H*D] -> [B, T, H, D]

    def forward(self, x, state=None, return_state=False, mask=None, cp_group=None):
        """x [B, T, hidden] -> [B, T, hidden]; with return_state, (out, new_state [B, H, D, D]).

        cp_group: x is this rank's slice of the sequence (context parallelism, see
        gla_ext.distributed); the recurrence runs through chunk_gla_cp over that group.
        """
        q, k, v = self._heads(self.q_proj(x)), self._heads(self.k_proj(x)), self._heads(self.v_proj(x))
        # Gates in float32 whatever the model dtype: they are summed over many steps.
        g = self._heads(F.logsigmoid(self.gk_proj(x).float()) / self.gate_logit_normalizer)
        if mask is not None:
            # k = 0 and g = 0 at padding: S_t = S_{t-1}, so the state stops at the last valid step.
            keep = mask[:, :, None, None]
            k = torch.where(keep, k, torch.zeros((), dtype=k.dtype, device=k.device))
            g = torch.where(keep, g, torch.zeros((), dtype=g.dtype, device=g.device))
        # One step (decode) goes to the recurrent kernel; sequences to the chunked one.
        op = fused_recurrent_gla if x.shape[1] == 1 else chunk_gla
        if cp_group is not None:
            from .distributed import chunk_gla_cp
            op = functools.partial(chunk_gla_cp, group=cp_group)
        o, new_state = op(q, k, v, g, initial_state=state, output_final_state=return_state,
                          backend=self.backend)
        if self.norm is not None:
            o = self.norm(o)
        if self.g_proj is not None:
            o = o * F.silu(self._heads(self.g_proj(x)))
        out = self.o_proj(o.flatten(-2))
        return (out, new_state) if return_state else out


class GatedFFN(nn.Module):
    """SwiGLU feed-forward without biases: w2(silu(w1 x) * w3 x), inner size hidden * expand_factor."""

    def __init__(self, config: GLAConfig):
        super().__init__()
        d, inner = config.hidden_size, config.inner_size
        self.w1 = nn.Linear(d, inner, bias=False)
        self.w3 = nn.Linear(d, inner, bias=False)
        self.w2 = nn.Linear(inner, d, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class GLABlock(nn.Module):
    """Pre-norm block: x + Dropout(GLA(LayerNorm(x))), then x + Dropout(FFN(LayerNorm(x)))."""

    def __init__(self, config: GLAConfig):
        super().__init__()
        d = config.hidden_size
        self.attn_norm = nn.LayerNorm(d, eps=config.norm_eps)
        self.attn = GatedLinearAttention(config)
        self.ffn_norm = nn.LayerNorm(d, eps=config.norm_eps)
        self.ffn = GatedFFN(config)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x, state=None, return_state=False, mask=None, cp_group=None):
        """x [B, T, hidden] -> [B, T, hidden]; with return_state, (out, new_state)."""
        h = self.attn(self.attn_norm(x), state, return_state, mask, cp_group=cp_group)
        if return_state:
            h, state = h
        x = x + self.dropout(h)
        x = x + self.dropout(self.ffn(self.ffn_norm(x)))
        return (x, state) if return_state else x


def build_gla_layer(**options) -> GatedLinearAttention:
    """The attention layer alone, [B, T, hidden_size] -> [B, T, hidden_size].

    Options used: hidden_size, num_heads, head_dim, gate_low_rank_dim, use_output_gate,
    use_norm, gate_logit_normalizer, norm_eps, backend. Every other build option is
    accepted (so a model's options can be passed whole), validated, and has no effect.
    """
    return GatedLinearAttention(make_config(options, require_embed_dim=False,
                                            caller="GLA.build_gla_layer"))


def build_gla_block(**options) -> GLABlock:
    """One pre-norm block (attention + SwiGLU), [B, T, hidden_size] -> [B, T, hidden_size].

    Options used: those of build_gla_layer plus expand_factor and dropout. Every other
    build option is accepted, validated, and has no effect.
    """
    return GLABlock(make_config(options, require_embed_dim=False, caller="GLA.build_gla_block"))
