"""The fused CPU decode step (gla_ext.decode, issue 3) against the generic GLA.step path."""
import gc
import weakref

import pytest
import torch
from torch import nn

import gla_ext
from gla_ext import GLA
from gla_ext import decode as dec

pytestmark = pytest.mark.skipif(not gla_ext.extension_loaded(),
                                reason="gla_ext._C is not built (the fast path needs it)")

SMALL = dict(embed_dim=13, hidden_size=32, num_layers=2, num_heads=2, head_dim=16,
             dropout=0.1)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def small_model(**overrides):
    return GLA.build(**{**SMALL, **overrides}).eval()


@pytest.fixture(autouse=True)
def _fresh_seed_and_flag():
    print(f"torch seed {torch.seed()}")
    yield
    dec.ENABLED = True


def fused_step(model, x_t, state):
    """The fast path, called directly; fails if it declined."""
    out = dec.try_step(model, x_t.unsqueeze(1), state)
    assert out is not None, "the fused step did not apply"
    return out


def generic_step(model, x_t, state):
    dec.ENABLED = False
    try:
        return model.step(x_t, state)
    finally:
        dec.ENABLED = True


OPTIONS = [{}, dict(gate_low_rank_dim=4), dict(use_norm=False), dict(use_output_gate=False),
           dict(use_norm=False, use_output_gate=False), dict(embed_dim=32),
           dict(num_heads=3, head_dim=24, hidden_size=40), dict(gate_logit_normalizer=1.0,
                                                                norm_eps=1e-3)]


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_fused_step_equals_generic_step(options, batch):
    model = small_model(**options)
    x = torch.randn(batch, 6, model.embed_dim)
    with torch.no_grad():
        s_fast = s_gen = [s + torch.randn_like(s) for s in model.init_state(batch)]
        for t in range(x.shape[1]):
            y_fast, s_fast = fused_step(model, x[:, t], s_fast)
            y_gen, s_gen = generic_step(model, x[:, t], s_gen)
            assert y_fast.shape == y_gen.shape == (batch, model.hidden_size)
            assert rel_err(y_fast, y_gen) < 1e-5
            for a, b in zip(s_fast, s_gen):
                assert a.shape == b.shape and a.dtype == torch.float32
                assert rel_err(a, b) < 1e-5


def test_default_seed_model_one_step():
    model = GLA.build(embed_dim=287, hidden_size=256, num_layers=6, num_heads=4).eval()
    x = torch.randn(2, 287)
    state = [s + 0.1 * torch.randn_like(s) for s in model.init_state(2)]
    with torch.no_grad():
        y_fast, s_fast = fused_step(model, x, state)
        y_gen, s_gen = generic_step(model, x, state)
    assert rel_err(y_fast, y_gen) < 1e-5
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(s_fast, s_gen))


def test_step_uses_the_fast_path_and_matches_full_forward():
    model = small_model(gate_low_rank_dim=5)
    x = torch.randn(3, 15, model.embed_dim)
    with torch.no_grad():
        full, full_state = model(x, return_sequence=True, return_state=True)
        state, steps = None, []
        for t in range(x.shape[1]):
            y_t, state = model.step(x[:, t], state)
            steps.append(y_t)
    assert dec.is_cached(model)
    assert rel_err(torch.stack(steps, 1), full) < 1e-5
    assert all(rel_err(s, f) < 1e-5 for s, f in zip(state, full_state))


def test_prefill_then_fused_decode_leaves_the_given_state_untouched():
    model = small_model()
    x = torch.randn(2, 12, model.embed_dim)
    with torch.no_grad():
        full = model(x, return_sequence=True)
        _, state = model(x[:, :8], return_state=True)
        before = [s.clone() for s in state]
        y, new_state = fused_step(model, x[:, 8], state)
        assert all(torch.equal(a, b) for a, b in zip(state, before))
        assert all(n.data_ptr() != s.data_ptr() for n, s in zip(new_state, state))
        assert rel_err(y, full[:, 8]) < 1e-5
        y, new_state = model.step(x[:, 9], new_state)
        assert rel_err(y, full[:, 9]) < 1e-5


def test_no_state_and_zero_state_agree():
    model = small_model()
    x = torch.randn(2, model.embed_dim)
    with torch.no_grad():
        y0, s0 = fused_step(model, x, None)
        y1, s1 = fused_step(model, x, model.init_state(2))
    assert torch.equal(y0, y1) and all(torch.equal(a, b) for a, b in zip(s0, s1))


def test_non_contiguous_inputs():
    model = small_model()
    x = torch.randn(model.embed_dim, 2).t()                     # [2, E], not contiguous
    state = [torch.randn(2, 2, 16, 16).transpose(-1, -2) for _ in range(2)]
    with torch.no_grad():
        y_fast, s_fast = fused_step(model, x, state)
        y_gen, s_gen = generic_step(model, x, state)
    assert rel_err(y_fast, y_gen) < 1e-5
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(s_fast, s_gen))


def test_batch_size_can_change_between_steps():
    model = small_model()
    with torch.no_grad():
        for batch in (1, 4, 1, 2):
            x = torch.randn(batch, model.embed_dim)
            y_fast, _ = fused_step(model, x, None)
            y_gen, _ = generic_step(model, x, None)
            assert rel_err(y_fast, y_gen) < 1e-5


# ---- the packed weights follow the parameters ----

def _check_against_generic(model, batch=2):
    x = torch.randn(batch, model.embed_dim)
    with torch.no_grad():
        y_fast, _ = fused_step(model, x, None)
        y_gen, _ = generic_step(model, x, None)
    assert rel_err(y_fast, y_gen) < 1e-5


def test_in_place_weight_updates_are_picked_up():
    model = small_model()
    _check_against_generic(model)
    with torch.no_grad():
        model.blocks[1].attn.q_proj.weight.add_(1)
        model.blocks[0].ffn.w2.weight.mul_(-2)
        model.norm.bias.add_(3)
    _check_against_generic(model)
    other = small_model()
    model.load_state_dict(other.state_dict())
    _check_against_generic(model)


def test_reassigned_parameters_and_modules_are_picked_up():
    model = small_model()
    _check_against_generic(model)
    attn = model.blocks[0].attn
    attn.k_proj.weight = nn.Parameter(torch.randn_like(attn.k_proj.weight))
    _check_against_generic(model)
    model.blocks[1].ffn = GLA.build_gla_block(**SMALL).ffn
    _check_against_generic(model)
    model.input_proj.weight.data = torch.randn_like(model.input_proj.weight)  # new data pointer
    _check_against_generic(model)


def test_writes_through_data_need_clear_cache():
    model = small_model()
    _check_against_generic(model)
    model.blocks[0].attn.v_proj.weight.data.add_(1)    # invisible to version counters
    dec.clear_cache(model)
    _check_against_generic(model)


# ---- when the generic path runs instead ----

def test_autograd_takes_the_generic_path():
    model = small_model(dropout=0.0)
    x = torch.randn(2, model.embed_dim)
    assert dec.try_step(model, x.unsqueeze(1), None) is None     # params require grad
    y, state = model.step(x)
    assert not dec.is_cached(model)                              # no packed copy made
    assert y.requires_grad
    y.sum().backward()
    assert model.blocks[0].attn.q_proj.weight.grad is not None
    for p in model.parameters():                                 # nothing requires grad: fast
        p.requires_grad_(False)
    assert dec.try_step(model, x.unsqueeze(1), None) is not None
    with torch.no_grad():
        assert dec.try_step(model, x.unsqueeze(1).requires_grad_(), None) is not None


def test_training_mode_dropout_float64_and_reference_backend_take_the_generic_path():
    x = torch.randn(2, 1, SMALL["embed_dim"])
    with torch.no_grad():
        assert dec.try_step(small_model().train(), x, None) is None
        assert dec.try_step(small_model(dropout=0.0).train(), x, None) is not None
        assert dec.try_step(small_model(backend="reference"), x, None) is None
        model64 = small_model().double()
        assert dec.try_step(model64, x.double(), None) is None
        y, _ = model64.step(x.double()[:, 0])
        assert y.dtype == torch.float64
        model = small_model()
        state = [s.double() for s in model.init_state(2)]
        assert dec.try_step(model, x, state) is None
        dec.ENABLED = False
        assert dec.try_step(model, x, None) is None


def test_inference_mode_then_no_grad():
    model = small_model()
    x = torch.randn(2, model.embed_dim)
    with torch.inference_mode():
        y_inf, s_inf = model.step(x)
    assert dec.is_cached(model) and y_inf.is_inference()
    with torch.no_grad():
        y, s = model.step(x)
        y2, _ = model.step(x, s)
        y2_gen, _ = generic_step(model, x, s)
    assert torch.equal(y, y_inf) and not y.is_inference()
    assert rel_err(y2, y2_gen) < 1e-5


def test_bad_input_raises_like_the_generic_path():
    model = small_model()
    with torch.no_grad(), pytest.raises(ValueError, match="embed_dim"):
        model.step(torch.randn(2, model.embed_dim + 1))
    with torch.no_grad(), pytest.raises(ValueError, match="state"):
        model.step(torch.randn(2, model.embed_dim), model.init_state(3))


def test_cache_goes_away_with_the_model():
    model = small_model()
    with torch.no_grad():
        model.step(torch.randn(1, model.embed_dim))
    assert dec.is_cached(model)
    ref = weakref.ref(model)
    del model
    gc.collect()
    assert ref() is None                      # the cache does not keep the model alive


def test_replaced_dropout_is_seen():
    model = small_model(dropout=0.0).train()
    x = torch.randn(2, 1, model.embed_dim)
    with torch.no_grad():
        assert dec.try_step(model, x, None) is not None          # p = 0: same math
        model.blocks[1].dropout = nn.Dropout(0.5)                 # now active in training mode
        assert dec.try_step(model, x, None) is None
