"""Static cost of the CUDA kernels from their SASS (no GPU needed): registers, spills, shared
memory, blocks per SM, and per-(chunk, head) counts of HMMA, MUFU.EX2, LDSM, LDGSTS, BAR and
of all instructions.

    python benchmarks/sass_stats.py [--arch sm_90a] [--name sass_stats] [--files chunk_fwd.cu ...]

Each csrc/cuda/*.cu is compiled on its own with nvcc (setup.py's and torch's extension flags,
plus -cubin -Xptxas -v), disassembled with nvdisasm (shipped in the triton package) with line
information, and analysed per kernel instantiation:

- ptxas -v: registers, spill stores/loads, static shared memory. Dynamic shared memory (the
  kernels' layouts) is printed by a tiny host program that includes the kernel source the way
  the CPU emulator does (GLA_CHUNK_EMULATE) and prints the layouts' kBytes.
- blocks per SM (H100/H200): min over 65536 registers (allocated per warp in units of 256, so
  registers per thread round up to 8), 228 KB shared memory per SM with 1 KB reserved per
  block (227 KB per block at most), 2048 threads and 32 blocks.
- Counts: loops are the SASS back edges (a branch to a lower address); each one is tied to the
  source `for`/`while` line of its branch instruction (nvdisasm -gi line info). Its trip count
  per warp is derived from the kernel's parameters: `for (X = START; X < LIMIT; X += STEP)` is
  evaluated with the kernel's constants (KT, threads, warps, chunk size, K, V, the template
  arguments of load_tile at its call site) for each warp (START = tid: lane 0 of the warp,
  START = warp: the warp index) and averaged over the warps; `#pragma unroll N` on the line
  above divides it by N (the body holds N copies); a few loops get explicit rules (TRIP_RULES).
  An instruction counts (static count) x (product of the trip counts of the loops around it).
  Straight-line code under an `if` is counted as executed (an upper bound), except source lines
  listed in COLD (paths the benchmark shapes never take: misaligned / odd-size scalar loads,
  cu_seqlens lookups) and the fractions in FRACTION_RULES. Loops with no rule count once and are
  listed in the results ("unmatched").
- Figures: per warp (warp-instructions a warp issues), per block (x warps; MUFU, HMMA as warp
  instructions, and MUFU.EX2 also as thread-level exp2 = x 32 lanes), per chunk (kernels that
  walk chunks: counted with 1 and 2 chunks, the difference is the per-chunk cost, the rest is
  fixed per block), per (chunk, head) = per chunk x blocks per (chunk, head).
Shapes for the trip counts: K = V = KT (64 or 128) for the chunk kernels.
- float32 forward (gla_chunk_fwd_f32_kernel<KT, passes>, dtype "f32"; passes 1 = one tf32
  pass, torch's "high"; 3 = 3xTF32, "highest"): its HMMA are m16n8k8 tf32 (HMMA.TF32, 2048
  flops each; the 16-bit kernels' m16n8k16 do 8192), and its per-chunk counts are also split
  by phase (PHASES), with the instructions that round operands to tf32 (cvt.rna.tf32.f32, or
  cvt.rn.tf32.f32 on sm_90+, and the 3xTF32 split, TF32_CVT) counted per phase.
- float32 split forward (chunk_fwd_f32_split.cuh, dtype "f32"): gla_chunk_state_scan_f32_kernel
  <passes> (64 key dims x 64 V columns per block; per (chunk, head) at K = V = 128: 4 blocks)
  and gla_chunk_fwd_f32_split_kernel<KT, passes> (one block per (chunk, head), all V tiles).
- float32 backward (chunk_bwd_f32.cuh, dtype "f32"): gla_chunk_state_scans_f32_kernel<KT,
  passes> (both scans in one grid; per (chunk, head) the forward and gradient halves are
  summed, each block runs one) and gla_chunk_bwd_f32_kernel<KT, passes>. The trips of
  warp_mma_tiles' k loop come from the arguments at each call site (evaluated per warp).
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

NVCC = os.environ.get("NVCC", "/usr/local/cuda/bin/nvcc")
TORCH_NVCC_FLAGS = ["-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__",
                    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__", "-D__CUDA_NO_HALF2_OPERATORS__",
                    "--expt-relaxed-constexpr", "-std=c++17"]
SETUP_NVCC_FLAGS = ["-O3", "--use_fast_math", "--expt-relaxed-constexpr", "-lineinfo",
                    "-DGLA_WITH_CUDA"]

# H100 / H200 (sm_90) per-SM limits
SM_REGS = 65536
SM_SMEM = 228 * 1024
BLOCK_SMEM_MAX = 227 * 1024
SMEM_RESERVED = 1024
SM_THREADS = 2048
SM_BLOCKS = 32

OPS = {"HMMA": r"^HMMA", "HMMA.TF32": r"^HMMA\.1688\.F32\.TF32", "MUFU.EX2": r"^MUFU\.EX2",
       "MUFU": r"^MUFU", "LDSM": r"^LDSM", "LDGSTS": r"^LDGSTS", "BAR": r"^BAR",
       "LDS": r"^LDS(\.|$)", "STS": r"^STS", "LDG": r"^LDG(\.|$)", "STG": r"^STG"}
KC = 64


def tool_dir():
    try:
        import triton  # noqa: F401
        d = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
        if os.path.exists(os.path.join(d, "nvdisasm")):
            return d
    except ImportError:
        pass
    for d in ("/usr/local/cuda/bin",):
        if os.path.exists(os.path.join(d, "nvdisasm")):
            return d
    raise SystemExit("nvdisasm not found (pip install triton, or a CUDA toolkit with it)")


def torch_includes():
    try:
        from torch.utils.cpp_extension import include_paths
        return include_paths("cuda")
    except Exception:  # noqa: BLE001 - the .cu files are torch-free; includes only mirror setup.py
        return []


# ---- compile + parse ----------------------------------------------------------------------
def compile_cubin(src, arch, out_dir):
    cubin = os.path.join(out_dir, os.path.basename(src) + ".cubin")
    cmd = [NVCC] + SETUP_NVCC_FLAGS + TORCH_NVCC_FLAGS + ["-I" + os.path.join(ROOT, "csrc")]
    cmd += ["-I" + p for p in torch_includes()]
    cmd += [f"-gencode=arch=compute_{arch[3:]},code={arch}", "-cubin", "-Xptxas", "-v",
            "-o", cubin, src]
    run = subprocess.run(cmd, capture_output=True, text=True)
    if run.returncode != 0:
        raise SystemExit(f"nvcc failed on {src}:\n{run.stderr[-4000:]}")
    return cubin, run.stderr + run.stdout


def parse_ptxas(log):
    info, cur = {}, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            cur = m.group(1)
            info[cur] = {"regs": 0, "spill_stores": 0, "spill_loads": 0, "stack": 0,
                         "static_smem": 0}
            continue
        if cur is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                      line)
        if m:
            info[cur].update(stack=int(m.group(1)), spill_stores=int(m.group(2)),
                             spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            info[cur]["regs"] = int(m.group(1))
            m2 = re.search(r"(\d+) bytes smem", line)
            if m2:
                info[cur]["static_smem"] = int(m2.group(1))
    return info


def disassemble(cubin):
    out = subprocess.run([os.path.join(tool_dir(), "nvdisasm"), "-c", "-gi", cubin],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise SystemExit(f"nvdisasm failed: {out.stderr[-2000:]}")
    funcs, func, chain, fresh = {}, None, [], False
    for line in out.stdout.splitlines():
        m = re.match(r"^\.text\.(\S+):", line)
        if m:
            func = m.group(1)
            funcs[func] = {"ins": [], "labels": {}}
            chain = []
            continue
        if func is None:
            continue
        m = re.match(r'\s*//## File "([^"]+)", line (\d+)', line)
        if m:
            if not fresh:
                chain = []
                fresh = True
            chain.append((m.group(1), int(m.group(2))))
            continue
        m = re.match(r"^(\.L_x_\d+):", line)
        if m:
            funcs[func]["labels"][m.group(1)] = len(funcs[func]["ins"])
            continue
        m = re.match(r"\s*/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            fresh = False
            text = m.group(2)
            op = re.sub(r"^@!?U?P\w+\s+", "", text).split()[0]
            funcs[func]["ins"].append({"addr": int(m.group(1), 16), "op": op, "text": text,
                                       "chain": tuple(chain)})
    return funcs


_SRC_CACHE = {}
_REGION_CACHE = {}


def src_line(path, line):
    if path not in _SRC_CACHE:
        try:
            with open(path) as f:
                _SRC_CACHE[path] = f.read().splitlines()
        except OSError:
            _SRC_CACHE[path] = []
    lines = _SRC_CACHE[path]
    return lines[line - 1] if 0 < line <= len(lines) else ""


def src_statement(path, line, max_lines=6):
    """The source text from `line` to the end of its statement (calls span lines)."""
    out = []
    for i in range(line, line + max_lines):
        out.append(src_line(path, i).strip())
        if ";" in out[-1] or "{" in out[-1]:
            break
    return " ".join(out)


def find_loops(fn):
    ins = fn["ins"]
    loops = []
    for idx, x in enumerate(ins):
        if not x["op"].startswith("BRA"):
            continue
        m = re.search(r"`\((\.L_x_\d+)\)", x["text"])
        if not m or m.group(1) not in fn["labels"]:
            continue
        tgt = fn["labels"][m.group(1)]
        if tgt < idx:  # (tgt == idx: the BRA-to-itself after the last EXIT)
            loops.append({"first": tgt, "last": idx, "chain": x["chain"]})
    return loops


# ---- kernels: names, constants, trip counts -----------------------------------------------
F32_KERNELS = ("gla_chunk_fwd_f32_kernel", "gla_chunk_state_scans_f32_kernel",
               "gla_chunk_bwd_f32_kernel", "gla_chunk_state_scan_f32_kernel",
               "gla_chunk_fwd_f32_split_kernel")

def describe(mangled):
    """Kernel name and template arguments from the mangled name."""
    name, pos = mangled, mangled.find("_ZN") + 3
    while pos >= 3:  # _ZN <length><identifier>... : the last identifier before I or E
        m = re.match(r"\d+", mangled[pos:])
        if not m:
            break
        start = pos + len(m.group())
        name, pos = mangled[start:start + int(m.group())], start + int(m.group())
    dtype = "bf16" if "nv_bfloat16" in mangled else ("fp16" if "6__half" in mangled else "")
    if name in F32_KERNELS:
        dtype = "f32"  # template <KT, kPasses>: 1 = one tf32 pass, 3 = 3xTF32
    ints = [int(x) for x in re.findall(r"Li(\d+)E", mangled)]
    bools = [x == "1" for x in re.findall(r"Lb([01])E", mangled)]
    return name, dtype, ints, bools


def kernel_constants(name, ints, bools, file):
    """Constants the trip counts use, and how many blocks one (chunk, head) takes."""
    c = {"kC": KC, "kBV": 64, "kTileV": 64, "kScanV": 64, "kScanK": 64, "kRows": KC // 2,
         "kGroup": 16, "NCHUNK": 1, "kGateSegs": 4, "kGateRows": 16}
    if name == "gla_chunk_fwd_kernel":
        KT, split = ints[0], bools[0]
        c.update(KT=KT, K=KT, V=KT, NTHREADS=128, NWARPS=4, kThreads=128, kWarps=4,
                 kNT=KT // 8, kPerRow=KT // 8)
        c["kind"] = "fwd_split" if split else "fwd_fused"
        c["blocks_per_chunk_head"] = 1 if split else math.ceil(KT / 64)
        c["walks_chunks"] = not split
    elif name == "gla_chunk_fwd_f32_kernel":
        KT, passes = ints[0], ints[1]
        c.update(KT=KT, K=KT, V=KT, NTHREADS=128, NWARPS=4, kNW=4, kF32Threads=128, kF32Warps=4,
                 kF32BV=64, kNT=KT // 8, kPerRow=KT // 4, passes=passes)
        c["kind"] = "fwd_f32"
        c["blocks_per_chunk_head"] = math.ceil(KT / 64)  # one block per 64 V columns
        c["walks_chunks"] = True
    elif name == "gla_chunk_fwd_f32_split_kernel":
        KT, passes = ints[0], ints[1]
        c.update(KT=KT, K=KT, V=KT, NTHREADS=128, NWARPS=4, kF32Threads=128, kF32Warps=4,
                 kF32BV=64, kNT=KT // 8, kPerRow=KT // 4, kPairs=16 * 17 // 2, passes=passes)
        c["kind"] = "fwd_f32_split"
        c["blocks_per_chunk_head"] = 1  # one block per (chunk, head) loops over the V tiles
        c["walks_chunks"] = False
    elif name == "gla_chunk_state_scan_f32_kernel":  # template <passes>: 64 key dims a block
        passes = ints[0]
        c.update(KT=64, K=64, V=64, NTHREADS=128, NWARPS=4, kF32Threads=128, kF32BV=64, kNT=8,
                 kPerRow=16, rows_here=64, passes=passes)
        c["kind"] = "scan_f32"
        c["blocks_per_chunk_head"] = 4  # K = V = 128: 2 key tiles x 2 V tiles
        c["walks_chunks"] = True
    elif name == "gla_chunk_state_scans_f32_kernel":
        KT, passes = ints[0], ints[1]
        c.update(KT=KT, K=KT, V=KT, NTHREADS=128, NWARPS=4, kF32Threads=128, kF32BV=64,
                 kNT=KT // 8, kPerRow=16, rows_here=KT, passes=passes)
        c["kind"] = "scans_f32"
        c["blocks_per_chunk_head"] = math.ceil(KT / 64)  # per half: one block per 64 V columns
        c["walks_chunks"] = True
    elif name == "gla_chunk_bwd_f32_kernel":
        KT, passes = ints[0], ints[1]
        c.update(KT=KT, K=KT, V=KT, NTHREADS=256, NWARPS=8, kNW=8, kBwdThreads=256, kF32Threads=256,
                 kKH=KT // 2, kKN=KT // 16, kNT=KT // 8, kPerRow=KT // 4, kTPR=256 // KT,
                 kF32TileV=16, kRows=64 // (256 // KT), passes=passes)
        c["kind"] = "bwd_f32"
        c["blocks_per_chunk_head"] = 1
        c["walks_chunks"] = False
    elif name in ("gla_chunk_state_scan_kernel", "gla_chunk_state_scans_kernel"):
        warps = scan_warps()
        c.update(KT=64, NTHREADS=32 * warps, NWARPS=warps, kScanThreads=32 * warps, kNT=8,
                 kPerRow=8, kScanV=SCAN_V(warps), kScanSegRows=16)
        c["kind"] = "scan" if name == "gla_chunk_state_scan_kernel" else "scans"
        c["walks_chunks"] = True
    elif name == "gla_chunk_bwd_kernel":
        KT = ints[0]
        c.update(KT=KT, K=KT, V=KT, NTHREADS=256, NWARPS=8, kBwdThreads=256, kKH=KT // 2,
                 kKN=KT // 16, kNT=KT // 8, kPerRow=KT // 8, kTPR=256 // KT,
                 kCols=64 // (256 // KT))
        c["kind"] = "bwd"
        c["blocks_per_chunk_head"] = 1
        c["walks_chunks"] = False
    else:
        c.update(KT=128, K=128, V=128, NTHREADS=128, NWARPS=4)
        c["kind"] = "other"
        c["walks_chunks"] = False
        c["blocks_per_chunk_head"] = None
    return c


def scan_warps():
    """kScanWarps of csrc/cuda/chunk_scan.cuh (4 before the one-block-per-V rewrite)."""
    with open(os.path.join(ROOT, "csrc", "cuda", "chunk_scan.cuh")) as f:
        m = re.search(r"constexpr int kScanWarps = (\d+);", f.read())
    return int(m.group(1)) if m else 4


def SCAN_V(warps):
    """kScanV: 64 columns per block before the rewrite, then 16 per warp."""
    text = " ".join(src_line(os.path.join(ROOT, "csrc", "cuda", "chunk_scan.cuh"), i)
                    for i in range(1, 60))
    return 16 * warps if "kScanV = 16 * kScanWarps" in text else 64


def scan_blocks(c, K, V):
    """Blocks per (chunk, head) of the scans: one per 64 x 64 tile of the state; the
    two-scan kernel's count covers both halves (forward + gradient)."""
    return math.ceil(K / 64) * math.ceil(V / c["kScanV"])


# Source lines (text contained in the line) whose code the benchmark shapes never run.
COLD = [
    "dst[t * STRIDE + cc] =",                     # load_tile's scalar path (misaligned / odd K)
    "(t < len && col0 + cc < width) ? src[base",
    "dst[0] = E::from_float(x0);",                 # odd-V output stores
    "if (vc + 1 < V) dst[1]",
    "*reinterpret_cast<uint4*>(dst) = make_uint4(0u, 0u, 0u, 0u);",  # zero16: rows past a
                                                   # sequence's end (full chunks: never)
    "dst[static_cast<int64_t>(k0 + kl) * V + v0 + vl] = sOut",  # V % 8 != 0 state stores
    "gnext[r] = r < rows ? *gp : 0.0f;",           # scan: gates of a sequence's last chunk
    "for (int i = tid; i < ROWS * COLS; i += NTHREADS) {",       # scalar load_tile (set-up)
    "for (int i = tid; i < KT * kScanV; i += kScanThreads) {",   # scan's scalar state save
    "if (v0 + vl < V) dst[static_cast<int64_t>(kd) * V + v0 + vl] = sS[",  # f32 scan, V % 8
]
# Loops whose trip count is not a plain `for` over kernel constants: (text in the loop's
# source line, function of the constants -> trips per warp). Chunk loops use NCHUNK.
TRIP_RULES = [
    ("while (hi - lo > 1)", lambda c: 0),                # cu_seqlens chunk lookup: not taken
    # shfl.sync in code ptxas cannot prove converged: a retry loop that runs once
    ("__nvvm_shfl_bfly_sync", lambda c: 1),
    ("for (int i = tid; i < ROWS * COLS; i += NTHREADS)", lambda c: 0),  # scalar load_tile
    ("for (int i = tid; i < KT * kScanV; i += kScanThreads)", lambda c: 0),  # scalar save
    ("for (int i = tid; i < rows_here * kF32BV; i += kF32Threads)", lambda c: 0),  # f32 scalar save
    ("for (int64_t c0 = start; c0 < end; c0 += kC)", lambda c: c["NCHUNK"]),
    ("for (int64_t ci = 0; ci < nchunks; ++ci)", lambda c: c["NCHUNK"]),
    ("for (int64_t base = 0; base < a.N; base += kOffsetThreads)", lambda c: 1),
    ("for (int kl = kl0; kl < KT; kl += kScanThreads / kPerRow)",   # scan's state save
     lambda c: c["KT"] / (c["kScanThreads"] / (c["kScanV"] // 8))),
    ("for (int v0 = v_first; v0 < v_end; v0 += kBV)",
     lambda c: math.ceil(c["V"] / 64) if c["kind"] == "fwd_split" else 1),
    # backward: warp-dependent bounds, averaged over the warps' row blocks rb = 0..3
    ("for (int j = 0; j < i; ++j) {", lambda c: 1.5),
    ("for (int i = j + 1; i < 4; ++i) {", lambda c: 1.5),
    ("for (int p = kP - 1; p > seg; --p)", lambda c: (256 // c["KT"] - 1) / 2),
    ("for (int r = kRows - 1; r >= 0; --r) {", ("unroll", lambda c: 64 // (256 // c["KT"]))),
    # float32 forward: A @ v's causal loop (bound 16 i + 16 of the unrolled i: the SASS keeps
    # one loop per i that is not fully unrolled)
    ("for (int t0 = 0; t0 < 16 * i + 16; t0 += 8)", ("sass_bound", 8)),
]
# Straight-line code that only some warps / iterations run: (text in the line, fraction).
# Source regions (from the line containing the text to the end of the enclosing { } block):
# every instruction whose source (at any inlining level) lies inside runs that fraction of
# the times its loops say.
FRACTION_RULES = [
    # diagonal blocks: the upper row half of each 16-token block does j < 2 of 4
    ("if (j >= nj) break;", lambda c: 0.75),
    # split forward: V tiles after the first reload v
    # off-diagonal scores: unit j takes the row blocks i > j of 1..3 (6 of 9 copies run)
    ("if (bi <= bj) continue;", lambda c: 2 / 3),
    # output stores of a partial chunk / odd V (full chunks take the unchecked stores)
    ("} else {  // a partial chunk, odd V or V columns past the end", lambda c: 0.0),
    # the scan variant with scalar loads / stores (misaligned or odd-sized inputs)
    ("state_scan<T, kGrad, false>(a, key_tile);", lambda c: 0.0),
    ("if (v0 != v_first) {  // the first V tile came with q, k, g",
     lambda c: 1 - 1 / math.ceil(c["V"] / 64)),
    # float32 scores: one warp per diagonal block (4 of the backward's 8 warps)
    ("if (dblk < 4) {  // warp-uniform", lambda c: min(1.0, 4 / c["NWARPS"])),
    ("if (v0 > 0) {  // the first V tile came with q, k, g",
     lambda c: 1 - 1 / math.ceil(c["V"] / 64)),
    # float32 backward: dA by the warps whose token half lies at or before their rows (6 of 8)
    ("if (2 * half <= rb)", lambda c: 0.75),
]


# Phases of a kernel for the breakdown of its per-chunk counts: (label, file, text of the first
# line, text of the line after the last). An instruction belongs to the first phase whose
# lines hold any level of its inlining chain (so the helpers' phases come first).
F32 = "chunk_fwd_f32.cuh"
PHASES = {"gla_chunk_fwd_f32_kernel": [
    ("scores: 6 off-diagonal 16x16 blocks (mma)", F32,
     "for (int u = warp; u < 6; u += kNW)", "// the diagonal blocks, one warp each"),
    ("scores: 4 diagonal blocks (dyadic levels, mma)", F32,
     "void f32_diag_block(", "// sA (kC x kC, float, stride L::kAStride)"),
    ("scores: zeros right of the diagonal blocks", F32,
     "// zeros right of the diagonal blocks", "// grid x = N"),
    ("1-2. tiles -> shared memory, gate cumsum", F32, "// ---- 1. tiles", "// ---- 3. scores"),
    ("4. gate q, k; state -> shared memory", F32, "// ---- 4. q <- q", "// ---- 5. o ="),
    ("5. o = q~ S + A v (mma)", F32, "// ---- 5. o =", "// ---- 6. S^T"),
    ("6. state update (mma)", F32, "// ---- 6. S^T", "store_ht(s, a, rows.ht_base"),
]}
# tf32 operand rounding (cvt.rna.tf32.f32 before sm_90, cvt.rn.tf32.f32 on sm_90+, and the
# 3xTF32 split): counted inside each phase too
TF32_CVT = [("chunk_common.cuh", "__device__ __forceinline__ uint32_t cvt_rna_tf32(float x) {"),
            ("chunk_common.cuh", "__device__ __forceinline__ uint32_t cvt_rn_tf32(float x) {"),
            ("chunk_common.cuh", "void tf32_split(float x, uint32_t& hi, uint32_t& lo) {")]


def line_range(path, first, end):
    src_line(path, 1)
    lines = _SRC_CACHE[path]
    a = next((i for i, ln in enumerate(lines) if first in ln), None)
    if a is None:
        raise SystemExit(f"phase marker {first!r} not found in {path}")
    b = next((i for i in range(a + 1, len(lines)) if end in lines[i]), None)
    if b is None:
        raise SystemExit(f"phase end {end!r} not found in {path}")
    return set(range(a + 1, b + 1))  # 1-based lines a+1 .. b (the end line excluded)


def phase_counts(fn, w, name):
    """Per-phase weighted counts (all, HMMA, MUFU.EX2, tf32 conversion instructions)."""
    if name not in PHASES or not fn["ins"]:
        return None
    path_of = {os.path.basename(p): p for x in fn["ins"] for p, _ in x["chain"]}
    phases = [(label, path_of.get(f), line_range(path_of[f], a, b) if f in path_of else set())
              for label, f, a, b in PHASES[name]]
    cvt = [(path_of.get(f), region_lines(path_of[f], t)) for f, t in TF32_CVT if f in path_of]
    out = {label: {"all": 0.0, "HMMA": 0.0, "MUFU.EX2": 0.0, "tf32_cvt": 0.0}
           for label, _, _ in phases}
    out["other"] = {"all": 0.0, "HMMA": 0.0, "MUFU.EX2": 0.0, "tf32_cvt": 0.0}
    for x, wi in zip(fn["ins"], w):
        label = next((lb for lb, p, lines in phases
                      if any(cp == p and cl in lines for cp, cl in x["chain"])), "other")
        d = out[label]
        d["all"] += wi
        d["HMMA"] += wi if x["op"].startswith("HMMA") else 0.0
        d["MUFU.EX2"] += wi if x["op"].startswith("MUFU.EX2") else 0.0
        if any(cp == p and cl in lines for p, lines in cvt for cp, cl in x["chain"]):
            d["tf32_cvt"] += wi
    return out


def region_lines(path, text):
    """Line numbers from the line containing text to the end of its enclosing block (or of
    the block it opens)."""
    key = (path, text)
    if key in _REGION_CACHE:
        return _REGION_CACHE[key]
    src_line(path, 1)
    lines = _SRC_CACHE[path]
    out = set()
    for i, ln in enumerate(lines):
        if text not in ln:
            continue
        opens = ln.rstrip().endswith("{")
        depth = 0
        for j in range(i, len(lines)):
            depth += lines[j].count("{") - lines[j].count("}")
            out.add(j + 1)
            if depth < 0 or (opens and j > i and depth == 0):
                break
    _REGION_CACHE[key] = out
    return out


def load_tile_symbols(chain, c):
    """COLS / NTHREADS / ROWS / element size of a load_tile call, from its call site."""
    for i, (path, line) in enumerate(chain):
        if "load_tile" in src_line(path, line) and i + 1 < len(chain):
            pass
    for path, line in chain[1:]:
        text = src_statement(path, line)
        m = re.search(r"load_tile<([^>]*)>\s*\(([^;]*)", text)
        if not m:
            continue
        targs = [t.strip() for t in m.group(1).split(",")]
        env = dict(c)
        env.update(COLS=evaluate(targs[0], c), NTHREADS=evaluate(targs[2], c),
                   ROWS=evaluate(targs[3], c) if len(targs) > 3 else KC)
        is_float = (c.get("passes") is not None or "float" in m.group(2).split(",")[0] or
                    re.match(r"\s*sB\b", m.group(2)))  # float32 kernels: every tile float
        env["kVec"] = 4 if is_float else 8
        env["kPerRow"] = env["COLS"] // env["kVec"]
        return env
    return None


def evaluate(expr, env):
    expr = expr.replace("static_cast<int>", "").strip()
    expr = re.sub(r"(\w+) % (\w+)", r"(\1 % \2)", expr)
    names = set(re.findall(r"[A-Za-z_]\w*", expr))
    if names - set(env):
        raise KeyError(f"unknown {sorted(names - set(env))} in {expr!r}")
    return eval(expr, {"__builtins__": {}}, {k: env[k] for k in names})  # noqa: S307


CALL_SITES = [  # calls whose arguments give warp_mma_tiles' k range: (pattern, groups)
    r"warp_mma_tiles<[^>]*>\s*\(\s*\w+,\s*([^,]+),\s*([^,]+),",
    r"add_off_diagonal<[^>]*>\(\s*\w+,\s*\w+,\s*[^,]+,\s*([^,]+),\s*([^,]+),",
]


def call_site_trips(loop, c):
    """warp_mma_tiles' `for (k0 = k_begin; k0 < k_end; k0 += 8)`: k_begin and k_end from the
    innermost call site whose arguments evaluate (with r0 = 16 rb, rb = warp % 4; a helper
    that passes its own k_begin / k_end on is looked through), trips averaged over the warps."""
    for path, line in loop["chain"][1:]:
        # the call's line info may name the line of its arguments: look a few lines up too
        for d in (0, 1, 2):
            if line - d < 1:
                break
            text = src_statement(path, line - d)
            m = next((m for pat in CALL_SITES for m in [re.search(pat, text)] if m), None)
            if not m:
                continue
            try:
                trips = []
                for w in range(c["NWARPS"]):
                    env = dict(c, r0=16 * (w % 4), warp=w)
                    trips.append(max(0, math.ceil((evaluate(m.group(2), env) -
                                                   evaluate(m.group(1), env)) / 8)))
            except KeyError:  # k_begin / k_end passed on: the next call site out
                break
            return sum(trips) / len(trips)
    return None


def loop_trips(fn, loop, c):
    """Trips per warp (averaged over the block's warps) of one SASS loop; None = no rule."""
    path, line = loop["chain"][0]
    text = src_line(path, line).strip()
    if "for (int k0 = k_begin; k0 < k_end; k0 += 8)" in text:
        return call_site_trips(loop, c), text
    for key, rule in TRIP_RULES:
        if key in text:
            if isinstance(rule, tuple) and rule[0] == "per_ex2":
                body = fn["ins"][loop["first"]:loop["last"] + 1]
                loop["unroll"] = sum(x["op"].startswith("MUFU.EX2") for x in body) or 1
                return rule[1](c) / loop["unroll"], text
            if isinstance(rule, tuple) and rule[0] == "sass_bound":
                # bound set by an unrolled outer loop (one SASS loop per outer index): the
                # immediate the back edge compares with, over the SASS step
                lim = sass_counted_loop(fn, loop)
                if lim is None:
                    return None, text
                loop["unroll"] = lim[1] // rule[1]
                return lim[0] / lim[1], text
            if isinstance(rule, tuple):  # a counted loop the compiler may unroll (step 1)
                u = unroll_factor(fn, loop, 1) or 1
                loop["unroll"] = u
                return rule[1](c) / u, text
            return rule(c), text
    env = c
    if "load_tile" in " ".join(src_line(p, l) for p, l in loop["chain"][1:]) or \
            "ROWS * kPerRow" in text:
        env = load_tile_symbols(loop["chain"], c) or c
    m = re.search(r"for \((?:int|int64_t) (\w+) = ([^;]+); \1 (<=?) ([^;]+); (.+?)\)", text)
    if not m:
        return None, text
    var, start, rel, limit, step = m.groups()
    try:
        lim = evaluate(limit, env) + (1 if rel == "<=" else 0)
        sm = re.match(rf"{var} \+= (.+)$", step.strip())
        stp = 1 if step.strip() in (f"++{var}", f"{var}++") else (evaluate(sm.group(1), env)
                                                                  if sm else None)
        if stp is None:
            return None, text
        trips = []
        for w in range(env["NWARPS"]):
            s0 = evaluate(start, dict(env, tid=32 * w, warp=w, lane=0))
            trips.append(max(0, math.ceil((lim - s0) / stp)))
        t = sum(trips) / len(trips)
    except (KeyError, SyntaxError, TypeError, AttributeError):
        return None, text
    inner = [lp for lp in fn["loops"] if lp is not loop and loop["first"] <= lp["first"]
             and lp["last"] <= loop["last"]]
    u = unroll_factor(fn, loop, stp)
    if inner:
        # An unrolled body holds its inner loops once per copy, but so does a body with an
        # unrolled source loop around a rolled one (the score levels): the induction step
        # decides when it divides the copies, else the body counts as one copy.
        heads = {}
        for lp in inner:
            heads[lp["chain"][0]] = heads.get(lp["chain"][0], 0) + 1
        copies = min(heads.values())
        u = u if u is not None and copies % u == 0 else 1
    if u is None:  # no induction found in the SASS: trust the pragma, if any
        um = re.match(r"#pragma unroll (\d+)", src_line(path, line - 1).strip())
        u = int(um.group(1)) if um else 1
    loop["unroll"] = u
    return t / u, text


_SELF_ADD = re.compile(r"^(?:VIADD|IADD3|IMAD\.IADD)\s+(R\d+),\s*(R\d+),\s*(-?0x[0-9a-f]+|-?\d+)")


def unroll_factor(fn, loop, step):
    """Copies of the source body in one SASS trip: the immediate the loop's induction register
    grows by (the register compared before the back edge) over the source step; None when no
    such register is found."""
    ins = fn["ins"][loop["first"]:loop["last"] + 1]
    incs = {}
    for x in ins:
        m = _SELF_ADD.match(x["text"])
        if m and m.group(1) == m.group(2):
            incs.setdefault(m.group(1), []).append(int(m.group(3), 0))
    pm = re.match(r"@!?(U?P\d)", ins[-1]["text"])
    cands = []
    if pm:
        for x in reversed(ins[:-1]):
            parts = re.split(r"[ ,]+", x["text"].split(None, 1)[-1]) if "SETP" in x["op"] else []
            if parts and parts[0] == pm.group(1):
                cands = [r for r in parts[1:] if r in incs]
                break
    if not cands:
        cands = list(incs)
    for r in cands:
        for imm in incs[r]:
            if step and imm != 0 and abs(imm) % step == 0:
                return abs(imm) // step
    return None


def sass_counted_loop(fn, loop):
    """(limit, step) of a SASS loop counting up from 0: the immediate its back edge compares
    the induction register with, and that register's increment; None when not of that form."""
    ins = fn["ins"][loop["first"]:loop["last"] + 1]
    pm = re.match(r"@!?(U?P\d)", ins[-1]["text"])
    if not pm:
        return None
    incs = {}
    for x in ins:
        m = _SELF_ADD.match(x["text"])
        if m and m.group(1) == m.group(2):
            incs[m.group(1)] = int(m.group(3), 0)
    for x in reversed(ins[:-1]):
        parts = re.split(r"[ ,]+", x["text"].split(None, 1)[-1]) if "SETP" in x["op"] else []
        if parts and parts[0] == pm.group(1):
            reg = next((r for r in parts[1:] if r in incs), None)
            imm = next((int(r, 0) for r in parts[1:] if re.fullmatch(r"0x[0-9a-f]+|\d+", r)),
                       None)
            return (imm, incs[reg]) if reg and imm and incs[reg] > 0 else None
    return None


def weights(fn, c):
    """Executions per warp of every instruction; and the loops' descriptions."""
    ins = fn["ins"]
    w = [1.0] * len(ins)
    loops = fn.setdefault("loops", find_loops(fn))
    described, unmatched = [], []
    for lp in loops:
        t, text = loop_trips(fn, lp, c)
        if t is None:
            unmatched.append(text)
            t = 1.0
        for i in range(lp["first"], lp["last"] + 1):
            w[i] *= t
        described.append({"source": text, "trips_per_warp": t, "unroll": lp.get("unroll", 1),
                          "static_instructions": lp["last"] - lp["first"] + 1})
    for i, x in enumerate(ins):
        if not x["chain"]:
            continue
        text = src_line(*x["chain"][0])
        if any(k in text for k in COLD):
            w[i] = 0.0
        for key, frac in FRACTION_RULES:
            if any(l in region_lines(p, key) for p, l in x["chain"]):
                w[i] *= frac(c)
    return w, described, unmatched


def count(fn, w):
    out = {"all": 0.0}
    for k in OPS:
        out[k] = 0.0
    for x, wi in zip(fn["ins"], w):
        out["all"] += wi
        for k, pat in OPS.items():
            if re.match(pat, x["op"]):
                out[k] += wi
    return out


# ---- dynamic shared memory ------------------------------------------------------------------
LAYOUTS = {
    "chunk_fwd.cu": {"fwd64": "gla::SmemLayout<64>::kBytes", "fwd128": "gla::SmemLayout<128>::kBytes",
                     "f32_64": "gla::F32Layout<64>::kBytes",
                     "f32_128": "gla::F32Layout<128>::kBytes",
                     "f32scan64": "gla::F32ScanLayout<64>::kBytes",
                     "scan": "gla::ScanLayout::kBytes", "offsets": "gla::kOffsetSmem"},
    "chunk_bwd.cu": {"bwd64": "gla::BwdLayout<64>::kBytes", "bwd128": "gla::BwdLayout<128>::kBytes",
                     "f32bwd64": "gla::F32BwdLayout<64>::kBytes",
                     "f32bwd128": "gla::F32BwdLayout<128>::kBytes",
                     "f32scan64": "gla::F32ScanLayout<64>::kBytes",
                     "f32scan128": "gla::F32ScanLayout<128>::kBytes",
                     "scan": "gla::ScanLayout::kBytes", "offsets": "gla::kOffsetSmem"},
}


def dynamic_smem(file, out_dir):
    exprs = LAYOUTS.get(file)
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("clang++")
    if not exprs or not cxx:
        return {}
    prog = os.path.join(out_dir, file + ".layout.cpp")
    with open(prog, "w") as f:
        f.write('#include "emu.h"\n#define GLA_CHUNK_EMULATE 1\n')
        f.write(f'#include "cuda/{file}"\n#include <cstdio>\nint main() {{\n')
        for k, e in exprs.items():
            f.write(f'  std::printf("{k} %d\\n", static_cast<int>({e}));\n')
        f.write("  return 0;\n}\n")
    exe = prog[:-4]
    run = subprocess.run([cxx, "-std=c++20", "-O0", "-w", "-I" + os.path.join(ROOT, "csrc"),
                          "-I" + os.path.join(ROOT, "tests", "cuda_emu"), prog, "-o", exe],
                         capture_output=True, text=True)
    if run.returncode != 0:
        print(f"layout program for {file} failed:\n{run.stderr[-2000:]}", file=sys.stderr)
        return {}
    out = subprocess.run([exe], capture_output=True, text=True).stdout
    return {ln.split()[0]: int(ln.split()[1]) for ln in out.splitlines() if ln.strip()}


def smem_key(name, c):
    if name == "gla_chunk_fwd_kernel":
        return f"fwd{c['KT']}"
    if name == "gla_chunk_bwd_kernel":
        return f"bwd{c['KT']}"
    if name in ("gla_chunk_fwd_f32_kernel", "gla_chunk_fwd_f32_split_kernel"):
        return f"f32_{c['KT']}"
    if name == "gla_chunk_state_scan_f32_kernel":
        return "f32scan64"
    if name == "gla_chunk_bwd_f32_kernel":
        return f"f32bwd{c['KT']}"
    if name == "gla_chunk_state_scans_f32_kernel":
        return f"f32scan{c['KT']}"
    if "scan" in name and "offsets" not in name:
        return "scan"
    if "offsets" in name:
        return "offsets"
    return None


def blocks_per_sm(regs, threads, smem):
    warps = math.ceil(threads / 32)
    regs_warp = math.ceil(max(regs, 1) / 8) * 8 * 32
    by_regs = SM_REGS // (regs_warp * warps)
    by_smem = SM_SMEM // (smem + SMEM_RESERVED) if smem + SMEM_RESERVED > 0 else SM_BLOCKS
    if smem > BLOCK_SMEM_MAX:
        by_smem = 0
    return min(by_regs, by_smem, SM_THREADS // threads, SM_BLOCKS), {"regs": by_regs,
                                                                      "smem": by_smem}


# ---- per kernel -------------------------------------------------------------------------------
def analyse(mangled, fn, ptx, smem_table, file):
    name, dtype, ints, bools = describe(mangled)
    c = kernel_constants(name, ints, bools, file)
    key = smem_key(name, c)
    dyn = smem_table.get(key, 0) if key else 0
    smem = dyn + ptx.get("static_smem", 0)
    threads = c["NTHREADS"] if c["kind"] != "other" else None
    row = {"file": file, "kernel": name, "dtype": dtype, "template": {"ints": ints, "bools": bools},
           "kind": c["kind"], "regs": ptx.get("regs"), "spill_stores": ptx.get("spill_stores"),
           "spill_loads": ptx.get("spill_loads"), "stack": ptx.get("stack"),
           "smem_bytes": smem, "threads": threads, "static_instructions": len(fn["ins"])}
    if threads:
        row["blocks_per_sm"], row["occupancy_limits"] = blocks_per_sm(row["regs"], threads, smem)
    if c["kind"] == "other":
        row["static_counts"] = count(fn, [1.0] * len(fn["ins"]))
        return row
    w1, loops, unmatched = weights(fn, dict(c, NCHUNK=1))
    per1 = count(fn, w1)
    if c["walks_chunks"]:
        w2, _, _ = weights(fn, dict(c, NCHUNK=2))
        per2 = count(fn, w2)
        per_chunk = {k: per2[k] - per1[k] for k in per1}
        fixed = {k: per1[k] - per_chunk[k] for k in per1}
        ph1, ph2 = phase_counts(fn, w1, name), phase_counts(fn, w2, name)
        if ph1:
            row["phases_per_warp_per_chunk"] = {
                lb: {k: round(ph2[lb][k] - ph1[lb][k], 1) for k in ph1[lb]} for lb in ph1}
    else:
        per_chunk, fixed = per1, {k: 0.0 for k in per1}
    nw = c["NWARPS"]
    if c["kind"] in ("scan", "scans"):
        bpch = scan_blocks(c, 128, 128)  # K = V = 128
        row["shape"] = "K=V=128 (per block: 64 key dims x 64 V columns)"
        if c["kind"] == "scans":
            row["note"] = "forward + gradient halves summed (each block runs one)"
    elif c["kind"] == "scan_f32":
        bpch = c["blocks_per_chunk_head"]
        row["shape"] = "K=V=128 (per block: 64 key dims x 64 V columns)"
    elif c["kind"] == "scans_f32":
        bpch = c["blocks_per_chunk_head"]
        row["shape"] = f"K=V={c['KT']} (per block: all key dims x 64 V columns)"
        row["note"] = "forward + gradient halves summed (each block runs one)"
    else:
        bpch = c["blocks_per_chunk_head"]
        row["shape"] = f"K=V={c['KT']}"
    row["per_warp_per_chunk"] = {k: round(v, 1) for k, v in per_chunk.items()}
    row["per_warp_fixed"] = {k: round(v, 1) for k, v in fixed.items()}
    row["blocks_per_chunk_head"] = bpch
    pch = {k: v * nw * bpch for k, v in per_chunk.items()}
    pch["exp2_thread_level"] = per_chunk["MUFU.EX2"] * nw * bpch * 32
    row["per_chunk_head"] = {k: round(v, 1) for k, v in pch.items()}
    row["loops"] = loops
    row["unmatched_loops"] = unmatched
    return row


def git(*args):
    r = subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT)
    return r.stdout.strip() if r.returncode == 0 else "unknown"


def table(rows):
    hdr = (f"{'kernel':<34}{'dt':<5}{'tmpl':<10}{'regs':>5}{'spill':>7}{'smem':>8}{'blk/SM':>7}"
           f"{'ins/warp/ch':>12}{'HMMA/ch,h':>10}{'EX2/ch,h':>10}{'LDSM':>7}{'LDGSTS':>7}"
           f"{'BAR':>5}{'all/ch,h':>10}")
    out = [hdr, "-" * len(hdr)]
    for r in rows:
        t = ",".join(map(str, r["template"]["ints"] + [int(b) for b in r["template"]["bools"]]))
        spill = f"{r['spill_stores']}/{r['spill_loads']}"
        if "per_chunk_head" in r:
            p, pw = r["per_chunk_head"], r["per_warp_per_chunk"]
            out.append(f"{r['kernel']:<34}{r['dtype']:<5}{t:<10}{r['regs']:>5}{spill:>7}"
                       f"{r['smem_bytes']:>8}{r.get('blocks_per_sm', '-'):>7}{pw['all']:>12.0f}"
                       f"{p['HMMA']:>10.0f}{p['exp2_thread_level']:>10.0f}{p['LDSM']:>7.0f}"
                       f"{p['LDGSTS']:>7.0f}{p['BAR']:>5.0f}{p['all']:>10.0f}")
        else:
            out.append(f"{r['kernel']:<34}{r['dtype']:<5}{t:<10}{r['regs']:>5}{spill:>7}"
                       f"{r['smem_bytes']:>8}{r.get('blocks_per_sm', '-'):>7}"
                       f"{'static ' + str(r['static_instructions']):>12}")
    out.append("")
    out.append("dt f32: the float32 kernels (forward fused; forward split: scan_f32 + "
               "fwd_f32_split; backward scans_f32 + bwd_f32), tmpl KT,passes (1 = one tf32 "
               "pass, 3 = 3xTF32; scan_f32: passes, 64 key dims per block); their HMMA are "
               "m16n8k8 tf32 (a quarter of an m16n8k16's flops); scans_f32: both halves, "
               "K=V=KT; scan_f32: K=V=128.")
    out.append("ins/warp/ch: warp-instructions one warp issues per chunk (scan: per chunk of its "
               "64x64 state tile; scans: both halves). /ch,h: per (chunk, head) at K=V=KT "
               "(scans: K=V=128), all warps and blocks; HMMA/LDSM/LDGSTS/BAR as warp "
               "instructions, EX2 as thread-level exp2 (x32). spill: bytes stored/loaded.")
    return "\n".join(out)


def phase_table(rows):
    """Per-chunk counts of each phase of the kernels that have PHASES, per warp."""
    out = []
    for r in rows:
        ph = r.get("phases_per_warp_per_chunk")
        if not ph:
            continue
        t = ",".join(map(str, r["template"]["ints"]))
        tot = r["per_warp_per_chunk"]["all"]
        out.append(f"{r['kernel']} {r['dtype']} {t} (K=V={r['template']['ints'][0]}), per warp "
                   f"per chunk: {tot:.0f} instructions")
        out.append(f"  {'phase':<58}{'ins':>7}{'share':>7}{'HMMA':>6}{'EX2':>6}{'tf32 cvt':>9}")
        for lb, d in ph.items():
            out.append(f"  {lb:<58}{d['all']:>7.0f}{d['all'] / tot:>7.1%}{d['HMMA']:>6.0f}"
                       f"{d['MUFU.EX2']:>6.0f}{d['tf32_cvt']:>9.0f}")
        cvt = sum(d["tf32_cvt"] for d in ph.values())
        out.append(f"  {'all phases: tf32 operand rounding':<58}{cvt:>7.0f}{cvt / tot:>7.1%}")
        out.append("")
    return "\n".join(out)


def host_cpu():
    try:
        with open("/proc/cpuinfo") as f:
            for ln in f:
                if ln.startswith("model name"):
                    return ln.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", default="sm_90a")
    ap.add_argument("--name", default="sass_stats")
    ap.add_argument("--files", nargs="*", help="csrc/cuda file names (default: all .cu)")
    ap.add_argument("--no-save", action="store_true")
    args = ap.parse_args()
    files = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    if args.files:
        files = [f for f in files if os.path.basename(f) in args.files]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for src in files:
            base = os.path.basename(src)
            print(f"compiling {base} for {args.arch} ...", file=sys.stderr, flush=True)
            cubin, log = compile_cubin(src, args.arch, tmp)
            ptx = parse_ptxas(log)
            funcs = disassemble(cubin)
            smem_table = dynamic_smem(base, tmp)
            for mangled in sorted(funcs):
                rows.append(analyse(mangled, funcs[mangled], ptx.get(mangled, {}), smem_table,
                                    base))
    rows.sort(key=lambda r: (r["file"], r["kernel"], r["dtype"], r["template"]["ints"],
                             r["template"]["bools"]))
    text = table(rows)
    phases = phase_table(rows)
    print(text)
    if phases:
        print("\n" + phases)
    for r in rows:
        if r.get("unmatched_loops"):
            print(f"note: {r['kernel']} {r['dtype']} {r['template']}: loops counted once: "
                  f"{r['unmatched_loops']}", file=sys.stderr)
    if args.no_save:
        return
    meta = {"benchmark": args.name, "date": datetime.datetime.now(datetime.timezone.utc)
            .isoformat(timespec="seconds"),
            "commit": git("rev-parse", "--short", "HEAD") + ("-dirty" if git(
                "status", "--porcelain", "--untracked-files=no", "--", "csrc") else ""),
            "host": host_cpu() + " (static analysis: the host does not matter)",
            "arch": args.arch, "nvcc": subprocess.run([NVCC, "--version"], capture_output=True,
                                                      text=True).stdout.strip().splitlines()[-1],
            "flags": SETUP_NVCC_FLAGS + TORCH_NVCC_FLAGS,
            "limits": {"sm_regs": SM_REGS, "sm_smem": SM_SMEM, "block_smem_max": BLOCK_SMEM_MAX,
                       "smem_reserved_per_block": SMEM_RESERVED},
            "method": __doc__}
    out_dir = os.path.join(ROOT, "benchmarks", "results")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, args.name + ".json"), "w") as f:
        json.dump({**meta, "rows": rows}, f, indent=1)
    with open(os.path.join(out_dir, args.name + ".md"), "w") as f:
        f.write(f"# {args.name}\n\n{meta['date']}, commit {meta['commit']}, {args.arch}, "
                f"{meta['nvcc']}; host {meta['host']}\n\nStatic counts from SASS (no GPU); "
                f"method: benchmarks/sass_stats.py docstring.\n\n```\n{text}\n```\n")
        if phases:
            f.write(f"\nWhere the instructions go, by phase (per warp per chunk; `tf32 cvt`: "
                    f"instructions that round operands to tf32, inside each phase):\n\n"
                    f"```\n{phases}```\n")
    print(f"saved {os.path.join(out_dir, args.name)}.json/.md", file=sys.stderr)


if __name__ == "__main__":
    main()
