"""CUDA fused recurrent GLA kernels (csrc/cuda/recurrent.cu) against the float64 reference.

Every test needs a GPU and skips cleanly without one. Inputs are fresh random draws; the
reference is gla_ext.reference.naive_recurrent_gla in float64 with gradients from autograd.
Outputs are allocated with torch.empty by the op, so before each call the allocator's free
blocks are filled with 0xFF bytes (NaN in float32, float16 and bfloat16): anything the
kernels leave unwritten shows up as NaN.
"""
import math

import pytest
import torch

from gla_ext.reference import naive_recurrent_gla
from helpers import cuda_gates, nbytes, poison_cuda_allocator

try:
    import gla_ext._C as _C
except ImportError:  # extension not built: only acceptable without a GPU (tests skip)
    _C = None

HAS_GPU = torch.cuda.is_available()
pytestmark = pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")

TOL = {torch.float32: 1e-3, torch.float16: 5e-3, torch.bfloat16: 1e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


# ---- helpers ----------------------------------------------------------------------------

def make_case(B, T, H, K, V, dtype, gate=1.0, h0=True, dht=True, offsets=None):
    dev = "cuda"
    cu = None
    N = B
    if offsets is not None:
        assert B == 1 and offsets[-1] == T
        cu = torch.tensor(offsets, dtype=torch.int64, device=dev)
        N = len(offsets) - 1
    case = dict(
        q=torch.randn(B, T, H, K, device=dev).to(dtype),
        k=torch.randn(B, T, H, K, device=dev).to(dtype),
        v=torch.randn(B, T, H, V, device=dev).to(dtype),
        g=cuda_gates((B, T, H, K), gate).contiguous(),
        h0=torch.randn(N, H, K, V, device=dev) if h0 else None,
        dout=torch.randn(B, T, H, V, device=dev).to(dtype),
        dht=torch.randn(N, H, K, V, device=dev) if dht else None,
        cu=cu, N=N,
    )
    return case


def run_cuda(c, scale, reverse):
    q, k, v, g = c["q"], c["k"], c["v"], c["g"]
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = c["N"]
    poison_cuda_allocator(nbytes((B, T, H, V), v.dtype), nbytes((N, H, K, V), torch.float32))
    o, ht = torch.ops.gla_ext.recurrent_fwd(q, k, v, g, c["h0"], c["cu"], scale, reverse)
    ntiles = (V + 31) // 32
    poison_cuda_allocator(nbytes((B, T, H, K), q.dtype), nbytes((B, T, H, K), q.dtype),
            nbytes((B, T, H, V), v.dtype), nbytes((B, T, H, K), torch.float32),
            nbytes((N, H, K, V), torch.float32),
            4 * ntiles * (2 * B * T * H * K + N * H * K))
    grads = torch.ops.gla_ext.recurrent_bwd(q, k, v, g, c["dout"], c["dht"], c["h0"], c["cu"],
                                            scale, reverse)
    return (o, ht), grads


def run_reference(c, scale, reverse):
    q, k, v, g = (c[n].detach().double().requires_grad_() for n in ("q", "k", "v", "g"))
    B, T, H, K = q.shape
    V = v.shape[-1]
    h0 = (c["h0"].double() if c["h0"] is not None
          else torch.zeros(c["N"], H, K, V, dtype=torch.float64, device="cuda"))
    h0 = h0.detach().requires_grad_()
    o, ht = naive_recurrent_gla(q, k, v, g, scale=scale, initial_state=h0,
                                output_final_state=True, reverse=reverse, cu_seqlens=c["cu"])
    loss = (o * c["dout"].double()).sum()
    if c["dht"] is not None:
        loss = loss + (ht * c["dht"].double()).sum()
    inputs = [q, k, v, g, h0]
    grads = torch.autograd.grad(loss, inputs, allow_unused=True)
    grads = [gr if gr is not None else torch.zeros_like(x) for gr, x in zip(grads, inputs)]
    return (o.detach(), ht.detach()), grads


def rel_err(x, ref, floor=0.0):
    x = x.double()
    denom = max(ref.norm().item(), floor)
    diff = (x - ref).norm().item()
    if denom == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / denom


def check_case(c, scale, reverse, dtype):
    (o, ht), (dq, dk, dv, dg, dh0) = run_cuda(c, scale, reverse)
    (o_r, ht_r), (dq_r, dk_r, dv_r, dg_r, dh0_r) = run_reference(c, scale, reverse)
    tol = TOL[dtype]

    assert o.dtype == c["v"].dtype and ht.dtype == torch.float32
    assert dq.dtype == dk.dtype == c["q"].dtype and dv.dtype == c["v"].dtype
    assert dg.dtype == torch.float32 and dh0.dtype == torch.float32
    outs = dict(o=(o, o_r), ht=(ht, ht_r), dq=(dq, dq_r), dk=(dk, dk_r), dv=(dv, dv_r),
                dg=(dg, dg_r), dh0=(dh0, dh0_r))
    for name, (x, ref) in outs.items():
        assert x.shape == ref.shape, f"{name}: shape {tuple(x.shape)} != {tuple(ref.shape)}"
        assert torch.isfinite(x).all(), f"{name}: NaN/inf (unwritten or overflowed entries)"

    # dg is a running sum of (q*dq - k*dk) terms (the CPU twin's formula) that cancel exactly
    # when every gate is a full forget (g = -1e4): there the reference is 0 and only an
    # absolute error makes sense, measured against the size of the terms being summed
    # (float32 leaves ~3e-7 of it at T=33). For drawn gates ||dg|| >= 0.04 * that size
    # (normalizer 0.1), so this floor only ever applies to the full-forget case.
    dg_terms = ((c["q"].double() * dq_r).norm() + (c["k"].double() * dk_r).norm()).item()
    floors = dict(dg=1e-2 * dg_terms)
    errors = {name: rel_err(x, ref, floors.get(name, 0.0)) for name, (x, ref) in outs.items()}
    bad = {n: e for n, e in errors.items() if not e <= tol}
    assert not bad, f"relative errors above {tol}: {bad} (all: {errors})"


# ---- tests ------------------------------------------------------------------------------

def test_extension_has_cuda_kernels():
    assert _C is not None, "gla_ext._C is not built"
    assert _C.build_info()["cuda"], "gla_ext._C was built without the CUDA kernels"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalizer", [0.1, 1.0, 16.0])
@pytest.mark.parametrize("reverse", [False, True])
def test_dtypes_and_gates(dtype, normalizer, reverse):
    B, T, H, K, V = 2, 37, 3, 100, 60
    c = make_case(B, T, H, K, V, dtype, gate=normalizer)
    check_case(c, K ** -0.5, reverse, dtype)


@pytest.mark.parametrize("K", [60, 100, 128, 256])
@pytest.mark.parametrize("V", [60, 100, 128, 256])
def test_head_sizes_float32(K, V):
    c = make_case(2, 19, 2, K, V, torch.float32, gate=1.0)
    check_case(c, K ** -0.5, False, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("KV", [(64, 64), (128, 128), (256, 256), (3, 5), (1, 33), (40, 1)])
@pytest.mark.parametrize("reverse", [False, True])
def test_head_sizes_all_dtypes(dtype, KV, reverse):
    K, V = KV
    c = make_case(2, 23, 2, K, V, dtype, gate=16.0)
    check_case(c, K ** -0.5, reverse, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gate", ["0", "-1e4"])
@pytest.mark.parametrize("reverse", [False, True])
def test_extreme_gates(dtype, gate, reverse):
    c = make_case(2, 33, 2, 64, 100, dtype, gate=gate)
    check_case(c, 64 ** -0.5, reverse, dtype)


@pytest.mark.parametrize("h0", [False, True])
@pytest.mark.parametrize("dht", [False, True])
@pytest.mark.parametrize("reverse", [False, True])
def test_initial_and_final_state(h0, dht, reverse):
    c = make_case(3, 29, 2, 128, 96, torch.float32, gate=1.0, h0=h0, dht=dht)
    check_case(c, 0.37, reverse, torch.float32)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("offsets", [[0, 7, 7, 20, 41], [0, 0, 1, 31], [0, 16, 16]],
                         ids=["empty-middle", "empty-first", "empty-last"])
@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("h0", [False, True])
def test_cu_seqlens(dtype, offsets, reverse, h0):
    T = offsets[-1]
    c = make_case(1, T, 2, 60, 100, dtype, gate=1.0, h0=h0, dht=True, offsets=offsets)
    check_case(c, 60 ** -0.5, reverse, dtype)


def test_cu_seqlens_k256_no_state():
    c = make_case(1, 45, 2, 256, 70, torch.float32, gate=16.0, h0=False, dht=False,
                  offsets=[0, 12, 12, 45])
    check_case(c, 256 ** -0.5, True, torch.float32)


@pytest.mark.parametrize("T", [1, 2, 129])
def test_sequence_lengths(T):
    c = make_case(2, T, 2, 64, 64, torch.float32, gate=1.0)
    check_case(c, 0.125, False, torch.float32)


@pytest.mark.parametrize("with_cu", [False, True])
def test_empty_time_axis(with_cu):
    """T == 0: nothing to run, but ht = h0 and dh0 = dht must still be written."""
    offsets = [0, 0, 0] if with_cu else None
    B = 1 if with_cu else 2
    c = make_case(B, 0, 2, 32, 40, torch.float32, offsets=offsets)
    (o, ht), (dq, dk, dv, dg, dh0) = run_cuda(c, 0.5, False)
    assert o.shape == (B, 0, 2, 40) and dq.numel() == dk.numel() == dv.numel() == dg.numel() == 0
    torch.testing.assert_close(ht, c["h0"], rtol=0, atol=0)
    torch.testing.assert_close(dh0, c["dht"], rtol=0, atol=0)
    c = make_case(B, 0, 2, 32, 40, torch.float32, h0=False, dht=False, offsets=offsets)
    (o, ht), (dq, dk, dv, dg, dh0) = run_cuda(c, 0.5, True)
    assert (ht == 0).all() and (dh0 == 0).all()


def test_matches_cpu_kernel():
    c = make_case(2, 41, 2, 100, 70, torch.float32, gate=1.0)
    (o, ht), grads = run_cuda(c, 0.1, True)
    cpu = {n: (x.cpu() if torch.is_tensor(x) else x) for n, x in c.items()}
    o_c, ht_c = torch.ops.gla_ext.recurrent_fwd(cpu["q"], cpu["k"], cpu["v"], cpu["g"],
                                                cpu["h0"], None, 0.1, True)
    grads_c = torch.ops.gla_ext.recurrent_bwd(cpu["q"], cpu["k"], cpu["v"], cpu["g"],
                                              cpu["dout"], cpu["dht"], cpu["h0"], None, 0.1,
                                              True)
    for name, x, ref in zip(["o", "ht", "dq", "dk", "dv", "dg", "dh0"],
                            [o, ht, *grads], [o_c, ht_c, *grads_c]):
        assert rel_err(x.cpu(), ref.double()) <= 1e-4, name


def test_deterministic():
    c = make_case(2, 31, 2, 128, 100, torch.bfloat16, gate=1.0)
    first = run_cuda(c, 0.2, False)
    second = run_cuda(c, 0.2, False)
    for a, b in zip([*first[0], *first[1]], [*second[0], *second[1]]):
        assert torch.equal(a, b)


def test_many_heads_and_v_tiles():
    """More (sequence, head, V tile) blocks than SMs, uneven last V tile."""
    c = make_case(4, 17, 16, 64, 200, torch.float16, gate=1.0)
    check_case(c, 64 ** -0.5, False, torch.float16)
