"""The CUDA recurrent kernels' own source (csrc/cuda/recurrent.cu: forward, backward and its
finalize kernel), run on the CPU through tests/cuda_emu (see test_cuda_chunk_emu.py for how the
emulator works). The forward is the decode kernel, where pool indexing lives: state pools
(state_indices with padding rows, in place or not), V-first states, varlen with empty
sequences and a padded tail, reverse, and the three block shapes (K <= 64, 128, 256). Results
are compared with the float64 reference on the same rounded inputs; every case runs twice with
threads and blocks in opposite orders (results must agree bitwise), inside poisoned guard zones.
"""
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gla_ext.reference import naive_recurrent_gla
from helpers import TOLERANCE
from test_cuda_chunk_emu import _build

_DT = {"f32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    return _build(tmp_path_factory, "recurrent_emu")


def _raw(x):
    if x.dtype in (torch.bfloat16, torch.float16):
        x = x.view(torch.int16)
    return x.contiguous().numpy().tobytes()


def _split(blob, specs):
    """Cuts the output file into tensors of the given (shape, dtype)."""
    out, pos = [], 0
    for shape, dt in specs:
        nbytes = int(np.prod(shape)) * torch.empty((), dtype=dt).element_size()
        chunk = torch.from_numpy(np.frombuffer(blob[pos:pos + nbytes], dtype=np.uint8).copy())
        out.append((chunk.view(dt) if nbytes else torch.empty(0, dtype=dt)).view(shape))
        pos += nbytes
    assert pos == len(blob), "output size"
    return out


def _run(emulator, tmp_path, blobs, **kw):
    """Runs the emulator on blobs with key=value arguments kw; returns (output bytes, report)."""
    (tmp_path / "in.bin").write_bytes(b"".join(_raw(x) for x in blobs))
    args = [emulator] + [f"{k}={v}" for k, v in kw.items()] + [
        f"in={tmp_path / 'in.bin'}", f"out={tmp_path / 'out.bin'}"]
    run = subprocess.run(args, capture_output=True, text=True, timeout=600)
    report = " ".join(args[1:]) + "\n" + (run.stdout + run.stderr).strip()
    assert run.returncode == 0 and "DONE" in run.stdout, report
    return (tmp_path / "out.bin").read_bytes(), report


def _inputs(dtype, B, T, H, K, V, gate=1.0):
    dt = _DT[dtype]
    q, k = (torch.randn(B, T, H, K).to(dt) for _ in range(2))
    v = torch.randn(B, T, H, V).to(dt)
    g = (F.logsigmoid(torch.randn(B, T, H, K, dtype=torch.float64)) / gate).float()
    return q, k, v, g


def _segments(cu, B, T):
    return [(b, 0, T) for b in range(B)] if cu is None else [
        (0, cu[n], cu[n + 1]) for n in range(len(cu) - 1)]


def check_forward(blob, report, q, k, v, g, h0, idx, dtype, cu, reverse, P, slots, inplace,
                  vfirst):
    """Checks a forward run's o, dense final states and pool against the float64 reference:
    named rows advanced, other rows bitwise unchanged, padding rows and the tail untouched.
    h0: the K-first initial states (dense [N, ..] or the pool [P, ..])."""
    B, T, H, K = q.shape
    V = v.shape[-1]
    N = B if cu is None else len(cu) - 1
    h0_given_shape = (h0.shape[0], H, V, K) if vfirst else tuple(h0.shape)
    state_shape = (N, H, V, K) if vfirst else (N, H, K, V)
    specs = [((B, T, H, V), _DT[dtype])]
    if not inplace:
        specs.append((state_shape, torch.float32))
    if P:
        specs.append((h0_given_shape, torch.float32))
    outs = _split(blob, specs)
    o = outs[0]
    ht = None if inplace else outs[1]
    pool_after = outs[-1] if P else None

    # float64 reference from the same rounded inputs and the same pool semantics
    live = [True] * N if not P else [s >= 0 for s in slots]
    ref_pool = h0.double().clone()
    kwargs = dict(state_indices=idx) if P else {}
    o_ref, ht_ref = naive_recurrent_gla(
        q.double(), k.double(), v.double(), g.double(), scale=K ** -0.5,
        initial_state=ref_pool, output_final_state=True, reverse=bool(reverse),
        cu_seqlens=None if cu is None else torch.tensor(cu), **kwargs)
    tol = TOLERANCE[("cuda", _DT[dtype])]
    o = o.double()
    assert torch.isfinite(o).all(), report
    rel = (o - o_ref).norm() / o_ref.norm()
    assert rel <= tol, f"o rel {rel:.2e}\n{report}"
    for n, (b, s, e) in enumerate(_segments(cu, B, T)):
        if not live[n]:
            assert torch.count_nonzero(o[b, s:e]) == 0, f"padding row {n} wrote o\n{report}"
    if cu is not None:
        assert torch.count_nonzero(o[0, cu[-1]:]) == 0, f"tail written\n{report}"
    ht_k = None
    if ht is not None:
        ht_k = ht.transpose(-1, -2) if vfirst else ht
        for n in range(N):
            if live[n]:
                err = (ht_k[n].double() - ht_ref[n]).norm() / ht_ref[n].norm()
                assert err <= tol, f"ht[{n}] rel {err:.2e}\n{report}"
            else:
                assert torch.count_nonzero(ht_k[n]) == 0, report
    if P:
        after = pool_after.transpose(-1, -2) if vfirst else pool_after
        named = [s for s in slots if s >= 0]
        for r in range(P):
            if inplace and r in named:
                n = slots.index(r)
                err = (after[r].double() - ht_ref[n]).norm() / ht_ref[n].norm()
                assert err <= tol, f"pool row {r} rel {err:.2e}\n{report}"
            else:
                assert torch.equal(after[r], h0[r]), f"pool row {r} changed\n{report}"


FWD_CASES = [
    # dtype, B, T, H, K, V, cu, reverse, P, slots, inplace, vfirst
    ("f32", 3, 5, 2, 64, 40, None, 0, 0, None, 0, 0),
    ("bf16", 1, 15, 1, 64, 64, [0, 3, 3, 9, 12], 0, 6, [4, -1, 1, 0], 1, 0),
    ("fp16", 3, 4, 1, 100, 70, None, 0, 5, [2, 0, -1], 1, 1),
    ("f32", 1, 11, 1, 200, 33, [0, 0, 6, 11], 1, 4, [3, 1, -1], 0, 1),
    ("f32", 4, 1, 2, 64, 64, None, 0, 8, [7, -1, 2, 5], 1, 0),   # decode step on a pool
    ("bf16", 2, 6, 1, 32, 20, None, 1, 0, None, 0, 1),            # dense V-first
]


@pytest.mark.parametrize("case", FWD_CASES, ids=lambda c: "-".join(map(str, c[:8])))
def test_forward_kernel_source_on_cpu(emulator, tmp_path, case):
    dtype, B, T, H, K, V, cu, reverse, P, slots, inplace, vfirst = case
    N = B if cu is None else len(cu) - 1
    q, k, v, g = _inputs(dtype, B, T, H, K, V)
    rows = P if P else N
    h0 = torch.randn(rows, H, K, V)                   # K-first values
    h0_given = h0.transpose(-1, -2).contiguous() if vfirst else h0
    blobs = [q, k, v, g, h0_given]
    if P:
        idx = torch.tensor(slots, dtype=torch.int64)
        blobs.append(idx)
    blob, report = _run(emulator, tmp_path, blobs, mode="fwd", order="both", dtype=dtype, B=B, T=T, H=H, K=K,
                        V=V, h0=1, cu="-" if cu is None else ",".join(map(str, cu)),
                        reverse=reverse, P=P, inplace=inplace, vfirst=vfirst)
    check_forward(blob, report, q, k, v, g, h0, idx if P else None, dtype, cu, reverse, P,
                  slots, inplace, vfirst)


def test_out_of_range_offsets_and_indices_stay_inside(emulator, tmp_path):
    """Malformed cu_seqlens (decreasing, past T) are clamped to [0, T] and pool indices >= P
    count as padding: the kernel stays inside every buffer (guard zones) and leaves the pool."""
    q, k, v, g = _inputs("f32", 1, 10, 1, 64, 32)
    pool = torch.randn(3, 1, 64, 32)
    blob, report = _run(emulator, tmp_path, [q, k, v, g, pool, torch.tensor([9, 0, 2])],
                        mode="fwd", order="both", dtype="f32", B=1, T=10, H=1, K=64, V=32, h0=1,
                        cu="0,6,3,25", P=3, inplace=1, vfirst=0)
    o, after = _split(blob, [((1, 10, 1, 32), torch.float32), ((3, 1, 64, 32), torch.float32)])
    assert torch.equal(after[0], pool[0]), "index 9 >= P wrote a row"
    assert torch.isfinite(o).all() and torch.isfinite(after).all(), report
    # the backward clamps the same offsets (recurrent_clamp_kernel) and stays inside too
    # (one order only: sequences 0 and 2 overlap, so their token writes race, as on a GPU)
    h0, dht = torch.randn(3, 1, 64, 32), torch.randn(3, 1, 64, 32)
    blob, report = _run(emulator, tmp_path, [q, k, v, g, h0, torch.randn(1, 10, 1, 32), dht],
                        mode="bwd", order="fwd", dtype="f32", B=1, T=10, H=1, K=64, V=32,
                        h0=1, dht=1, cu="0,6,3,25")
    dh0 = _split(blob, [((1, 10, 1, 64), torch.float32)] * 2 + [((1, 10, 1, 32), torch.float32),
                        ((1, 10, 1, 64), torch.float32), ((3, 1, 64, 32), torch.float32)])[-1]
    assert torch.isfinite(dh0).all(), report


def test_nan_gate_propagates(emulator, tmp_path):
    """A NaN gate poisons the state from that token on, as in the reference."""
    q, k, v, g = _inputs("f32", 1, 6, 1, 64, 32)
    g[0, 2, 0, 5] = float("nan")
    blob, report = _run(emulator, tmp_path, [q, k, v, g, torch.randn(1, 1, 64, 32)],
                        mode="fwd", order="both", dtype="f32", B=1, T=6, H=1, K=64, V=32, h0=1)
    o, ht = _split(blob, [((1, 6, 1, 32), torch.float32), ((1, 1, 64, 32), torch.float32)])
    assert torch.isfinite(o[:, :2]).all() and torch.isnan(o[:, 2:]).all(), report
    assert torch.isnan(ht[0, 0, 5]).all() and torch.isfinite(ht[0, 0, :5]).all(), report


BWD_CASES = [
    # dtype, B, T, H, K, V, cu, reverse, h0, dht
    ("f32", 2, 7, 1, 64, 40, None, 0, 1, 1),
    ("bf16", 1, 13, 1, 64, 64, [0, 0, 4, 4, 11], 0, 1, 1),
    ("fp16", 1, 6, 1, 130, 64, None, 1, 0, 1),
    ("f32", 1, 3, 1, 256, 32, None, 0, 1, 0),
]


@pytest.mark.parametrize("case", BWD_CASES, ids=lambda c: "-".join(map(str, c[:8])))
def test_backward_kernel_source_on_cpu(emulator, tmp_path, case):
    dtype, B, T, H, K, V, cu, reverse, with_h0, with_dht = case
    N = B if cu is None else len(cu) - 1
    q, k, v, g = _inputs(dtype, B, T, H, K, V)
    h0, dht = torch.randn(N, H, K, V), torch.randn(N, H, K, V)
    do = torch.randn(B, T, H, V).to(_DT[dtype])
    blobs = [q, k, v, g] + ([h0] if with_h0 else []) + [do] + ([dht] if with_dht else [])
    blob, report = _run(emulator, tmp_path, blobs, mode="bwd", order="both", dtype=dtype, B=B, T=T, H=H, K=K,
                        V=V, h0=with_h0, dht=with_dht,
                        cu="-" if cu is None else ",".join(map(str, cu)), reverse=reverse)
    dt = _DT[dtype]
    grads = _split(blob, [(q.shape, dt), (k.shape, dt), (v.shape, dt), (g.shape, torch.float32),
                          ((N, H, K, V), torch.float32)])
    h0_ref = h0 if with_h0 else torch.zeros_like(h0)
    leaves = [x.double().requires_grad_() for x in (q, k, v, g, h0_ref)]
    o_ref, ht_ref = naive_recurrent_gla(*leaves[:4], scale=K ** -0.5, initial_state=leaves[4],
                                        output_final_state=True, reverse=bool(reverse),
                                        cu_seqlens=None if cu is None else torch.tensor(cu))
    loss = (o_ref * do.double()).sum() + ((ht_ref * dht.double()).sum() if with_dht else 0)
    refs = torch.autograd.grad(loss, leaves)
    end = T if cu is None else cu[-1]
    tol = TOLERANCE[("cuda", dt)]
    for name, x, ref in zip(["dq", "dk", "dv", "dg", "dh0"], grads, refs):
        x = x.double()
        if name != "dh0":  # tokens past cu_seqlens[-1]: not written (the bindings zero them)
            x, ref = x[:, :end], ref[:, :end]
        assert torch.isfinite(x).all(), f"{name} not finite\n{report}"
        den = ref.norm().item()
        if name == "dg":  # dg sums terms that cancel: measure against their size
            den = max(den, 1e-2 * ((leaves[0] * refs[0]).norm().item()
                                   + (leaves[1] * refs[1]).norm().item()))
        err = (x - ref).norm().item() / den
        assert err <= tol, f"{name} rel {err:.2e}\n{report}"
