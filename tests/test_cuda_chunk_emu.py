"""The CUDA chunked kernels' own source (forward and backward), run on the CPU (no GPU needed).

tests/cuda_emu/chunk_{fwd,bwd}_emu.cpp include csrc/cuda/chunk_{fwd,bwd}.cu with
GLA_CHUNK_EMULATE: the kernel bodies are compiled unchanged by the host C++ compiler, each
block's threads run as fibers, and ldmatrix / mma.m16n8k16 / cp.async / shfl.xor are emulated
from the PTX ISA's definitions. Every case is run twice with opposite thread orders (a missing
__syncthreads changes the result), with shared memory and the backward's workspace poisoned
with NaN and guard zones around every buffer. The forward is compared with a float64
recurrence inside the harness; the backward's gradients (dq, dk, dv, dg, dh0) with torch
autograd through gla_ext.reference in float64 on the same rounded inputs.

This checks indexing, masking, fragment layouts and barriers; it does not check timing, the
real hardware's rounding inside the tensor cores, or anything the CUDA compiler does.
Skips when no C++20 compiler with _Float16 is found. GLA_EMU_CSRC=DIR compiles the kernels from
another copy of csrc/ (to check that these tests catch deliberately broken kernels).
"""
import os
import random
import re
import shutil
import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from gla_ext.reference import naive_recurrent_gla
from helpers import CUDA_BF16_DG_STRONG_DECAY_TOL, TOLERANCE, record_diagnostic

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
EMU_DIR = os.path.join(HERE, "cuda_emu")


def _compiler():
    for name in (os.environ.get("CXX"), "g++", "clang++"):
        if name and shutil.which(name):
            return name
    return None


def _build(tmp_path_factory, name):
    cxx = _compiler()
    if cxx is None:
        pytest.skip("no C++ compiler found")
    out = tmp_path_factory.mktemp("cuda_emu")
    probe = out / "probe.cpp"
    probe.write_text("int main() { _Float16 x = (_Float16)1.5f; return (float)x > 1 ? 0 : 1; }\n")
    if subprocess.run([cxx, "-std=c++20", str(probe), "-o", str(out / "probe")],
                      capture_output=True).returncode != 0:
        pytest.skip(f"{cxx} lacks C++20 or _Float16")
    exe = out / name
    build = subprocess.run(
        [cxx, "-std=c++20", "-O2", "-Wall", "-Wno-unknown-pragmas",
         "-I" + os.environ.get("GLA_EMU_CSRC", os.path.join(ROOT, "csrc")), "-I" + EMU_DIR,
         os.path.join(EMU_DIR, name + ".cpp"), "-o", str(exe)], capture_output=True, text=True)
    assert build.returncode == 0, f"emulator build failed:\n{build.stderr[-4000:]}"
    return str(exe)


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    return _build(tmp_path_factory, "chunk_fwd_emu")


@pytest.fixture(scope="module")
def bwd_emulator(tmp_path_factory):
    return _build(tmp_path_factory, "chunk_bwd_emu")


# 300 packed sequences of 0..4 tokens (more than one round of the chunk-offset scan)
_MANY = [0]
for _i in range(300):
    _MANY.append(_MANY[-1] + (_i * 7) % 5)
MANY_OFFSETS = ",".join(map(str, _MANY))

CASES = [
    # dtype, B, T, H, K, V, gate, h0, cu, misalign
    ("bf16", 2, 333, 2, 64, 64, "norm:1", 1, "-", 0),
    ("fp16", 1, 129, 3, 128, 128, "norm:1", 1, "-", 0),
    ("bf16", 2, 77, 2, 60, 100, "norm:0.1", 1, "-", 0),
    ("fp16", 2, 100, 2, 100, 60, "norm:16", 0, "-", 0),
    ("bf16", 2, 1, 2, 64, 64, "norm:1", 1, "-", 0),
    ("fp16", 1, 64, 1, 128, 200, "norm:1", 1, "-", 0),
    ("bf16", 1, 201, 2, 96, 40, "norm:1", 1, "0,0,70,70,200,201", 0),
    ("fp16", 1, 300, 1, 64, 64, "norm:1", 1, "0,0,5,5,70,71,130,130,200,264,265,300,300", 0),
    ("bf16", 1, _MANY[-1], 1, 64, 64, "norm:1", 1, MANY_OFFSETS, 0),
    ("fp16", 1, 150, 2, 64, 72, "norm:1", 0, "0,150", 0),
    ("bf16", 1, 150, 2, 128, 64, "const:-1e4", 1, "-", 0),
    ("fp16", 1, 150, 2, 128, 64, "const:-inf", 1, "-", 0),
    ("bf16", 1, 150, 2, 64, 64, "const:0", 1, "-", 0),
    ("bf16", 2, 130, 2, 64, 64, "norm:1", 1, "-", 1),
    ("fp16", 2, 130, 2, 128, 24, "norm:1", 1, "-", 1),
    ("bf16", 2, 0, 2, 64, 64, "norm:1", 1, "-", 0),
    ("fp16", 1, 70, 1, 3, 5, "norm:1", 1, "-", 0),
]


def _case_id(case):
    return "-".join(str(x) if len(str(x)) < 40 else f"{len(str(x).split(','))-1}seqs"
                    for x in case)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_kernel_source_on_cpu(emulator, case):
    dtype, B, T, H, K, V, gate, h0, cu, misalign = case
    tol = "1e-2" if dtype == "bf16" else "5e-3"
    args = [emulator, f"dtype={dtype}", f"B={B}", f"T={T}", f"H={H}", f"K={K}", f"V={V}",
            f"gate={gate}", f"h0={h0}", f"cu={cu}", f"misalign={misalign}", f"tol={tol}",
            "order=both", "mode=both",  # fused in one thread order, split in the other
            f"seed={random.randrange(2**31)}"]  # fresh inputs every run
    run = subprocess.run(args, capture_output=True, text=True, timeout=600)
    report = " ".join(args[1:]) + "\n" + (run.stdout + run.stderr).strip()
    assert run.returncode == 0 and "PASS" in run.stdout, report


# The state scan's warps own 16 V columns each (8 warps, 128 columns per block); a warp whose
# columns all lie past V skips its state update, so the scan's tensor-core work follows V
# (half at V = 64). Per chunk and key tile an active warp runs 4 token blocks x KT/16 x 2 mma.
@pytest.mark.parametrize("K,V", [(64, 64), (64, 40), (128, 136), (64, 128)])
def test_scan_mma_follows_v(emulator, K, V):
    T, H = 130, 2  # 3 chunks
    args = [emulator, "dtype=bf16", "B=1", f"T={T}", f"H={H}", f"K={K}", f"V={V}",
            "gate=norm:1", "h0=1", "cu=-", "misalign=0", "tol=1e-2", "order=fwd",
            "mode=split", f"seed={random.randrange(2**31)}"]
    run = subprocess.run(args, capture_output=True, text=True, timeout=600)
    report = " ".join(args[1:]) + "\n" + (run.stdout + run.stderr).strip()
    assert run.returncode == 0 and "PASS" in run.stdout, report
    chunks, key_tiles, active_warps = -(-T // 64), -(-K // 64), -(-V // 16)
    expected = H * chunks * key_tiles * active_warps * 4 * (64 // 16) * 2
    assert re.search(rf"\bscan_mmas={expected}\b", run.stdout), report


# ---- backward ---------------------------------------------------------------------------

BWD_CASES = [
    # dtype, B, T, H, K, V, gate, h0, dht, cu, misalign
    ("bf16", 2, 130, 1, 64, 64, "norm:1", 1, 1, "-", 0),
    ("fp16", 1, 150, 2, 128, 128, "norm:1", 1, 1, "-", 0),
    ("bf16", 1, 100, 1, 60, 100, "norm:0.1", 1, 0, "-", 0),
    ("fp16", 1, 77, 1, 100, 60, "norm:16", 0, 1, "-", 0),
    ("bf16", 2, 1, 1, 64, 64, "norm:1", 1, 1, "-", 0),
    ("bf16", 1, 201, 1, 96, 40, "norm:1", 1, 1, "0,0,70,70,200,201", 0),
    ("fp16", 1, 300, 1, 64, 64, "norm:1", 1, 1, "0,0,5,5,70,71,130,130,200,264,265,300,300", 0),
    ("bf16", 1, _MANY[-1], 1, 64, 64, "norm:1", 1, 1, MANY_OFFSETS, 0),
    ("fp16", 1, 130, 1, 64, 72, "norm:1", 0, 0, "0,130", 0),
    ("bf16", 1, 130, 1, 128, 64, "const:-1e4", 1, 1, "-", 0),
    ("fp16", 1, 130, 1, 64, 64, "const:-inf", 1, 1, "-", 0),
    ("bf16", 1, 130, 1, 64, 64, "const:0", 1, 1, "-", 0),
    ("bf16", 1, 150, 1, 128, 64, "mixed:-", 1, 1, "-", 0),
    ("bf16", 1, 100, 1, 64, 64, "norm:1", 1, 1, "-", 1),
    ("fp16", 1, 70, 1, 3, 5, "norm:1", 1, 1, "-", 1),
    ("bf16", 2, 0, 1, 64, 64, "norm:1", 1, 1, "-", 0),
]

_TORCH_DTYPE = {"bf16": torch.bfloat16, "fp16": torch.float16, "f32": torch.float32}


def _bwd_inputs(dtype, B, T, H, K, V, gate, N):
    dt = _TORCH_DTYPE[dtype]
    q, k = (torch.randn(B, T, H, K).to(dt) for _ in range(2))
    v, do = (torch.randn(B, T, H, V).to(dt) for _ in range(2))
    kind, value = gate.split(":")
    if kind == "mixed":  # full forget, near-full forget and no decay among drawn gates
        g = F.logsigmoid(torch.randn(B, T, H, K, dtype=torch.float64)).float()
        u = torch.rand(B, T, H, K)
        g[u < 0.1] = float("-inf")
        g[(u >= 0.1) & (u < 0.2)] = -1e4
        g[(u >= 0.2) & (u < 0.35)] = 0.0
    elif kind == "norm":
        g = (F.logsigmoid(torch.randn(B, T, H, K, dtype=torch.float64)) / float(value)).float()
    else:
        g = torch.full((B, T, H, K), float(value))
    h0, dht = (torch.randn(N, H, K, V) for _ in range(2))
    return q, k, v, do, g, h0, dht


# Both thread orders by default (a missing barrier changes the result). The seed sweep
# (tools/seed_sweep.py), which measures only the numbers, may set GLA_EMU_BWD_ORDER=fwd to run
# one order: the harness already requires the two to agree bitwise.
BWD_ORDER = os.environ.get("GLA_EMU_BWD_ORDER", "both")


def _rel(x, ref):
    den = ref.norm().item()
    return (x - ref).norm().item() / den if den > 0 else (x - ref).norm().item()


def bwd_errors(grads, q, k, v, do, g, h0, dht, with_h0, with_dht, offsets, report):
    """Relative errors of the kernel's (dq, dk, dv, dg, dh0) against torch autograd through the
    float64 reference on the same (rounded) inputs; also how much of q*dq and k*dk cancels in
    dg (small = strong cancellation). Asserts every gradient is finite."""
    K = q.shape[-1]
    # Without h0 the kernel still writes dh0, the gradient on a zero initial state, so the
    # reference always starts from one (the same math).
    h0_ref = h0 if with_h0 else torch.zeros_like(h0)
    leaves = [x.double().requires_grad_() for x in (q, k, v, g, h0_ref)]
    cu_t = None if offsets is None else torch.tensor(offsets)
    o_ref, ht_ref = naive_recurrent_gla(*leaves[:4], scale=K ** -0.5, initial_state=leaves[4],
                                        output_final_state=True, cu_seqlens=cu_t)
    loss = (o_ref * do.double()).sum()
    if with_dht:
        loss = loss + (ht_ref * dht.double()).sum()
    refs = torch.autograd.grad(loss, leaves, allow_unused=True)
    refs = [torch.zeros_like(x) if r is None else r for r, x in zip(refs, leaves)]
    errors, dg_ref_over_terms = {}, None
    for name, x, ref in zip(["dq", "dk", "dv", "dg", "dh0"], grads, refs):
        assert torch.isfinite(x).all(), f"{name} not finite\n{report}"
        if name == "dg":  # exact zeros for full forget: measure against the terms it sums
            terms = (leaves[0] * refs[0]).norm().item() + (leaves[1] * refs[1]).norm().item()
            den = max(ref.norm().item(), 1e-2 * terms)
            errors[name] = (x - ref).norm().item() / den if den > 0 else (x - ref).norm().item()
            dg_ref_over_terms = ref.norm().item() / max(terms, 1e-30)
        else:
            errors[name] = _rel(x, ref)
    return errors, dg_ref_over_terms


@pytest.mark.parametrize("case", BWD_CASES, ids=_case_id)
def test_backward_kernel_source_on_cpu(bwd_emulator, tmp_path, case):
    dtype, B, T, H, K, V, gate, with_h0, with_dht, cu, misalign = case
    offsets = None if cu == "-" else [int(x) for x in cu.split(",")]
    N = B if offsets is None else len(offsets) - 1
    q, k, v, do, g, h0, dht = _bwd_inputs(dtype, B, T, H, K, V, gate, N)
    blobs = [q, k, v, do, g] + ([h0] if with_h0 else []) + ([dht] if with_dht else [])
    raw = b"".join((x.view(torch.int16) if x.dtype in (torch.bfloat16, torch.float16) else x)
                   .contiguous().numpy().tobytes() for x in blobs)
    (tmp_path / "in.bin").write_bytes(raw)
    args = [bwd_emulator, f"dtype={dtype}", f"B={B}", f"T={T}", f"H={H}", f"K={K}", f"V={V}",
            f"h0={with_h0}", f"dht={with_dht}", f"cu={cu}", f"misalign={misalign}",
            f"order={BWD_ORDER}", f"in={tmp_path / 'in.bin'}", f"out={tmp_path / 'out.bin'}"]
    run = subprocess.run(args, capture_output=True, text=True, timeout=900)
    report = " ".join(args[1:8]) + "\n" + (run.stdout + run.stderr).strip()
    assert run.returncode == 0 and "DONE" in run.stdout, report

    out = np.frombuffer((tmp_path / "out.bin").read_bytes(), dtype=np.uint8)
    sizes = [(q.shape, q.dtype), (k.shape, k.dtype), (v.shape, v.dtype), (g.shape, torch.float32),
             ((N, H, K, V), torch.float32)]
    grads, pos = [], 0
    for shape, dt in sizes:
        nbytes = int(np.prod(shape)) * torch.empty((), dtype=dt).element_size()
        chunk = torch.from_numpy(out[pos:pos + nbytes].copy())
        grads.append((chunk.view(dt) if nbytes else torch.empty(0, dtype=dt)).view(shape).double())
        pos += nbytes
    assert pos == out.size, report

    errors, dg_ref_over_terms = bwd_errors(grads, q, k, v, do, g, h0, dht, with_h0, with_dht,
                                           offsets, report)
    print(" ".join(f"{n}={e:.2e}" for n, e in errors.items()))
    record_diagnostic(**{f"{n}_err": e for n, e in errors.items()}, dg_ref_over_terms=dg_ref_over_terms)
    tol = TOLERANCE[("cuda", _TORCH_DTYPE[dtype])]
    for name, err in errors.items():  # one assertion per gradient (the seed sweep reads each)
        bound = tol
        if name == "dg" and dtype == "bf16" and gate == "norm:0.1":
            bound = CUDA_BF16_DG_STRONG_DECAY_TOL  # measured and explained in tests/helpers.py
        assert err <= bound, f"{name}: relative error over {bound}\nall: {errors}\n{report}"
