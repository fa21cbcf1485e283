"""The split float32 forward (csrc/cuda/chunk_fwd_f32_split.cuh: float32 state scan + one block
per chunk and head, tf32 tensor cores) run on the CPU through tests/cuda_emu/chunk_f32_emu.cpp
with split=1, which runs the fused kernel on the same inputs too. Every case: the split
path's o, final states and pool bitwise equal to the fused path's (same precision), both
paths run twice with threads and blocks in opposite orders (bitwise equal) inside poisoned
guard zones, the split path over a NaN-poisoned workspace; the split results against the
float64 reference (test_cuda_chunk_f32_emu.check_case / check_gates): one tf32 pass ("high")
<= 1e-3, 3xTF32 ("highest") <= 1e-5, with state pools (padding rows, in place), V-first
states, varlen with empty sequences and a padded tail, odd K and V, misaligned pointers, and
-inf / huge / NaN gates.
"""
import pytest

from test_cuda_chunk_f32_emu import check_case, check_gates, emulators  # noqa: F401 (fixture)

CASES = [
    # (prec, B, T, H, K, V, cu, P, slots, inplace, vfirst), misalign
    ((1, 1, 200, 1, 64, 64, None, 0, None, 0, 0), 0),
    ((3, 1, 200, 1, 128, 128, None, 0, None, 0, 0), 0),
    ((1, 1, 130, 1, 128, 72, None, 0, None, 0, 1), 0),
    ((3, 1, 150, 1, 60, 100, [0, 0, 70, 70, 140], 5, [3, -1, 0, 4], 1, 0), 0),
    ((1, 2, 80, 1, 100, 40, None, 4, [-1, 2], 0, 1), 0),
    ((3, 1, 100, 1, 64, 24, None, 0, None, 0, 0), 1),
    ((3, 1, 7, 1, 3, 5, None, 0, None, 0, 0), 0),
]
# the same kernels built as sm_90 code (tf32 operands rounded by cvt.rn instead of cvt.rna)
SM90_CASES = [CASES[1], CASES[3]]


@pytest.mark.parametrize("case,misalign", CASES,
                         ids=lambda c: "-".join(map(str, c[:6])) if isinstance(c, tuple)
                         else f"mis{c}")
def test_f32_split_forward_on_cpu(emulators, tmp_path, case, misalign):
    _split_case(emulators, tmp_path, case, misalign, arch=80)


@pytest.mark.parametrize("case,misalign", SM90_CASES,
                         ids=lambda c: "-".join(map(str, c[:6])) if isinstance(c, tuple)
                         else f"mis{c}")
def test_f32_split_forward_sm90_on_cpu(emulators, tmp_path, case, misalign):
    _split_case(emulators, tmp_path, case, misalign, arch=90)


def _split_case(emulators, tmp_path, case, misalign, arch):
    report = check_case(emulators[arch], tmp_path, case, split=1, misalign=misalign, arch=arch)
    # the launcher's rule (132 SMs) picks split for these few sequences x heads, when their
    # sequences span two chunks or more (the varlen case: 140 tokens over 4 sequences do not)
    T, cu = case[2], case[6]
    long_enough = (T + 63) // 64 >= (2 * (len(cu) - 1) if cu else 2)
    assert f"auto_split={int(long_enough)}" in report, report


@pytest.mark.parametrize("gate", ["-inf", "-1e4", "-3e38", "nan"])
def test_f32_split_forward_adversarial_gates(emulators, tmp_path, gate):
    check_gates(emulators[80], tmp_path, gate, B=1, H=2, split=1)
