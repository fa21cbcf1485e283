"""Sizes without building anything: output_size, param_count, recommended_defaults.

param_count is arithmetic and must match the modules in layers.py / model.py exactly;
tests compare it with sum(p.numel() for p in model.parameters()) over many option sets.
"""
from __future__ import annotations

from .options import RECOMMENDED_DEFAULTS, GLAConfig, make_config

__all__ = ["output_size", "param_count", "block_param_count", "layer_param_count",
           "recommended_defaults"]


def _linear(n_in: int, n_out: int, bias: bool) -> int:
    return n_in * n_out + (n_out if bias else 0)


def _layer_norm(n: int) -> int:
    return 2 * n  # weight and bias


def attention_params(c: GLAConfig) -> int:
    """GatedLinearAttention: Q, K, V, forget gate, optional norm / output gate, output projection."""
    d, a = c.hidden_size, c.attn_dim
    total = 3 * _linear(d, a, bias=False)                       # q_proj, k_proj, v_proj
    if c.gate_low_rank_dim is None:
        total += _linear(d, a, bias=True)                       # gk_proj
    else:
        r = c.gate_low_rank_dim
        total += _linear(d, r, bias=False) + _linear(r, a, bias=True)
    if c.use_norm:
        total += c.head_dim                                     # RMSNorm weight, shared by heads
    if c.use_output_gate:
        total += _linear(d, a, bias=False)                      # g_proj
    return total + _linear(a, d, bias=False)                    # o_proj


def ffn_params(c: GLAConfig) -> int:
    """SwiGLU without biases: w1, w3 hidden->inner, w2 inner->hidden."""
    return 3 * c.hidden_size * c.inner_size


def block_params(c: GLAConfig) -> int:
    return 2 * _layer_norm(c.hidden_size) + attention_params(c) + ffn_params(c)


def model_params(c: GLAConfig) -> int:
    total = 0 if c.embed_dim == c.hidden_size else _linear(c.embed_dim, c.hidden_size, bias=True)
    return total + c.num_layers * block_params(c) + _layer_norm(c.hidden_size)


def output_size(**options) -> int:
    """Features per output position: hidden_size. Takes (and validates) all build options."""
    return make_config(options, require_embed_dim=False, caller="GLA.output_size").hidden_size


def param_count(**options) -> int:
    """Exact parameter count of GLA.build(**options), computed without building it."""
    return model_params(make_config(options, caller="GLA.param_count"))


def block_param_count(**options) -> int:
    """Exact parameter count of GLA.build_gla_block(**options)."""
    return block_params(make_config(options, require_embed_dim=False, caller="block_param_count"))


def layer_param_count(**options) -> int:
    """Exact parameter count of GLA.build_gla_layer(**options)."""
    return attention_params(make_config(options, require_embed_dim=False,
                                        caller="layer_param_count"))


def recommended_defaults() -> dict:
    """The seed's recommended options (a fresh dict; every key is a valid build option)."""
    return dict(RECOMMENDED_DEFAULTS)
