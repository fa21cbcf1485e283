"""The GLA model: shapes, streaming == full forward, padded batches, errors, gradients, compile, backends."""
import pytest
import torch

import gla_ext
from gla_ext import GLA
from helpers import float32_model_tolerance, rel_err

SMALL = dict(embed_dim=11, hidden_size=24, num_layers=2, num_heads=2, head_dim=8, dropout=0.1)


def small_model(**overrides):
    return GLA.build(**{**SMALL, **overrides}).eval()


def n_params(module):
    return sum(p.numel() for p in module.parameters())


# ---- shapes ----

def test_seed_default_model_shapes():
    model = GLA.build(embed_dim=287, hidden_size=256, num_layers=6, num_heads=4).eval()
    x = torch.randn(2, 60, 287)
    with torch.no_grad():
        y = model(x)
    assert y.shape == (2, 256) and torch.isfinite(y).all()
    assert n_params(model) == GLA.param_count(embed_dim=287, hidden_size=256, num_layers=6,
                                              num_heads=4)


@pytest.mark.parametrize("embed_dim", [11, 24])     # projected, and Identity when equal
@pytest.mark.parametrize("T", [1, 5, 37])
def test_output_shapes(embed_dim, T):
    model = small_model(embed_dim=embed_dim)
    x = torch.randn(3, T, embed_dim)
    assert model(x).shape == (3, 24)
    assert model(x, return_sequence=True).shape == (3, T, 24)
    y, state = model(x, return_state=True)
    assert y.shape == (3, 24) and len(state) == 2
    assert all(s.shape == (3, 2, 8, 8) and s.dtype == torch.float32 for s in state)
    assert isinstance(model.input_proj, torch.nn.Identity) == (embed_dim == 24)


def test_last_position_is_the_last_of_the_sequence():
    model = small_model()
    x = torch.randn(2, 9, 11)
    assert torch.equal(model(x), model(x, return_sequence=True)[:, -1])


def test_layer_and_block_alone():
    layer = GLA.build_gla_layer(hidden_size=16, num_heads=2, head_dim=4)
    block = GLA.build_gla_block(hidden_size=16, num_heads=2, head_dim=4, expand_factor=3)
    x = torch.randn(2, 7, 16)
    assert layer(x).shape == (2, 7, 16)
    assert block(x).shape == (2, 7, 16)
    out, state = layer(x, return_state=True)
    assert state.shape == (2, 2, 4, 4)
    assert block.ffn.w1.out_features == 48


# ---- streaming ----

@pytest.mark.parametrize("options", [{}, dict(embed_dim=24), dict(gate_low_rank_dim=4),
                                     dict(use_norm=False, use_output_gate=False)])
def test_step_through_equals_full_forward(options):
    model = small_model(**options)
    x = torch.randn(3, 23, model.embed_dim)
    with torch.no_grad():
        full = model(x, return_sequence=True)
        state = model.init_state(3)
        steps = []
        for t in range(x.shape[1]):
            y_t, state = model.step(x[:, t], state)
            steps.append(y_t)
        _, full_state = model(x, return_state=True)
    assert rel_err(torch.stack(steps, 1), full) < 1e-5
    for s, f in zip(state, full_state):
        assert rel_err(s, f) < 1e-5


def test_step_accepts_3d_input_and_no_state():
    model = small_model()
    x = torch.randn(2, 1, 11)
    with torch.no_grad():
        y2, s2 = model.step(x[:, 0])
        y3, s3 = model.step(x, model.init_state(2))
    assert y2.shape == (2, 24)
    assert torch.equal(y2, y3) and all(torch.equal(a, b) for a, b in zip(s2, s3))


def test_prefill_then_decode_equals_full_forward():
    model = small_model()
    x = torch.randn(2, 30, 11)
    with torch.no_grad():
        full = model(x, return_sequence=True)
        y, state = model(x[:, :17], state=model.init_state(2), return_state=True)
        assert rel_err(y, full[:, 16]) < 1e-5
        rest = []
        for t in range(17, 30):
            y_t, state = model.step(x[:, t], state)
            rest.append(y_t)
        # a second prefill chunk continues from the state as well
        _, mid = model(x[:, :10], return_state=True)
        seq2 = model(x[:, 10:], state=mid, return_sequence=True)
    assert rel_err(torch.stack(rest, 1), full[:, 17:]) < 1e-5
    assert rel_err(seq2, full[:, 10:]) < 1e-5


def test_step_does_not_modify_the_given_state():
    model = small_model()
    state = [s + 1.0 for s in model.init_state(2)]
    before = [s.clone() for s in state]
    with torch.no_grad():
        model.step(torch.randn(2, 11), state)
        model(torch.randn(2, 4, 11), state=state)
    assert all(torch.equal(a, b) for a, b in zip(state, before))


# ---- right-padded batches ----

def _padded_batch(lengths, T, dim, pad_value=None):
    x = torch.randn(len(lengths), T, dim)
    for i, n in enumerate(lengths):
        x[i, n:] = torch.randn(T - n, dim) * 1e3 if pad_value is None else pad_value
    return x


def _outputs(m, x):
    """[last y, sequence, each final state] of m on x."""
    y, state = m(x, return_state=True)
    return [y, m(x, return_sequence=True), *state]


def test_lengths_equal_running_each_row_unpadded():
    model = small_model()
    lengths = [5, 12, 1, 9]
    x = _padded_batch(lengths, 12, 11)
    with torch.no_grad():
        y, state = model(x, lengths=torch.tensor(lengths), return_state=True)
        seq = model(x, lengths=torch.tensor(lengths), return_sequence=True)
        for i, n in enumerate(lengths):
            y_i, state_i = model(x[i:i + 1, :n], return_state=True)
            # 1e-5, or wider where a row's draw is ill-conditioned (n = 1: tests/helpers.py)
            tol_y, tol_seq, *tol_s = float32_model_tolerance(model, _outputs, x[i:i + 1, :n])
            assert rel_err(y[i], y_i[0]) < tol_y
            assert rel_err(seq[i, :n], model(x[i:i + 1, :n], return_sequence=True)[0]) < tol_seq
            assert torch.all(seq[i, n:] == 0)
            for s, s_i, tol in zip(state, state_i, tol_s):  # the state stops at the last valid step
                assert rel_err(s[i], s_i[0]) < tol


@pytest.mark.parametrize("pad_value", [None, 1e6, -1e6, 0.0, float("inf"), float("nan")])
def test_padding_values_never_leak(pad_value):
    model = small_model()
    lengths = torch.tensor([3, 8, 6])
    x = _padded_batch(lengths.tolist(), 8, 11)
    garbage = x.clone()
    for i, n in enumerate(lengths.tolist()):
        garbage[i, n:] = torch.randn(8 - n, 11) * 1e6 if pad_value is None else pad_value
    with torch.no_grad():
        y, s = model(x, lengths=lengths, return_state=True)
        y2, s2 = model(garbage, lengths=lengths, return_state=True)
        seq2 = model(garbage, lengths=lengths, return_sequence=True)
    assert torch.equal(y, y2)
    assert all(torch.equal(a, b) for a, b in zip(s, s2))
    assert torch.isfinite(seq2).all()


def test_padded_prefill_then_decode():
    model = small_model()
    lengths = [4, 7]
    x = torch.randn(2, 10, 11)
    with torch.no_grad():
        _, state = model(x[:, :7], lengths=torch.tensor(lengths), return_state=True)
        y_next, _ = model.step(x[:, 9], state)
        for i, n in enumerate(lengths):
            row = torch.cat([x[i:i + 1, :n], x[i:i + 1, 9:10]], 1)
            assert rel_err(y_next[i], model(row)[0]) < 1e-5


def test_padding_gets_no_gradient_and_valid_rows_match():
    model = small_model(dropout=0.0).train()
    lengths = torch.tensor([2, 6])
    x = torch.randn(2, 6, 11, requires_grad=True)
    model(x, lengths=lengths).sum().backward()
    assert torch.all(x.grad[0, 2:] == 0)
    assert torch.isfinite(x.grad).all()


# ---- errors ----

def test_bad_inputs_raise_clear_errors():
    model = small_model()
    with pytest.raises(ValueError, match="embed_dim"):
        model(torch.randn(2, 5, 12))
    with pytest.raises(ValueError, match="x must be"):
        model(torch.randn(5, 11))
    with pytest.raises(ValueError, match="at least one"):
        model(torch.randn(2, 0, 11))
    with pytest.raises(TypeError, match="x must be"):
        model([[1.0] * 11])
    with pytest.raises(ValueError, match="lengths"):
        model(torch.randn(2, 5, 11), lengths=torch.tensor([5, 6]))
    with pytest.raises(ValueError, match="lengths"):
        model(torch.randn(2, 5, 11), lengths=torch.tensor([0, 5]))
    with pytest.raises(ValueError, match="lengths"):
        model(torch.randn(2, 5, 11), lengths=torch.tensor([5]))
    with pytest.raises(ValueError, match="lengths"):
        model(torch.randn(2, 5, 11), lengths=torch.tensor([5.0, 5.0]))
    with pytest.raises(ValueError, match="state"):
        model(torch.randn(2, 5, 11), state=model.init_state(3))
    with pytest.raises(ValueError, match="state"):
        model(torch.randn(2, 5, 11), state=model.init_state(2)[:1])
    with pytest.raises(ValueError, match="x_t"):
        model.step(torch.randn(2, 3, 11), model.init_state(2))
    with pytest.raises(ValueError, match="batch"):
        model.init_state(0)


def test_sequence_length_is_not_fixed_by_seq_len():
    # seq_len / window_size are shape hints: any length is accepted.
    model = small_model(window_size=8)
    assert model.seq_len == 8
    assert model(torch.randn(1, 13, 11)).shape == (1, 24)


# ---- gradients, compile, backends ----

@pytest.mark.parametrize("options", [{}, dict(gate_low_rank_dim=3, embed_dim=24)])
def test_backward_gives_finite_grads_for_all_params(options):
    model = small_model(**options).train()
    x = torch.randn(3, 9, model.embed_dim)
    model(x, lengths=torch.tensor([9, 4, 7])).pow(2).mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_gradients_match_reference_backend():
    model = small_model(dropout=0.0)
    ref = small_model(dropout=0.0, backend="reference")
    ref.load_state_dict(model.state_dict())
    x = torch.randn(2, 20, 11)
    w = torch.randn(2, 20, 24)   # a random projection: no cancellation, unlike |LayerNorm(h)|^2
    for m in (model, ref):
        (m(x, return_sequence=True) * w).sum().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        assert rel_err(p.grad, q.grad) < 1e-4, name


@pytest.mark.skipif(not gla_ext.extension_loaded(), reason="gla_ext._C (CPU kernels) not built")
def test_reference_backend_equals_cpu_backend():
    model = small_model(backend="cpu")
    ref = small_model(backend="reference")
    ref.load_state_dict(model.state_dict())
    x = torch.randn(3, 40, 11)
    lengths = torch.tensor([40, 17, 33])
    with torch.no_grad():
        assert rel_err(model(x, return_sequence=True), ref(x, return_sequence=True)) < 1e-5
        assert rel_err(model(x, lengths=lengths), ref(x, lengths=lengths)) < 1e-5
        y, s = model.step(x[:, 0])
        y_ref, s_ref = ref.step(x[:, 0])
        assert rel_err(y, y_ref) < 1e-5


def _check_compiled(**compile_options):
    model = GLA.build(embed_dim=6, hidden_size=8, num_layers=1, num_heads=2, head_dim=4).eval()
    compiled = torch.compile(model, fullgraph=True, **compile_options)   # no graph breaks allowed
    x = torch.randn(2, 10, 6)
    lengths = torch.tensor([10, 6])
    with torch.no_grad():
        assert rel_err(compiled(x, lengths=lengths), model(x, lengths=lengths)) < 1e-5
        y, state = compiled(x, return_state=True)
        y_eager, state_eager = model(x, return_state=True)
        assert rel_err(y, y_eager) < 1e-5 and rel_err(state[0], state_eager[0]) < 1e-5


def test_torch_compile_traces_in_one_graph():
    # aot_eager traces through the fake kernels and autograd registration without codegen: fast.
    _check_compiled(backend="aot_eager")


@pytest.mark.slow
def test_torch_compile_matches_eager():
    # The default inductor backend compiles C++ on the CPU: ~10-30 s cold, fast once cached.
    _check_compiled()


def test_eval_is_deterministic_and_train_uses_dropout():
    model = small_model(dropout=0.5)
    x = torch.randn(2, 6, 11)
    assert torch.equal(model(x), model(x))
    model.train()
    assert not torch.equal(model(x), model(x))
