"""Maps an fla GLAForCausalLM state dict (fla's parameter names) onto gla_ext's tensors,
checking every name and shape against the config so a wrong checkpoint fails at load time.
"""
from __future__ import annotations

import torch

from .fla_config import FlaGLASettings

__all__ = ["LayerWeights", "ModelWeights", "map_state_dict"]

# gla_ext name -> fla name inside model.layers.{i}. (None in the tuple = optional name pair)
_LAYER_MATRICES = {
    "wq": "attn.q_proj.weight", "wk": "attn.k_proj.weight", "wv": "attn.v_proj.weight",
    "wg": "attn.g_proj.weight", "wgk0": "attn.gk_proj.0.weight",
    "wgk1": "attn.gk_proj.1.weight", "wo": "attn.o_proj.weight",
    "w_gate": "mlp.gate_proj.weight", "w_up": "mlp.up_proj.weight",
    "w_down": "mlp.down_proj.weight",
}
_LAYER_VECTORS = {"attn_norm": "attn_norm.weight", "mlp_norm": "mlp_norm.weight",
                  "bgk": "attn.gk_proj.1.bias"}
# the per-head output norm: fused with the swish gate (fuse_norm) or plain (otherwise)
_G_NORM_NAMES = ("attn.g_norm_swish_gate.weight", "attn.g_norm.weight")


class LayerWeights(dict):
    """One block's tensors by gla_ext name (wg / g_norm may be None)."""


class ModelWeights:
    def __init__(self, embed, layers, norm, lm_head):
        self.embed, self.layers, self.norm, self.lm_head = embed, layers, norm, lm_head


def _expected_shapes(s: FlaGLASettings, rank: int) -> dict:
    d, h, hkv = s.hidden_size, s.num_heads, s.num_kv_heads
    kd, vd = h * s.head_k_dim, h * s.head_v_dim
    kd_kv, vd_kv = hkv * s.head_k_dim, hkv * s.head_v_dim
    return {"wq": (kd, d), "wk": (kd_kv, d), "wv": (vd_kv, d), "wg": (vd, d),
            "wgk0": (rank, d), "wgk1": (kd_kv, rank), "bgk": (kd_kv,), "wo": (d, vd),
            "w_gate": (s.intermediate_size, d), "w_up": (s.intermediate_size, d),
            "w_down": (d, s.intermediate_size), "attn_norm": (d,), "mlp_norm": (d,),
            "g_norm": (s.head_v_dim,)}


def _take(state: dict, name: str, shape, used: set) -> torch.Tensor:
    if name not in state:
        raise ValueError(f"fla checkpoint: missing weight {name!r}")
    t = state[name]
    if not isinstance(t, torch.Tensor) or not t.is_floating_point():
        raise ValueError(f"fla checkpoint: weight {name!r} must be a floating-point tensor")
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"fla checkpoint: weight {name!r} has shape {tuple(t.shape)}, the "
                         f"config implies {tuple(shape)}")
    used.add(name)
    return t


def map_state_dict(state: dict, s: FlaGLASettings) -> ModelWeights:
    """gla_ext's view of an fla state dict; unknown names are an error (they would mean a
    feature this integration does not run)."""
    used: set = set()
    # fla may store the tied head or not; some exports drop the "model." prefix: accept both.
    if not any(k.startswith("model.") for k in state):
        state = {("lm_head.weight" if k == "lm_head.weight" else "model." + k): v
                 for k, v in state.items()}
    d, vocab = s.hidden_size, s.vocab_size
    embed = _take(state, "model.embeddings.weight", (vocab, d), used)
    norm = _take(state, "model.norm.weight", (d,), used)
    if s.tie_word_embeddings:
        lm_head = embed
        if "lm_head.weight" in state:
            used.add("lm_head.weight")
    else:
        lm_head = _take(state, "lm_head.weight", (vocab, d), used)

    rank_name = "model.layers.0.attn.gk_proj.0.weight"
    if rank_name not in state:
        raise ValueError(f"fla checkpoint: missing weight {rank_name!r}")
    rank = state[rank_name].shape[0]   # fla's gate_low_rank_dim (16), read from the weights
    shapes = _expected_shapes(s, rank)
    layers = []
    for i in range(s.num_layers):
        p = f"model.layers.{i}."
        lw = LayerWeights()
        for ours, theirs in {**_LAYER_MATRICES, **_LAYER_VECTORS}.items():
            if ours == "wg" and not s.use_output_gate:
                lw[ours] = None
                continue
            lw[ours] = _take(state, p + theirs, shapes[ours], used)
        lw["g_norm"] = None
        if s.norm_affine:
            present = [n for n in _G_NORM_NAMES if p + n in state]
            if not present:
                raise ValueError(f"fla checkpoint: missing weight {p + _G_NORM_NAMES[0]!r} "
                                 f"(or {p + _G_NORM_NAMES[1]!r})")
            lw["g_norm"] = _take(state, p + present[0], shapes["g_norm"], used)
        layers.append(lw)
    unknown = sorted(k for k in state if k not in used)
    if unknown:
        raise ValueError(f"fla checkpoint: weights this integration does not use: "
                         f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''} "
                         "(a model feature that is not implemented, or a wrong config)")
    return ModelWeights(embed, layers, norm, lm_head)
