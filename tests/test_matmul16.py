"""Products of float32 activations with 16-bit weights on the CPU (gla_ext/matmul16.py): the
widened product is float32 math on the stored weights, the native one rounds x like a bf16
GEMM, the mode picks between them, and fla LMs with 16-bit weights use it."""
import time

import pytest
import torch
import torch.nn.functional as F

import gla_ext
from gla_ext import matmul16
from gla_ext._timing import clearly_faster
from helpers import rel_err


@pytest.fixture
def forced(monkeypatch):
    def force(mode):
        monkeypatch.setattr(matmul16, "MODE", mode)
    return force


def _float64_product(x, w, b=None):
    y = x.double() @ w.double().t()
    return y if b is None else y + b.double()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
# (scratch in weight rows, MIN_BLOCK_ROWS) -> the blocks' rows: one block; the scratch's 25
# rows; the minimum's 30 rows where the scratch holds fewer
@pytest.mark.parametrize("scratch_rows,min_rows,blocks", [
    (None, None, [70]), (25, 1, [25, 25, 20]), (2, 30, [30, 30, 10])])
def test_widened_product_is_float32_math_on_the_stored_weights(monkeypatch, dtype, scratch_rows,
                                                               min_rows, blocks):
    out_f, in_f = 70, 48
    if scratch_rows is not None:
        monkeypatch.setattr(matmul16, "SCRATCH_FLOATS", scratch_rows * in_f)
        monkeypatch.setattr(matmul16, "MIN_BLOCK_ROWS", min_rows)
    seen, real_mm = [], torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b, **kw: seen.append(b.shape[1]) or real_mm(a, b, **kw))
    x, w, b = torch.randn(2, 5, in_f), torch.randn(out_f, in_f).to(dtype), torch.randn(out_f)
    y = matmul16.widened_linear(x, w, b)
    assert (seen or [out_f]) == blocks
    assert y.shape == (2, 5, out_f) and y.dtype == torch.float32
    ref = _float64_product(x.reshape(-1, in_f), w, b).reshape(2, 5, out_f)
    assert rel_err(y, ref) < 1e-6                 # float32 accuracy: x was not rounded
    # the native product rounds x to the weights' dtype: its error is that rounding's
    assert rel_err(matmul16.native_linear(x, w, b), ref) > 1e-4


def test_widened_product_has_gradients(monkeypatch):
    """With autograd recording, one product instead of the blocks (their out= products
    record no graph): x's gradient is float32 math on the stored weights."""
    monkeypatch.setattr(matmul16, "SCRATCH_FLOATS", 8 * 16)
    monkeypatch.setattr(matmul16, "MIN_BLOCK_ROWS", 1)
    x = torch.randn(3, 16, requires_grad=True)
    w = torch.randn(40, 16).bfloat16()
    y = matmul16.widened_linear(x, w)
    gy = torch.randn_like(y)
    y.backward(gy)
    ref = gy.double() @ w.double()
    assert rel_err(x.grad, ref) < 1e-6
    with torch.no_grad():                         # the blocks again without autograd
        assert rel_err(matmul16.widened_linear(x, w), y.detach()) < 1e-6


def test_modes_reach_their_product(forced):
    x, w = torch.randn(9, 32), torch.randn(40, 32).bfloat16()
    forced("native")
    assert torch.equal(matmul16.linear(x, w), matmul16.native_linear(x, w))
    forced("widened")
    assert torch.equal(matmul16.linear(x, w), matmul16.widened_linear(x, w))


def test_auto_follows_the_measurement(forced, monkeypatch):
    x, w = torch.randn(9, 32), torch.randn(40, 32).bfloat16()
    forced("auto")
    seen = []
    for faster in (True, False):
        monkeypatch.setattr(matmul16, "widened_faster",
                            lambda *args, faster=faster: seen.append(args) or faster)
        want = matmul16.widened_linear if faster else matmul16.native_linear
        assert torch.equal(matmul16.linear(x, w), want(x, w))
    assert seen[0] == (torch.bfloat16, 9, 32, 40)


def test_measurement_is_cached_per_shape_class(monkeypatch):
    monkeypatch.setattr(matmul16, "_choice", {})
    first = matmul16.widened_faster(torch.bfloat16, 100, 40, 60)
    assert len(matmul16._choice) == 1
    assert matmul16.widened_faster(torch.bfloat16, 120, 64, 33) is first   # same class
    matmul16.widened_faster(torch.bfloat16, 300, 64, 33)                   # rows bucket 256
    assert len(matmul16._choice) == 2


def test_other_dtypes_take_the_native_product(forced):
    forced("widened")
    x16, w = torch.randn(4, 8).bfloat16(), torch.randn(6, 8).bfloat16()
    assert torch.equal(matmul16.linear(x16, w), F.linear(x16, w))   # not float32 x
    x, w32 = torch.randn(4, 8), torch.randn(6, 8)
    assert torch.equal(matmul16.linear(x, w32), F.linear(x, w32))   # not a 16-bit weight


def test_bad_mode_names_the_setting(forced, monkeypatch):
    forced(None)
    monkeypatch.setenv(matmul16.ENV, "fast")
    with pytest.raises(ValueError, match=matmul16.ENV):
        matmul16.linear(torch.randn(2, 8), torch.randn(3, 8).bfloat16())
    forced("fast")
    with pytest.raises(ValueError, match="matmul16.MODE"):
        matmul16.linear(torch.randn(2, 8), torch.randn(3, 8).bfloat16())


def test_fla_lm_with_bf16_weights_uses_it(forced, monkeypatch):
    """An fla LM loaded with bf16 weights: widened, its logits are float32 math on the bf16
    weights (the float32 model on the same rounded weights, to float32 accuracy); native,
    they carry the bf16 rounding of every product's input."""
    pytest.importorskip("fla")
    from test_fla_integration import VOCAB, _fla_model

    from gla_ext.integrations import fla as gla_fla
    model = _fla_model(num_heads=4, num_kv_heads=2, perturb=0.0)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    lm32, lm16 = gla_fla.load(model), gla_fla.load(model, dtype=torch.bfloat16)
    ids = torch.randint(0, VOCAB, (2, 20))
    ref = lm32(ids)
    calls = []
    real = matmul16.widened_linear
    monkeypatch.setattr(matmul16, "widened_linear", lambda *a: calls.append(1) or real(*a))
    forced("widened")
    assert rel_err(lm16(ids), ref) < 1e-5 and calls
    forced("native")
    assert 1e-4 < rel_err(lm16(ids), ref) < 3e-2


def test_info_line_says_the_route(forced, monkeypatch):
    import gla_ext.__main__ as cli
    forced(None)
    for value, route in (("native", "bf16 GEMM"), ("widened", "widened to float32")):
        monkeypatch.setenv(matmul16.ENV, value)
        line = cli.bf16_products()
        assert route in line and f"[{matmul16.ENV}={value}]" in line, line
    monkeypatch.setenv(matmul16.ENV, "auto")
    monkeypatch.setattr(matmul16, "widened_faster", lambda *a: True)
    assert "widened to float32" in cli.bf16_products()
    monkeypatch.setenv(matmul16.ENV, "fast")
    assert matmul16.ENV in cli.bf16_products()          # says what is wrong, no traceback


@pytest.mark.skipif(not gla_ext.extension_loaded(), reason="gla_ext._C is not built")
def test_bad_mode_stops_a_bf16_engine_not_a_float32_one(forced, monkeypatch):
    """The engine of a bf16 model reads the mode when it is built: a bad value is an error
    naming the variable, not a silent fallback; a float32 model has no 16-bit products."""
    forced(None)
    monkeypatch.setenv(matmul16.ENV, "fast")
    monkeypatch.setattr(gla_ext.engine_choice, "MODE", "fused")
    opts = dict(embed_dim=16, hidden_size=32, num_layers=1, num_heads=2, head_dim=16)
    model = gla_ext.GLA.build(**opts).eval()
    with torch.no_grad():
        model(torch.randn(1, 5, 16))
        with pytest.raises(ValueError, match=matmul16.ENV):
            model.bfloat16()(torch.randn(1, 5, 16).bfloat16())
        # a quantized engine (bf16 norms, int8 matrices) has no vendor route: not read
        q = gla_ext.quantize_(gla_ext.GLA.build(**opts).eval(), "int8").bfloat16()
        y, _ = q.step(torch.randn(1, 16).bfloat16(), q.init_state(1))
        assert y.shape == (1, 32) and gla_ext.cpu_engine.peek(q).quantized


def _busy(seconds, calls):
    def run():
        calls.append(1)
        t0 = time.thread_time()
        while time.thread_time() - t0 < seconds:
            pass
    return run


@pytest.mark.parametrize("candidate_ms,baseline_ms,faster", [(1, 5, True), (4.5, 5, False),
                                                             (5, 1, False)])
def test_clearly_faster_needs_the_margin(monkeypatch, candidate_ms, baseline_ms, faster):
    """The measured choices (matmul16: native vs widened; quant_matmul: bf16 vs float32) keep
    the float32 route unless the other one wins by the margin; a candidate far behind runs
    once after its warm-up, not three more times."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)   # thread CPU time
    cand, base = [], []
    assert clearly_faster(_busy(candidate_ms / 1e3, cand), _busy(baseline_ms / 1e3, base),
                          1.25) is faster
    assert len(base) == 4 and len(cand) == (2 if candidate_ms > 3 * baseline_ms else 5)
