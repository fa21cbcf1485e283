"""Static speed of the quantized tiles (csrc/cpu/linear_qdot_tile.h) without the CPU they are
for: compiles csrc/cpu/linear.cpp as setup.py does (real AVX-512 / AVX512-VNNI / AVX-VNNI
instructions; nothing is run), takes the innermost quad loop of each qtile instantiation
from `objdump -d`, counts its instructions by kind and, where LLVM's llvm-mca exists, asks it
for the cycles per iteration on a given CPU model (its scheduling model, not a measurement).

    python tools/qdot_loops/loop_stats.py [--mcpu icelake-server] [--obj linear.o]

(--obj build/temp.*/csrc/cpu/linear.o: the in-place build's object.)

One loop iteration = one quad (4 k) of the tile's panels for MB batch rows. Per 32 products
per batch row = per iteration / (MB * NP * NR * 4 / 32).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# (copy, VNNI?, format, MB, NP, NR)
TILES = [(isa, vnni, fmt, mb, np_, 32 if isa == "avx512" else 16)
         for isa in ("avx512", "avx2") for vnni in (False, True) for fmt in ("Q8Quads", "Q4Quads")
         for mb, np_ in (((8, 1), (1, 2)) if isa == "avx512" else ((4, 1), (1, 2)))]
MULS = ("vpdpbusd", "vpmaddubsw", "vpmaddwd")


def compile_obj(out):
    import torch.utils.cpp_extension as ce
    inc = sum((["-I", p] for p in ce.include_paths()), [])
    # setup.py's flags for the CPU sources (torch's extension builder adds -fwrapv -DNDEBUG)
    subprocess.run(["g++", "-std=c++20", "-O3", "-fPIC", "-fwrapv", "-DNDEBUG", "-fopenmp",
                    "-ffast-math", "-fno-finite-math-only", "-c", "-I", os.path.join(ROOT, "csrc"), *inc,
                    os.path.join(ROOT, "csrc", "cpu", "linear.cpp"), "-o", out], check=True)


def functions(obj):
    dis = subprocess.run(["objdump", "-d", "--no-show-raw-insn", "-C", obj], check=True,
                         capture_output=True, text=True).stdout
    out, name = {}, None
    for line in dis.splitlines():
        m = re.match(r"^[0-9a-f]+ <(.*)>:$", line)
        if m:
            name = m.group(1)
            out[name] = []
        elif name and re.match(r"\s+[0-9a-f]+:", line):
            out[name].append(line)
    return out


def opcode(line):
    parts = re.sub(r"^\s+[0-9a-f]+:\s+(\{vex\}\s+)?", "", line).split()
    return parts[0] if parts else ""


def inner_loop(lines):
    """The backward-jump loop with the most multiply instructions (the quad loop)."""
    addr = {int(re.match(r"\s+([0-9a-f]+):", l).group(1), 16): i for i, l in enumerate(lines)}
    best = None
    for i, l in enumerate(lines):
        m = re.match(r"\s+([0-9a-f]+):\s+j\w+\s+([0-9a-f]+) <", l)
        if m and int(m.group(2), 16) < int(m.group(1), 16) and int(m.group(2), 16) in addr:
            body = lines[addr[int(m.group(2), 16)]:i + 1]
            n = sum(any(op.startswith(k) for k in MULS) for op in map(opcode, body))
            if n and (best is None or n > best[0]):
                best = (n, body)
    return best[1] if best else []


def classify(body):
    kinds = collections.Counter()
    for l in body:
        parts = re.sub(r"^\s+[0-9a-f]+:\s+(\{vex\}\s+)?", "", l).split(None, 1)
        op, args = parts[0], parts[1] if len(parts) > 1 else ""
        if op.startswith(MULS):
            kinds["multiply (" + op + ")"] += 1
        elif op.startswith(("vmovdq", "vmovap", "vmovup")):
            dst = args.rsplit(",", 1)[-1]
            kinds["vector store (spill)" if "(" in dst else "vector load" if "(" in args
                  else "vector reg move"] += 1
        elif op.startswith("vpbroadcast"):
            kinds["broadcast x"] += 1
        elif op.startswith("v"):
            kinds["other vector (" + op + ")"] += 1
        else:
            kinds["scalar / branch / prefetch"] += 1
    return kinds


def mca(body, mcpu):
    tool = shutil.which("llvm-mca") or shutil.which("llvm-mca-14") or (
        "/usr/lib/llvm-14/bin/llvm-mca" if os.path.exists("/usr/lib/llvm-14/bin/llvm-mca") else None)
    if not tool:
        return None
    asm = "\n".join(re.sub(r"<.*", "", re.sub(r"^\s+[0-9a-f]+:\s+", "", l)) for l in body
                    if not re.search(r"\s(j\w+|cmp|prefetch\w*)\s", l))
    with tempfile.NamedTemporaryFile("w", suffix=".s", delete=False) as f:
        f.write(asm + "\n")
    r = subprocess.run([tool, f"-mcpu={mcpu}", "-iterations=200", f.name], capture_output=True,
                       text=True)
    os.unlink(f.name)
    m = re.search(r"Total Cycles:\s+(\d+)", r.stdout)
    return int(m.group(1)) / 200 if m else None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--mcpu", default="icelake-server")
    ap.add_argument("--obj", default=None, help="a compiled linear.cpp (default: compile it)")
    args = ap.parse_args()
    obj = args.obj or os.path.join(tempfile.mkdtemp(), "linear.o")
    if not args.obj:
        compile_obj(obj)
    funcs = functions(obj)
    print(f"| copy | kernel | format | MB x NP | instructions / quad | multiplies | reg moves + "
          f"spills | per 32 products per row: instr / multiplies | llvm-mca {args.mcpu} cycles / "
          "quad |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for isa, vnni, fmt, mb, np_, nr in TILES:
        ns = f"gla::linear_{isa}::" + ("vnni::" if vnni else "")
        key = f"void {ns}qtile<{ns}{fmt}, {mb}, {np_}>("
        name = next((n for n in funcs if n.startswith(key)), None)
        if name is None:
            print(f"| {isa} | {'VNNI' if vnni else 'no VNNI'} | {fmt[:2].lower()} | {mb} x {np_} | (inlined: not found) | | | | |")
            continue
        body = inner_loop(funcs[name])
        kinds = classify(body)
        per32 = mb * np_ * nr * 4 / 32   # products per quad per row: NR * 4 (int8 and int4)
        muls = sum(v for k, v in kinds.items() if k.startswith("multiply"))
        moves = kinds["vector reg move"] + kinds["vector store (spill)"]
        cyc = mca(body, args.mcpu)
        print(f"| {isa} | {'VNNI' if vnni else 'no VNNI'} | {fmt[:2].lower()} | {mb} x {np_} | "
              f"{len(body)} | {muls} | {moves} | {len(body) / per32:.2f} / {muls / per32:.2f} | "
              f"{'-' if cyc is None else f'{cyc:.1f}'} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
