"""Every bad input in docs/design.md raises a clear error, and the caller's tensors are never written."""
import pytest
import torch

import gla_ext
from gla_ext import chunk_gla, fused_recurrent_gla
from helpers import make_inputs

OPS = [chunk_gla, fused_recurrent_gla]


def _inputs(B=1, T=10, H=2, K=4, V=3):
    q, k, v, g, h0 = make_inputs(B, T, H, K, V)
    return q, k, v, g, h0


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("case,message", [
    ("k_shape", "k must have the shape of q"),
    ("g_shape", "must have the shape of q"),
    ("v_shape", "v must be"),
    ("rank", "must be 4-D"),
    ("int_dtype", "must be a floating tensor"),
    ("mixed_dtype", "share one dtype"),
    ("h0_shape", "initial_state must have shape"),
    ("cu_start", "cu_seqlens must start at 0"),
    ("cu_order", "non-decreasing"),
    ("cu_end", "must end at T"),
    ("cu_batch", "batch size must be 1"),
    ("cu_float", "integer tensor"),
    ("cu_rank", "1-D"),
    ("backend", "backend must be one of"),
])
def test_bad_input_raises_and_leaves_inputs_untouched(op, case, message):
    q, k, v, g, h0 = _inputs()
    kwargs = {}
    if case == "k_shape":
        k = k[:, :, :, :3]
    elif case == "g_shape":
        g = g[:, :5]
    elif case == "v_shape":
        v = v[:, :5]
    elif case == "rank":
        q = q[0]
    elif case == "int_dtype":
        q = q.to(torch.int32)
    elif case == "mixed_dtype":
        k = k.double()
    elif case == "h0_shape":
        h0 = h0[:, :1]
    elif case == "cu_start":
        kwargs["cu_seqlens"] = torch.tensor([1, 5, 10])
    elif case == "cu_order":
        kwargs["cu_seqlens"] = torch.tensor([0, 6, 4, 10])
    elif case == "cu_end":
        kwargs["cu_seqlens"] = torch.tensor([0, 5, 11])
    elif case == "cu_batch":
        q, k, v, g, h0 = _inputs(B=2)
        kwargs["cu_seqlens"] = torch.tensor([0, 5, 10])
    elif case == "cu_float":
        kwargs["cu_seqlens"] = torch.tensor([0.0, 5.0, 10.0])
    elif case == "cu_rank":
        kwargs["cu_seqlens"] = torch.tensor([[0, 5, 10]])
    elif case == "backend":
        kwargs["backend"] = "tpu"
    if "cu_seqlens" in kwargs and case not in ("cu_batch",):
        h0 = torch.randn(kwargs["cu_seqlens"].numel() - 1, 2, 4, 3) if case != "cu_rank" else None
    before = [x.clone() if isinstance(x, torch.Tensor) else x for x in (q, k, v, g, h0)]
    with pytest.raises(ValueError, match=message):
        op(q, k, v, g, initial_state=h0, **kwargs)
    for b, a in zip(before, (q, k, v, g, h0)):
        if isinstance(a, torch.Tensor):
            assert torch.equal(a, b)


@pytest.mark.parametrize("op", OPS)
def test_non_tensor_input(op):
    q, k, v, g, _ = _inputs()
    with pytest.raises(TypeError, match="q must be a torch.Tensor"):
        op(q.tolist(), k, v, g)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU for mixed devices")
@pytest.mark.parametrize("op", OPS)
def test_mixed_devices(op):
    q, k, v, g, _ = _inputs()
    with pytest.raises(ValueError, match="one device"):
        op(q.cuda(), k, v, g)


@pytest.mark.parametrize("op", OPS)
def test_unavailable_backend_is_refused_not_swapped(op):
    q, k, v, g, _ = _inputs()
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="cuda"):
            op(q, k, v, g, backend="cuda")
    if not gla_ext.extension_loaded():
        with pytest.raises(RuntimeError, match="gla_ext._C"):
            op(q, k, v, g, backend="cpu")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_inputs_unchanged_and_grads_flow(op, backend):
    q, k, v, g, h0 = _inputs()
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g, h0)]
    copies = [x.detach().clone() for x in leaves]
    o, ht = op(*leaves[:4], initial_state=leaves[4], output_final_state=True, backend=backend)
    (o.sum() + ht.sum()).backward()
    for a, b in zip(leaves, copies):
        assert torch.equal(a.detach(), b)
        assert a.grad is not None and torch.isfinite(a.grad).all()


@pytest.mark.parametrize("op", OPS)
def test_final_state_only_when_asked(op):
    q, k, v, g, _ = _inputs()
    o, ht = op(q, k, v, g)
    assert ht is None and o.shape == (1, 10, 2, 3)


def test_empty_time_axis():
    q, k, v, g, h0 = _inputs(T=0)
    for op in OPS:
        o, ht = op(q, k, v, g, initial_state=h0, output_final_state=True)
        assert o.shape == (1, 0, 2, 3) and torch.equal(ht, h0)
