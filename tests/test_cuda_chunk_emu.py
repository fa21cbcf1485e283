"""The CUDA chunked forward kernel's own source, run on the CPU (no GPU needed).

tests/cuda_emu/chunk_fwd_emu.cpp includes csrc/cuda/chunk_fwd.cu with GLA_CHUNK_EMULATE: the
kernel body is compiled unchanged by the host C++ compiler, each block's 128 threads run as
fibers, and ldmatrix / mma.m16n8k16 / cp.async are emulated from the PTX ISA's fragment
tables. Every case is run twice with opposite thread orders (a missing __syncthreads changes
the result) and compared with a float64 recurrence on the same rounded inputs, with shared
memory poisoned with NaN and guard zones around every buffer.

This checks indexing, masking, fragment layouts and barriers; it does not check timing, the
real hardware's rounding inside the tensor cores, or anything the CUDA compiler does.
Skips when no C++20 compiler with _Float16 is found.
"""
import os
import random
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SOURCE = os.path.join(HERE, "cuda_emu", "chunk_fwd_emu.cpp")


def _compiler():
    for name in (os.environ.get("CXX"), "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler found")
    out = tmp_path_factory.mktemp("cuda_emu")
    probe = out / "probe.cpp"
    probe.write_text("int main() { _Float16 x = (_Float16)1.5f; return (float)x > 1 ? 0 : 1; }\n")
    if subprocess.run([cxx, "-std=c++20", str(probe), "-o", str(out / "probe")],
                      capture_output=True).returncode != 0:
        pytest.skip(f"{cxx} lacks C++20 or _Float16")
    exe = out / "chunk_fwd_emu"
    build = subprocess.run(
        [cxx, "-std=c++20", "-O2", "-Wall", "-Wno-unknown-pragmas",
         "-I" + os.path.join(ROOT, "csrc"), "-I" + os.path.join(HERE, "cuda_emu"), SOURCE,
         "-o", str(exe)], capture_output=True, text=True)
    assert build.returncode == 0, f"emulator build failed:\n{build.stderr[-4000:]}"
    return str(exe)


CASES = [
    # dtype, B, T, H, K, V, gate, h0, cu, misalign
    ("bf16", 2, 333, 2, 64, 64, "norm:1", 1, "-", 0),
    ("fp16", 1, 129, 3, 128, 128, "norm:1", 1, "-", 0),
    ("bf16", 2, 77, 2, 60, 100, "norm:0.1", 1, "-", 0),
    ("fp16", 2, 100, 2, 100, 60, "norm:16", 0, "-", 0),
    ("bf16", 2, 1, 2, 64, 64, "norm:1", 1, "-", 0),
    ("fp16", 1, 64, 1, 128, 200, "norm:1", 1, "-", 0),
    ("bf16", 1, 201, 2, 96, 40, "norm:1", 1, "0,0,70,70,200,201", 0),
    ("fp16", 1, 150, 2, 64, 72, "norm:1", 0, "0,150", 0),
    ("bf16", 1, 150, 2, 128, 64, "const:-1e4", 1, "-", 0),
    ("fp16", 1, 150, 2, 128, 64, "const:-inf", 1, "-", 0),
    ("bf16", 1, 150, 2, 64, 64, "const:0", 1, "-", 0),
    ("bf16", 2, 130, 2, 64, 64, "norm:1", 1, "-", 1),
    ("fp16", 2, 130, 2, 128, 24, "norm:1", 1, "-", 1),
    ("bf16", 2, 0, 2, 64, 64, "norm:1", 1, "-", 0),
    ("fp16", 1, 70, 1, 3, 5, "norm:1", 1, "-", 0),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(map(str, c)))
def test_kernel_source_on_cpu(emulator, case):
    dtype, B, T, H, K, V, gate, h0, cu, misalign = case
    tol = "1e-2" if dtype == "bf16" else "5e-3"
    args = [emulator, f"dtype={dtype}", f"B={B}", f"T={T}", f"H={H}", f"K={K}", f"V={V}",
            f"gate={gate}", f"h0={h0}", f"cu={cu}", f"misalign={misalign}", f"tol={tol}",
            "order=both", f"seed={random.randrange(2**31)}"]  # fresh inputs every run
    run = subprocess.run(args, capture_output=True, text=True, timeout=600)
    report = " ".join(args[1:]) + "\n" + (run.stdout + run.stderr).strip()
    assert run.returncode == 0 and "PASS" in run.stdout, report
