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
from helpers import (ACT_QUANT_KERNEL_BOUND, EMULATION_STEP_BOUND, NearTies,
                     closest_emulated_fla_step, qdot_linear_float64, quantize_activations,
                     record_diagnostic, rel_err)

pytestmark = pytest.mark.skipif(not _ext.loaded(), reason="compiled extension not built")


def _under_isa(isa, query):
    """query() with GLA_EXT_CPU_ISA=isa (the variable restored afterwards)."""
    import os
    old = os.environ.get("GLA_EXT_CPU_ISA")
    os.environ["GLA_EXT_CPU_ISA"] = isa
    try:
        return query()
    finally:
        if old is None:
            del os.environ["GLA_EXT_CPU_ISA"]
        else:
            os.environ["GLA_EXT_CPU_ISA"] = old


# the ISAs this CPU can run (asking for one it lacks gives the best available)
RUNNABLE = [isa for isa in ("generic", "avx2", "avx512")
            if _ext.loaded() and _under_isa(isa, _ext._C.linear_isa) == isa]
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


def test_emulation_near_ties_round_either_way():
    """helpers.NearTies (the emulation's choice where an engine activation may round to the
    other neighbour): d = 1 as above; 2.5002 and -3.4999 sit within 5e-4 steps of a tie,
    1.2 does not; the same (position, value) met again keeps its number."""
    x = torch.tensor([[127.0, 2.5002, -3.4999, 1.2]])
    ties = NearTies()
    assert (quantize_activations(x, 4, ties)[0].flatten() == torch.tensor([127.0, 3, -3, 1])).all()
    quantize_activations(x, 4, ties)                 # a second linear on the same input
    assert ties.found == 2 and ties.flipped_gap == 0
    ties.reset({1})
    assert (quantize_activations(x, 4, ties)[0].flatten() == torch.tensor([127.0, 3, -4, 1])).all()
    ties.reset({0, 1})
    assert (quantize_activations(x, 4, ties)[0].flatten() == torch.tensor([127.0, 2, -4, 1])).all()
    assert 1e-4 < ties.flipped_gap < 5e-4


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
    packed = Decoder(lm.model)
    assert packed.blocks[0].in_proj.lin.isa == isa
    for t in range(4, 12):
        # the same math (int8 activations, integer sums) in float64 inside the float32 step,
        # from the same states, near-tie activations rounded as the packed step rounded them
        before = [s.clone() for s in states]
        logits = packed.step(ids[:, t], states).clone()
        err, ties, _ = closest_emulated_fla_step(lm, ids[:, t], before, [logits, *states])
        record_diagnostic(near_ties=ties)
        assert err < EMULATION_STEP_BOUND, t


# --- VNNI (vpdpbusd) kernels: csrc/cpu/linear_qdot_tile.h with GLA_QDOT_VNNI, picked per packed
# matrix by pick_cpu_vnni (GLA_EXT_CPU_VNNI=auto|off). They run where the CPU has AVX512-VNNI
# (avx512) / AVX-VNNI (avx2), and in the emulated test build (tools/avx512_emulated_check.sh,
# SIMDe) on any AVX2 CPU; elsewhere these tests skip.

# where the quantized kernels run VNNI (GLA_EXT_CPU_VNNI unset or auto)
VNNI_RUNNABLE = [isa for isa in RUNNABLE if _under_isa(isa, _ext._C.linear_vnni)]
VNNI_ISAS = [pytest.param(isa, marks=pytest.mark.skipif(
    isa not in VNNI_RUNNABLE, reason=f"no VNNI for the {isa} kernels here (needs "
    f"{'AVX512-VNNI' if isa == 'avx512' else 'AVX-VNNI'}, or the SIMDe-emulated build: "
    "tools/avx512_emulated_check.sh)")) for isa in ("avx2", "avx512")]
VNNI_BATCHES = (1, 2, 3, 4, 5, 6, 7, 8, 9, 17, 64)
# every group size the quantized tests use; 6 and 2 leave the group (and `in`) not a
# multiple of 4 (zero-padded quads)
VNNI_FORMATS = [("int8", 32), ("int8", 16), ("int8", 6), ("int8", 2),
                ("int4", 64), ("int4", 32), ("int4", 16), ("int4", 6), ("int4", 2)]


def _packed(monkeypatch, q, isa, vnni):
    from gla_ext.cpu_linear import PackedLinear
    monkeypatch.setenv("GLA_EXT_CPU_ISA", isa)
    monkeypatch.setenv("GLA_EXT_CPU_VNNI", "auto" if vnni else "off")
    lin = PackedLinear.from_quantized(q)
    assert lin.isa == isa and lin._impl.vnni == vnni
    return lin


def _integer_qlin(fmt, out, inp, group):
    """A QuantizedLinear with scale 1 and offset 0: the dequantized weight is q itself, drawn
    over the whole range (int8 +-127 included, int4 0 and 15 included)."""
    q = QuantizedLinear(inp, out, fmt, group)
    if fmt == "int8":
        w = torch.randint(-127, 128, (out, inp))
        w[:, ::5] = 127 * torch.sign(torch.randn(out, len(range(0, inp, 5)))).long()
        q.qweight.copy_(w.to(torch.int8))
    else:
        w = torch.randint(0, 16, (out, inp))
        w[:, ::5] = 15
        q.qweight.copy_((w[:, 0::2] | (w[:, 1::2] << 4)).to(torch.uint8))
        q.offsets.zero_()
    q.scales.fill_(1.0)
    return q, w


@pytest.mark.parametrize("isa", VNNI_ISAS)
@pytest.mark.parametrize("fmt,group", VNNI_FORMATS)
def test_vnni_integer_sums_exact(monkeypatch, isa, fmt, group):
    """Integer inputs with max|x| = 127 in every group (d = 1, xq = x) and unit scales: the
    output is the integer sum itself (exact in float32 here), so the VNNI and non-VNNI
    kernels must both give exactly x q^T, extremes (+-127 x +-127) included."""
    out, inp = 37, 3 * group if group > 2 else 10
    q, w = _integer_qlin(fmt, out, inp, group)
    on, off = _packed(monkeypatch, q, isa, True), _packed(monkeypatch, q, isa, False)
    for n in VNNI_BATCHES:
        x = torch.randint(-127, 128, (n, inp)).float()
        x[:, ::group] = 127 * torch.sign(torch.randn(n, inp // group))   # max|x| = 127 per group
        x[:, ::group][x[:, ::group] == 0] = 127
        exact = (x.double() @ w.double().t()).float()
        assert exact.abs().max() < 2 ** 24
        assert torch.equal(off(x), exact), n
        assert torch.equal(on(x), exact), n


@pytest.mark.parametrize("isa", VNNI_ISAS)
@pytest.mark.parametrize("fmt,group", VNNI_FORMATS)
@pytest.mark.parametrize("out,bias", [(37, True), (100, False), (8, True)])
def test_vnni_matches_non_vnni_and_float64(monkeypatch, isa, fmt, group, out, bias):
    """Random weights and inputs: the VNNI kernel's output is bitwise the non-VNNI kernel's of
    the same ISA (the same integer sums, the same float code), for every batch size and output
    tail, and within float32 rounding of the float64 emulation of the math; rows are
    independent (bitwise)."""
    inp = 3 * group if group > 2 else 10
    q = _qlin(fmt, out, inp, group, bias)
    on, off = _packed(monkeypatch, q, isa, True), _packed(monkeypatch, q, isa, False)
    for n in VNNI_BATCHES:
        x = torch.randn(n, inp) * torch.rand(n, 1).add(0.1) * 3
        y = on(x)
        assert torch.equal(y, off(x)), n
        err = rel_err(y, qdot_linear_float64(x, q))
        record_diagnostic(emulation=err)
        assert err < 1e-6, n
        for r in {0, n // 2, n - 1}:
            assert torch.equal(on(x[r:r + 1]), y[r:r + 1]), (n, r)


@pytest.mark.parametrize("isa", VNNI_ISAS)
def test_vnni_non_finite_inputs(monkeypatch, isa):
    """A NaN / inf in a row's group gives that row NaN under VNNI too (through d, as without)."""
    for fmt in ("int8", "int4"):
        q = _qlin(fmt, 20, 64, 32, True)
        on = _packed(monkeypatch, q, isa, True)
        x = torch.randn(4, 64)
        x[1, 5], x[2, 40], x[3] = float("nan"), float("inf"), 0
        y = on(x)
        assert y[1].isnan().all() and y[2].isnan().all()
        assert torch.equal(y[3], q.bias)
        assert rel_err(y[0], qdot_linear_float64(x[:1], q)[0]) < 1e-6
