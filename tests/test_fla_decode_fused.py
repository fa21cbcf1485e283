"""The fla decode step on the engine's compiled row math (gla_ext._C.StepRows,
Decoder(fused=...)): the attention-core op against a float64 PyTorch version of its math on
every CPU path here, the whole step against the same step on torch ops (the same packed
products) and against fla's own model in float64, for the options the row math handles, and
its errors. The quantized steps are checked by test_quantize_fla / test_quantize_kernels,
which run lm.decoder() (the fused step wherever it applies)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import gla_ext
from helpers import rel_err
from test_prefill_cpu import supported_isas

pytestmark = pytest.mark.skipif(not gla_ext.extension_loaded(), reason="gla_ext._C is not built")


def _attention_float64(proj, gk, states, cols, H, w, normalizer, clamp, scale, eps):
    """The op's math on float64 copies: (o [rows, H * V], new states)."""
    q_col, k_col, v_col, r_col = cols
    rows, Hkv, K, V = states.shape
    G = H // Hkv
    p, S = proj.double(), states.double().clone()
    q = p[:, q_col:q_col + H * K].view(rows, Hkv, G, K)
    k = p[:, k_col:k_col + Hkv * K].view(rows, Hkv, K, 1)
    v = p[:, v_col:v_col + Hkv * V].view(rows, Hkv, 1, V)
    logd = F.logsigmoid(gk.double()).view(rows, Hkv, K, 1) / normalizer
    if clamp is not None:
        logd = logd.clamp_min(clamp)
    S = logd.exp() * S + k * v
    o = (scale * q) @ S                                            # [rows, Hkv, G, V]
    o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + eps)
    if w is not None:
        o = o * w.double()
    o = o.reshape(rows, H * V)
    if r_col >= 0:
        o = o * F.silu(p[:, r_col:r_col + H * V])
    return o, S


# (rows, H, Hkv, K, V): a tail of columns under one vector (V 13), blocks of 8 + 1 vectors
# (V 72 on AVX2), GQA / MQA, one row
SHAPES = [(3, 4, 2, 5, 13), (2, 2, 2, 16, 72), (1, 3, 1, 64, 64), (4, 2, 1, 8, 24)]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("variant", ["plain", "clamp_no_weight_no_gate"])
def test_attention_rows_vs_float64_on_every_isa(monkeypatch, shape, variant):
    rows, H, Hkv, K, V = shape
    clamp = -0.3 if variant != "plain" else None
    gate = variant == "plain"
    # proj: q | k | v | r | 3 unused columns, as a row range of a wider buffer
    widths = [H * K, Hkv * K, Hkv * V, H * V if gate else 0]
    cols = [sum(widths[:i]) for i in range(4)]
    cols[3] = cols[3] if gate else -1
    proj = torch.randn(rows, sum(widths) + 3 + 7)[:, 7:]
    gk = torch.randn(rows, Hkv * K) * 3
    w = torch.randn(V) if variant == "plain" else None
    states = torch.randn(rows, Hkv, K, V)
    scale, eps = K ** -0.5, 1e-6
    o_ref, s_ref = _attention_float64(proj, gk, states, cols, H, w, 16.0, clamp, scale, eps)
    for isa in supported_isas():
        monkeypatch.setenv("GLA_EXT_CPU_ISA", isa)
        ops = gla_ext._ext._C.StepRows()
        assert ops.isa == isa
        S, o = states.clone(), torch.empty(rows, H * V)
        ops.attention(proj, gk, S, o, *cols, H, w, 16.0, clamp, scale, eps)
        assert rel_err(o, o_ref) < 1e-5, isa
        assert rel_err(S, s_ref) < 1e-6, isa


def test_norm_and_swiglu_rows():
    ops = gla_ext._ext._C.StepRows()
    x, w = torch.randn(3, 37), torch.randn(37)
    out = torch.empty(3, 37)
    ops.rms_norm(x, w, 1e-5, out)
    assert rel_err(out, F.rms_norm(x.double(), (37,), w.double(), 1e-5)) < 1e-6
    ops.rms_norm(x, None, 1e-5, x)                      # in place, no weight
    assert rel_err(x, out / w) < 1e-5
    u, act = torch.randn(2, 2 * 19), torch.empty(2, 19)
    ops.swiglu(u, act)
    assert rel_err(act, F.silu(u[:, :19].double()) * u[:, 19:].double()) < 1e-6


def test_attention_rows_threads_bitwise():
    # 12 (row, kv head) tasks, each a [128, 128] state: step_rows.cpp's grain (2^16 floats of
    # state per thread at least) is 4 tasks, so 2 threads split them
    rows, H, Hkv, K, V = 6, 4, 2, 128, 128
    assert rows * Hkv > (1 << 16) // (K * V)
    proj = torch.randn(rows, 2 * H * K + 2 * H * V)
    gk, states = torch.randn(rows, Hkv * K), torch.randn(rows, Hkv, K, V)
    args = (0, H * K, H * K + Hkv * K, H * K + Hkv * (K + V), H, None, 16.0, None, 0.1, 1e-6)
    results = []
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            S, o = states.clone(), torch.empty(rows, H * V)
            gla_ext._ext._C.StepRows().attention(proj, gk, S, o, *args)
            results.append((S, o))
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(*results))


def test_attention_rows_errors():
    ops = gla_ext._ext._C.StepRows()
    proj, gk = torch.randn(2, 40), torch.randn(2, 8)
    states, o = torch.randn(2, 2, 4, 6), torch.empty(2, 12)
    ok = dict(q_col=0, k_col=8, v_col=16, r_col=-1, num_heads=2, norm_weight=None,
              gate_normalizer=16.0, clamp_min=None, scale=0.5, eps=1e-6)
    ops.attention(proj, gk, states.clone(), o, **ok)
    shared = torch.randn(200)
    bad = [(dict(states=states.transpose(2, 3)), "states"),
           (dict(num_heads=3), "num_heads"),
           (dict(v_col=30), "v columns"),
           (dict(r_col=35), "output gate"),
           (dict(gk=torch.randn(2, 9)), "gk"),
           (dict(o=torch.empty(2, 12, dtype=torch.float64)), "o must be"),
           (dict(states=torch.randn(2, 2, 0, 6)), "K, V >= 1"),
           (dict(o=proj[:, :12]), "o must not overlap proj"),
           (dict(proj=shared[:80].view(2, 40), states=shared[50:146].view(2, 2, 4, 6)),
            "states must not overlap proj"),
           (dict(norm_weight=torch.ones(5)), "norm_weight"),
           (dict(gate_normalizer=0.0), "gate_normalizer")]
    for change, match in bad:
        args = dict(proj=proj, gk=gk, states=states, o=o, **ok)
        args.update(change)
        with pytest.raises(ValueError, match=match):
            ops.attention(**args)


def test_packed_product_accumulates_and_reads_row_ranges():
    from gla_ext.cpu_linear import PackedLinear
    lin = PackedLinear(torch.randn(30, 16))._impl
    wide = torch.randn(4, 25)
    x = wide[:, 5:21]                                   # rows 25 floats apart
    y = lin.forward(x)
    assert torch.equal(y, lin.forward(x.contiguous()))
    base = torch.randn(4, 30)
    acc = base.clone()
    lin.forward(x, acc, True)
    assert torch.equal(acc, base + y)
    with pytest.raises(ValueError, match="accumulate needs out"):
        lin.forward(x, None, True)
    buf = torch.randn(300)
    with pytest.raises(ValueError, match="overlap"):      # out starts inside x's rows
        lin.forward(buf[:64].view(4, 16), buf[40:160].view(4, 30))
    one = torch.randn(16, 1).t()                          # one row, strides (1, 1)
    assert torch.equal(lin.forward(one), lin.forward(one.contiguous().clone()))


def test_norm_and_swiglu_rows_overlap():
    ops = gla_ext._ext._C.StepRows()
    buf = torch.randn(80)
    with pytest.raises(ValueError, match="out must be x itself or not overlap"):
        ops.rms_norm(buf[:40].view(2, 20), None, 1e-6, buf[10:50].view(2, 20))
    with pytest.raises(ValueError, match="out must not overlap u"):
        ops.swiglu(buf[:40].view(2, 20), buf[:20].view(2, 10))


# ---- the whole step -----------------------------------------------------------------------

fla_models = pytest.importorskip("fla_models")
if fla_models.FLA_ERROR is not None:
    pytest.skip(f"fla not importable: {fla_models.FLA_ERROR}", allow_module_level=True)
from fla_models import VOCAB, random_fla_model  # noqa: E402

from gla_ext.integrations import fla as gla_fla  # noqa: E402
from gla_ext.integrations.fla_cpu_reference import fla_reference_ops  # noqa: E402
from gla_ext.integrations.fla_decode import Decoder  # noqa: E402

OPTIONS = {
    "gqa_clamp": dict(num_heads=4, num_kv_heads=2, clamp_min=-0.2),
    "mqa_expand_k1": dict(num_heads=4, num_kv_heads=1, expand_k=1.0),
    "no_output_gate": dict(num_heads=2, use_output_gate=False),
    "norm_without_weight": dict(num_heads=2, elementwise_affine=False),
    "expand_v_half": dict(num_heads=4, expand_v=0.5, intermediate_size=80),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("name", OPTIONS)
def test_fused_step_vs_torch_ops_and_fla_float64(name, dtype):
    """From the same prefilled states: every step's logits and states equal the torch-op
    step's (float32 rounding) and fla's float64 model on the same (bf16-rounded) weights."""
    model = random_fla_model(None, 64, 2, **OPTIONS[name])
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(dtype).float())
    lm = gla_fla.load(model, dtype=dtype)
    ids = torch.randint(0, VOCAB, (3, 20))
    with fla_reference_ops(), torch.no_grad():
        ref = model.double()(ids).logits
    _, states = lm.prefill(ids[:, :8])
    torch_states = [st.clone() for st in states]
    fused, torch_ops = Decoder(lm.model), Decoder(lm.model, fused=False)
    assert fused.rows is not None and torch_ops.rows is None
    for t in range(8, 20):
        y = fused.step(ids[:, t], states).clone()
        assert rel_err(y, torch_ops.step(ids[:, t], torch_states)) < 1e-5, t
        assert rel_err(y, ref[:, t]) < 1e-4, t
    assert all(rel_err(a, b) < 1e-5 for a, b in zip(states, torch_states))


def test_fused_step_from_state_views():
    """States that are views (here slices of one [layers, B, ...] block, transposed back)
    advance in place like contiguous ones."""
    lm = gla_fla.load(random_fla_model(None, 64, 2, num_heads=4, num_kv_heads=2))
    ids = torch.randint(0, VOCAB, (2, 6))
    _, states = lm.prefill(ids[:, :5])
    block = torch.stack([st.transpose(2, 3) for st in states]).contiguous()
    views = [block[i].transpose(2, 3) for i in range(len(states))]
    assert not views[0].is_contiguous()
    dec = lm.decoder()
    y = dec.step(ids[:, 5], states).clone()
    assert torch.equal(dec.step(ids[:, 5], views), y)
    assert all(torch.equal(a, b) for a, b in zip(views, states))


def test_fused_needs_packed_float32_cpu_products():
    lm = gla_fla.load(random_fla_model(None, 64, 1, num_heads=2))
    assert lm.decoder().rows is not None                  # the default where it applies
    assert Decoder(lm.model, packed=False).rows is None   # torch products: torch ops
    with pytest.raises(ValueError, match="fused=True"):
        Decoder(lm.model, packed=False, fused=True)
