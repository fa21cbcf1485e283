"""The float32 forward's and backward's benchmark tooling on the CPU (no GPU, no nvcc):
sass_stats.py's kernel names, its counts of the float32 scores' work per warp and of
warp_mma_tiles' call sites, and bench_gpu_f32.py's measuring code (run with the CPU kernels; on
a GPU the same code times the CUDA kernels)."""
import math
import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "benchmarks"))
import bench_gpu_f32  # noqa: E402
import sass_stats  # noqa: E402

# names as nvdisasm prints them (the hash in the anonymous namespace holds digits that an
# identifier length could be mistaken for)
NAMES = [
    ("_ZN3gla45_GLOBAL__N__d09b16af_12_chunk_fwd_cu_5a7beb2f24gla_chunk_fwd_f32_kernelILi128ELi3E"
     "EEvNS0_9ChunkArgsE", ("gla_chunk_fwd_f32_kernel", "f32", [128, 3], [])),
    ("_ZN3gla45_GLOBAL__N__4b0a54b9_12_chunk_bwd_cu_b30ef25420gla_chunk_bwd_kernelI6__halfLi64EE"
     "EvNS0_9ChunkArgsE", ("gla_chunk_bwd_kernel", "fp16", [64], [])),
    ("_ZN3gla45_GLOBAL__N__d09b16af_12_chunk_fwd_cu_5a7beb2f20gla_chunk_fwd_kernelI13__nv_bfloat16"
     "Li128ELb1EEEvNS0_9ChunkArgsE", ("gla_chunk_fwd_kernel", "bf16", [128], [True])),
    ("_ZN3gla45_GLOBAL__N__4b0a54b9_12_chunk_bwd_cu_b30ef25424gla_chunk_offsets_kernelENS0_9Chunk"
     "ArgsE", ("gla_chunk_offsets_kernel", "", [], [])),
    ("_ZN3gla45_GLOBAL__N__4b0a54b9_12_chunk_bwd_cu_b30ef25424gla_chunk_bwd_f32_kernelILi64ELi1EE"
     "EvNS0_9ChunkArgsE", ("gla_chunk_bwd_f32_kernel", "f32", [64, 1], [])),
    ("_ZN3gla45_GLOBAL__N__4b0a54b9_12_chunk_bwd_cu_b30ef25432gla_chunk_state_scans_f32_kernelILi"
     "128ELi3EEEvNS0_9ChunkArgsE", ("gla_chunk_state_scans_f32_kernel", "f32", [128, 3], [])),
]


@pytest.mark.parametrize("mangled,expected", NAMES)
def test_kernel_names(mangled, expected):
    assert sass_stats.describe(mangled) == expected


@pytest.mark.parametrize("name,ints", [("gla_chunk_fwd_f32_kernel", [128, 1]),
                                       ("gla_chunk_bwd_f32_kernel", [64, 3])])
def test_score_work_per_warp(name, ints):
    """f32_scores splits its work over the warps: off-diagonal units u = warp, warp + kNW, ...
    below 6, and the diagonal block kNW - 1 - warp when below 4. sass_stats' trips for the unit
    loop (its generic `for` rule on the kernel's source line) and its fraction for the diagonal
    block equal those splits averaged over the warps (4 in the forward, 8 in the backward)."""
    c = sass_stats.kernel_constants(name, ints, [], "chunk_fwd.cu")
    nw = c["NWARPS"]
    assert c["kNW"] == nw
    path = os.path.join(sass_stats.ROOT, "csrc", "cuda", "chunk_fwd_f32.cuh")
    with open(path) as f:
        lines = f.read().splitlines()
    line = next(i + 1 for i, ln in enumerate(lines)
                if "for (int u = warp; u < 6; u += kNW)" in ln)
    fn = {"ins": [{"text": "BRA `(.L_x_0)", "op": "BRA", "chain": []}], "loops": []}
    loop = {"chain": [(path, line)], "first": 0, "last": 0}
    trips, _ = sass_stats.loop_trips(fn, loop, c)
    assert trips == pytest.approx(sum(len(range(w, 6, nw)) for w in range(nw)) / nw)
    frac = next(f for key, f in sass_stats.FRACTION_RULES if "if (dblk < 4)" in key)
    assert frac(c) == pytest.approx(sum(nw - 1 - w < 4 for w in range(nw)) / nw)
    assert any("if (dblk < 4) {  // warp-uniform" in ln for ln in lines)  # the rule's anchor


def test_warp_mma_tiles_trips_follow_call_sites():
    """The float32 backward's k loops (one source loop, inlined at each call) take their trips
    from the call's k range, per warp (r0 = 16 * (warp % 4)), as the kernel runs them."""
    c = sass_stats.kernel_constants("gla_chunk_bwd_f32_kernel", [128, 3], [], "chunk_bwd.cu")
    path = os.path.join(sass_stats.ROOT, "csrc", "cuda", "chunk_bwd_f32.cuh")
    with open(path) as f:
        lines = f.read().splitlines()

    helper = next(i + 1 for i, ln in enumerate(lines)
                  if "warp_mma_tiles<kPasses, kKN>(tmp, k_begin, k_end" in ln)

    def trips(call):
        line = next(i + 1 for i, ln in enumerate(lines) if call in ln)
        # through add_off_diagonal: its inner call passes k_begin / k_end on
        inner = [(path, helper)] if "add_off_diagonal" in lines[line - 1] else []
        loop = {"chain": [("loop", 0)] + inner + [(path, line)]}
        return sass_stats.call_site_trips(loop, c)
    rows = [16 * (w % 4) for w in range(8)]
    assert trips("dA, 0, kF32TileV, lane") == 2                      # 16 V columns, step 8
    assert trips("acc, 0, KT, lane") == 128 / 8                      # Kb @ dS over all K
    assert trips("acc, r0, kC, lane") == pytest.approx(
        sum((64 - r) / 8 for r in rows) / 8)                         # A^T dO: tokens >= r0
    assert trips("add_off_diagonal<KT, kPasses, L>(") == pytest.approx(  # dq: tokens < r0
        sum(r / 8 for r in rows) / 8)
    line = next(i for i, ln in enumerate(lines) if "dk, sB, r0 + 15, r0 + 16, kC, false," in ln)
    loop = {"chain": [("loop", 0), (path, helper), (path, line + 1)]}
    assert sass_stats.call_site_trips(loop, c) == pytest.approx(
        sum(max(0, (64 - r - 16) / 8) for r in rows) / 8)              # dk: tokens > r0 + 15


_PATH_BEFORE = os.environ.get("GLA_EXT_CHUNK_FWD")


def _cpu_timer(fn):
    fn()
    return 1e-3, 0


def test_bench_f32_measures_against_float64():
    """A row of the float32 section at a small shape: every error is the measured one (the CPU
    kernels are float32-accurate), the ratios follow the times, and the verdict names both
    targets."""
    rows, lines = [], []
    bench_gpu_f32.bench_f32([(2, 100, 3, 24)], _cpu_timer, rows, lines, fla=None,
                            fla_error="absent", device="cpu")
    assert len(rows) == 1
    row = rows[0]
    for prec in bench_gpu_f32.TARGETS:
        assert 0 < row[f"{prec}_err_o"] < 1e-5 and 0 < row[f"{prec}_err_ht"] < 1e-5
        assert row[f"{prec}_over_bf16"] == pytest.approx(row[f"{prec}_s"] / row["bf16_s"])
    assert math.isnan(row["fla_s"]) and math.isnan(row["fla_err_o"])
    # both forward paths forced (the CPU kernels have one: equal bits, float32 accuracy)
    for prec in bench_gpu_f32.TARGETS:
        assert row[f"{prec}_split_equal"] and 0 < row[f"{prec}_split_err_o"] < 1e-5
        assert row[f"{prec}_fused_s"] > 0 and row[f"{prec}_split_s"] > 0
    assert "split == fused bitwise: yes" in lines[-2]
    assert os.environ.get("GLA_EXT_CHUNK_FWD") == _PATH_BEFORE  # restored
    assert any("fla not importable (absent)" in ln for ln in lines)
    assert "highest:" in lines[-1] and "high:" in lines[-1] and "ok <=" in lines[-1]


def test_bench_f32_peer_errors_and_failures():
    """The peer's columns: its error is measured against float64 (a float32 reference stands
    in for fla, a perturbed one must show its error), and a failing peer leaves NaN."""
    def peer(q, k, v, g, output_final_state=False):
        o, ht = bench_gpu_f32.chunk_gla_reference(q, k, v, g,
                                                  output_final_state=output_final_state)
        return o * (1 + 1e-3), ht

    def broken(*args, **kwargs):
        raise RuntimeError("no kernel")
    rows, lines = [], []
    for fla in (peer, broken):
        bench_gpu_f32.bench_f32([(1, 70, 2, 16)], _cpu_timer, rows, lines, fla=fla,
                                device="cpu")
    assert rows[0]["fla_err_o"] == pytest.approx(1e-3, rel=1e-3)
    assert rows[0]["fla_err_ht"] < 1e-5
    assert math.isnan(rows[1]["fla_err_o"]) and math.isnan(rows[1]["fla_s"])
    assert rows[1]["highest_err_o"] < 1e-5  # gla_ext's own columns still measured


def test_rel_err_flags_unwritten_outputs():
    ref = torch.randn(5, 4, dtype=torch.float64)
    x = ref.float().clone()
    assert bench_gpu_f32.rel_err(x, ref) < 1e-6
    x[2, 1] = float("nan")
    assert bench_gpu_f32.rel_err(x, ref) == math.inf


def test_bench_f32_bwd_measures_against_float64():
    """A forward + backward row at a small shape: the gradient errors are measured against
    float64 (the CPU kernels are float32-accurate), a perturbed peer shows its error, and the
    verdict names both precisions."""
    def peer(q, k, v, g):
        o, ht = bench_gpu_f32.chunk_gla_reference(q, k, v, g)
        return o * (1 + 1e-3), ht
    rows, lines = [], []
    bench_gpu_f32.bench_f32_bwd([(1, 90, 2, 24)], _cpu_timer, rows, lines, fla=peer,
                                device="cpu")
    row = rows[0]
    for prec in bench_gpu_f32.TARGETS:
        assert 0 < row[f"{prec}_err"] < 1e-5
        assert row[f"{prec}_over_bf16"] == pytest.approx(row[f"{prec}_s"] / row["bf16_s"])
    assert row["fla_err"] == pytest.approx(1e-3, rel=1e-2)
    assert lines[-1].startswith("    bwd highest:") and "high:" in lines[-1]
