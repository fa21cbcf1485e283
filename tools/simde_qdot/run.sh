#!/bin/sh
# Builds and runs tools/simde_qdot/harness.cpp: the AVX-512 quantized linear kernels under
# SIMDe emulation (Debian: apt-get install libsimde-dev) vs the generic ones. No AVX-512 CPU
# needed. Usage: tools/simde_qdot/run.sh [python with torch (for the c10 headers)]
set -e
cd "$(dirname "$0")/../.."
PY=${1:-python}
TORCH_INC=$("$PY" -c "import torch.utils.cpp_extension as c; print(c.include_paths()[0])")
TORCH_LIB=$("$PY" -c "import torch.utils.cpp_extension as c; print(c.library_paths()[0])")
OUT=${TMPDIR:-/tmp}/gla_simde_qdot
g++ -std=c++20 -O1 -mavx2 -mfma -mf16c -Wno-psabi -Icsrc -I"$TORCH_INC" \
  tools/simde_qdot/harness.cpp csrc/cpu/simd/cpu_features.cpp -o "$OUT" \
  -L"$TORCH_LIB" -lc10 -Wl,-rpath,"$TORCH_LIB"
"$OUT"
