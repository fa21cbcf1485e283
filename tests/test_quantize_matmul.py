"""The engine of QuantizedLinear's per-call product (gla_ext/quant_matmul.py): forced
"float32" and forced "bf16" (x and the dequantized W rounded to bf16, bf16 GEMM, output
widened) against float64 of the dequantized weights, for one layer, a GLA model's prefill and
an fla LM's logits; the switch (module attribute, environment, bad values); "auto"'s choice.
"""
from __future__ import annotations

import pytest
import torch

import gla_ext
from gla_ext import quant_matmul
from gla_ext.quantize import QuantizedLinear
from helpers import dequantized_copy, rel_err

# One product in bf16: x, W and y each rounded to bf16 (2^-9 relative each): measured
# relative (Frobenius) error 3e-3 over 12 draws; the contract's bf16 bound.
BF16_OP_BOUND = 1e-2
# A whole model in bf16 products (2 blocks x 9 products; each rounds its input and output)
# compounds, and these random models amplify it chaotically: GLA model median ~5e-3, worst
# 1.6e-2 over 300 draws (seeds 0-11 and 100-249 x {int8, int4}); fla logits worst 7.6e-3
# over 50. The model check is a gross-error check at 5e-2 (the op check above is the
# contract's); a path that skipped the bf16 rounding fails its lower limit instead.
BF16_MODEL_BOUND = 5e-2
# forced float32: the float32 model of the dequantized weights (test_quantize.py's bound)
FLOAT32_BOUND = 1e-5

OPTS = dict(embed_dim=40, hidden_size=64, num_layers=2, num_heads=2, head_dim=32,
            dropout=0.0)


def _set_mode(model, mode):
    for m in model.modules():
        if isinstance(m, QuantizedLinear):
            m.matmul = mode


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_linear_forced_modes_vs_float64(fmt):
    lin = QuantizedLinear.from_weight(torch.randn(72, 96), fmt, 32, bias=torch.randn(72))
    x = torch.randn(3, 50, 96)
    ref = x.double() @ lin.dequantize(torch.float64).T + lin.bias.double()
    lin.matmul = "float32"
    y32 = lin(x)
    lin.matmul = "bf16"
    y16 = lin(x)
    assert y32.dtype == y16.dtype == torch.float32 and y16.shape == (3, 50, 72)
    assert rel_err(y32, ref) < FLOAT32_BOUND
    err16 = rel_err(y16, ref)
    assert err16 < BF16_OP_BOUND
    assert err16 > 1e-4   # the bf16 path did run (its rounding shows)
    # what it computes: bf16 x and W, the product's bf16 output, float32 bias
    xb, wb = x.bfloat16().double(), lin.dequantize(torch.bfloat16).double()
    expect = (xb @ wb.T).bfloat16().double() + lin.bias.double()
    # within one bf16 ulp of the output (float32 vs float64 accumulation may flip a rounding)
    prod = expect - lin.bias.double()
    assert ((y16.double() - expect).abs() <= 2.0 ** -7 * prod.abs() + 1e-6).all()


def test_bf16_mode_keeps_gradients():
    lin = QuantizedLinear.from_weight(torch.randn(16, 64), "int8", 32,
                                      bias=torch.nn.Parameter(torch.randn(16)))
    lin.matmul = "bf16"
    x = torch.randn(5, 64, requires_grad=True)
    g = torch.randn(5, 16)
    (lin(x) * g).sum().backward()
    w = lin.dequantize(torch.float64)
    assert rel_err(x.grad, g.double() @ w) < BF16_OP_BOUND
    assert torch.allclose(lin.bias.grad, g.sum(0))


def test_env_switch_and_bad_values(monkeypatch):
    lin = QuantizedLinear.from_weight(torch.randn(8, 32), "int4", 32)
    x = torch.randn(4, 32)
    lin.matmul = "bf16"
    forced = lin(x)
    lin.matmul = None
    monkeypatch.setenv(quant_matmul.ENV, "bf16")
    assert torch.equal(lin(x), forced)
    monkeypatch.setenv(quant_matmul.ENV, "float32")
    assert torch.equal(lin(x), torch.nn.functional.linear(x, lin.dequantize()))
    monkeypatch.setenv(quant_matmul.ENV, "fp16")
    with pytest.raises(ValueError, match=quant_matmul.ENV):
        lin(x)
    monkeypatch.delenv(quant_matmul.ENV)
    lin.matmul = "half"
    with pytest.raises(ValueError, match="QuantizedLinear.matmul"):
        lin(x)


def test_auto_follows_the_measured_choice(monkeypatch):
    lin = QuantizedLinear.from_weight(torch.randn(24, 64), "int8", 32)
    lin.matmul = "auto"
    big, small = torch.randn(quant_matmul.AUTO_MIN_ROWS, 64), torch.randn(4, 64)
    asked = []

    def fake(in_f, out_f, answer):
        asked.append((in_f, out_f))
        return answer

    monkeypatch.setattr(quant_matmul, "bf16_faster", lambda i, o: fake(i, o, True))
    lin.matmul = "bf16"
    as_bf16 = lin(big)
    lin.matmul = "auto"
    assert torch.equal(lin(big), as_bf16) and asked == [(64, 24)]
    # few rows, or a non-float32 x: never asks, stays in x's dtype
    assert torch.equal(lin(small), torch.nn.functional.linear(small, lin.dequantize()))
    assert lin(big.double()).dtype == torch.float64 and asked == [(64, 24)]
    monkeypatch.setattr(quant_matmul, "bf16_faster", lambda i, o: fake(i, o, False))
    assert torch.equal(lin(big), torch.nn.functional.linear(big, lin.dequantize()))


def test_probe_is_cached_per_shape_class(monkeypatch):
    monkeypatch.setattr(quant_matmul, "_choice", {})
    a = quant_matmul.bf16_faster(700, 300)
    assert isinstance(a, bool) and len(quant_matmul._choice) == 1
    assert quant_matmul.bf16_faster(600, 400) == a and len(quant_matmul._choice) == 1  # same class
    quant_matmul.bf16_faster(64, 64)
    assert len(quant_matmul._choice) == 2


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_gla_prefill_forced_modes_vs_float64(fmt):
    model = gla_ext.quantize_(gla_ext.GLA.build(**OPTS).eval(), fmt)
    ref = dequantized_copy(model)
    x = torch.randn(2, 40, 40)
    y64 = ref(x.double(), return_sequence=True)
    errs = {}
    for mode in ("float32", "bf16"):
        _set_mode(model, mode)
        with torch.no_grad():
            errs[mode] = rel_err(model(x, return_sequence=True), y64)
    assert errs["float32"] < FLOAT32_BOUND
    assert 1e-4 < errs["bf16"] < BF16_MODEL_BOUND, errs


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_fla_logits_forced_modes_vs_dequantized(fmt):
    """fla LM: the reference is the float32 LM of the dequantized weights (the fla loader has
    no float64; test_quantize_fla checks that reference against the quantized LM at 1e-5)."""
    fla_models = pytest.importorskip("fla_models")
    if fla_models.FLA_ERROR is not None:
        pytest.skip(f"fla not importable: {fla_models.FLA_ERROR}")
    from gla_ext.integrations import fla as gla_fla
    src = fla_models.random_fla_model(num_heads=4, num_kv_heads=2, perturb=0.0)
    lm = gla_fla.load(src)
    gla_ext.quantize_(lm, fmt)
    ref = gla_fla.load(src)
    for name, mod in lm.model.named_modules():
        if isinstance(mod, QuantizedLinear):
            parent, _, attr = name.rpartition(".")
            owner = ref.model.get_submodule(parent) if parent else ref.model
            setattr(owner, attr, mod.dequantize(torch.float32))
    ids = torch.randint(0, fla_models.VOCAB, (2, 40))
    with torch.no_grad():
        logits_ref = ref(ids)
        errs = {}
        for mode in ("float32", "bf16"):
            _set_mode(lm.model, mode)
            errs[mode] = rel_err(lm(ids), logits_ref)
    assert errs["float32"] < FLOAT32_BOUND
    assert 1e-4 < errs["bf16"] < BF16_MODEL_BOUND, errs
