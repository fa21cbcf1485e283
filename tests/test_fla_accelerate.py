"""gla_ext.integrations.fla.accelerate(): fla's own GLA code, unchanged, on gla_ext kernels.

Compared with gla_ext's own fla loader (an independent re-implementation: checks the norms,
MLP and ops together), with fla's model on its naive reference ops (fla_reference_ops: the
same PyTorch norms, fla's naive recurrence), and with plain torch formulas (losses).
Skipped only when fla / transformers cannot be imported (./run.sh test installs them).
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from helpers import float64_perturbed_copy, rel_err

from fla_models import FLA_ERROR, VOCAB, GLAConfig, GLAForCausalLM, random_fla_model

pytestmark = pytest.mark.skipif(FLA_ERROR is not None, reason=f"fla not importable: {FLA_ERROR}")

from gla_ext.integrations import fla as gla_fla  # noqa: E402
from gla_ext.integrations.fla_cpu_reference import fla_reference_ops  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(autouse=True)
def _off_after_each_test():
    yield
    gla_fla.accelerate(False)


def _model(seed=None, **options):
    """fla's default GLAConfig at a tiny size (fuse_norm / fuse_swiglu / fuse_cross_entropy
    on), every parameter random; in training mode as GLAForCausalLM builds it. seed=None: a
    fresh model per run from the test seed (tests/conftest.py); greedy-token tests pass a
    fixed seed, since a near-tie between two logits would flip a token whatever the kernels."""
    return random_fla_model(seed, **{"num_heads": 2, **options}).train()


def _greedy_loop(model, prompt, n):
    """fla's cached decoding: prefill, then one step per token with past_key_values."""
    with torch.no_grad():
        out = model(prompt, use_cache=True)
        tokens = [prompt]
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(n):
            tokens.append(tok)
            out = model(tok, past_key_values=out.past_key_values, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
    return torch.cat(tokens, 1)


def _check_decode_equals_forward(model, ids, prompt_len):
    """fla's cached decode (prefill prompt_len tokens, then one step per token) gives the
    full forward's logits at every position; returns the full logits."""
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :prompt_len], use_cache=True)
        assert rel_err(out.logits, full[:, :prompt_len]) < 1e-5
        for t in range(prompt_len, ids.shape[1]):
            out = model(ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            assert rel_err(out.logits[:, 0], full[:, t]) < 1e-5, t
    return full


# --- patching and restoring -------------------------------------------------------------

def _fla_snapshot():
    """Every fla module's namespace and every fla class's __dict__, by object identity."""
    mods, classes = {}, {}
    for name, module in list(sys.modules.items()):
        if module is None or not (name == "fla" or name.startswith("fla.")):
            continue
        mods[name] = dict(vars(module))
        for value in vars(module).values():
            if isinstance(value, type) and getattr(value, "__module__", "").startswith("fla"):
                classes[id(value)] = (value, dict(vars(value)))
    return mods, classes, list(sys.meta_path)


def _same(a: dict, b: dict) -> list:
    return [k for k in set(a) | set(b) if k not in a or k not in b or a[k] is not b[k]]


def test_accelerate_patches_every_binding_and_restores_byte_for_byte():
    import fla.layers.gla as fla_gla
    import fla.layers.hgrn2 as fla_hgrn2
    import fla.modules.mlp as fla_mlp
    import fla.ops.gla as fla_ops_gla
    from fla.modules import FusedCrossEntropyLoss
    originals = (fla_ops_gla.chunk_gla, fla_ops_gla.fused_recurrent_gla,
                 fla_ops_gla.fused_chunk_gla, fla_mlp.swiglu_linear)
    mods, classes, meta = _fla_snapshot()
    ce_forward = FusedCrossEntropyLoss.forward
    assert gla_fla.accelerate() is True and gla_fla.is_accelerated()
    for name in ("chunk_gla", "fused_recurrent_gla", "fused_chunk_gla"):
        for module in (fla_gla, fla_hgrn2, fla_ops_gla):
            assert getattr(module, name) not in originals, (module.__name__, name)
    assert fla_gla.chunk_gla is fla_hgrn2.chunk_gla is fla_ops_gla.chunk_gla
    assert fla_mlp.swiglu_linear is not originals[3]
    assert FusedCrossEntropyLoss.forward is not ce_forward
    patched = fla_gla.chunk_gla
    assert gla_fla.accelerate() is True          # twice: harmless, nothing re-wrapped
    assert fla_gla.chunk_gla is patched
    assert gla_fla.accelerate(False) is False and not gla_fla.is_accelerated()
    mods2, classes2, meta2 = _fla_snapshot()
    assert meta2 == meta
    assert mods2.keys() == mods.keys()
    for name in mods:
        assert not _same(mods[name], mods2[name]), name
    for key, (cls, before) in classes.items():
        assert not _same(before, dict(vars(cls))), cls
    assert gla_fla.accelerate(False) is False    # off twice: harmless too
    with gla_fla.accelerated():
        assert fla_gla.chunk_gla not in originals
    assert fla_gla.chunk_gla is originals[0] and not gla_fla.is_accelerated()


def test_modules_imported_later_are_patched_and_restored():
    """An fla module loaded while accelerate() is on binds the adapters; accelerate(False)
    restores it too."""
    import importlib

    import fla.layers as fla_layers
    import fla.layers.hgrn2 as old
    import fla.ops.gla as fla_ops_gla
    original = fla_ops_gla.chunk_gla
    gla_fla.accelerate()
    try:
        del sys.modules["fla.layers.hgrn2"]
        fresh = importlib.import_module("fla.layers.hgrn2")
        assert fresh is not old
        assert fresh.chunk_gla is fla_ops_gla.chunk_gla and fresh.chunk_gla is not original
        gla_fla.accelerate(False)
        assert fresh.chunk_gla is original
    finally:
        sys.modules["fla.layers.hgrn2"] = old
        fla_layers.hgrn2 = old


def test_accelerate_before_importing_fla():
    code = (
        "import sys, warnings, torch\n"
        "warnings.simplefilter('ignore')\n"
        "from gla_ext.integrations import fla as gla_fla\n"
        "assert 'fla' not in sys.modules\n"
        "gla_fla.accelerate()\n"
        "from fla.models import GLAConfig, GLAForCausalLM\n"
        "from fla.layers.gla import chunk_gla\n"
        "assert chunk_gla.__module__.startswith('gla_ext'), chunk_gla.__module__\n"
        "m = GLAForCausalLM(GLAConfig(hidden_size=32, num_hidden_layers=1, num_heads=2,\n"
        "                             vocab_size=50))\n"
        "ids = torch.randint(0, 50, (1, 70))\n"
        "loss = m(ids, labels=ids).loss\n"
        "loss.backward()\n"
        "assert torch.isfinite(loss) and m.lm_head.weight.grad is not None\n"
        "print('ok')\n")
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def test_without_accelerate_fla_fails_on_cpu():
    """The problem accelerate() solves (fla 0.6.0 has only Triton kernels)."""
    model = _model()
    with pytest.raises(Exception):
        model(torch.randint(0, VOCAB, (1, 8)))


# --- the whole model ----------------------------------------------------------------------

@pytest.mark.parametrize("options", [{}, dict(num_heads=4, num_kv_heads=2, clamp_min=-0.1,
                                              fuse_norm=False, fuse_swiglu=False)],
                         ids=["defaults", "gqa_unfused"])
def test_logits_match_loader_and_reference_ops(options):
    model = _model(**options).eval()
    lm = gla_fla.load(model)
    for T in (5, 80):     # fla's recurrent mode up to 64 tokens, chunked above
        ids = torch.randint(0, VOCAB, (2, T))
        with fla_reference_ops(), torch.no_grad():
            ref = model(ids).logits
        with gla_fla.accelerated(), torch.no_grad():
            ours = model(ids).logits
        assert rel_err(ours, lm(ids)) < 1e-5, T
        assert rel_err(ours, ref) < 1e-4, T


# float32 against float32 fails on ill-conditioned draws whatever the kernels (the seed sweep
# found weight gradients 1.06e-4 and input gradients 3.0e-4 apart in 2 and 1 of 25 draws, with
# fla's own float32 run as far from float64 as ours in the draws checked). So both float32 runs are compared with
# the float64 run of fla's reference ops: ours must be within the contract's floor, or within
# REF_FACTOR x fla's own float32 error on that draw (60 seeds: at most 0.48 of that bound,
# benchmarks/results/seed_sweep_fla_vs_float64_60.md).
REF_FACTOR = 4.0
# fla's float32 error is itself a random draw (on some draws ours is 3x it, fla's 16x ours),
# so where the test has it, the bound also takes SENS_FACTOR x how far the float64 run moves
# when its inputs and parameters move by one float32 rounding (float64_perturbed_copy): the
# draw's own conditioning, whatever the kernels. Over 300 draws of each layer test (AMD,
# benchmarks/results/fla_layer_conditioning.md) ours stays <= 0.26 of max(floor, 4 x fla's
# error, 8 x that), while the old bound without it reached 0.76.
SENS_FACTOR = 8.0


def _float32_error_bound(ref32, ref64, floor, perturbed64=None):
    sensitivity = 0.0 if perturbed64 is None else rel_err(perturbed64, ref64)
    return max(floor, REF_FACTOR * rel_err(ref32, ref64), SENS_FACTOR * sensitivity)


def test_training_step_matches_reference_ops():
    """loss (== torch cross entropy of the logits), every parameter gradient and the model
    after an optimizer step equal fla's model run with its reference ops (SGD: its update is
    proportional to the gradient; Adam's first step divides by |grad| and would magnify the
    last bits of near-zero gradients), as far as float32 allows (see REF_FACTOR)."""
    ids = torch.randint(0, VOCAB, (2, 72))
    models = {"ours": _model().train()}
    models["ref"] = copy.deepcopy(models["ours"])
    models["ref64"] = copy.deepcopy(models["ours"]).double()
    losses, logits = {}, {}
    for name, ctx in (("ours", gla_fla.accelerated), ("ref", fla_reference_ops),
                      ("ref64", fla_reference_ops)):
        model = models[name]
        with ctx():
            out = model(ids, labels=ids)
            out.loss.backward()
            losses[name], logits[name] = out.loss.detach(), out.logits.detach()
            torch.optim.SGD(model.parameters(), lr=0.5).step()
    manual = F.cross_entropy(logits["ours"][:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    assert rel_err(losses["ours"], manual) < 1e-6
    assert rel_err(losses["ours"], losses["ref"]) < 1e-5
    ref = dict(models["ref"].named_parameters())
    ref64 = dict(models["ref64"].named_parameters())
    checked = 0
    for name, p in models["ours"].named_parameters():
        assert p.grad is not None, name
        bound = _float32_error_bound(ref[name].grad, ref64[name].grad, 1e-4)
        assert rel_err(p.grad, ref64[name].grad) < bound, name
        bound = _float32_error_bound(ref[name].detach(), ref64[name].detach(), 1e-5)
        assert rel_err(p.detach(), ref64[name].detach()) < bound, name   # after the step
        checked += 1
    assert checked == len(ref64)
    with gla_fla.accelerated():
        assert models["ours"](ids, labels=ids).loss < losses["ours"]   # the step helped


def test_cached_loop_generate_and_loader_agree():
    """20 greedy tokens: fla's cached loop under accelerate() == gla_ext's loader ==
    transformers' generate under accelerate()."""
    model = _model(0, num_heads=4, num_kv_heads=2).eval()     # fixed: token equality
    torch.manual_seed(3)
    prompt = torch.randint(0, VOCAB, (2, 9))
    ours = gla_fla.load(model).generate(prompt, max_new_tokens=20)
    with gla_fla.accelerated():
        loop = _greedy_loop(model, prompt, 20)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            gen = model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                 max_new_tokens=20, do_sample=False, pad_token_id=0)
    assert torch.equal(loop, ours)
    assert torch.equal(gen, ours)


def test_from_pretrained_and_auto_model(tmp_path):
    from transformers import AutoModelForCausalLM
    model = _model(tie_word_embeddings=True).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(tmp_path))
    ids = torch.randint(0, VOCAB, (1, 70))
    expected = gla_fla.load(str(tmp_path))(ids)
    gla_fla.accelerate()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        auto = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
        direct = GLAForCausalLM.from_pretrained(str(tmp_path)).eval()
    assert type(auto) is GLAForCausalLM
    with torch.no_grad():
        assert rel_err(auto(ids).logits, expected) < 1e-5
        assert rel_err(direct(ids).logits, expected) < 1e-5


def test_attention_mask_and_cu_seqlens():
    """Left-padded rows with attention_mask, and packed sequences with cu_seqlens, give each
    sequence's logits as if it ran alone (loss and backward run too)."""
    model = _model().eval()
    lengths = (70, 9)
    seqs = [torch.randint(0, VOCAB, (1, n)) for n in lengths]
    gla_fla.accelerate()
    with torch.no_grad():
        alone = [model(s).logits[0] for s in seqs]
        T = max(lengths)
        ids = torch.zeros(2, T, dtype=torch.int64)
        mask = torch.zeros(2, T, dtype=torch.int64)
        for i, s in enumerate(seqs):
            ids[i, T - s.shape[1]:], mask[i, T - s.shape[1]:] = s[0], 1
        padded = model(ids, attention_mask=mask).logits
        packed_ids = torch.cat(seqs, 1)
        cu = torch.tensor([0, lengths[0], sum(lengths)], dtype=torch.int32)
        packed = model(packed_ids, cu_seqlens=cu).logits[0]
    for i, s in enumerate(seqs):
        n = s.shape[1]
        assert rel_err(padded[i, T - n:], alone[i]) < 1e-5, i
    assert rel_err(packed[:lengths[0]], alone[0]) < 1e-5
    assert rel_err(packed[lengths[0]:], alone[1]) < 1e-5
    model.train()
    loss = model(packed_ids, labels=packed_ids, cu_seqlens=cu).loss
    loss.backward()
    assert torch.isfinite(loss) and model.lm_head.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("mode,fuse_norm", [("chunk", True), ("fused_recurrent", False),
                                            ("fused_chunk", True)])
def test_gated_linear_attention_layer_alone(mode, fuse_norm):
    """fla's GatedLinearAttention in a user's own model: output and every gradient (inputs
    and parameters) equal the layer on fla's reference ops."""
    from fla.layers import GatedLinearAttention
    layer = GatedLinearAttention(mode=mode, hidden_size=64, num_heads=2, fuse_norm=fuse_norm)
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    x = torch.randn(2, 80, 64)
    results = []
    for ctx, (run, xi) in ((gla_fla.accelerated, (copy.deepcopy(layer), x.clone())),
                           (fla_reference_ops, (copy.deepcopy(layer), x.clone())),
                           (fla_reference_ops, (copy.deepcopy(layer).double(), x.double())),
                           (fla_reference_ops, float64_perturbed_copy(layer, x))):
        xi.requires_grad_()
        with ctx():
            o, _, _ = run(xi)
            (o * torch.linspace(-1, 1, o.shape[-1], dtype=o.dtype)).sum().backward()
        results.append((o.detach(), xi.grad, {n: p.grad.clone() for n, p in
                                               run.named_parameters()}))
    # ours, fla float32, float64, float64 with perturbed inputs
    (o1, dx1, g1), (o2, dx2, g2), (o64, dx64, g64), (op, dxp, gp) = results
    assert rel_err(o1, o64) < _float32_error_bound(o2, o64, 1e-4, op)
    assert rel_err(dx1, dx64) < _float32_error_bound(dx2, dx64, 1e-4, dxp)
    for name in g64:
        bound = _float32_error_bound(g2[name], g64[name], 1e-4, gp[name])
        assert rel_err(g1[name], g64[name]) < bound, name


# --- the replaced pieces alone ------------------------------------------------------------

def test_op_adapters_conventions_and_unsupported_arguments():
    import fla.ops.gla as fla_ops_gla
    from gla_ext.reference import naive_recurrent_gla
    gla_fla.accelerate()
    q, k = torch.randn(1, 12, 2, 8), torch.randn(1, 12, 2, 8)
    v, g = torch.randn(1, 12, 2, 16), F.logsigmoid(torch.randn(1, 12, 2, 8)) / 4
    h0 = torch.randn(2, 2, 16, 8)                    # V-first, two packed sequences
    cu = torch.tensor([0, 5, 12])
    ref_o, ref_h = naive_recurrent_gla(q.double(), k.double(), v.double(), g.double(), 0.3,
                                       h0.double().transpose(-1, -2), True, False, cu)
    for op in (fla_ops_gla.chunk_gla, fla_ops_gla.fused_recurrent_gla):
        gate = {"g": g} if op is fla_ops_gla.chunk_gla else {"gk": g}
        o, ht = op(q=q, k=k, v=v, scale=0.3, initial_state=h0, output_final_state=True,
                   state_v_first=True, cu_seqlens=cu, **gate)
        assert rel_err(o, ref_o) < 1e-5 and rel_err(ht, ref_h.transpose(-1, -2)) < 1e-5
    with pytest.raises(NotImplementedError, match="gv"):
        fla_ops_gla.fused_recurrent_gla(q, k, v, g, gv=torch.zeros_like(v))
    with pytest.raises(NotImplementedError, match="use_qk_l2norm"):
        fla_ops_gla.fused_recurrent_gla(q, k, v, g, use_qk_l2norm=True)
    o, _ = fla_ops_gla.fused_recurrent_gla(q, k, v, None)      # no gate: no decay
    assert rel_err(o, naive_recurrent_gla(q, k, v, torch.zeros_like(g))[0]) < 1e-5


@pytest.mark.parametrize("kw", [dict(), dict(label_smoothing=0.1, reduction="sum"),
                                dict(logit_scale=0.5, reduction="none")])
def test_cross_entropy_modules(kw):
    from fla.modules import FusedCrossEntropyLoss, FusedLinearCrossEntropyLoss
    gla_fla.accelerate()
    x, w = torch.randn(10, 16), torch.randn(VOCAB, 16)
    target = torch.randint(0, VOCAB, (10,))
    target[3] = -100
    scale = kw.get("logit_scale", 1.0)
    expected = F.cross_entropy(F.linear(x, w) * scale, target,
                               label_smoothing=kw.get("label_smoothing", 0.0),
                               reduction=kw.get("reduction", "mean"))
    got = FusedCrossEntropyLoss(**kw)(F.linear(x, w), target)
    if kw.get("reduction") == "none":
        assert got.shape == (10,) and got[3] == 0
    assert rel_err(got, expected) < 1e-6
    if kw.get("reduction") != "none":
        fused = FusedLinearCrossEntropyLoss(**kw)(x, target, w)
        assert rel_err(fused, expected) < 1e-6


@pytest.mark.parametrize("window", [None, 6])
def test_attention_layer_alone_matches_softmax_oracle(window):
    """fla's softmax Attention (GQA, rotary, causal, sliding window) on CPU == attention
    written out here with fla's pure-PyTorch rotary_embedding_ref: output and input gradient."""
    from fla.layers.attn import Attention
    from fla.modules.rotary.ops import rotary_embedding_ref
    gla_fla.accelerate()
    layer = Attention(hidden_size=64, num_heads=4, num_kv_heads=2, window_size=window,
                      layer_idx=0)
    B, T, H, D = 2, 20, 4, 16
    x = torch.randn(B, T, 64, requires_grad=True)
    o, _, _ = layer(x)
    cos, sin = layer.rotary._cos_cached[:T], layer.rotary._sin_cached[:T]
    q = rotary_embedding_ref(layer.q_proj(x).view(B, T, H, D), cos, sin)
    k = rotary_embedding_ref(layer.k_proj(x).view(B, T, 2, D), cos, sin)
    k = k.repeat_interleave(2, dim=2)
    v = layer.v_proj(x).view(B, T, 2, D).repeat_interleave(2, dim=2)
    scores = torch.einsum("bthd,bshd->bhts", q, k) * D ** -0.5
    i, j = torch.arange(T).unsqueeze(1), torch.arange(T).unsqueeze(0)
    keep = (j <= i) if window is None else (j <= i) & (j > i - window)
    att = scores.masked_fill(~keep, float("-inf")).softmax(-1)
    ref = layer.o_proj(torch.einsum("bhts,bshd->bthd", att, v).reshape(B, T, H * D))
    assert rel_err(o, ref) < 1e-5
    g = torch.randn_like(o)
    (dx,) = torch.autograd.grad((o * g).sum(), x)
    (dx_ref,) = torch.autograd.grad((ref * g).sum(), x)
    assert rel_err(dx, dx_ref) < 1e-5


def test_hybrid_model_decode_padding_and_training():
    """A GLA config with an `attn` layer: cached decode steps == the full forward,
    left-padded rows == each row alone, and a training step runs."""
    gla_fla.accelerate()          # fla builds the attn layer only with flash-attn's functions
    model = _model(attn={"layers": [1], "num_heads": 2}).eval()
    assert type(model.model.layers[1].attn).__name__ == "Attention"
    ids = torch.randint(0, VOCAB, (2, 20))
    full = _check_decode_equals_forward(model, ids, 12)
    with torch.no_grad():
        short = ids[1:, :13]
        padded = torch.cat([torch.zeros(1, 7, dtype=torch.int64), short], 1)
        mask = torch.cat([torch.zeros(1, 7), torch.ones(1, 13)], 1).to(torch.int64)
        both = model(torch.cat([ids, padded]), attention_mask=torch.cat(
            [torch.ones_like(ids), mask])).logits
        assert rel_err(both[0], full[0]) < 1e-5
        assert rel_err(both[2, 7:], model(short).logits[0]) < 1e-5
    model.train()
    loss = model(ids, labels=ids).loss
    loss.backward()
    assert model.model.layers[1].attn.q_proj.weight.grad.abs().sum() > 0


def test_short_convolution_against_conv1d():
    """fla's ShortConvolution on CPU == torch's grouped conv1d (output and gradients), packed
    sequences == each alone, and decode steps from the final state == the full sequence."""
    from fla.modules import ShortConvolution
    gla_fla.accelerate()
    D, W, T = 16, 4, 10
    conv = ShortConvolution(hidden_size=D, kernel_size=W, bias=True, activation="silu")

    def oracle(x):
        return F.silu(F.conv1d(x.transpose(1, 2), conv.weight, conv.bias, padding=W - 1,
                               groups=D)[..., :x.shape[1]]).transpose(1, 2)

    x = torch.randn(2, T + 3, D)
    xa, xb = (x[:, :T].clone().requires_grad_() for _ in range(2))
    y, final = conv(xa, output_final_state=True)
    ref = oracle(xb)
    assert rel_err(y, ref) < 1e-6
    assert torch.equal(final, x[:, T - W:T].transpose(1, 2))
    g = torch.randn_like(ref)
    ours = torch.autograd.grad((y * g).sum(), (xa, conv.weight, conv.bias))
    theirs = torch.autograd.grad((ref * g).sum(), (xb, conv.weight, conv.bias))
    for a, b in zip(ours, theirs):
        assert rel_err(a, b) < 1e-6
    full = oracle(x)
    cache = final.clone()
    with torch.no_grad():
        for t in range(T, T + 3):
            y_t, cache = conv(x[:, t:t + 1], cache=cache, output_final_state=True)
            assert rel_err(y_t[:, 0], full[:, t]) < 1e-6, t
    packed, _ = conv(torch.cat([x[:1, :T], x[1:, :6]], 1), cu_seqlens=torch.tensor([0, T, T + 6]))
    assert rel_err(packed[0, :T], full[0, :T]) < 1e-6
    assert rel_err(packed[0, T:], oracle(x[1:, :6])[0]) < 1e-6


def test_short_conv_model_decode_equals_forward():
    """use_short_conv=True: each cached decode step's logits == the full forward's."""
    model = _model(use_short_conv=True).eval()
    gla_fla.accelerate()
    ids = torch.randint(0, VOCAB, (2, 20))
    _check_decode_equals_forward(model, ids, 12)
    model.train()
    model(ids, labels=ids).loss.backward()
    assert model.model.layers[0].attn.q_conv1d.weight.grad.abs().sum() > 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_tensors_keep_fla_or_take_gla_ext_ops_when_asked():  # pragma: no cover
    """On CUDA fla's own Triton modules stay; cuda_ops=True routes the GLA ops to gla_ext's
    CUDA kernels: logits agree with fla's own CUDA model (float32 on GPU: 1e-3)."""
    model = _model().cuda().eval()
    ids = torch.randint(0, VOCAB, (2, 80), device="cuda")
    with torch.no_grad():
        plain = model(ids).logits
        with gla_fla.accelerated():
            kept = model(ids).logits
        with gla_fla.accelerated(cuda_ops=True):
            routed = model(ids).logits
    assert rel_err(kept, plain) < 1e-6
    assert rel_err(routed, plain) < 1e-3


def test_bfloat16_model_trains():
    """A bf16 fla model on CPU: logits near float32 logits of the same bf16-rounded weights
    (so only the bf16 computation is measured), a loss and finite gradients for every
    parameter. Fresh model and tokens per run (the test seed)."""
    model = _model(seed=None, perturb=0.0)      # fla's own initialization (see below)
    ids = torch.randint(0, VOCAB, (2, 70))
    gla_fla.accelerate()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
        full = model(ids).logits
    model = model.to(torch.bfloat16)
    out = model(ids, labels=ids)
    out.loss.backward()
    assert out.logits.dtype == torch.bfloat16
    # Every activation of the whole 2-layer model rounded to bf16 (fla's modules and ours).
    # With perturbed random weights this reached 0.0284 in 30 fresh seeds (0.076 against the
    # float32 model of unrounded weights, which the fixed seed this test used to have hid);
    # fla's own initialization is well conditioned (see the sweep in the commit).
    assert rel_err(out.logits.float(), full) < 4e-2
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad.float()).all(), name
