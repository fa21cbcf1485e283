"""The ops on CPU tensors (C++ kernels) against the float64 reference: forward and every gradient."""
import pytest
import torch

import gla_ext
from gla_ext import chunk_gla, fused_recurrent_gla
from gla_ext.reference import naive_recurrent_gla
from helpers import TOLERANCE, make_inputs, reference_grads, rel_err

pytestmark = pytest.mark.skipif(not gla_ext.extension_loaded(),
                                reason="gla_ext._C is not built")

OPS = {"recurrent": fused_recurrent_gla, "chunk": chunk_gla}


def _check_against_reference(op, B, T, H, K, V, dtype, normalizer=1.0, reverse=False, cu=None,
                             with_h0=True, gate=None, backend="cpu"):
    N = B if cu is None else len(cu) - 1
    q, k, v, g, h0 = make_inputs(B, T, H, K, V, dtype, normalizer=normalizer, n_states=N,
                                 with_h0=with_h0, gate=gate)
    cu_t = None if cu is None else torch.tensor(cu)
    kwargs = {"cu_seqlens": cu_t}
    if op is fused_recurrent_gla:
        kwargs["reverse"] = reverse
    grad_o = torch.randn(B, T, H, V).to(dtype)
    grad_ht = torch.randn(N, H, K, V)
    o_ref, ht_ref, grads_ref = reference_grads(
        lambda *a, **kw: naive_recurrent_gla(*a, reverse=reverse, **kw),
        (q, k, v, g, h0), grad_o, grad_ht, cu_seqlens=cu_t)
    leaves = [None if x is None else x.clone().requires_grad_() for x in (q, k, v, g, h0)]
    o, ht = op(*leaves[:4], initial_state=leaves[4], output_final_state=True, backend=backend,
               **kwargs)
    assert o.dtype == v.dtype and ht.dtype == (torch.float64 if dtype == torch.float64
                                                else torch.float32)
    ((o * grad_o).sum() + (ht * grad_ht.to(ht.dtype)).sum()).backward()
    tol = TOLERANCE[("cpu", dtype)]
    assert rel_err(o, o_ref) < tol
    assert rel_err(ht, ht_ref) < tol
    for name, leaf, ref in zip("q k v g h0".split(), leaves, grads_ref):
        if leaf is not None:
            assert rel_err(leaf.grad, ref) < tol, f"d{name}"


@pytest.mark.parametrize("op", ["recurrent", "chunk"])
@pytest.mark.parametrize("normalizer", [0.1, 1.0, 16.0])
@pytest.mark.parametrize("K,V", [(60, 100), (100, 60), (64, 64)])
def test_matches_reference_float32(op, normalizer, K, V):
    _check_against_reference(OPS[op], 2, 45, 2, K, V, torch.float32, normalizer)


@pytest.mark.parametrize("op", ["recurrent", "chunk"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_matches_reference_other_dtypes(op, dtype):
    _check_against_reference(OPS[op], 2, 33, 2, 32, 24, dtype)


def test_recurrent_reverse():
    _check_against_reference(fused_recurrent_gla, 2, 29, 2, 20, 36, torch.float32, reverse=True)
    _check_against_reference(fused_recurrent_gla, 1, 29, 2, 20, 36, torch.float32, reverse=True,
                             cu=[0, 10, 10, 29])


@pytest.mark.parametrize("op", ["recurrent", "chunk"])
def test_varlen_with_empty_sequences(op):
    _check_against_reference(OPS[op], 1, 70, 2, 24, 40, torch.float32, cu=[0, 0, 17, 17, 70])


@pytest.mark.parametrize("op", ["recurrent", "chunk"])
@pytest.mark.parametrize("gate", [-1e4, 0.0])
def test_extreme_gates(op, gate):
    _check_against_reference(OPS[op], 2, 21, 2, 16, 16, torch.float32, gate=gate)


@pytest.mark.parametrize("op", ["recurrent", "chunk"])
def test_without_initial_state(op):
    _check_against_reference(OPS[op], 2, 19, 3, 16, 8, torch.float32, with_h0=False)


def test_gradcheck_cpu_kernel():
    """torch.autograd.gradcheck on the C++ kernel in float64, incl. h0 and the final state."""
    B, T, H, K, V = 1, 6, 2, 3, 4
    q, k, v, g, h0 = make_inputs(B, T, H, K, V, torch.float64)
    inputs = tuple(x.requires_grad_() for x in (q, k, v, g, h0))

    def fn(q, k, v, g, h0):
        o, ht = fused_recurrent_gla(q, k, v, g, initial_state=h0, output_final_state=True,
                                    backend="cpu")
        return o, ht

    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7)

    def fn_rev(q, k, v, g, h0):
        return fused_recurrent_gla(q, k, v, g, initial_state=h0, output_final_state=True,
                                   reverse=True, backend="cpu")

    assert torch.autograd.gradcheck(fn_rev, inputs, eps=1e-6, atol=1e-7)

    def fn_chunk(q, k, v, g, h0):
        return chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True, backend="cpu")

    assert torch.autograd.gradcheck(fn_chunk, inputs, eps=1e-6, atol=1e-7)


def test_recurrent_and_chunk_agree():
    q, k, v, g, h0 = make_inputs(2, 77, 2, 32, 32)
    o1, h1 = fused_recurrent_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    o2, h2 = chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True)
    assert rel_err(o1, o2) < 1e-5 and rel_err(h1, h2) < 1e-5


def test_non_contiguous_inputs():
    q, k, v, g, h0 = make_inputs(2, 20, 3, 8, 8)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)   # same values, other strides
    assert not qt.is_contiguous()
    o1, _ = fused_recurrent_gla(q, k, v, g, initial_state=h0)
    o2, _ = fused_recurrent_gla(qt, k, v, g, initial_state=h0)
    assert torch.equal(o1, o2)


def test_torch_compile_of_ops():
    q, k, v, g, h0 = make_inputs(1, 24, 2, 16, 16)

    def f(q, k, v, g, h0):
        o, ht = chunk_gla(q, k, v, g, initial_state=h0, output_final_state=True)
        return o.sum() + ht.sum()

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(q, k, v, g, h0), f(q, k, v, g, h0))
