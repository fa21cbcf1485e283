"""gla_ext.StatePool: slot-indexed states == the model run stream by stream, in place, errors."""
import random

import pytest
import torch

import gla_ext
from gla_ext import GLA, decode

from helpers import (float32_model_tolerance, float64_reference_model, forward_y_and_states,
                     rel_err)

SMALL = dict(embed_dim=11, hidden_size=24, num_layers=2, num_heads=2, head_dim=8, dropout=0.1)
TOL = 1e-5       # float32 on the CPU (docs/design.md "Numerics")


def small_model(**overrides):
    return GLA.build(**{**SMALL, **overrides}).eval()


def snapshot(pool):
    return [s.clone() for s in pool.states]


def assert_rows_unchanged(pool, before, rows):
    """Pool rows `rows` are bitwise what they were in `before`."""
    rows = torch.tensor(sorted(rows), dtype=torch.long)
    for now, then in zip(pool.states, before):
        if len(rows):
            assert torch.equal(now[rows], then[rows])


def assert_state_close(pool, slot, state, tols=None):
    got = pool.get(slot)
    for a, b, tol in zip(got, state, tols or [TOL] * len(state)):
        if b.abs().max() > 0:
            assert rel_err(a, b) <= tol
        else:
            assert torch.equal(a, b)


def _step_y_and_states(m, x_t, state):
    y, s = m.step(x_t, state)
    return [y, *s]


def forward_tolerances(model, x, state):
    """[tolerance of y, of each state] of model(x, state): TOL, or wider where this draw is
    ill-conditioned (a one-token prompt whose q.k nearly cancels; tests/helpers.py)."""
    return float32_model_tolerance(model, forward_y_and_states, x, state, floor=TOL)


def step_tolerances(model, x_t, state):
    return float32_model_tolerance(model, _step_y_and_states, x_t, state, floor=TOL)


# ---- the pool equals the model run stream by stream ----

@pytest.mark.parametrize("options", [
    dict(embed_dim=11),
    dict(embed_dim=24),                                   # no input projection (Identity)
    dict(embed_dim=11, gate_low_rank_dim=4, use_output_gate=False, use_norm=False),
    dict(embed_dim=11, backend="reference"),              # the ops' reference pool path
])
def test_prefill_with_lengths_then_steps_match_per_stream(options):
    model = small_model(**options)
    embed_dim = options["embed_dim"]
    pool = model.state_pool(6)
    slots = [pool.open() for _ in range(4)]
    n, T = 4, 13
    x = torch.randn(n, T, embed_dim)
    lengths = torch.tensor([13, 1, 7, 4])
    for i, L in enumerate(lengths.tolist()):
        x[i, L:] = float("nan")       # padding never reaches anything
    y = pool.prefill(x, torch.tensor(slots), lengths=lengths)
    assert y.shape == (n, model.hidden_size) and not y.requires_grad
    states = []
    for i, L in enumerate(lengths.tolist()):
        x_i, zero = x[i:i + 1, :L], model.init_state(1)
        y_ref, s = model(x_i, state=zero, return_state=True)
        tol_y, *tol_s = forward_tolerances(model, x_i, zero)
        assert rel_err(y[i], y_ref[0]) <= tol_y
        assert_state_close(pool, slots[i], s, tol_s)
        states.append(s)
    # three decode steps, rows in a different order than the slots were opened
    order = [2, 0, 3, 1]
    for _ in range(3):
        x_t = torch.randn(n, embed_dim)
        y_t = pool.step(x_t, torch.tensor([slots[i] for i in order]))
        assert y_t.shape == (n, model.hidden_size)
        for row, i in enumerate(order):
            tol_y, *tol_s = step_tolerances(model, x_t[row:row + 1], states[i])
            y_ref, states[i] = model.step(x_t[row:row + 1], states[i])
            assert rel_err(y_t[row], y_ref[0]) <= tol_y
            assert_state_close(pool, slots[i], states[i], tol_s)


def test_prefill_without_lengths_and_from_a_set_state():
    model = small_model()
    pool = model.state_pool(3)
    a, b = pool.open(), pool.open()
    start = [torch.randn(1, 2, 8, 8) for _ in range(2)]
    pool.set(b, start)
    x = torch.randn(2, 9, 11)
    y = pool.prefill(x, torch.tensor([b, a], dtype=torch.int32))
    y_b, s_b = model(x[:1], state=start, return_state=True)
    y_a, s_a = model(x[1:], state=model.init_state(1), return_state=True)
    assert rel_err(y[0], y_b[0]) <= TOL and rel_err(y[1], y_a[0]) <= TOL
    assert_state_close(pool, b, s_b)
    assert_state_close(pool, a, s_a)


def test_continuous_batching_open_close_reuse_mixed_ticks():
    """A random engine: arrivals prefill, running streams step, finished streams close and
    their slots are reused; every output and state equals its own stream's model run in
    float64 (each stream's float64 state carried along), and rows a call does not name stay
    bitwise unchanged. float64, not the float32 model: over a stream's prefill and steps two
    float32 runs each within 1e-5 of float64 were seen 1.15e-5 apart (errors 4.7e-6 and
    6.8e-6 of opposite sign, session-10 seed sweep). Tolerances from the stream's whole input
    so far (prompt and stepped tokens): the float32 errors of earlier tokens are carried in the
    state, so one step's sensitivity alone understates them."""
    model = small_model()
    m64 = float64_reference_model(model)
    capacity = 5
    pool = model.state_pool(capacity)
    live = {}           # slot -> (float64 reference state, steps left, inputs so far)
    reused = 0
    seen = set()
    for tick in range(14):
        # arrivals (as many as fit), prefill together with random prompt lengths
        arrivals = []
        for _ in range(random.randint(0, 3)):
            if pool.num_open == capacity:
                break
            slot = pool.open()
            assert all(torch.equal(s, torch.zeros_like(s)) for s in pool.get(slot))
            reused += slot in seen
            seen.add(slot)
            arrivals.append(slot)
        if arrivals:
            T = random.randint(1, 12)
            lengths = [random.randint(1, T) for _ in arrivals]
            x = torch.randn(len(arrivals), T, 11)
            before = snapshot(pool)
            y = pool.prefill(x, torch.tensor(arrivals), lengths=torch.tensor(lengths))
            assert_rows_unchanged(pool, before, set(range(capacity)) - set(arrivals))
            for i, (slot, L) in enumerate(zip(arrivals, lengths)):
                x_i, zero = x[i:i + 1, :L], model.init_state(1)
                with torch.no_grad():
                    y_ref, s = m64(x_i.double(), state=[z.double() for z in zero],
                                   return_state=True)
                assert rel_err(y[i], y_ref[0]) <= forward_tolerances(model, x_i, zero)[0]
                live[slot] = (s, random.randint(1, 4), x_i)
        # one step for the streams that were running before this tick
        running = [s for s in live if s not in arrivals]
        random.shuffle(running)
        if running:
            x_t = torch.randn(len(running), 11)
            before = snapshot(pool)
            y_t = pool.step(x_t, torch.tensor(running))
            assert_rows_unchanged(pool, before, set(range(capacity)) - set(running))
            for row, slot in enumerate(running):
                state, left, seen_x = live[slot]
                seen_x = torch.cat([seen_x, x_t[row:row + 1, None]], dim=1)
                tol_y, *tol_s = forward_tolerances(model, seen_x, model.init_state(1))
                with torch.no_grad():
                    y_ref, state = m64.step(x_t[row:row + 1].double(), state)
                assert rel_err(y_t[row], y_ref[0]) <= tol_y
                assert_state_close(pool, slot, state, tol_s)
                if left == 1:
                    pool.close(slot)
                    del live[slot]
                else:
                    live[slot] = (state, left - 1, seen_x)
    assert reused > 0, "the schedule should have reused a closed slot"


def test_default_model_fused_and_generic_step_agree(monkeypatch):
    """The default model: pool.step equals per-stream model.step with the fused C++ path on
    and off (where the fused pool step exists it must be the one taken)."""
    monkeypatch.setattr(gla_ext.engine_choice, "MODE", "fused")
    model = GLA.build(embed_dim=287).eval()
    pool = model.state_pool(8)
    slots = [pool.open() for _ in range(3)]
    pool.prefill(torch.randn(3, 5, 287), torch.tensor(slots))
    states = [pool.get(s) for s in slots]
    x_t = torch.randn(3, 287)
    taken = []
    real = getattr(decode, "try_step_pool", None)
    if real is not None:
        def counting(*args):
            out = real(*args)
            taken.append(out is not None)
            return out
        monkeypatch.setattr(decode, "try_step_pool", counting)
    y = pool.step(x_t, torch.tensor(slots))
    if real is not None and decode.ENABLED and gla_ext.extension_loaded():
        assert taken == [True], "the fused C++ pool step should run for a float32 CPU model"
    monkeypatch.setattr(decode, "ENABLED", False)
    pool2 = model.state_pool(8)
    for s, st in zip(slots, states):
        pool2.open()
        pool2.set(s, st)
    y_generic = pool2.step(x_t, torch.tensor(slots))
    for i, s in enumerate(slots):
        y_ref, st = model.step_layers(x_t[i:i + 1], states[i])
        assert rel_err(y[i], y_ref[0]) <= TOL
        assert rel_err(y_generic[i], y_ref[0]) <= TOL
        assert_state_close(pool, s, st)
        assert_state_close(pool2, s, st)


def test_inference_only_outputs_carry_no_graph():
    model = small_model()      # parameters require grad, grad mode on
    pool = model.state_pool(2)
    a = pool.open()
    y = pool.prefill(torch.randn(1, 4, 11, requires_grad=True), torch.tensor([a]))
    y_t = pool.step(torch.randn(1, 11, requires_grad=True), torch.tensor([a]))
    assert not y.requires_grad and not y_t.requires_grad
    assert not any(s.requires_grad for s in pool.states)


# ---- get / set / open / close ----

def test_get_and_set_copy_and_do_not_alias():
    model = small_model()
    pool = model.state_pool(3)
    a, b = pool.open(), pool.open()
    pool.prefill(torch.randn(2, 6, 11), torch.tensor([a, b]))
    got = pool.get(a)
    assert len(got) == 2 and all(g.shape == (1, 2, 8, 8) and g.dtype == torch.float32 for g in got)
    before = snapshot(pool)
    for g in got:
        g.add_(1.0)
    assert_rows_unchanged(pool, before, range(3))
    new = [torch.randn(1, 2, 8, 8) for _ in range(2)]
    pool.set(b, new)
    kept = [t.clone() for t in new]
    for t in new:
        t.zero_()
    assert all(torch.equal(g, k) for g, k in zip(pool.get(b), kept))
    assert_rows_unchanged(pool, before, [a, 2])


def test_open_hands_out_free_slots_with_zero_state_and_close_frees():
    model = small_model()
    pool = model.state_pool(2)
    assert pool.states[0].shape == (2, 2, 8, 8) and pool.states[0].device == model.norm.weight.device
    a, b = pool.open(), pool.open()
    assert {a, b} == {0, 1} and pool.num_open == 2
    pool.set(a, [torch.randn(1, 2, 8, 8) for _ in range(2)])
    with pytest.raises(RuntimeError, match="full"):
        pool.open()
    pool.close(a)
    assert not pool.is_open(a) and pool.open() == a
    assert all(torch.equal(s, torch.zeros_like(s)) for s in pool.get(a))


# ---- errors: clear ValueError, pool unchanged ----

def _bad_calls(pool, a, b, closed):
    E = 11
    x1 = torch.randn(1, E)
    return [
        (lambda: pool.step(x1, torch.tensor([closed])), "not open"),
        (lambda: pool.step(x1, torch.tensor([3])), "not open"),               # never opened
        (lambda: pool.step(x1, torch.tensor([4])), "out of range"),
        (lambda: pool.step(x1, torch.tensor([-1])), "out of range"),
        (lambda: pool.step(torch.randn(2, E), torch.tensor([a, a])), "distinct"),
        (lambda: pool.step(torch.randn(2, E), torch.tensor([a])), r"\[n=2\]"),
        (lambda: pool.step(x1, torch.tensor([[a]])), "1-D"),
        (lambda: pool.step(x1, torch.tensor([0.0])), "integer"),
        (lambda: pool.step(torch.randn(1, E + 1), torch.tensor([a])), "embed_dim"),
        (lambda: pool.step(torch.randn(1, 2, E), torch.tensor([a])), "embed_dim"),
        (lambda: pool.step(x1.double(), torch.tensor([a])), "dtype"),
        (lambda: pool.prefill(torch.randn(2, 3, E), torch.tensor([a, a])), "distinct"),
        (lambda: pool.prefill(torch.randn(2, 3, E), torch.tensor([a, closed])), "not open"),
        (lambda: pool.prefill(torch.randn(2, 3, E), torch.tensor([a, b]),
                              lengths=torch.tensor([3, 4])), "lengths"),
        (lambda: pool.prefill(torch.randn(2, 3, E), torch.tensor([a, b]),
                              lengths=torch.tensor([0, 2])), "lengths"),
        (lambda: pool.prefill(torch.randn(2, 3, E), torch.tensor([a, b]),
                              lengths=torch.tensor([3])), "lengths"),
        (lambda: pool.prefill(torch.randn(2, E), torch.tensor([a, b])), "seq_len"),
        (lambda: pool.get(closed), "not open"),
        (lambda: pool.get(7), "out of range"),
        (lambda: pool.set(closed, pool.get(a)), "not open"),
        (lambda: pool.set(a, pool.get(a)[:1]), "num_layers"),
        (lambda: pool.set(a, [torch.zeros(2, 2, 8, 8)] * 2), r"\[1, 2, 8, 8\]"),
        (lambda: pool.set(a, [torch.zeros(1, 2, 8, 8, dtype=torch.int32)] * 2), "floating"),
        (lambda: pool.close(closed), "not open"),
        (lambda: pool.close(True), "int"),
    ]


def test_bad_calls_raise_and_change_nothing():
    model = small_model()
    pool = model.state_pool(4)
    a, b, closed = pool.open(), pool.open(), pool.open()
    pool.prefill(torch.randn(3, 5, 11), torch.tensor([a, b, closed]))
    pool.close(closed)
    for call, message in _bad_calls(pool, a, b, closed):
        before = snapshot(pool)
        with pytest.raises(ValueError, match=message):
            call()
        assert_rows_unchanged(pool, before, range(4))
        assert pool.num_open == 2 and pool.is_open(a) and pool.is_open(b)
    with pytest.raises(TypeError, match="torch.Tensor"):
        pool.step([[0.0] * 11], torch.tensor([a]))
    with pytest.raises(ValueError, match="capacity"):
        model.state_pool(0)


# ---- CUDA ----

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_cuda_graph_pool_step_matches_eager_pool_step():
    model = small_model().cuda()
    pool, eager = model.state_pool(6), model.state_pool(6)
    slots = [pool.open() for _ in range(4)]
    for _ in slots:
        eager.open()
    x = torch.randn(4, 7, 11, device="cuda")
    pool.prefill(x, torch.tensor(slots))
    eager.prefill(x, torch.tensor(slots))
    graph_step = pool.cuda_graph_step(3)
    for rows in ([0, 1, 2], [3, 0, -1], [-1, 2, -1]):
        x_t = torch.randn(3, 11, device="cuda")
        before = snapshot(pool)
        y = graph_step(x_t, rows).clone()
        real = [i for i, s in enumerate(rows) if s >= 0]
        y_ref = eager.step(x_t[real], torch.tensor([rows[i] for i in real]))
        assert rel_err(y[real], y_ref) <= 1e-3
        assert all(torch.equal(y[i], torch.zeros_like(y[i])) for i in range(3) if rows[i] < 0)
        assert_rows_unchanged(pool, before, set(range(6)) - {s for s in rows if s >= 0})
        for s in slots:
            for p, q in zip(pool.get(s), eager.get(s)):
                assert rel_err(p, q) <= 1e-3 or torch.equal(p, q)


def test_cuda_graph_step_refuses_a_cpu_model():
    pool = small_model().state_pool(2)
    with pytest.raises(RuntimeError, match="CUDA|cuda"):
        pool.cuda_graph_step(1)
