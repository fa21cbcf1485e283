"""The AVX-512 copy of the quantized linear kernels, run on any x86 CPU through the SIMDe
emulation headers (tools/simde_qdot): its activation rounding must equal the generic copy's
exactly and its products agree to 1e-5 of max|y| (they are equal when both contract the
per-group FMA, as the harness builds them). No machine here has AVX-512; without this the
AVX-512 path would first run on whichever CI machine has it. Skips where SIMDe or g++ is
missing (Debian / Ubuntu: apt-get install libsimde-dev)."""
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE = (os.path.exists("/usr/include/simde/x86/avx512.h") and shutil.which("g++") is not None
        and os.uname().machine == "x86_64")


@pytest.mark.skipif(not HAVE, reason="needs g++ and the SIMDe headers (libsimde-dev) on x86-64")
def test_avx512_qdot_under_simde_matches_generic(tmp_path):
    env = dict(os.environ, TMPDIR=str(tmp_path))
    r = subprocess.run(["sh", os.path.join(ROOT, "tools", "simde_qdot", "run.sh"), sys.executable],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    last = r.stdout.strip().splitlines()[-1]
    assert " 0 failures" in last and int(last.split()[0]) >= 600, last


def _disassembly(tmp_path, src):
    """objdump -d of src compiled with g++ -O2: {function name: [instruction text]}."""
    import re
    (tmp_path / "f.cpp").write_text(src)
    subprocess.run(["g++", "-O2", "-c", "-I", os.path.join(ROOT, "csrc"), str(tmp_path / "f.cpp"),
                    "-o", str(tmp_path / "f.o")], check=True, capture_output=True, timeout=120)
    out = subprocess.run(["objdump", "-d", "--no-show-raw-insn", str(tmp_path / "f.o")],
                         check=True, capture_output=True, text=True).stdout
    funcs, name = {}, None
    for line in out.splitlines():
        m = re.match(r"^[0-9a-f]+ <(\w+)>:$", line)
        if m:
            name = m.group(1)
            funcs[name] = []
        elif name and re.match(r"\s+[0-9a-f]+:", line) and "nop" not in line:   # not padding
            funcs[name].append(re.sub(r"^\s+[0-9a-f]+:\s+", "", line).strip())
    return funcs


@pytest.mark.skipif(not (shutil.which("g++") and shutil.which("objdump")
                         and os.uname().machine == "x86_64"), reason="needs g++ and objdump on x86-64")
def test_vnni_asm_text_is_the_intrinsic(tmp_path):
    """The real builds issue vpdpbusd through inline asm (csrc/cpu/simd/vnni_asm.h), which no
    machine here can run and the emulated build does not use: its operand order (and the
    AVX-VNNI {vex} encoding) must assemble to exactly what GCC emits for the intrinsics."""
    funcs = _disassembly(tmp_path, r'''
#include <immintrin.h>
#include "cpu/simd/vnni_asm.h"
extern "C" {
__attribute__((target("avx512f,avx512vnni"))) __m512i zi(__m512i a, __m512i u, __m512i s) {
  return _mm512_dpbusd_epi32(a, u, s); }
__attribute__((target("avx512f,avx512vnni"))) __m512i za(__m512i a, __m512i u, __m512i s) {
  asm(GLA_ASM_VPDPBUSD : "+v"(a) : "v"(u), "vm"(s)); return a; }
__attribute__((target("avx512f,avx512vnni"))) __m512i zm(__m512i a, __m512i u, const __m512i* s) {
  return _mm512_dpbusd_epi32(a, u, _mm512_loadu_si512(s)); }
__attribute__((target("avx512f,avx512vnni"))) __m512i zam(__m512i a, __m512i u, const __m512i* s) {
  const __m512i v = _mm512_loadu_si512(s);
  asm(GLA_ASM_VPDPBUSD : "+v"(a) : "v"(u), "vm"(v)); return a; }
__attribute__((target("avx2,avxvnni"))) __m256i yi(__m256i a, __m256i u, __m256i s) {
  return _mm256_dpbusd_avx_epi32(a, u, s); }
__attribute__((target("avx2,avxvnni"))) __m256i ya(__m256i a, __m256i u, __m256i s) {
  asm(GLA_ASM_VPDPBUSD_VEX : "+x"(a) : "x"(u), "xm"(s)); return a; }
}
''')
    for intrinsic, asm in (("zi", "za"), ("zm", "zam"), ("yi", "ya")):
        assert any("vpdpbusd" in i for i in funcs[intrinsic]), funcs[intrinsic]
        assert funcs[asm] == funcs[intrinsic], (funcs[asm], funcs[intrinsic])
    assert any(i.startswith("{vex} vpdpbusd") for i in funcs["ya"]), funcs["ya"]
