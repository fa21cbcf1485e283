"""Tensor-core chunked GLA forward (csrc/cuda/chunk_fwd.cu) through chunk_gla(backend="cuda").

Compared with gla_ext.reference.naive_recurrent_gla in float64 on the same (rounded) inputs,
as relative error ||x - ref|| / ||ref|| (docs/design.md: bf16 1e-2, fp16 5e-3), for the output and
the final state. Outputs are allocated with torch.empty by the op, so before each call free
blocks of the allocator are filled with 0xFF bytes (NaN as float32, float16 and bfloat16):
anything the kernel leaves unwritten shows up as NaN.

Both execution paths (fused and split, see csrc/cuda/chunk_fwd.cu) are compared bitwise.

Skips cleanly without a GPU, without the compiled extension, or when gla_ext::chunk_fwd has
no CUDA kernel. _C.build_info()["chunk_cuda"], when the build reports it, says what runs.
"""

import pytest
import torch

from gla_ext import chunk_gla
from gla_ext.reference import naive_recurrent_gla
from helpers import TOLERANCE, cuda_gates, has_cuda_kernel, nbytes, poison_cuda_allocator


def _what_runs() -> str:
    try:
        from gla_ext import _ext
        return str(_ext.build_info().get("chunk_cuda", "not reported by build_info"))
    except Exception:  # noqa: BLE001 - informational only
        return "unknown"


pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(not has_cuda_kernel("gla_ext::chunk_fwd"),
                       reason="gla_ext._C has no CUDA kernel for gla_ext::chunk_fwd"),
]

DTYPES = [torch.bfloat16, torch.float16]


# ---- helpers ----------------------------------------------------------------------------

def _misaligned(t):
    """A contiguous copy of t whose data pointer is one element past a 16-byte boundary."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = buf[1:].view(t.shape)
    out.copy_(t)
    assert out.is_contiguous() and out.data_ptr() % 16 != 0
    return out


def _rel(x, ref, name):
    x = x.detach().double()
    assert torch.isfinite(x).all(), f"{name}: non-finite values (unwritten or overflowed)"
    ref = ref.double()
    denom = ref.norm().item()
    diff = (x - ref).norm().item()
    return diff / denom if denom > 0 else diff


def check(B, T, H, K, V, dtype, gate=1.0, h0=True, offsets=None, scale=None, misalign=False):
    cu = None
    N = B
    if offsets is not None:
        assert B == 1 and offsets[-1] == T
        cu = torch.tensor(offsets, dtype=torch.int64, device="cuda")
        N = len(offsets) - 1
    q = torch.randn(B, T, H, K, device="cuda").to(dtype)
    k = torch.randn(B, T, H, K, device="cuda").to(dtype)
    v = torch.randn(B, T, H, V, device="cuda").to(dtype)
    g = cuda_gates((B, T, H, K), gate)
    s0 = torch.randn(N, H, K, V, device="cuda") if h0 else None
    if misalign:
        q, k, v, g = (_misaligned(x) for x in (q, k, v, g))

    o_ref, ht_ref = naive_recurrent_gla(q.double(), k.double(), v.double(), g.double(),
                                        scale=scale,
                                        initial_state=None if s0 is None else s0.double(),
                                        output_final_state=True, cu_seqlens=cu)
    poison_cuda_allocator(nbytes((B, T, H, V), dtype), nbytes((N, H, K, V), torch.float32))
    o, ht = chunk_gla(q, k, v, g, scale=scale, initial_state=s0, output_final_state=True,
                      cu_seqlens=cu, backend="cuda")
    torch.cuda.synchronize()
    assert o.dtype == dtype and o.shape == (B, T, H, V) and o.device == q.device
    assert ht.dtype == torch.float32 and ht.shape == (N, H, K, V)
    tol = TOLERANCE[("cuda", dtype)]
    err_o, err_h = _rel(o, o_ref, "o"), _rel(ht, ht_ref, "final_state")
    assert err_o <= tol, f"o: relative error {err_o:.3e} > {tol} ({_what_runs()})"
    assert err_h <= tol, f"final_state: relative error {err_h:.3e} > {tol} ({_what_runs()})"
    return err_o, err_h


# ---- tests ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K,V", [(64, 64), (128, 128), (60, 100), (100, 60), (256, 64),
                                 (64, 256), (128, 200)])
@pytest.mark.parametrize("normalizer", [0.1, 1.0, 16.0])
def test_matches_reference(dtype, K, V, normalizer):
    check(2, 333, 2, K, V, dtype, gate=normalizer)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 2, 15, 63, 64, 65, 127, 129, 191])
@pytest.mark.parametrize("K", [64, 128])
def test_sequence_lengths(dtype, T, K):
    check(2, T, 3, K, 72, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gate", ["-1e4", "0", "-inf"])
@pytest.mark.parametrize("K,V", [(64, 64), (128, 100), (100, 128)])
def test_extreme_gates(dtype, gate, K, V):
    """Full forget (-1e4, -inf) and no decay (0): finite, and exact up to rounding."""
    check(2, 201, 2, K, V, dtype, gate=gate)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("h0", [True, False])
@pytest.mark.parametrize("K,V", [(64, 64), (100, 60), (128, 128)])
def test_varlen_with_empty_sequences(dtype, h0, K, V):
    # empty sequences first, in the middle and last: their final state is h0 (or zeros)
    offsets = [0, 0, 37, 37, 100, 165, 230, 230]
    check(1, 230, 2, K, V, dtype, h0=h0, offsets=offsets)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("path", ["fused", "split"])
def test_many_packed_sequences(monkeypatch, dtype, path):
    """300 packed sequences of 0..100 tokens (the split path numbers their chunks with a scan
    and finds them by binary search)."""
    monkeypatch.setenv("GLA_EXT_CHUNK_FWD", path)
    lengths = torch.randint(0, 17, (300,))
    lengths[::7] = 100   # some sequences span two chunks
    lengths[torch.rand(300) < 0.2] = 0
    offsets = [0] + torch.cumsum(lengths, 0).tolist()
    check(1, offsets[-1], 2, 64, 64, dtype, offsets=offsets)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_all_sequences_empty(dtype):
    check(1, 0, 2, 64, 64, dtype, offsets=[0, 0, 0])
    check(2, 0, 2, 64, 64, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("K,V", [(64, 64), (128, 48)])
def test_misaligned_pointers(dtype, K, V):
    """Inputs one element off a 16-byte boundary take the kernel's element-wise load path."""
    check(2, 150, 2, K, V, dtype, misalign=True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_no_initial_state_and_custom_scale(dtype):
    check(2, 140, 2, 64, 64, dtype, h0=False, scale=0.3)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("gate", [16.0, "0"])
def test_long_sequence(dtype, gate):
    """Many chunks: the float32 state carried in registers must not drift."""
    check(1, 2048, 2, 128, 128, dtype, gate=gate)


def test_small_sizes():
    for K, V in [(1, 1), (3, 5), (8, 2), (16, 65), (127, 129)]:
        check(1, 70, 1, K, V, torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_many_heads_and_batch(dtype):
    check(3, 97, 8, 64, 64, dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("B,T,H,K,V,offsets", [
    (2, 333, 2, 64, 64, None),
    (1, 300, 3, 128, 100, None),
    (1, 230, 2, 100, 60, [0, 0, 37, 37, 100, 165, 230, 230]),
    (2, 1, 2, 128, 128, None),
    (4, 129, 16, 128, 128, None),
])
def test_fused_and_split_paths_agree(monkeypatch, dtype, B, T, H, K, V, offsets):
    """The forward runs fused (one block walks a sequence) or split (state scan, then every
    chunk in parallel), chosen by grid size; GLA_EXT_CHUNK_FWD forces one. Both do the same
    operations in the same order, so they agree bitwise, and both match the reference."""
    results = {}
    for path in ("fused", "split"):
        monkeypatch.setenv("GLA_EXT_CHUNK_FWD", path)
        torch.manual_seed(1234)  # same inputs for both paths
        check(B, T, H, K, V, dtype, offsets=offsets)
        torch.manual_seed(1234)
        cu = None if offsets is None else torch.tensor(offsets, device="cuda")
        N = B if offsets is None else len(offsets) - 1
        q, k = (torch.randn(B, T, H, K, device="cuda").to(dtype) for _ in range(2))
        v = torch.randn(B, T, H, V, device="cuda").to(dtype)
        g = cuda_gates((B, T, H, K), 1.0)
        s0 = torch.randn(N, H, K, V, device="cuda")
        results[path] = chunk_gla(q, k, v, g, initial_state=s0, output_final_state=True,
                                  cu_seqlens=cu, backend="cuda")
    for a, b in zip(results["fused"], results["split"]):
        assert torch.equal(a, b), "fused and split forward paths differ"


@pytest.mark.parametrize("precision,bound", [("highest", 1e-5), ("high", 1e-3)])
@pytest.mark.parametrize("B,T,H,K,V,offsets", [
    (1, 300, 2, 128, 100, None),
    (1, 230, 2, 100, 60, [0, 0, 37, 37, 100, 165, 200]),  # empty sequences, padded tail
    (2, 200, 1, 64, 64, None),
])
def test_float32_fused_and_split_paths_agree(monkeypatch, precision, bound, B, T, H, K, V,
                                             offsets):
    """float32 on the tf32 tensor cores (chunk_fwd_f32.cuh fused, chunk_fwd_f32_split.cuh
    split): both paths forced give the same bits (the emulator's claim, on hardware), within
    the precision's bound of the float64 reference."""
    torch.manual_seed(4321)
    cu = None if offsets is None else torch.tensor(offsets, device="cuda")
    N = B if offsets is None else len(offsets) - 1
    q, k = (torch.randn(B, T, H, K, device="cuda") for _ in range(2))
    v = torch.randn(B, T, H, V, device="cuda")
    g = cuda_gates((B, T, H, K), 1.0)
    s0 = torch.randn(N, H, K, V, device="cuda")
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        results = {}
        for path in ("fused", "split"):
            monkeypatch.setenv("GLA_EXT_CHUNK_FWD", path)
            results[path] = chunk_gla(q, k, v, g, initial_state=s0, output_final_state=True,
                                      cu_seqlens=cu, backend="cuda")
    finally:
        torch.set_float32_matmul_precision(previous)
    for a, b in zip(results["fused"], results["split"]):
        assert torch.equal(a, b), "fused and split float32 forward paths differ"
    o_ref, ht_ref = naive_recurrent_gla(q.double(), k.double(), v.double(), g.double(),
                                        scale=K ** -0.5, initial_state=s0.double(),
                                        output_final_state=True, cu_seqlens=cu)
    err_o, err_h = _rel(results["split"][0], o_ref, "o"), _rel(results["split"][1], ht_ref, "ht")
    assert err_o <= bound and err_h <= bound, f"{precision}: o {err_o:.2e}, ht {err_h:.2e}"


def test_unknown_path_setting_is_an_error(monkeypatch):
    monkeypatch.setenv("GLA_EXT_CHUNK_FWD", "fastest")
    q = k = torch.randn(1, 130, 2, 64, device="cuda", dtype=torch.bfloat16)
    g = cuda_gates((1, 130, 2, 64), 1.0)
    with pytest.raises(RuntimeError, match="GLA_EXT_CHUNK_FWD"):
        chunk_gla(q, k, q, g, backend="cuda")
