"""State pools (docs/design.md "State pools" and the cu_seqlens bullet) on every backend.

Each test compares with the float64 reference run densely, sequence by sequence, from the
pool row a sequence names; rows not named must stay bitwise unchanged."""
import pytest
import torch

from gla_ext import chunk_gla, fused_recurrent_gla, reference
from helpers import TOLERANCE, has_cuda_kernel, make_inputs, rel_err

OPS = {"chunk": chunk_gla, "recurrent": fused_recurrent_gla}
REFS = {"chunk": reference.chunk_gla_reference, "recurrent": reference.naive_recurrent_gla}

_GPU = has_cuda_kernel("gla_ext::recurrent_fwd")
BACKENDS = ["cpu", "reference",
            pytest.param("cuda", marks=pytest.mark.skipif(not _GPU, reason="needs a GPU"))]


def _device(backend):
    return "cuda" if backend == "cuda" else "cpu"


def _tol(backend, dtype):
    return TOLERANCE[("cuda" if backend == "cuda" else "cpu", dtype)]


def _case(packed, device, dtype=torch.float32, H=2, K=8, V=6, P=7):
    """Inputs, a pool and slots: 4 sequences (one a padding row, one empty when packed)."""
    if packed:
        cu = torch.tensor([0, 5, 5, 12, 20], device=device)
        q, k, v, g, _ = make_inputs(1, 20, H, K, V, dtype=dtype, device=device, with_h0=False)
    else:
        cu = None
        q, k, v, g, _ = make_inputs(4, 9, H, K, V, dtype=dtype, device=device, with_h0=False)
    pool = torch.randn(P, H, K, V, device=device)
    slots = torch.tensor([5, -1, 0, 3], device=device)
    return q, k, v, g, pool, slots, cu


def _dense_reference(kind, q, k, v, g, pool_kfirst, slots, cu):
    """float64 o and final states, each sequence from its pool row (zeros for padding)."""
    live = (slots >= 0).cpu()
    h0 = pool_kfirst.double().cpu()[slots.clamp(min=0).cpu()]
    h0[~live] = 0
    ref = REFS[kind](q.double().cpu(), k.double().cpu(), v.double().cpu(), g.double().cpu(),
                     initial_state=h0, output_final_state=True,
                     cu_seqlens=None if cu is None else cu.cpu())
    o, ht = ref
    ht[~live] = 0
    # padding rows: zero outputs, zero returned final states
    if cu is None:
        o[~live] = 0
    else:
        bounds = cu.cpu().tolist()
        for n, alive in enumerate(live.tolist()):
            if not alive:
                o[:, bounds[n]:bounds[n + 1]] = 0
    return o, ht


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["chunk", "recurrent"])
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("v_first", [False, True])
@pytest.mark.parametrize("idx_dtype", [torch.int64, torch.int32])
def test_inplace_pool_advances_named_rows_only(backend, kind, packed, v_first, idx_dtype):
    device = _device(backend)
    q, k, v, g, pool, slots, cu = _case(packed, device)
    o_ref, ht_ref = _dense_reference(kind, q, k, v, g, pool, slots, cu)
    work = pool.transpose(-1, -2).contiguous() if v_first else pool.clone()
    before = work.clone()
    with torch.no_grad():
        o, none = OPS[kind](q, k, v, g, initial_state=work, state_indices=slots.to(idx_dtype),
                            inplace_final_state=True, cu_seqlens=cu, backend=backend,
                            state_v_first=v_first)
    assert none is None
    tol = _tol(backend, torch.float32)
    assert rel_err(o, o_ref) <= tol
    after = work.transpose(-1, -2) if v_first else work
    for n, s in enumerate(slots.tolist()):
        if s >= 0:
            assert rel_err(after[s], ht_ref[n]) <= tol, f"pool row {s}"
    untouched = [r for r in range(pool.shape[0]) if r not in slots.tolist()]
    assert torch.equal(work[untouched], before[untouched]), "rows not named changed"
    # the padding row's outputs are exactly zero
    if cu is None:
        assert torch.count_nonzero(o[1]) == 0
    else:
        assert torch.count_nonzero(o[:, 5:5]) == 0  # empty sequence 1 (padding) covers nothing


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["chunk", "recurrent"])
@pytest.mark.parametrize("v_first", [False, True])
def test_pool_read_only_returns_dense_final_states(backend, kind, v_first):
    device = _device(backend)
    q, k, v, g, pool, slots, cu = _case(True, device)
    slots = torch.tensor([2, 6, -1, 4], device=device)  # padding row 2 covers tokens 5..12
    o_ref, ht_ref = _dense_reference(kind, q, k, v, g, pool, slots, cu)
    work = pool.transpose(-1, -2).contiguous() if v_first else pool.clone()
    before = work.clone()
    with torch.no_grad():
        o, ht = OPS[kind](q, k, v, g, initial_state=work, state_indices=slots,
                          output_final_state=True, cu_seqlens=cu, backend=backend,
                          state_v_first=v_first)
    assert torch.equal(work, before), "the pool changed without inplace_final_state"
    if v_first:
        assert ht.shape == (4, 2, 6, 8)
        ht = ht.transpose(-1, -2)
    tol = _tol(backend, torch.float32)
    assert rel_err(o, o_ref) <= tol and rel_err(ht, ht_ref) <= tol
    assert torch.count_nonzero(o[:, 5:12]) == 0 and torch.count_nonzero(ht[2]) == 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["chunk", "recurrent"])
def test_pool_gradients_flow_to_named_rows(backend, kind):
    """Without inplace the pool path is differentiable (rows gathered): same gradients as the
    float64 reference through indexing."""
    device = _device(backend)
    q, k, v, g, pool, slots, cu = _case(False, device)
    leaves = [x.clone().requires_grad_() for x in (q, k, v, g, pool)]
    o, ht = OPS[kind](*leaves[:4], initial_state=leaves[4], state_indices=slots,
                      output_final_state=True, backend=backend)
    w_o, w_h = torch.randn_like(o), torch.randn_like(ht)
    ((o * w_o).sum() + (ht * w_h).sum()).backward()
    ref_leaves = [x.detach().double().cpu().requires_grad_() for x in (q, k, v, g, pool)]
    o_r, ht_r = REFS[kind](*ref_leaves[:4], initial_state=ref_leaves[4],
                           state_indices=slots.cpu(), output_final_state=True)
    ((o_r * w_o.double().cpu()).sum() + (ht_r * w_h.double().cpu()).sum()).backward()
    tol = _tol(backend, torch.float32)
    assert rel_err(o, o_r) <= tol and rel_err(ht, ht_r) <= tol
    for x, r, name in zip(leaves, ref_leaves, "qkvgp"):
        assert rel_err(x.grad, r.grad) <= tol, name
    unnamed = [r for r in range(pool.shape[0]) if r not in slots.tolist()]
    assert torch.count_nonzero(leaves[4].grad[unnamed]) == 0
    assert torch.count_nonzero(leaves[0].grad[1]) == 0   # padding row: no gradient


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["chunk", "recurrent"])
def test_v_first_dense_equals_transposed_forward_and_grads(backend, kind):
    device = _device(backend)
    q, k, v, g, h0 = make_inputs(2, 11, 2, 8, 6, device=device)
    def run(v_first, grad):
        xs = [x.clone().requires_grad_(grad) for x in (q, k, v, g)]
        s0 = (h0.transpose(-1, -2).contiguous() if v_first else h0.clone()).requires_grad_(grad)
        with torch.set_grad_enabled(grad):
            o, ht = OPS[kind](*xs, initial_state=s0, output_final_state=True, backend=backend,
                              state_v_first=v_first)
        return xs, s0, o, ht
    for grad in (False, True):
        xs_k, s_k, o_k, ht_k = run(False, grad)
        xs_v, s_v, o_v, ht_v = run(True, grad)
        assert ht_v.shape == (2, 2, 6, 8)
        tol = _tol(backend, torch.float32)
        assert rel_err(o_v, o_k) <= tol and rel_err(ht_v.transpose(-1, -2), ht_k) <= tol
        if grad:
            w_o, w_h = torch.randn_like(o_k), torch.randn_like(ht_k)
            ((o_k * w_o).sum() + (ht_k * w_h).sum()).backward()
            ((o_v * w_o).sum() + (ht_v * w_h.transpose(-1, -2)).sum()).backward()
            for a, b in zip(xs_k, xs_v):
                assert rel_err(b.grad, a.grad) <= tol
            assert rel_err(s_v.grad.transpose(-1, -2), s_k.grad) <= tol


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["chunk", "recurrent"])
def test_int32_offsets_equal_int64(backend, kind):
    device = _device(backend)
    q, k, v, g, h0 = make_inputs(1, 30, 2, 8, 6, device=device, n_states=3)
    cu = torch.tensor([0, 7, 7, 30], device=device)
    with torch.no_grad():
        o64, h64 = OPS[kind](q, k, v, g, initial_state=h0, output_final_state=True,
                             cu_seqlens=cu, backend=backend)
        o32, h32 = OPS[kind](q, k, v, g, initial_state=h0, output_final_state=True,
                             cu_seqlens=cu.to(torch.int32), backend=backend)
    assert torch.equal(o32, o64) and torch.equal(h32, h64)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["chunk", "recurrent"])
def test_padded_tail_is_zero_with_zero_gradients(backend, kind):
    """cu_seqlens[-1] < T: the tail belongs to no sequence."""
    device = _device(backend)
    q, k, v, g, h0 = make_inputs(1, 24, 2, 8, 6, device=device, n_states=2)
    cu = torch.tensor([0, 9, 17], device=device)
    xs = [x.clone().requires_grad_() for x in (q, k, v, g, h0)]
    o, ht = OPS[kind](*xs[:4], initial_state=xs[4], output_final_state=True, cu_seqlens=cu,
                      backend=backend)
    w_o, w_h = torch.randn_like(o), torch.randn_like(ht)
    ((o * w_o).sum() + (ht * w_h).sum()).backward()
    assert torch.count_nonzero(o[:, 17:]) == 0
    for x, name in zip(xs[:4], "qkvg"):
        assert torch.count_nonzero(x.grad[:, 17:]) == 0, name
    # the valid part equals the reference on the truncated input
    ref = [x.detach().double().cpu()[:, :17].requires_grad_() for x in (q, k, v, g)]
    h0_r = h0.detach().double().cpu().requires_grad_()
    o_r, ht_r = REFS[kind](*ref, initial_state=h0_r, output_final_state=True,
                           cu_seqlens=cu.cpu())
    ((o_r * w_o[:, :17].double().cpu()).sum() + (ht_r * w_h.double().cpu()).sum()).backward()
    tol = _tol(backend, torch.float32)
    assert rel_err(o[:, :17], o_r) <= tol and rel_err(ht, ht_r) <= tol
    for x, r, name in zip(xs[:4], ref, "qkvg"):
        assert rel_err(x.grad[:, :17], r.grad) <= tol, name
    assert rel_err(xs[4].grad, h0_r.grad) <= tol


def test_cu_seqlens_past_t_is_an_error():
    q, k, v, g, h0 = make_inputs(1, 10, 2, 4, 3, n_states=2)
    for op in OPS.values():
        with pytest.raises(ValueError, match="must end at T"):
            op(q, k, v, g, initial_state=h0, cu_seqlens=torch.tensor([0, 5, 11]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind", ["chunk", "recurrent"])
@pytest.mark.parametrize("case,error,message", [
    ("index_too_big", ValueError, "must be < P=7"),
    ("repeated", ValueError, "more than once"),
    ("pool_shape", ValueError, "must be a pool"),
    ("pool_dtype", ValueError, "must be torch.float32"),
    ("pool_noncontig", ValueError, "contiguous"),
    ("idx_dtype", ValueError, "int32 or int64"),
    ("idx_len", ValueError, "one per sequence"),
    ("idx_rank", ValueError, "1-D"),
    ("no_pool", ValueError, "needs initial_state"),
    ("inplace_no_idx", ValueError, "needs state_indices"),
    ("inplace_grad", RuntimeError, "inference only"),
    ("v_first_shape", ValueError, "must be a pool"),
])
def test_bad_pool_input_raises_and_changes_nothing(backend, kind, case, error, message):
    device = _device(backend)
    q, k, v, g, pool, slots, cu = _case(False, device)
    kwargs = dict(initial_state=pool, state_indices=slots, inplace_final_state=True)
    if case == "index_too_big":
        kwargs["state_indices"] = torch.tensor([5, 7, 0, 3], device=device)
    elif case == "repeated":
        kwargs["state_indices"] = torch.tensor([5, 3, -1, 3], device=device)
    elif case == "pool_shape":
        kwargs["initial_state"] = pool[:, :1].clone()
    elif case == "pool_dtype":
        kwargs["initial_state"] = pool.double()
    elif case == "pool_noncontig":
        kwargs["initial_state"] = pool.transpose(-1, -2).contiguous().transpose(-1, -2)
    elif case == "idx_dtype":
        kwargs["state_indices"] = slots.float()
    elif case == "idx_len":
        kwargs["state_indices"] = slots[:3]
    elif case == "idx_rank":
        kwargs["state_indices"] = slots.view(2, 2)
    elif case == "no_pool":
        kwargs["initial_state"] = None
    elif case == "inplace_no_idx":
        kwargs["state_indices"] = None
        kwargs["initial_state"] = pool[:4].clone()
    elif case == "inplace_grad":
        q = q.clone().requires_grad_()
    elif case == "v_first_shape":
        kwargs["state_v_first"] = True     # pool is K-first [P, H, 8, 6]: wrong for V-first
    target = kwargs["initial_state"]
    saved = None if target is None else target.clone()
    inputs = [x.clone() for x in (q, k, v, g)]
    with pytest.raises(error, match=message):
        OPS[kind](q, k, v, g, backend=backend, **kwargs)
    if target is not None:
        assert torch.equal(target, saved), "the pool changed although the call failed"
    for a, b in zip((q, k, v, g), inputs):
        assert torch.equal(a, b)


@pytest.mark.skipif(not _GPU, reason="needs a GPU")
@pytest.mark.parametrize("path", ["fused", "split"])
@pytest.mark.parametrize("v_first", [False, True])
def test_cuda_bf16_chunk_kernels_update_the_pool(monkeypatch, path, v_first):
    """The tensor-core chunked forward (bf16) reads and writes pool rows through the index,
    on both of its paths."""
    monkeypatch.setenv("GLA_EXT_CHUNK_FWD", path)
    cu = torch.tensor([0, 70, 70, 150, 200], device="cuda")
    q, k, v, g, _ = make_inputs(1, 210, 2, 64, 64, dtype=torch.bfloat16, device="cuda",
                                with_h0=False)
    pool = torch.randn(6, 2, 64, 64, device="cuda")
    slots = torch.tensor([4, -1, 0, 2], device="cuda")
    o_ref, ht_ref = _dense_reference("chunk", q, k, v, g, pool, slots, cu)
    work = pool.transpose(-1, -2).contiguous() if v_first else pool.clone()
    before = work.clone()
    with torch.no_grad():
        o, _ = chunk_gla(q, k, v, g, initial_state=work, state_indices=slots, cu_seqlens=cu,
                         inplace_final_state=True, state_v_first=v_first, backend="cuda")
    tol = TOLERANCE[("cuda", torch.bfloat16)]
    assert rel_err(o, o_ref) <= tol and torch.count_nonzero(o[:, 200:]) == 0
    after = work.transpose(-1, -2) if v_first else work
    for n, s in enumerate(slots.tolist()):
        if s >= 0:
            assert rel_err(after[s], ht_ref[n]) <= tol
    assert torch.equal(work[[1, 3, 5]], before[[1, 3, 5]])


def test_inplace_pool_op_under_torch_compile():
    """The in-place op is a mutating custom op with a fake kernel: torch.compile traces it and
    the pool is updated exactly as in eager mode."""
    q, k, v, g, pool, slots, _ = _case(False, "cpu")
    eager_pool, compiled_pool = pool.clone(), pool.clone()

    def step(p):
        return fused_recurrent_gla(q, k, v, g, initial_state=p, state_indices=slots,
                                   inplace_final_state=True)[0]
    with torch.no_grad():
        o_eager = step(eager_pool)
        o_compiled = torch.compile(step)(compiled_pool)
    assert torch.equal(o_eager, o_compiled) and torch.equal(eager_pool, compiled_pool)
    assert not torch.equal(eager_pool, pool)
