"""Reads an fla GLA config (config.json or a GLAConfig) into the settings gla_ext runs.

fla's GLAConfig has many fields; only some change the math of the released GLA checkpoints.
Those are read and validated here; options this integration does not implement raise
NotImplementedError naming the option, so a checkpoint never runs with silently wrong math.
Defaults are fla 0.6.0's (GLAConfig.__init__), used when a key is missing from config.json.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["FlaGLASettings", "parse_config"]

_DEFAULTS = {
    "hidden_size": 2048, "expand_k": 0.5, "expand_v": 1.0, "hidden_ratio": 4,
    "intermediate_size": None, "num_hidden_layers": 24, "num_heads": 4, "num_kv_heads": None,
    "feature_map": None, "attn_mode": "chunk", "use_short_conv": False, "use_output_gate": True,
    "clamp_min": None, "hidden_act": "swish", "elementwise_affine": True, "norm_eps": 1e-6,
    "use_gk": True, "use_gv": False, "attn": None, "tie_word_embeddings": False,
    "vocab_size": 32000, "attnres_block_size": None,
}

# fla's GatedLinearAttention constants that GLAConfig does not expose (0.6.0).
GATE_LOGIT_NORMALIZER = 16.0


@dataclass(frozen=True)
class FlaGLASettings:
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_k_dim: int
    head_v_dim: int
    intermediate_size: int
    vocab_size: int
    use_output_gate: bool
    norm_affine: bool          # g_norm has a weight (elementwise_affine)
    clamp_min: float | None
    norm_eps: float
    tie_word_embeddings: bool
    gate_logit_normalizer: float = GATE_LOGIT_NORMALIZER

    @property
    def kv_groups(self) -> int:
        return self.num_heads // self.num_kv_heads


def _unsupported(name: str, value, why: str) -> NotImplementedError:
    return NotImplementedError(
        f"fla GLA option {name}={value!r} is not implemented by gla_ext.integrations.fla "
        f"({why}); supported checkpoints have {name}={_DEFAULTS[name]!r}")


def _positive_int(cfg: dict, name: str) -> int:
    value = cfg[name]
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"fla GLA config: {name} must be a positive integer, got {value!r}")
    return value


def _whole(product: float, name: str) -> int:
    whole = round(product)
    if not math.isclose(product, whole):
        raise ValueError(f"fla GLA config: hidden_size * {name} must be an integer, got {product}")
    return whole


def parse_config(raw: dict) -> FlaGLASettings:
    """Validated settings from a config dict (config.json contents or GLAConfig.to_dict())."""
    if not isinstance(raw, dict):
        raise TypeError(f"fla GLA config must be a dict, got {type(raw).__name__}")
    model_type = raw.get("model_type", "gla")
    if model_type != "gla":
        raise ValueError(f"fla config: model_type must be 'gla' (a GLAForCausalLM checkpoint), "
                         f"got {model_type!r}")
    cfg = {**_DEFAULTS, **{k: v for k, v in raw.items() if k in _DEFAULTS}}

    # Options that change the math and are not implemented here.
    if cfg["use_short_conv"]:
        raise _unsupported("use_short_conv", cfg["use_short_conv"], "short convolutions on q/k/v")
    if cfg["feature_map"] is not None:
        raise _unsupported("feature_map", cfg["feature_map"], "a feature map on q and k")
    if cfg["attn"] is not None:
        raise _unsupported("attn", cfg["attn"], "hybrid models with softmax-attention layers")
    if cfg["attnres_block_size"] is not None:
        raise _unsupported("attnres_block_size", cfg["attnres_block_size"],
                           "attention residuals between blocks")
    if cfg["use_gv"]:
        raise _unsupported("use_gv", cfg["use_gv"], "a value gate")
    if not cfg["use_gk"]:
        # fla 0.6.0 ignores use_gk, older releases dropped the key gate: ambiguous, refuse.
        raise _unsupported("use_gk", cfg["use_gk"], "GLA without its key forget gate")
    if cfg["hidden_act"] != "swish":
        raise _unsupported("hidden_act", cfg["hidden_act"],
                           "only the swish output gate and SwiGLU MLP are implemented")
    if cfg["attn_mode"] not in ("chunk", "fused_recurrent", "fused_chunk"):
        raise _unsupported("attn_mode", cfg["attn_mode"], "unknown GLA kernel mode")

    hidden = _positive_int(cfg, "hidden_size")
    layers = _positive_int(cfg, "num_hidden_layers")
    heads = _positive_int(cfg, "num_heads")
    vocab = _positive_int(cfg, "vocab_size")
    kv_heads = heads if cfg["num_kv_heads"] is None else _positive_int(cfg, "num_kv_heads")
    if heads % kv_heads:
        raise ValueError(f"fla GLA config: num_heads ({heads}) must be divisible by "
                         f"num_kv_heads ({kv_heads})")
    key_dim = _whole(hidden * float(cfg["expand_k"]), "expand_k")
    value_dim = _whole(hidden * float(cfg["expand_v"]), "expand_v")
    if key_dim % heads or value_dim % heads or key_dim <= 0 or value_dim <= 0:
        raise ValueError(f"fla GLA config: key dim {key_dim} and value dim {value_dim} must be "
                         f"positive multiples of num_heads ({heads})")

    inter = cfg["intermediate_size"]
    if inter is None:   # fla's GatedMLP rule: 2/3 * hidden * ratio, rounded up to 256
        ratio = 4 if cfg["hidden_ratio"] is None else cfg["hidden_ratio"]
        inter = int(hidden * ratio * 2 / 3)
        inter = 256 * ((inter + 255) // 256)
    elif isinstance(inter, bool) or not isinstance(inter, int) or inter <= 0:
        raise ValueError(f"fla GLA config: intermediate_size must be a positive integer, "
                         f"got {inter!r}")

    clamp_min = cfg["clamp_min"]
    return FlaGLASettings(
        hidden_size=hidden, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads,
        head_k_dim=key_dim // heads, head_v_dim=value_dim // heads, intermediate_size=inter,
        vocab_size=vocab, use_output_gate=bool(cfg["use_output_gate"]),
        norm_affine=bool(cfg["elementwise_affine"]),
        clamp_min=None if clamp_min is None else float(clamp_min),
        norm_eps=float(cfg["norm_eps"]), tie_word_embeddings=bool(cfg["tie_word_embeddings"]))
