#!/usr/bin/env bash
# Runs the CPU-kernel tests on the AVX-512 copies of the kernels on a machine WITHOUT AVX-512
# (the AMD EPYC ones), through a test build whose _mm512_* intrinsics are SIMDe's portable
# code (csrc/cpu/simd/avx512_emulated.h; Debian package libsimde-dev). What it checks: the
# AVX-512 kernel bodies compute what the generic and AVX2 ones do, before an Intel machine
# runs them for real. What it cannot check: speed, and instruction semantics SIMDe gets wrong.
#
#   tools/avx512_emulated_check.sh [--quick] [BUILD_DIR] [pytest args...]
#
# --quick: only the files whose kernels have per-ISA copies (what .ci/run uses).
# BUILD_DIR (default build/avx512_emulated, git-ignored) receives a copy of this checkout
# (tracked and untracked-not-ignored files, as they are in the working tree), so the normal
# in-place build is left alone. On a machine with AVX-512 this is not needed: .ci/run runs
# the real AVX-512 path there.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
quick=0
if [ "${1:-}" = "--quick" ]; then quick=1; shift; fi
dest=${1:-build/avx512_emulated}
shift || true
PY=${PYTHON:-$root/.venv/bin/python}
if [ ! -f /usr/include/simde/x86/avx512.h ]; then
    echo "avx512_emulated_check: needs the SIMDe headers (apt-get install libsimde-dev)" >&2
    exit 2
fi
mkdir -p "$dest"
git ls-files -z --cached --others --exclude-standard \
    | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C "$dest"
cd "$dest"
t0=$SECONDS
GLA_EXT_EMULATE_AVX512=1 GLA_EXT_NO_CUDA=1 MAX_JOBS=${MAX_JOBS:-2} \
    "$PY" setup.py -q build_ext --inplace > build_emulated.log 2>&1 \
    || { tail -30 build_emulated.log; exit 1; }
echo "[avx512-emulated] build took $((SECONDS - t0)) s"
GLA_EXT_CPU_ISA=avx512 "$PY" -c "
import gla_ext, gla_ext._ext as e
assert gla_ext.__file__.startswith('$PWD'), gla_ext.__file__
print('[avx512-emulated]', e._C.cpu_isa_summary())
assert e._C.cpu_isa_summary().startswith('avx512'), 'the emulated AVX-512 path was not picked'"
source .ci/cpu_kernel_tests.sh
[ $quick = 1 ] && files=("${CPU_ISA_KERNEL_TESTS[@]}") || files=("${CPU_KERNEL_TESTS[@]}")
t0=$SECONDS
GLA_EXT_CPU_ISA=avx512 "$PY" -m pytest -q -p no:cacheprovider "${files[@]}" "$@"
echo "[avx512-emulated] CPU-kernel tests took $((SECONDS - t0)) s"
