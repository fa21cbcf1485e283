"""The int8 / int4 packed CPU kernels (csrc/cpu/linear_qdot_impl.h: activations quantized
to int8 per group, integer dot products) against a float64 emulation of exactly that math
(tests/helpers.qdot_linear_float64) and against the dequantized weights in float64 (within
the activation-quantization bound), on every instruction set this CPU runs
(GLA_EXT_CPU_ISA), and the fla decode step on them against that step with the emulated
linears."""
from __future__ import annotations

import warnings

import pytest
import torch

import gla_ext
from gla_ext import _ext
from gla_ext.quantize import QuantizedLinear
from helpers import (ACT_QUANT_KERNEL_BOUND, EMULATION_BOUND, emulating_fla_decoder,
                     qdot_linear_float64, quantize_activations, record_diagnostic, rel_err)

pytestmark = pytest.mark.skipif(not _ext.loaded(), reason="compiled extension not built")


def _isas():
    """The ISAs this CPU can run (asking for one it lacks gives the best available)."""
    import os
    out = []
    for isa in ("generic", "avx2", "avx512"):
        old = os.environ.get("GLA_EXT_CPU_ISA")
        os.environ["GLA_EXT_CPU_ISA"] = isa
        try:
            if _ext._C.linear_isa() == isa:
                out.append(isa)
        finally:
            if old is None:
                del os.environ["GLA_EXT_CPU_ISA"]
            else:
                os.environ["GLA_EXT_CPU_ISA"] = old
    return out


RUNNABLE = _isas()
# every ISA the kernels are built for; the ones this CPU lacks show as skipped (the AVX-512
# kernels run only on an AVX-512 machine; the development AMD EPYC has AVX2 only)
ISAS = [pytest.param(isa, marks=pytest.mark.skipif(isa not in RUNNABLE,
                                                   reason=f"this CPU has no {isa}"))
        for isa in ("generic", "avx2", "avx512")]


def _qlin(fmt, out, inp, group, bias):
    w = torch.randn(out, inp) * torch.rand(out, 1) + 0.3 * torch.randn(out, 1)
    b = torch.randn(out) if bias else None
    return QuantizedLinear.from_weight(w, fmt, group, b)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["int8", "int4"])
@pytest.mark.parametrize("out,inp,group,bias", [(37, 64, 32, True), (16, 96, 16, False),
                                                (100, 128, 64, True), (8, 16, 16, False),
                                                (21, 36, 6, True)])
def test_packed_quantized_vs_float64(monkeypatch, isa, fmt, out, inp, group, bias):
    if fmt == "int8" and group > 32:
        group = 32
    monkeypatch.setenv("GLA_EXT_CPU_ISA", isa)
    from gla_ext.cpu_linear import PackedLinear
    q = _qlin(fmt, out, inp, group, bias)
    lin = PackedLinear.from_quantized(q)
    assert lin.isa == isa and lin._impl.format == fmt and lin._impl.group_size == group
    w64 = q.dequantize(torch.float64)
    for n in (1, 2, 3, 5, 8, 9, 17):
        x = torch.randn(n, inp)
        y = lin(x)
        # the same math (int8 activations per group, integer sums, float scales) in float64:
        # float32 rounding only (measured <= 2.1e-7 over a 50-seed sweep)
        err_emu = rel_err(y, qdot_linear_float64(x, q))
        assert err_emu < 1e-6, n
        # the format's definition (dequantized weights, float activations): the activations'
        # 8-bit rounding, about max|x| / 254 per input; a packing mistake is 1e-1 or more
        ref = x.double() @ w64.t() + (q.bias.double() if bias else 0)
        err_deq = rel_err(y, ref)
        record_diagnostic(emulation=err_emu, act_quant=err_deq)
        assert err_deq < ACT_QUANT_KERNEL_BOUND, n
        buf = torch.full((n, out), float("nan"))
        lin(x, out=buf)
        assert torch.equal(buf, y)
    # bytes streamed: per group the weights (k padded to a multiple of 4) and the float16
    # scales (int4: and offsets) of the padded panels
    nr, g4 = lin._impl.panel_width, -(-group // 4) * 4
    per_group = g4 * (1 if fmt == "int8" else 0.5) + (2 if fmt == "int8" else 4)
    assert lin.weight_bytes == -(-out // nr) * nr * (inp // group) * per_group


@pytest.mark.parametrize("fmt,group", [("int8", 32), ("int8", 6), ("int4", 64), ("int4", 6)])
def test_packed_quantized_isas_agree(monkeypatch, fmt, group):
    """Every ISA rounds the activations and sums the integer products identically; only the
    float32 rounding of the per-group scale FMA may differ (generic has no FMA)."""
    from gla_ext.cpu_linear import PackedLinear
    q = _qlin(fmt, 45, 192, group, True)
    x = torch.randn(9, 192)
    ys = {}
    for isa in RUNNABLE:
        monkeypatch.setenv("GLA_EXT_CPU_ISA", isa)
        ys[isa] = PackedLinear.from_quantized(q)(x)
    for isa, y in ys.items():
        record_diagnostic(isa_diff=rel_err(y, ys["generic"]))
        assert rel_err(y, ys["generic"]) < 1e-6, isa


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_packed_quantized_rows_are_independent(fmt):
    """Activations are quantized per row: a row's result does not depend on the other rows
    of the call (bitwise), so batching decode requests changes nothing."""
    from gla_ext.cpu_linear import PackedLinear
    q = _qlin(fmt, 70, 128, 32, True)
    lin = PackedLinear.from_quantized(q)
    x = torch.randn(11, 128)
    x[3] *= 1e3                                   # a row with a much larger scale
    full = lin(x)
    for r in (0, 3, 10):
        assert torch.equal(lin(x[r:r + 1]), full[r:r + 1]), r
    assert torch.equal(lin(x[4:9]), full[4:9])


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_packed_quantized_non_finite_and_zero_inputs(fmt):
    """A NaN / inf in a row's group makes that row's outputs NaN (not a silently finite
    number); a zero row gives the bias; other rows are unaffected."""
    from gla_ext.cpu_linear import PackedLinear
    q = _qlin(fmt, 20, 64, 32, True)
    lin = PackedLinear.from_quantized(q)
    x = torch.randn(4, 64)
    x[1, 5] = float("nan")
    x[2, 40] = float("inf")
    x[3] = 0
    y = lin(x)
    assert y[1].isnan().all() and y[2].isnan().all()
    assert torch.equal(y[3], q.bias)
    assert rel_err(y[0], qdot_linear_float64(x[:1], q)[0]) < 1e-6


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_activation_rounding_ties_to_even(fmt):
    """Exact ties (max|x| = 127 gives d = 1): the kernels round half to even like the
    emulation (a half-away rounding would move 0.5, 2.5, -0.5 and 64.5 by one step)."""
    from gla_ext.cpu_linear import PackedLinear
    x = torch.tensor([[127.0, 0.5, 1.5, 2.5, -0.5, -1.5, 64.5, 3.25]])
    assert (quantize_activations(x, 8)[0].flatten() ==
            torch.tensor([127.0, 0, 2, 2, 0, -2, 64, 3])).all()
    q = _qlin(fmt, 16, 8, 8, False)
    y = PackedLinear.from_quantized(q)(x)
    assert rel_err(y, qdot_linear_float64(x, q)) < 1e-6
    away = torch.tensor([[127.0, 1, 2, 3, -1, -2, 65, 3]])   # the ties rounded half away
    assert rel_err(y, qdot_linear_float64(away, q)) > 1e-4


def test_packed_quantized_bad_input():
    q = _qlin("int4", 8, 32, 16, False)
    with pytest.raises(ValueError, match="offsets"):
        _ext._C.PackedLinear(q.qweight, q.scales, None, 16)
    with pytest.raises(ValueError, match="group_size"):
        _ext._C.PackedLinear(q.qweight, q.scales, q.offsets, 6)
    with pytest.raises(ValueError, match="scales"):
        _ext._C.PackedLinear(q.qweight, q.scales.float(), q.offsets, 16)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_fla_decode_step_packed_vs_dequantized(monkeypatch, isa, fmt):
    fla_models = pytest.importorskip("fla.models")
    from gla_ext.integrations import fla as gla_fla
    from gla_ext.integrations.fla_decode import Decoder
    monkeypatch.setenv("GLA_EXT_CPU_ISA", isa)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        src = fla_models.GLAForCausalLM(fla_models.GLAConfig(
            hidden_size=64, num_hidden_layers=2, vocab_size=97, num_heads=4)).eval()
    lm = gla_ext.quantize_(gla_fla.load(src), fmt)
    ids = torch.randint(0, 97, (3, 12))
    _, states = lm.prefill(ids[:, :4])
    ref_states = [s.clone() for s in states]
    packed, emulated = Decoder(lm.model), emulating_fla_decoder(lm)
    assert packed.blocks[0].in_proj.lin.isa == isa
    for t in range(4, 12):
        a = packed.step(ids[:, t], states).clone()
        b = emulated.step(ids[:, t], ref_states)
        # the same math (int8 activations, integer sums) in float64 inside the float32 step
        record_diagnostic(emulation=rel_err(a, b))
        assert rel_err(a, b) < EMULATION_BOUND, t
