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
from helpers import decoder_for_isa, float32_model_tolerance, float64_reference_model, rel_err

SMALL = dict(embed_dim=13, hidden_size=32, num_layers=2, num_heads=2, head_dim=16,
             dropout=0.1)


def small_model(**overrides):
    return GLA.build(**{**SMALL, **overrides}).eval()


@pytest.fixture(autouse=True)
def _restore_flag():  # random inputs are seeded by conftest.py (replayable)
    yield
    dec.ENABLED = True


def fused_step(model, x_t, state):
    """The fast path, called directly; fails if it declined."""
    out = dec.try_step(model, x_t.unsqueeze(1), state)
    assert out is not None, "the fused step did not apply"
    return out


def generic_step(model, x_t, state):
    """The plain PyTorch layers (never a fused engine: not decode, not prefill)."""
    return model.step_layers(x_t, state)


def _y_and_states(m, x_t, state):
    y, s = m.step_layers(x_t, state)
    return [y, *s]


def _sequence_and_states(m, x):
    seq, s = m(x, return_sequence=True, return_state=True)
    return [seq, *s]


def step_tolerances(model, x_t, state):
    """[tolerance of y, of each state]: the contract's 1e-5, or wider where this draw is
    ill-conditioned (a first token whose q.k nearly cancels; tests/helpers.py)."""
    return float32_model_tolerance(model, _y_and_states, x_t, state)


@pytest.fixture(autouse=True)
def _always_fused(monkeypatch):
    """GLA.step takes the fused engine wherever it can run (no per-shape timing choice)."""
    monkeypatch.setattr(gla_ext.engine_choice, "MODE", "fused")


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
        ref, ref_state = float64_reference_model(model)(
            x.double(), state=[s.double() for s in s_gen], return_sequence=True,
            return_state=True)
        for t in range(x.shape[1]):
            y_fast, s_fast = fused_step(model, x[:, t], s_fast)
            y_gen, s_gen = generic_step(model, x[:, t], s_gen)
            assert y_fast.shape == y_gen.shape == (batch, model.hidden_size)
            assert rel_err(y_fast, y_gen) < 1e-5
            assert rel_err(y_fast, ref[:, t]) < 1e-5
            for a, b in zip(s_fast, s_gen):
                assert a.shape == b.shape and a.dtype == torch.float32
                assert rel_err(a, b) < 1e-5
    assert all(rel_err(a, r) < 1e-5 for a, r in zip(s_fast, ref_state))


def test_default_seed_model_one_step():
    model = GLA.build(embed_dim=287, hidden_size=256, num_layers=6, num_heads=4).eval()
    x = torch.randn(2, 287)
    state = [s + 0.1 * torch.randn_like(s) for s in model.init_state(2)]
    with torch.no_grad():
        y_fast, s_fast = fused_step(model, x, state)
        y_gen, s_gen = generic_step(model, x, state)
    tol_y, *tol_s = step_tolerances(model, x, state)
    assert rel_err(y_fast, y_gen) < tol_y
    assert all(rel_err(a, b) < tol for a, b, tol in zip(s_fast, s_gen, tol_s))


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
    tol_seq, *tol_s = float32_model_tolerance(model, _sequence_and_states, x)
    assert rel_err(torch.stack(steps, 1), full) < tol_seq
    assert all(rel_err(s, f) < tol for s, f, tol in zip(state, full_state, tol_s))


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


# head_dim 16 / 32 / 64 take one register-resident block of the state update at every vector
# width (4, 8 or 16 floats); 24 blocks of 2 + 1 vectors on AVX2 (the tail loop on AVX-512);
# 20 a tail of 4 columns after the blocks on every width (head_update). Under -ffast-math the
# compiler may reassociate the output sums differently in the zero-state branch unless the
# kernel pins them (csrc/cpu/engine/step_impl.h): this once failed on AVX2 only.
@pytest.mark.parametrize("head_dim", [16, 20, 24, 32, 64])
def test_no_state_and_zero_state_agree(head_dim):
    model = small_model(head_dim=head_dim)
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
    tol_y, *tol_s = step_tolerances(model, x, state)
    assert rel_err(y_fast, y_gen) < tol_y
    assert all(rel_err(a, b) < tol for a, b, tol in zip(s_fast, s_gen, tol_s))


def test_batch_size_can_change_between_steps():
    model = small_model()
    m64 = float64_reference_model(model)
    with torch.no_grad():
        for batch in (1, 4, 1, 2):
            x = torch.randn(batch, model.embed_dim)
            y_fast, _ = fused_step(model, x, None)
            y_gen, _ = generic_step(model, x, None)
            y64, _ = m64.step_layers(x.double(), None)
            tol = step_tolerances(model, x, None)[0]
            assert rel_err(y_fast, y64) < tol and rel_err(y_gen, y64) < tol


# ---- the packed weights follow the parameters ----

def _check_against_generic(model, batch=2):
    x = torch.randn(batch, model.embed_dim)
    with torch.no_grad():
        y_fast, _ = fused_step(model, x, None)
        y_gen, _ = generic_step(model, x, None)
    assert rel_err(y_fast, y_gen) < step_tolerances(model, x, None)[0]


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
    assert rel_err(y2, y2_gen) < step_tolerances(model, x, s)[0]


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
    cached = dec.is_cached(model)   # (not asserted on `model` directly: with pytest's
    ref = weakref.ref(model)        # assertion-pass hook, the sweep's, the rewritten assert
    del model                       # would keep a reference to it in this frame)
    assert cached
    gc.collect()
    assert ref() is None                      # the cache does not keep the model alive


def test_replaced_dropout_is_seen():
    model = small_model(dropout=0.0).train()
    x = torch.randn(2, 1, model.embed_dim)
    with torch.no_grad():
        assert dec.try_step(model, x, None) is not None          # p = 0: same math
        model.blocks[1].dropout = nn.Dropout(0.5)                 # now active in training mode
        assert dec.try_step(model, x, None) is None


# ---- issue 10: own kernels for every ISA, 16-bit weights, state pools, threads ----

ISAS = ["generic", "avx2", "avx512"]


def stream(model, x, dtype=None):
    """Outputs [B, T, hidden] and final state of the fused step fed token by token."""
    state, ys = None, []
    for t in range(x.shape[1]):
        y, state = fused_step(model, x[:, t], state)
        ys.append(y)
    return torch.stack(ys, 1), state


@pytest.mark.parametrize("isa", ISAS)
def test_every_isa_matches_generic_and_float64(isa, monkeypatch):
    model = small_model(num_heads=3, head_dim=16, hidden_size=40, gate_low_rank_dim=3)
    decoder = decoder_for_isa(model, isa, monkeypatch)
    x = torch.randn(3, 8, model.embed_dim)
    with torch.no_grad():
        ys, state = stream(model, x)
        ref, ref_state = float64_reference_model(model)(x.double(), return_sequence=True,
                                                        return_state=True)
        s_gen, gen = None, []
        for t in range(x.shape[1]):
            y, s_gen = generic_step(model, x[:, t], s_gen)
            gen.append(y)
    assert dec.decoder(model) is decoder          # the same packed copy ran every step
    tol_seq, *tol_s = float32_model_tolerance(model, _sequence_and_states, x)
    assert rel_err(ys, ref) < tol_seq and rel_err(torch.stack(gen, 1), ref) < tol_seq
    assert all(rel_err(s, r) < tol for s, r, tol in zip(state, ref_state, tol_s))


@pytest.mark.parametrize("dtype,tol,tokens", [(torch.bfloat16, 1e-2, 200), (torch.float16, 5e-3, 50)])
def test_16bit_model_takes_the_fused_step(dtype, tol, tokens):
    """model.to(bfloat16): bf16 weights, float32 accumulation and state, bf16 in and out."""
    model = GLA.build(embed_dim=31, hidden_size=64, num_layers=2, num_heads=2, head_dim=32,
                      dropout=0.0).eval().to(dtype)
    x = torch.randn(2, tokens, model.embed_dim).to(dtype)
    with torch.no_grad():
        ys, state = stream(model, x)
        y_step, _ = model.step(x[:, 0])           # GLA.step takes it too
        ref, ref_state = float64_reference_model(model)(x.double(), return_sequence=True,
                                                        return_state=True)
    assert dec.decoder(model).isa and dec.is_cached(model)
    assert ys.dtype == dtype and y_step.dtype == dtype
    assert all(s.dtype == torch.float32 for s in state)
    assert torch.isfinite(ys.float()).all()
    assert rel_err(ys, ref) < tol
    assert all(rel_err(s, r) < tol for s, r in zip(state, ref_state))
    assert dec.try_step(model, x[:, :1].float(), None) is None   # x in another dtype: generic


def test_returned_states_never_share_storage_while_alive():
    model = small_model()
    x = torch.randn(2, model.embed_dim)
    with torch.no_grad():
        _, s1 = fused_step(model, x, None)
        keep = [t.clone() for t in s1]
        _, s2 = fused_step(model, x, s1)
        _, s3 = fused_step(model, x, s2)
        del s2
        _, s4 = fused_step(model, x, s3)
        _, s5 = fused_step(model, x, s4)
    ptrs = [t.data_ptr() for s in (s1, s3, s4, s5) for t in s]
    assert len(set(ptrs)) == len(ptrs)
    assert all(torch.equal(a, b) for a, b in zip(s1, keep))


def test_threads_split_the_step_with_identical_results():
    model = GLA.build(embed_dim=50, hidden_size=96, num_layers=2, num_heads=3, head_dim=32).eval()
    decoder = dec.decoder(model)
    threads = torch.get_num_threads()
    x = torch.randn(5, model.embed_dim)
    state = [torch.randn_like(s) for s in model.init_state(5)]
    try:
        torch.set_num_threads(max(2, threads))
        with torch.no_grad():
            decoder.thread_limit = 1
            y1, s1 = fused_step(model, x, state)
            decoder.thread_limit = 2
            assert decoder.threads_for(5) == 2
            y2, s2 = fused_step(model, x, state)
    finally:
        decoder.thread_limit = 0
        torch.set_num_threads(threads)
    assert torch.equal(y1, y2) and all(torch.equal(a, b) for a, b in zip(s1, s2))


# ---- state pools (TEAM interface 2) ----

def make_pool(model, capacity):
    c = model.config
    return [torch.randn(capacity, c.num_heads, c.head_dim, c.head_dim)
            for _ in range(c.num_layers)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pool_step_advances_named_rows_like_the_dense_step(dtype):
    model = small_model(gate_low_rank_dim=4).to(dtype)
    pool = make_pool(model, 7)
    before = [p.clone() for p in pool]
    versions = [p._version for p in pool]
    slots = torch.tensor([4, -1, 0, 6, -3])
    valid = slots >= 0
    x = torch.randn(5, 1, model.embed_dim).to(dtype)
    with torch.no_grad():
        y_dense, s_dense = fused_step(model, x[valid, 0],
                                      [p[slots[valid]] for p in before])
        y = dec.try_step_pool(model, x, pool, slots)
    assert y.shape == (5, model.hidden_size) and y.dtype == dtype
    assert torch.equal(y[valid], y_dense)               # same kernels, same rows: bitwise
    assert not y[~valid].any()                         # padding rows give zeros
    assert all(p._version > v for p, v in zip(pool, versions))   # written in place
    untouched = [1, 2, 3, 5]
    for p, b, s in zip(pool, before, s_dense):
        assert torch.equal(p[slots[valid]], s)
        assert torch.equal(p[untouched], b[untouched])


def test_pool_step_int32_slots_all_padding_and_errors():
    model = small_model()
    pool = make_pool(model, 3)
    before = [p.clone() for p in pool]
    x = torch.randn(2, model.embed_dim)
    with torch.no_grad():
        y = dec.try_step_pool(model, x, pool, torch.tensor([-1, -1], dtype=torch.int32))
        assert y.shape == (2, model.hidden_size) and not y.any()
        assert all(torch.equal(p, b) for p, b in zip(pool, before))
        y = dec.try_step_pool(model, x, pool, torch.tensor([2, 0], dtype=torch.int32))
        assert y is not None and not torch.equal(pool[0][2], before[0][2])
        with pytest.raises(ValueError, match="out of range"):
            dec.try_step_pool(model, x, pool, torch.tensor([3, 0]))
        with pytest.raises(ValueError, match="twice"):
            dec.try_step_pool(model, x, pool, torch.tensor([1, 1]))
        strided = [torch.randn(3, 2, 16, 16).transpose(-1, -2) for _ in range(2)]
        assert dec.try_step_pool(model, x, strided, torch.tensor([0, 1])) is None
        assert dec.try_step_pool(small_model().train(), x, pool, torch.tensor([0, 1])) is None
