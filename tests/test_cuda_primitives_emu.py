"""Arithmetic primitives of csrc/cuda/chunk_common.cuh on the CPU emulator, bitwise or against
float64, with fresh random inputs every run.

- Cumulative gate sums (gate_cumsum; harness tests/cuda_emu/gate_sum_emu.cpp): on the GPU
  every step `run + g * log2(e)` is one FFMA; the emulator's host build would round the
  product first, so about a fifth of the sums would differ by an ulp and the emulator's
  bitwise checks (fused == split) would be about arithmetic the GPU does not run. Compared
  bitwise with a std::fma reference of the same order; the harness also counts the sums a
  multiply-then-add reference gets differently, which must be non-zero (else this test could
  not tell a fused step from an unfused one).
- tf32 (cvt_rna_tf32, cvt_rn_tf32, cvt_tf32, mma_tf32, tf32_split; harness
  tests/cuda_emu/tf32_emu.cpp): cvt.rna.tf32.f32 rounding (ties away from zero) and
  cvt.rn.tf32.f32 (sm_90+, ties to even) on chosen values (ties both ways, just below/above,
  overflow to infinity, subnormals, NaN kept) and against a float64 reference on a million
  random bit patterns; the m16n8k8 fragment layout against a float64 product, raw float32
  operands truncated by the tensor cores, one tf32 pass at ~1e-4 relative error and 3xTF32 at
  float32 accuracy (docs/cuda_float32.md). Built twice: as sm_80 device code (the kernels round
  with rna) and as sm_90 code (tf32_emu_sm90.cpp: rn).
"""
import random
import re
import subprocess

import pytest

from test_cuda_chunk_emu import _build


def _run(exe, *args):
    seed = random.randrange(2**31)
    run = subprocess.run([exe, f"seed={seed}", *args], capture_output=True, text=True,
                         timeout=300)
    return run, f"seed={seed}\n{run.stdout}{run.stderr}"


@pytest.fixture(scope="module", params=["gate_sum_emu", "tf32_emu", "tf32_emu_sm90"])
def harness(request, tmp_path_factory):
    return request.param, _build(tmp_path_factory, request.param)


def test_primitive(harness):
    name, exe = harness
    if name == "gate_sum_emu":
        check_gate_sums(exe)
    else:
        check_tf32(exe, "rn" if name.endswith("sm90") else "rna")


def check_gate_sums(exe):
    run, report = _run(exe, "chunks=40")
    m = re.search(r"mismatch=(\d+) unfused_differs=(\d+) total=(\d+)", run.stdout)
    assert m, report
    mismatch, unfused, total = map(int, m.groups())
    assert total == 40 * 64 * 64, report
    assert mismatch == 0 and run.returncode == 0 and "PASS" in run.stdout, report
    assert unfused > total // 50, report  # the reference tells FMA from mul+add


def check_tf32(exe, rounding):
    run, report = _run(exe, "reps=20")
    assert run.returncode == 0 and run.stdout.strip().endswith("PASS"), report
    assert "cvt_rna_tf32 ok" in run.stdout and "cvt_rn_tf32 ok" in run.stdout, report
    assert "rn_wrong=0 rna_wrong=0" in run.stdout, report
    # the kernels' operand rounding follows the arch: rn on sm_90+, rna before
    assert f"kernel_rounding={rounding}\n" in run.stdout, report
