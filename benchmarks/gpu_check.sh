#!/usr/bin/env bash
# One command for a GPU machine: build for sm_90a, run the GPU tests, the GPU benchmark, the
# numerical self-check and the other tests; logs and results go into OUT_DIR. Sized to finish
# within 10 minutes on an H200 with 16 cores (build ~2-3 min, then at most 200+200+45+60+45 s).
#   benchmarks/gpu_check.sh OUT_DIR          (on the device tool: benchmarks/gpu_check.sh "$OUT")
# The peer fla-core is used when wheels are in .whl/ (pip download --no-deps fla-core==0.6.0 -d .whl).
# At most 8 files land in OUT_DIR: build.log tests.log check.txt bench.log bench_gpu.{json,md,png}.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-gpu_out}}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"   # absolute: the benchmark runs from benchmarks/
PY="${PYTHON:-python3}"
export GLA_EXT_CUDA_ARCH="${GLA_EXT_CUDA_ARCH:-90a}" MAX_JOBS="${MAX_JOBS:-16}"
[ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ] && export CUDA_HOME=/usr/local/cuda

{
    date; git log -1 --oneline 2>/dev/null || true
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv || true
    "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
    start=$SECONDS
    "$PY" -m pip install --no-build-isolation --no-deps -e . 2>&1 | tail -30
    echo "build took $((SECONDS - start)) s"
    "$PY" -m gla_ext info
} > "$OUT/build.log" 2>&1
echo "build: $(tail -n 12 "$OUT/build.log" | head -n 1)"

if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >> "$OUT/build.log" 2>&1
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi

# GPU test files first (the kernels' correctness), then the benchmark (it saves its tables
# after every section, so a timeout still leaves results), then the self-check and the rest
# of the suite while time remains (CI runs the CPU tests on every submission anyway; the
# CUDA emulator tests are for machines without a GPU).
GPU_TESTS="tests/test_cuda_recurrent.py tests/test_cuda_chunk_fwd.py tests/test_cuda_chunk_bwd.py tests/test_cuda_graph.py"
timeout 200 "$PY" -m pytest -q -rs --durations=10 -p no:cacheprovider $GPU_TESTS \
    > "$OUT/tests.log" 2>&1
echo "gpu tests: $(tail -n 1 "$OUT/tests.log")"
# (its float32 section, bench_gpu_f32.py: forward, then forward + backward, "highest"/"high"
# vs fla and bf16, errors vs float64)
(cd benchmarks && timeout 200 "$PY" bench_gpu.py --out "$OUT") > "$OUT/bench.log" 2>&1
echo "bench: exit $?"; tail -n 30 "$OUT/bench.log"
grep -E "^    (highest:|bwd highest:|fla not importable)" "$OUT/bench.log" | sed 's/^ */float32: /' || true
timeout 45 "$PY" -m gla_ext check > "$OUT/check.txt" 2>&1
echo "check: $(tail -n 1 "$OUT/check.txt")"
timeout 60 "$PY" -m pytest -q -p no:cacheprovider tests --ignore=tests/test_cuda_chunk_emu.py \
    $(for f in $GPU_TESTS; do echo "--ignore=$f"; done) >> "$OUT/tests.log" 2>&1
echo "other tests: $(tail -n 1 "$OUT/tests.log")"
# training smoke: bf16 model on the GPU, through the chunked forward and backward kernels
timeout 45 "$PY" examples/train_tiny.py --steps 200 >> "$OUT/tests.log" 2>&1
echo "train_tiny: exit $? ($(tail -n 1 "$OUT/tests.log"))"
