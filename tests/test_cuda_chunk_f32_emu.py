"""The float32 chunked forward on the tensor cores (csrc/cuda/chunk_fwd_f32.cuh, tf32) run on the
CPU through tests/cuda_emu/chunk_f32_emu.cpp: one tf32 pass (torch's "high") and 3xTF32
("highest") against the float64 reference, with state pools (padding rows, in place), V-first
states, varlen with empty sequences and a padded tail, odd K and V, and -inf / huge / NaN
gates. Every case runs twice with threads and blocks in opposite orders (bitwise equal),
inside poisoned guard zones. Accuracy: "high" <= 1e-3 relative (DESIGN "Numerics" for
float32 on CUDA), "highest" <= 1e-5. check_case / check_gates also serve the split path's
tests (test_cuda_chunk_f32_split_emu.py: split=1).
"""
import pytest
import torch

from gla_ext.reference import naive_recurrent_gla
from test_cuda_chunk_emu import _build
from test_cuda_recurrent_emu import _inputs, _run, _split, check_forward


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    return _build(tmp_path_factory, "chunk_f32_emu")


def _rel(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


CASES = [
    # prec, B, T, H, K, V, cu, P, slots, inplace, vfirst
    (1, 2, 150, 2, 64, 64, None, 0, None, 0, 0),
    (3, 2, 150, 2, 64, 64, None, 0, None, 0, 0),
    (3, 1, 200, 1, 128, 128, None, 0, None, 0, 0),
    (1, 1, 130, 2, 128, 72, None, 0, None, 0, 1),
    (3, 1, 150, 1, 60, 100, [0, 0, 70, 70, 140], 5, [3, -1, 0, 4], 1, 0),
    (3, 2, 80, 1, 100, 40, None, 4, [-1, 2], 0, 1),
    (1, 1, 7, 1, 3, 5, None, 0, None, 0, 0),
]


def check_case(emulator, tmp_path, case, split=0, misalign=0):
    """Runs one case (split=1: the split path too, which must give the fused path's bits;
    the results checked are the split path's) and checks it against float64: o, states and
    pool within 1e-3 with the pool semantics, o (and dense final states) at the precision
    asked for. Returns the emulator's report."""
    prec, B, T, H, K, V, cu, P, slots, inplace, vfirst = case
    N = B if cu is None else len(cu) - 1
    q, k, v, g = _inputs("f32", B, T, H, K, V)
    h0 = torch.randn(P if P else N, H, K, V)
    blobs = [q, k, v, g, h0.transpose(-1, -2).contiguous() if vfirst else h0]
    if P:
        blobs.append(torch.tensor(slots, dtype=torch.int64))
    blob, report = _run(emulator, tmp_path, blobs, prec=prec, B=B, T=T, H=H, K=K, V=V,
                        cu="-" if cu is None else ",".join(map(str, cu)), P=P,
                        inplace=inplace, vfirst=vfirst, split=split, misalign=misalign)
    assert "runs_equal=1" in report and "guards=1" in report, report
    assert "fused_equal=1" in report, f"split and fused paths differ\n{report}"
    idx = torch.tensor(slots, dtype=torch.int64) if P else None
    # o, states and pool within float32-on-CUDA's 1e-3, pool semantics
    check_forward(blob, report, q, k, v, g, h0, idx, "f32", cu, 0, P, slots, inplace, vfirst)
    # and the precision asked for: 3xTF32 within 1e-5, one tf32 pass worse than that
    o = _split(blob[:B * T * H * V * 4], [((B, T, H, V), torch.float32)])[0]
    o_ref, ht_ref = naive_recurrent_gla(
        q.double(), k.double(), v.double(), g.double(), scale=K ** -0.5,
        initial_state=h0.double().clone(), output_final_state=True,
        cu_seqlens=None if cu is None else torch.tensor(cu),
        **(dict(state_indices=idx) if P else {}))
    rel = _rel(o, o_ref)
    if prec == 3:
        assert rel <= 1e-5, f"3xTF32 o rel {rel:.2e}\n{report}"
    else:
        assert 1e-6 < rel <= 1e-3, f"1xTF32 o rel {rel:.2e}\n{report}"
    if P == 0 and not inplace:  # dense final states
        shape = (N, H, V, K) if vfirst else (N, H, K, V)
        ht = _split(blob[B * T * H * V * 4:], [(shape, torch.float32)])[0]
        rel_h = _rel(ht.transpose(-1, -2) if vfirst else ht, ht_ref)
        assert rel_h <= (1e-5 if prec == 3 else 1e-3), f"ht rel {rel_h:.2e}\n{report}"
    return report


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:6])))
def test_f32_forward_on_cpu(emulator, tmp_path, case):
    check_case(emulator, tmp_path, case)


def check_gates(emulator, tmp_path, gate, B, H, split=0):
    """Gates of -inf / -1e4 / -3e38 at chunk and 16-token block boundaries (exact forgets),
    or one NaN gate: NaN exactly where the float64 reference has it (that sequence and head
    from that token on), every other output still within 3xTF32's 1e-5."""
    T, K, V = 200, 64, 48
    q, k, v, g = _inputs("f32", B, T, H, K, V)
    h0 = torch.randn(B, H, K, V)
    if gate == "nan":
        g[0, 70, 1, 5] = float("nan")
    else:
        for t in (15, 16, 63, 64, 127, 150):
            g[:, t, :, ::3] = float(gate)
    blob, report = _run(emulator, tmp_path, [q, k, v, g, h0], prec=3, B=B, T=T, H=H, K=K,
                        V=V, cu="-", P=0, inplace=0, vfirst=0, split=split, misalign=0)
    assert "runs_equal=1" in report and "guards=1" in report, report
    assert "fused_equal=1" in report, f"split and fused paths differ\n{report}"
    o, ht = _split(blob, [((B, T, H, V), torch.float32), ((B, H, K, V), torch.float32)])
    o_ref, ht_ref = naive_recurrent_gla(q.double(), k.double(), v.double(), g.double(),
                                        scale=K ** -0.5, initial_state=h0.double(),
                                        output_final_state=True)
    nan_ref = torch.isnan(o_ref)
    assert torch.equal(torch.isnan(o), nan_ref), report
    if gate == "nan":
        assert nan_ref[0, 70:, 1].all() and not nan_ref[0, :70, 1].any(), "reference changed"
    fin = ~nan_ref
    rel = _rel(o[fin], o_ref[fin])
    assert rel <= 1e-5, f"o rel {rel:.2e}\n{report}"
    live = ~torch.isnan(ht_ref)
    rel_h = _rel(ht[live], ht_ref[live])
    assert rel_h <= 1e-5 and torch.equal(torch.isnan(ht), ~live), f"ht rel {rel_h:.2e}\n{report}"


@pytest.mark.parametrize("gate", ["-inf", "-1e4", "-3e38", "nan"])
def test_f32_forward_adversarial_gates(emulator, tmp_path, gate):
    check_gates(emulator, tmp_path, gate, B=2, H=2)
