"""A NaN gate propagates on every backend, as in the reference: outputs before it stay finite
and equal to a NaN-free run (before its 16-token block, see below), the state (and so every later output of that sequence and head)
becomes NaN; other heads and sequences are untouched. (The CUDA chunk kernels used to turn a
NaN gate into a full forget through fmaxf in their gate floor.)"""
import pytest
import torch

from gla_ext import chunk_gla, fused_recurrent_gla
from helpers import has_cuda_kernel, make_inputs

_GPU = has_cuda_kernel("gla_ext::chunk_fwd")
CASES = [("cpu", torch.float32), ("reference", torch.float32)] + [
    pytest.param("cuda", dt, marks=pytest.mark.skipif(not _GPU, reason="needs a GPU"))
    for dt in (torch.float32, torch.bfloat16)]


@pytest.mark.parametrize("op", [chunk_gla, fused_recurrent_gla])
@pytest.mark.parametrize("backend,dtype", CASES)
@pytest.mark.parametrize("isa", ["", "avx2", "generic"])   # the CPU kernels' copies
def test_nan_gate_propagates(op, backend, dtype, isa, monkeypatch):
    if isa and backend != "cpu":
        pytest.skip("the ISA copies are the CPU kernels'")
    monkeypatch.setenv("GLA_EXT_CPU_ISA", isa)
    device = "cuda" if backend == "cuda" else "cpu"
    q, k, v, g, h0 = make_inputs(2, 80, 2, 16, 8, dtype=dtype, device=device)
    g_nan = g.clone()
    g_nan[0, 70, 1, 3] = float("nan")     # sequence 0, head 1, token 70 (second chunk of 64)
    with torch.no_grad():
        o, ht = op(q, k, v, g, initial_state=h0, output_final_state=True, backend=backend)
        o_n, ht_n = op(q, k, v, g_nan, initial_state=h0, output_final_state=True,
                       backend=backend)
    # Tokens before the NaN's 16-token block are untouched. (Inside that block the CPU chunk
    # kernel's avx2/generic score loop multiplies masked-out zeros by the decay, and 0 * NaN
    # is NaN: a few earlier outputs of that block may be NaN too. Propagation is the contract.)
    assert torch.equal(o_n[0, :64], o[0, :64]) and torch.equal(o_n[:, :, 0], o[:, :, 0])
    assert torch.equal(o_n[1], o[1]) and torch.equal(ht_n[1], ht[1])
    assert torch.isnan(o_n[0, 70:, 1]).all(), "outputs after the NaN gate must be NaN"
    assert torch.isnan(ht_n[0, 1, 3]).all() and torch.equal(ht_n[0, 0], ht[0, 0])
