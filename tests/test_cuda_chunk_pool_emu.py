"""State pools in the CUDA chunked forward (csrc/cuda/chunk_fwd.cu, fused and split paths),
run on the CPU through tests/cuda_emu/chunk_pool_emu.cpp: h0 rows read through state indices,
padding rows (no state read or written, o zero), final states written into the pool in place,
V-first states, varlen with empty sequences and a padded tail. Checked against the float64
reference like the recurrent kernel (test_cuda_recurrent_emu.check_forward); the fused and the
split path must agree bitwise.
"""
import pytest
import torch

from test_cuda_chunk_emu import _build
from test_cuda_recurrent_emu import _inputs, _run, check_forward


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    return _build(tmp_path_factory, "chunk_pool_emu")


CASES = [
    # dtype, B, T, H, K, V, cu, P, slots, inplace, vfirst
    ("bf16", 1, 150, 1, 64, 64, [0, 70, 70, 140], 5, [3, -1, 0], 1, 0),
    ("fp16", 2, 80, 1, 128, 72, None, 4, [-1, 2], 1, 1),
    ("bf16", 1, 100, 2, 40, 64, [0, 0, 30, 100], 6, [5, 1, -1], 0, 1),
    ("fp16", 3, 20, 1, 64, 64, None, 0, None, 0, 1),     # dense V-first
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c[:7])))
def test_chunk_forward_pool_on_cpu(emulator, tmp_path, case):
    dtype, B, T, H, K, V, cu, P, slots, inplace, vfirst = case
    N = B if cu is None else len(cu) - 1
    q, k, v, g = _inputs(dtype, B, T, H, K, V)
    h0 = torch.randn(P if P else N, H, K, V)
    blobs = [q, k, v, g, h0.transpose(-1, -2).contiguous() if vfirst else h0]
    idx = None
    if P:
        idx = torch.tensor(slots, dtype=torch.int64)
        blobs.append(idx)
    blob, report = _run(emulator, tmp_path, blobs, dtype=dtype, B=B, T=T, H=H, K=K, V=V,
                        cu="-" if cu is None else ",".join(map(str, cu)), P=P,
                        inplace=inplace, vfirst=vfirst, mode="both")
    check_forward(blob, report, q, k, v, g, h0, idx, dtype, cu, 0, P, slots, inplace, vfirst)
