"""The per-shape choice between the fused CPU engine and the PyTorch layers
(gla_ext.engine_choice), and the PyTorch-only entry points it falls back to."""
import copy

import pytest
import torch

import gla_ext
from gla_ext import GLA
from gla_ext import decode as dec
from gla_ext import engine_choice as choice
from gla_ext import prefill as pf

from helpers import rel_err

pytestmark = pytest.mark.skipif(not gla_ext.extension_loaded(),
                                reason="gla_ext._C is not built (the fused engine needs it)")

SMALL = dict(embed_dim=13, hidden_size=32, num_layers=2, num_heads=2, head_dim=16, dropout=0.0)


@pytest.fixture(autouse=True)
def _auto_mode(monkeypatch):
    monkeypatch.setattr(choice, "MODE", "auto")
    yield
    choice.forget()


def float64_model(model):
    return copy.deepcopy(model).double()


def forced(monkeypatch, fused_s, plain_s):
    """Makes every measurement report these times (both paths still run)."""
    real = choice._measure

    def fake(fused, plain, fused_first=float("inf")):
        real(fused, plain)
        return fused_s, plain_s
    monkeypatch.setattr(choice, "_measure", fake)


def test_pytorch_entry_points_never_touch_the_engine(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("the fused engine was called")
    model = GLA.build(**SMALL).eval()
    x = torch.randn(2, 9, model.embed_dim)
    with torch.no_grad():
        ref, ref_state = float64_model(model)(x.double(), return_sequence=True, return_state=True)
    monkeypatch.setattr(dec, "try_step", boom)
    monkeypatch.setattr(pf, "try_forward", boom)
    with torch.no_grad():
        seq, state = model.forward_layers(x, return_sequence=True, return_state=True)
        y, s = model.step_layers(x[:, 0])
        for t in range(1, x.shape[1]):
            y, s = model.step_layers(x[:, t], s)
    assert rel_err(seq, ref) < 1e-5 and rel_err(y, ref[:, -1]) < 1e-5
    assert all(rel_err(a, r) < 1e-5 and rel_err(b, r) < 1e-5
               for a, b, r in zip(s, state, ref_state))
    monkeypatch.setattr(choice, "MODE", "pytorch")     # GLA.step / forward: the same
    with torch.no_grad():
        assert torch.equal(model(x, return_sequence=True), seq)
        assert torch.equal(model.step(x[:, 0])[0], model.step_layers(x[:, 0])[0])


@pytest.mark.parametrize("kind", ["step", "prefill"])
@pytest.mark.parametrize("fused_wins", [True, False])
def test_the_measured_winner_runs_and_matches_float64(kind, fused_wins, monkeypatch):
    forced(monkeypatch, 1.0 if fused_wins else 2.0, 1.5)
    model = GLA.build(**SMALL).eval()
    mod = dec if kind == "step" else pf
    x = torch.randn(3, 1 if kind == "step" else 20, model.embed_dim)
    with torch.no_grad():
        ref = float64_model(model)(x.double())
        run = (lambda: model.step(x[:, 0])[0]) if kind == "step" else (lambda: model(x))
        first = run()                        # measures, returns the fused result
        assert rel_err(first, ref) < 1e-5
        table = choice.decisions(model)
        assert list(table.values()) == ["fused" if fused_wins else "pytorch"]
        (key,) = table
        k, _, dtype, threads = key
        assert k == kind and dtype == torch.float32 and threads == torch.get_num_threads()
        # the copy is kept only for a winner
        assert mod.is_cached(model) == fused_wins
        calls = []
        real = getattr(mod, "try_step" if kind == "step" else "try_forward")

        def counting(*args):
            calls.append(1)
            return real(*args)
        monkeypatch.setattr(mod, "try_step" if kind == "step" else "try_forward", counting)
        again = run()
    assert len(calls) == (1 if fused_wins else 0)
    assert rel_err(again, ref) < 1e-5
    assert len(choice.decisions(model)) == 1     # measured once per class


def test_classes_are_power_of_two_buckets_per_kind(monkeypatch):
    forced(monkeypatch, 1.0, 2.0)
    model = GLA.build(**SMALL).eval()
    with torch.no_grad():
        for batch in (3, 4, 5):                 # buckets 4, 4, 8
            model.step(torch.randn(batch, model.embed_dim))
        model(torch.randn(2, 30, model.embed_dim))
        model(torch.randn(2, 31, model.embed_dim))   # same class (2, 32)
    keys = sorted((k[0], k[1]) for k in choice.decisions(model))
    assert keys == [("prefill", (2, 32, False)), ("step", (4,)), ("step", (8,))]


def test_large_prefills_are_measured_on_their_first_rows(monkeypatch):
    monkeypatch.setattr(choice, "_PROBE_ROWS", 8)
    monkeypatch.setattr(choice, "_TINY_ROWS", 3)
    monkeypatch.setattr(choice, "_FAR_BEHIND", 1e9)      # never settled by the tiny probe
    forced(monkeypatch, 1.0, 2.0)
    model = GLA.build(**SMALL).eval()
    x = torch.randn(3, 20, model.embed_dim)
    state = [torch.randn_like(s) for s in model.init_state(3)]
    with torch.no_grad():
        ref = float64_model(model)(x.double(), state=[s.double() for s in state])
    shapes = []
    real = pf.try_forward
    monkeypatch.setattr(pf, "try_forward",
                        lambda m, x, *a: shapes.append(tuple(x.shape[:2])) or real(m, x, *a))
    with torch.no_grad():
        y = model(x, state=state)
    assert shapes[0] == (3, 20) and set(shapes[1:]) == {(3, 2)}   # the call, then probes
    assert rel_err(y, ref) < 1e-5


def test_a_plain_path_far_behind_on_a_few_rows_settles_the_choice(monkeypatch):
    monkeypatch.setattr(choice, "_TINY_ROWS", 3)
    monkeypatch.setattr(choice, "_FAR_BEHIND", 0.0)       # any plain time is "far behind"
    model = GLA.build(**SMALL).eval()
    x = torch.randn(2, 20, model.embed_dim)
    with torch.no_grad():
        ref = float64_model(model)(x.double())
    rows = []
    real = model.forward_layers
    monkeypatch.setattr(model, "forward_layers",
                        lambda xs, *a: rows.append(xs.shape[0] * xs.shape[1]) or real(xs, *a))
    with torch.no_grad():
        y = model(x)
    assert rows == [2] and list(choice.decisions(model).values()) == ["fused"]   # [2, 1]
    assert rel_err(y, ref) < 1e-5


def test_autograd_calls_measure_nothing():
    model = GLA.build(**SMALL).eval()
    y, _ = model.step(torch.randn(2, model.embed_dim))   # parameters require grad
    assert y.requires_grad and choice.decisions(model) == {}
    assert not dec.is_cached(model)


def test_pool_step_follows_the_step_class_and_matches_the_layers(monkeypatch):
    forced(monkeypatch, 2.0, 1.0)               # PyTorch wins
    model = GLA.build(**SMALL).eval()
    pool, pool2 = model.state_pool(4), model.state_pool(4)
    slots = [pool.open() for _ in range(3)]
    for _ in slots:
        pool2.open()
    x = torch.randn(3, model.embed_dim)
    taken = []
    real = dec.try_step_pool
    monkeypatch.setattr(dec, "try_step_pool", lambda *a: taken.append(1) or real(*a))
    y = pool.step(x, torch.tensor(slots))
    assert taken == [] and list(choice.decisions(model).values()) == ["pytorch"]
    monkeypatch.setattr(choice, "MODE", "fused")
    y2 = pool2.step(x, torch.tensor(slots))
    assert taken == [1]
    with torch.no_grad():
        ref = float64_model(model)(x.double()[:, None])
    assert rel_err(y, ref) < 1e-5 and rel_err(y2, ref) < 1e-5
    for s in slots:
        assert rel_err(pool.get(s)[0], pool2.get(s)[0]) < 1e-5


def test_bad_mode_is_named():
    model = GLA.build(**SMALL).eval()
    choice.MODE = "fastest"
    with torch.no_grad(), pytest.raises(ValueError, match="engine_choice.MODE"):
        model.step(torch.randn(1, model.embed_dim))


def test_a_far_slower_plain_path_is_run_once():
    import time
    calls = []

    def plain():
        calls.append(1)
        time.sleep(0.06)
    t_fused, t_plain = choice._measure(lambda: None, plain, fused_first=0.001)
    assert calls == [1] and t_plain >= 0.06 and t_fused == 0.001
    calls.clear()
    t_fused, t_plain = choice._measure(lambda: time.sleep(0.03), plain, fused_first=0.03)
    assert len(calls) >= 4 and t_fused < t_plain          # close: measured interleaved
