"""gla_ext.quantize_: formats, the dequantize-per-call path, state_dict round trip, errors.

The quantized model must equal the float64 reference of its dequantized weights (the
dequantized weight is the format's definition) and stay within a quantization-error bound
of the float model it came from.
"""
from __future__ import annotations

import copy
import io

import pytest
import torch
from torch import nn

import gla_ext
from gla_ext.quantize import QuantizedLinear, dequantize_weight, quantize_weight
from helpers import act_quantized_copy, closest_emulated_step, rel_err, step_emulator
from helpers import dequantized_copy as _dequantized_copy

OPTS = dict(embed_dim=40, hidden_size=64, num_layers=2, num_heads=2, head_dim=32,
            dropout=0.0)


def _model(perturb=0.1, **kw):
    """A GLA model; perturb > 0 makes norms and biases non-trivial. Perturbed models are
    ill-conditioned: float32 vs float64 measured up to 2.2e-5 (forward) and step vs forward up
    to 9.8e-5 over 40 seeds, so the 1e-5 float32 checks use perturb=0 (worst 1.3e-6 / 5.0e-6)."""
    m = gla_ext.GLA.build(**{**OPTS, **kw}).eval()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(perturb * torch.randn_like(p))
    return m


# ---- the formats ------------------------------------------------------------------------

@pytest.mark.parametrize("group", [16, 32])
def test_int8_format(group):
    w = torch.randn(24, 96) * torch.rand(24, 1) * 3
    q, s, m = quantize_weight(w, "int8", group)
    assert q.dtype == torch.int8 and s.dtype == torch.float16 and m is None
    assert q.shape == (24, 96) and s.shape == (24, 96 // group) and q.abs().max() <= 127
    deq = dequantize_weight(q, s, m, "int8", group)
    step = s.float().repeat_interleave(group, 1)
    # round to nearest with the stored (float16) scale: error <= half a step (+ fp16 slack)
    assert ((deq - w).abs() <= 0.5 * step * 1.002 + 1e-7).all()
    assert torch.equal(deq, q.float() * step)


@pytest.mark.parametrize("group", [16, 32, 64])
def test_int4_format_and_fit(group):
    w = torch.randn(20, 128) + torch.randn(20, 1)    # groups not centred on 0
    q, s, m = quantize_weight(w, "int4", group)
    assert q.dtype == torch.uint8 and q.shape == (20, 64) and s.shape == (20, 128 // group)
    assert m.dtype == torch.float16
    # nibble order: column 2j low, 2j + 1 high
    cols = torch.empty(20, 128)
    cols[:, 0::2], cols[:, 1::2] = (q & 15).float(), (q >> 4).float()
    deq = dequantize_weight(q, s, m, "int4", group)
    expect = (cols.view(20, -1, group) * s.float()[..., None] + m.float()[..., None]).view(20, 128)
    assert torch.equal(deq, expect)
    # the least-squares refit is never worse than plain min/max rounding of each group
    wg = w.view(20, -1, group)
    lo, hi = wg.amin(-1), wg.amax(-1)
    s0 = ((hi - lo) / 15).half().float()
    m0 = lo.half().float()
    q0 = ((wg - m0[..., None]) / s0[..., None]).round().clamp(0, 15)
    err0 = (q0 * s0[..., None] + m0[..., None] - wg).square().sum(-1)
    err = (deq.view(20, -1, group) - wg).square().sum(-1)
    assert (err <= err0 * (1 + 1e-6) + 1e-12).all()
    assert err.sum() < 0.97 * err0.sum()     # and it does help overall


def test_constant_and_zero_groups():
    w = torch.zeros(4, 64)
    w[1] = 0.5
    for fmt in ("int8", "int4"):
        q, s, m = quantize_weight(w, fmt, 32)
        deq = dequantize_weight(q, s, m, fmt, 32)
        assert torch.equal(deq[0], w[0]) and torch.equal(deq[2:], w[2:]), fmt   # zeros exact
        if fmt == "int4":    # a constant group is its offset: exact
            assert torch.equal(deq[1], w[1])
        else:                # 127 steps of a float16 scale
            assert (deq[1] - 0.5).abs().max() < 0.5 * 2 ** -10


# ---- GLA models ---------------------------------------------------------------------------

@pytest.mark.parametrize("fmt,group,low_rank", [("int8", None, None), ("int4", 32, None),
                                                ("int4", 64, 16), ("int8", 16, 16)])
def test_gla_forward_and_grads_vs_float64(fmt, group, low_rank):
    model = _model(perturb=0.0, gate_low_rank_dim=low_rank)
    gla_ext.quantize_(model, fmt, group_size=group)
    n_q = sum(isinstance(m, QuantizedLinear) for m in model.modules())
    assert n_q == 2 * (9 + (low_rank is not None))   # q k v gk g o w1 w2 w3 (+ low-rank)
    assert isinstance(model.input_proj, nn.Linear)          # outside the blocks: kept
    ref = _dequantized_copy(model)
    x = torch.randn(2, 12, 40)
    y = model(x, return_sequence=True)
    y_ref = ref(x.double(), return_sequence=True)
    assert rel_err(y, y_ref) < 1e-5
    # gradients: input and every parameter that still trains
    g = torch.randn_like(y)
    xq = x.clone().requires_grad_()
    model.train()   # dropout is 0: train mode changes nothing but autograd use
    (model(xq, return_sequence=True) * g).sum().backward()
    xr = x.double().clone().requires_grad_()
    (ref(xr, return_sequence=True) * g.double()).sum().backward()
    # the float32 model with the dequantized weights: the same computation
    ref32 = _dequantized_copy(model, torch.float32, "auto")
    x32 = x.clone().requires_grad_()
    (ref32(x32, return_sequence=True) * g).sum().backward()
    # float32 backprop through the whole random model: 1e-3 vs float64 (as the float model)
    assert rel_err(xq.grad, xr.grad) < 1e-3
    assert rel_err(xq.grad, x32.grad) < 1e-6
    ref_params, ref32_params = dict(ref.named_parameters()), dict(ref32.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert rel_err(p.grad, ref_params[name].grad) < 1e-3, name
        assert rel_err(p.grad, ref32_params[name].grad) < 1e-6, name
    assert all(not b.requires_grad for n, b in model.named_buffers())


# a kernel error (a wrong scale, a transposed block) costs O(1); no draw's noise excuses that
GROSS_QUANT_ERROR = 0.5


def _shuffled_error_sensitivity(float_model, quantized, x, trials=3):
    """How far the float model's output moves when every quantized weight matrix gets its own
    quantization error (dequantized - float) back in a random order: noise of exactly the
    format's size with no structure. Quantization should cost about that much."""
    deq = dict(_dequantized_copy(quantized, torch.float32, backend="auto").named_modules())
    quantized_names = {n for n, m in quantized.named_modules() if isinstance(m, QuantizedLinear)}
    y0 = float_model(x, return_sequence=True)
    worst = 0.0
    for _ in range(trials):
        noisy = copy.deepcopy(float_model)
        for name, mod in noisy.named_modules():
            if isinstance(mod, nn.Linear) and name in quantized_names:
                err = (deq[name].weight - mod.weight).flatten()
                mod.weight.add_(err[torch.randperm(err.numel())].view_as(mod.weight))
        worst = max(worst, rel_err(noisy(x, return_sequence=True), y0))
    return worst


@pytest.mark.parametrize("fmt,bound", [("int8", 0.03), ("int4", 0.4)])
def test_gla_within_quantization_error_of_float(fmt, bound):
    """Default-initialized model: the quantized forward stays within `bound` of the float model
    (AMD EPYC: int8 median 0.0045 over 400 seeds; int4 median 0.07, worst 0.168 over 100),
    or within 4x what the same-size shuffled noise costs on that draw, for the tail of draws
    whose output is sensitive to any weight noise (int8 up to 0.063 where that noise costs
    0.066); never past GROSS_QUANT_ERROR.
    100 seeds (session 11): error / shuffled-noise cost <= 1.40 (int4), <= 1.33 (int8) with 8
    trials; 3 trials left it up to 3.5 (too noisy an estimate)."""
    model = gla_ext.GLA.build(**OPTS).eval()
    float_model = copy.deepcopy(model)
    gla_ext.quantize_(model, fmt)
    x = torch.randn(2, 12, 40)
    with torch.no_grad():
        err = rel_err(model(x, return_sequence=True), float_model(x, return_sequence=True))
        noise = _shuffled_error_sensitivity(float_model, model, x, trials=8)
    tol = min(GROSS_QUANT_ERROR, max(bound, 4 * noise))
    assert err < tol


def test_gla_step_matches_forward():
    """The fused step (int8 activations in its quantized kernels) equals, token by token, the
    float64 emulation of that math from the same state (near ties resolved:
    helpers.closest_emulated_step), and the emulation stepped through the sequence equals it
    run as a whole-sequence forward."""
    model = gla_ext.quantize_(_model(perturb=0.0), "int4")
    x = torch.randn(3, 9, 40)
    with torch.no_grad():
        full = act_quantized_copy(model)(x.double(), return_sequence=True)
        state = emu_state = None
        emulator = step_emulator(model)
        for t in range(9):
            before = None if state is None else [s.clone() for s in state]
            y, state = model.step(x[:, t], state)
            excess, _, _ = closest_emulated_step(model, x[:, t], before, [y, *state], emulator)
            assert excess < 1, t                   # error / tolerance
            y_emu, emu_state = emulator.step_layers(x[:, t].double(), emu_state)
            assert rel_err(y_emu, full[:, t]) < 1e-12, t


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_state_dict_round_trip_bitwise(fmt):
    model = gla_ext.quantize_(_model(), fmt, group_size=16)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    fresh = gla_ext.GLA.build(**OPTS).eval()
    gla_ext.quantize_(fresh, fmt, group_size=16)
    buf.seek(0)
    fresh.load_state_dict(torch.load(buf))
    x = torch.randn(2, 7, 40)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
        s1, s2 = model.step(x[:, 0]), fresh.step(x[:, 0])
        assert torch.equal(s1[0], s2[0])


def test_bfloat16_model_keeps_format():
    # default init: perturbed random models amplify bf16 rounding chaotically
    model = gla_ext.quantize_(gla_ext.GLA.build(**OPTS).eval(), "int4")
    scales = model.blocks[0].ffn.w1.scales.clone()
    model.to(torch.bfloat16)
    lin = model.blocks[0].ffn.w1
    assert lin.scales.dtype == torch.float16 and torch.equal(lin.scales, scales)
    x = torch.randn(2, 5, 40).bfloat16()
    y = model(x, return_sequence=True)
    assert y.dtype == torch.bfloat16
    # The same computation as a bf16 model holding the dequantized weights (both PyTorch
    # layers: the fused engine's float32 activations would differ by bf16 rounding).
    ref16 = _dequantized_copy(model, torch.bfloat16, "auto")
    assert rel_err(model.forward_layers(x, return_sequence=True),
                   ref16.forward_layers(x, return_sequence=True)) < 1e-3
    # Against float64: bf16 rounding of activations through this random model measured up
    # to 4.2e-2 over seeds 1-12 (the float bf16 model of the same weights does the same),
    # so only a gross error is caught here; the contract's bf16 bound is checked on the ops.
    assert rel_err(y, _dequantized_copy(model)(x.double(), return_sequence=True)) < 1e-1


def _snapshot(model):
    return {k: (v.clone() if isinstance(v, torch.Tensor) else v)
            for k, v in model.state_dict().items()}


def _unchanged(model, snap):
    now = model.state_dict()
    return now.keys() == snap.keys() and all(
        torch.equal(now[k], v) if isinstance(v, torch.Tensor) else now[k] == v
        for k, v in snap.items())


@pytest.mark.parametrize("args,kwargs,match", [
    (("int3",), {}, "format"),
    (("int8",), dict(group_size=64), "group_size"),
    (("int4",), dict(group_size=128), "group_size"),
    (("int4",), dict(group_size=7), "group_size"),
    (("int8",), dict(group_size=0), "group_size"),
    (("int8",), dict(group_size=True), "group_size"),
    (("int8",), dict(group_size=24), "does not divide"),   # hidden 64 % 24
])
def test_bad_arguments_change_nothing(args, kwargs, match):
    model = _model()
    snap = _snapshot(model)
    with pytest.raises(ValueError, match=match):
        gla_ext.quantize_(model, *args, **kwargs)
    assert _unchanged(model, snap)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())


def test_quantizing_twice_and_wrong_model():
    model = gla_ext.quantize_(_model(), "int8")
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="already quantized"):
        gla_ext.quantize_(model, "int4")
    assert _unchanged(model, snap)
    with pytest.raises(ValueError, match="model"):
        gla_ext.quantize_(nn.Linear(4, 4), "int8")


@pytest.mark.parametrize("source", ["float", "int4", "int8_g16"])
def test_mismatched_state_dict_changes_nothing(source):
    model = gla_ext.quantize_(_model(), "int8")
    other = _model()
    if source == "int4":
        gla_ext.quantize_(other, "int4")
    elif source == "int8_g16":
        gla_ext.quantize_(other, "int8", group_size=16)
    snap = _snapshot(model)
    with pytest.raises(ValueError, match="state_dict"):
        model.load_state_dict(other.state_dict())
    assert _unchanged(model, snap)


def test_cuda_dequantizes_per_call():
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    model = gla_ext.quantize_(_model(), "int4")
    ref = _dequantized_copy(model)
    x = torch.randn(2, 16, 40)
    y = model.cuda()(x.cuda(), return_sequence=True)
    assert rel_err(y, ref(x.double(), return_sequence=True)) < 1e-3
