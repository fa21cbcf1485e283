"""Sizing and options: param_count is exact for every option set; bad options raise with their name."""
import pytest

import gla_ext
from gla_ext import GLA, OptionError
from gla_ext.sizing import block_param_count, layer_param_count


def n_params(module):
    return sum(p.numel() for p in module.parameters())


CONFIGS = [
    dict(embed_dim=287, hidden_size=256, num_layers=6, num_heads=4),       # the seed's default
    dict(embed_dim=32, hidden_size=32, num_layers=2, num_heads=2, head_dim=16),  # Identity input
    dict(embed_dim=7, hidden_size=13, num_layers=3, num_heads=3, head_dim=5, expand_factor=3),
    dict(embed_dim=17, hidden_size=24, num_layers=1, num_heads=1, head_dim=8, gate_low_rank_dim=4),
    dict(embed_dim=9, hidden_size=20, num_layers=2, num_heads=2, head_dim=6, use_norm=False),
    dict(embed_dim=9, hidden_size=20, num_layers=2, num_heads=2, head_dim=6, use_output_gate=False),
    dict(embed_dim=20, hidden_size=20, num_layers=1, num_heads=5, head_dim=3, use_norm=False,
         use_output_gate=False, gate_low_rank_dim=2),
    dict(embed_dim=11, hidden_size=30, num_layers=2, num_heads=2, head_dim=8, expand_factor=8 / 3),
    dict(embed_dim=11, hidden_size=30, num_layers=1, num_heads=2, head_dim=8, expand_factor=0.5,
         dropout=0.0, window_size=10, seq_len=None, gate_logit_normalizer=4, backend="reference"),
]


@pytest.mark.parametrize("options", CONFIGS)
def test_param_count_is_exact(options):
    model = GLA.build(**options)
    assert GLA.param_count(**options) == n_params(model)
    assert gla_ext.param_count(**options) == n_params(model)


@pytest.mark.parametrize("options", CONFIGS[1:])
def test_block_and_layer_counts_are_exact(options):
    opts = {k: v for k, v in options.items() if k not in ("embed_dim", "num_layers")}
    assert block_param_count(**opts) == n_params(GLA.build_gla_block(**opts))
    assert layer_param_count(**opts) == n_params(GLA.build_gla_layer(**opts))


def test_recommended_defaults():
    d = GLA.recommended_defaults()
    assert d == dict(hidden_size=256, num_layers=6, num_heads=4, head_dim=64, expand_factor=2,
                     window_size=60, dropout=0.1)
    d["hidden_size"] = 1                      # a fresh dict each call
    assert gla_ext.recommended_defaults()["hidden_size"] == 256
    model = GLA.build(embed_dim=287, **GLA.recommended_defaults())
    assert n_params(model) == GLA.param_count(embed_dim=287)


def test_build_defaults_match_the_contract():
    model = GLA.build(embed_dim=3)
    c = model.config
    assert (c.hidden_size, c.num_layers, c.num_heads, c.head_dim, c.expand_factor, c.dropout,
            c.window_size, c.seq_len) == (256, 6, 4, 64, 2, 0.1, 60, 60)
    assert GLA.build(embed_dim=3, window_size=12).seq_len == 12     # seq_len follows window_size
    assert GLA.build(embed_dim=3, seq_len=None).seq_len is None


def test_output_size():
    assert GLA.output_size(hidden_size=128) == 128
    assert gla_ext.output_size() == 256
    assert GLA.output_size(embed_dim=287, hidden_size=64, num_layers=2) == 64


def test_module_level_functions_are_the_class_methods():
    assert gla_ext.build is GLA.build
    assert gla_ext.build_gla_block is GLA.build_gla_block
    assert gla_ext.build_gla_layer is GLA.build_gla_layer
    assert gla_ext.output_size is GLA.output_size
    assert gla_ext.param_count is GLA.param_count
    assert gla_ext.recommended_defaults is GLA.recommended_defaults
    assert isinstance(gla_ext.build(embed_dim=4, hidden_size=8, num_layers=1, num_heads=1,
                                    head_dim=4), GLA)


BAD_OPTIONS = [
    ("hidden_sise", 64),               # unknown (typo)
    ("hidden_size", 0),
    ("hidden_size", -3),
    ("hidden_size", 64.0),
    ("hidden_size", "64"),
    ("num_layers", 0),
    ("num_heads", True),
    ("head_dim", 0),
    ("expand_factor", 0),
    ("expand_factor", -1.5),
    ("expand_factor", 1e-6),           # inner size rounds to 0
    ("dropout", 1.5),
    ("dropout", -0.1),
    ("dropout", float("nan")),
    ("window_size", 0),
    ("seq_len", 0),
    ("seq_len", 2.5),
    ("gate_low_rank_dim", 0),
    ("use_output_gate", 1),
    ("use_norm", "yes"),
    ("gate_logit_normalizer", 0),
    ("gate_logit_normalizer", float("inf")),
    ("norm_eps", -1e-5),
    ("backend", "tpu"),
]


@pytest.mark.parametrize("name,value", BAD_OPTIONS)
@pytest.mark.parametrize("fn", [GLA.build, GLA.param_count, GLA.output_size,
                                GLA.build_gla_block, GLA.build_gla_layer])
def test_bad_option_raises_with_its_name(fn, name, value):
    options = dict(embed_dim=8, hidden_size=8, num_layers=1, num_heads=1, head_dim=4)
    options[name] = value
    with pytest.raises((ValueError, TypeError)) as info:
        fn(**options)
    assert name in str(info.value)
    assert isinstance(info.value, ValueError) and isinstance(info.value, TypeError)


@pytest.mark.parametrize("fn", [GLA.build, GLA.param_count])
@pytest.mark.parametrize("value", [None, 0, 2.0])
def test_embed_dim_required_and_valid(fn, value):
    with pytest.raises(OptionError, match="embed_dim"):
        fn(embed_dim=value)
    with pytest.raises(OptionError, match="embed_dim"):
        fn(hidden_size=8)


def test_options_are_keyword_only():
    with pytest.raises(TypeError):
        GLA.build(287)
    with pytest.raises(TypeError):
        GLA.param_count(287)
