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
