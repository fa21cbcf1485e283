"""The chunked CPU kernels (torch.ops.gla_ext.chunk_fwd / chunk_bwd) against the float64 reference.

Each case draws fresh random inputs, runs the ops directly (no autograd wrapper) and compares
the output, the final state and every gradient (q, k, v, g, initial state, with a gradient
arriving on the final state) to naive_recurrent_gla differentiated by autograd in float64.
Error is ||x - ref|| / ||ref||; the bounds are the CPU tolerances of docs/design.md "Numerics".
"""
import pytest
import torch
import torch.nn.functional as F

try:
    import gla_ext._C  # noqa: F401  (registers torch.ops.gla_ext)
    HAVE_EXT = True
except ImportError:
    HAVE_EXT = False

from gla_ext.reference import naive_recurrent_gla

pytestmark = pytest.mark.skipif(not HAVE_EXT, reason="gla_ext._C is not built")

TOL = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 5e-3, torch.float64: 1e-10}


def rel_err(x, ref):
    x, ref = x.detach().double(), ref.detach().double()
    assert torch.isfinite(x).all(), "non-finite values in the kernel's result"
    denom = ref.norm().item()
    return (x - ref).norm().item() / (denom if denom > 0 else 1.0)


def make_gates(shape, normalizer, special, dtype):
    g = F.logsigmoid(torch.randn(shape, dtype=torch.float64)) / normalizer
    if special == "mixed":  # full forget, near-full forget and no decay, scattered
        u = torch.rand(shape)
        g[u < 0.1] = float("-inf")
        g[(u >= 0.1) & (u < 0.2)] = -1e4
        g[(u >= 0.2) & (u < 0.35)] = 0.0
    elif special == "zero":
        g.zero_()
    elif special == "-inf":
        g.fill_(float("-inf"))
    return g.to(torch.float64 if dtype == torch.float64 else torch.float32)


def check(B, T, H, K, V, dtype=torch.float32, normalizer=1.0, special=None, cu=None,
          with_h0=True, with_dht=True, chunk_size=64):
    N = B if cu is None else len(cu) - 1
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    q = torch.randn(B, T, H, K).to(dtype)
    k = torch.randn(B, T, H, K).to(dtype)
    v = torch.randn(B, T, H, V).to(dtype)
    g = make_gates((B, T, H, K), normalizer, special, dtype)
    h0 = torch.randn(N, H, K, V, dtype=acc) if with_h0 else None
    do = torch.randn(B, T, H, V).to(dtype)
    dht = torch.randn(N, H, K, V, dtype=acc) if with_dht else None
    cu_t = None if cu is None else torch.tensor(cu, dtype=torch.int64)
    scale = K ** -0.5

    leaves = [None if x is None else x.detach().double().requires_grad_()
              for x in (q, k, v, g, h0)]
    o_ref, ht_ref = naive_recurrent_gla(*leaves[:4], scale=scale, initial_state=leaves[4],
                                        output_final_state=True, cu_seqlens=cu_t)
    loss = (o_ref * do.double()).sum()
    if dht is not None:
        loss = loss + (ht_ref * dht.double()).sum()
    loss.backward()

    o, ht = torch.ops.gla_ext.chunk_fwd(q, k, v, g, h0, cu_t, scale, chunk_size)
    dq, dk, dv, dg, dh0 = torch.ops.gla_ext.chunk_bwd(q, k, v, g, do, dht, h0, cu_t, scale,
                                                     chunk_size)
    assert o.dtype == dtype and o.shape == (B, T, H, V)
    assert ht.dtype == acc and ht.shape == (N, H, K, V)
    assert dq.dtype == dtype and dv.dtype == dtype and dg.dtype == acc
    tol = TOL[dtype]
    errors = {"o": rel_err(o, o_ref), "ht": rel_err(ht, ht_ref),
              "dq": rel_err(dq, leaves[0].grad), "dk": rel_err(dk, leaves[1].grad),
              "dv": rel_err(dv, leaves[2].grad), "dg": rel_err(dg, leaves[3].grad)}
    if with_h0:
        errors["dh0"] = rel_err(dh0, leaves[4].grad)
    else:  # dh0 is always written: the gradient of a zero initial state
        errors["dh0"] = rel_err(dh0, _grad_of_zero_h0(q, k, v, g, do, dht, cu_t, scale))
    bad = {name: err for name, err in errors.items() if not err <= tol}
    assert not bad, f"relative errors above {tol}: {bad}"
    return errors


def _grad_of_zero_h0(q, k, v, g, do, dht, cu_t, scale):
    N = q.shape[0] if cu_t is None else len(cu_t) - 1
    h0 = torch.zeros(N, q.shape[2], q.shape[3], v.shape[3], dtype=torch.float64,
                     requires_grad=True)
    o, ht = naive_recurrent_gla(q.double(), k.double(), v.double(), g.double(), scale=scale,
                                initial_state=h0, output_final_state=True, cu_seqlens=cu_t)
    loss = (o * do.double()).sum()
    if dht is not None:
        loss = loss + (ht * dht.double()).sum()
    loss.backward()
    return h0.grad


@pytest.mark.parametrize("normalizer", [0.1, 1.0, 16.0])
@pytest.mark.parametrize("T", [1, 37, 200])
def test_float32_gates_and_lengths(normalizer, T):
    check(2, T, 2, 64, 64, normalizer=normalizer)


@pytest.mark.parametrize("K,V", [(60, 100), (100, 60), (128, 128), (256, 60), (60, 256)])
def test_float32_head_sizes(K, V):
    check(1, 130, 2, K, V, normalizer=1.0)


@pytest.mark.parametrize("special", ["mixed", "zero", "-inf"])
@pytest.mark.parametrize("normalizer", [0.1, 16.0])
def test_extreme_gates(special, normalizer):
    check(2, 150, 2, 60, 100, normalizer=normalizer, special=special)


@pytest.mark.parametrize("with_h0,with_dht", [(False, False), (False, True), (True, False)])
def test_optional_states(with_h0, with_dht):
    check(2, 90, 2, 32, 48, with_h0=with_h0, with_dht=with_dht)


@pytest.mark.parametrize("cu", [[0, 50, 50, 137, 200], [0, 0, 200], [0, 1, 65, 200, 200]])
def test_packed_sequences(cu):
    check(1, 200, 2, 60, 100, normalizer=1.0, cu=cu)


@pytest.mark.parametrize("chunk_size", [0, 16, 37, 128])
def test_chunk_sizes(chunk_size):
    check(1, 200, 2, 64, 64, normalizer=0.1, chunk_size=chunk_size)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("normalizer", [0.1, 16.0])
def test_other_dtypes(dtype, normalizer):
    check(2, 100, 2, 60, 100, dtype=dtype, normalizer=normalizer)


def test_float64_special_gates():
    check(1, 120, 2, 32, 48, dtype=torch.float64, normalizer=0.1, special="mixed",
          cu=[0, 60, 60, 120])


def test_value_tiles():
    # one (sequence, head) pair and a wide V: the forward splits V into column tiles
    check(1, 150, 1, 64, 256, normalizer=1.0)
    check(1, 150, 1, 100, 100, normalizer=0.1, with_h0=False)


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_instruction_sets(isa, monkeypatch):
    # GLA_EXT_CPU_ISA forces one compiled copy (the best available one if the CPU lacks it)
    monkeypatch.setenv("GLA_EXT_CPU_ISA", isa)
    check(2, 100, 2, 60, 100, normalizer=0.1, special="mixed")
    check(1, 70, 2, 32, 48, dtype=torch.float64, normalizer=1.0)
    check(1, 70, 2, 32, 48, dtype=torch.bfloat16, normalizer=1.0, with_h0=False)
    check(1, 200, 4, 64, 64, normalizer=16.0)   # the benchmark's shape class, several chunks


def test_no_tokens():
    # every sequence empty: ht = h0, dh0 = dht, nothing else to compute
    h0 = torch.randn(2, 2, 8, 8)
    dht = torch.randn(2, 2, 8, 8)
    q = torch.randn(1, 0, 2, 8)
    v = torch.randn(1, 0, 2, 8)
    g = torch.zeros(1, 0, 2, 8)
    cu = torch.tensor([0, 0, 0])
    o, ht = torch.ops.gla_ext.chunk_fwd(q, q, v, g, h0, cu, 0.5, 64)
    assert o.shape == (1, 0, 2, 8) and torch.equal(ht, h0)
    grads = torch.ops.gla_ext.chunk_bwd(q, q, v, g, v, dht, h0, cu, 0.5, 64)
    assert torch.equal(grads[4], dht)
    _, ht = torch.ops.gla_ext.chunk_fwd(q, q, v, g, None, cu, 0.5, 64)
    assert torch.equal(ht, torch.zeros_like(h0))
    grads = torch.ops.gla_ext.chunk_bwd(q, q, v, g, v, None, None, cu, 0.5, 64)
    assert torch.equal(grads[4], torch.zeros_like(h0))


@pytest.mark.parametrize("isa", ["generic", "avx2", "avx512"])
def test_gates_exact_at_the_extremes(isa, monkeypatch):
    # g = 0 everywhere is plain linear attention; g = -inf everywhere keeps only k_t v_t
    monkeypatch.setenv("GLA_EXT_CPU_ISA", isa)
    B, T, H, K, V = 1, 100, 1, 16, 16
    q, k, v = torch.randn(B, T, H, K), torch.randn(B, T, H, K), torch.randn(B, T, H, V)
    h0 = torch.randn(B, H, K, V)
    o, ht = torch.ops.gla_ext.chunk_fwd(q, k, v, torch.zeros(B, T, H, K), h0, None, 1.0, 64)
    kv = torch.einsum("bthk,bthv->bthkv", k.double(), v.double()).cumsum(1) + h0.double()[:, None]
    o_lin = torch.einsum("bthk,bthkv->bthv", q.double(), kv)
    assert rel_err(o, o_lin) < 1e-5
    g = torch.full((B, T, H, K), float("-inf"))
    o, ht = torch.ops.gla_ext.chunk_fwd(q, k, v, g, h0, None, 1.0, 64)
    o_forget = (q * k).sum(-1, keepdim=True) * v
    assert rel_err(o, o_forget) < 1e-6
    assert torch.allclose(ht, (k[:, -1, :, :, None] * v[:, -1, :, None, :]), rtol=0, atol=0)
    dq, dk, dv, dg, dh0 = torch.ops.gla_ext.chunk_bwd(q, k, v, g, torch.randn_like(v), h0, h0,
                                                      None, 1.0, 64)
    assert torch.equal(dg, torch.zeros_like(dg))  # d/dg of exp(g) at -inf is exactly 0
    assert torch.equal(dh0, torch.zeros_like(dh0))
