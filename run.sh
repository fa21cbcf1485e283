#!/usr/bin/env bash
# One entry point for a fresh machine. Each command sets up what it needs (idempotent,
# fast the second time): a virtualenv in .venv with torch, then the extension build.
#
#   ./run.sh demo     build if needed, then `python -m gla_ext demo` (the main job)
#   ./run.sh test     build if needed, install the test peers (fla, transformers), run the tests
#   ./run.sh check    build if needed, then `python -m gla_ext check`
#   ./run.sh info     build if needed, then `python -m gla_ext info`
#   ./run.sh bench    build if needed, install matplotlib, then `python -m gla_ext bench` and
#                     benchmarks/bench_cpu.py --quick (tables + plot into bench_out/)
#
# Environment: GLA_EXT_TORCH (torch requirement, default torch==2.14.1), GLA_EXT_CUDA_ARCH,
# GLA_EXT_NO_CUDA=1, MAX_JOBS, PYTHON (interpreter that creates the venv, default python3).
set -euo pipefail
cd "$(dirname "$0")"

VENV=.venv
PY="$VENV/bin/python"
TORCH_SPEC="${GLA_EXT_TORCH:-torch==2.14.1}"

setup_env() {
    if [ ! -x "$PY" ]; then
        echo "[run.sh] creating $VENV"
        "${PYTHON:-python3}" -m venv "$VENV"
    fi
    if ! "$PY" -c "import torch, pytest, ninja, numpy" 2>/dev/null; then
        echo "[run.sh] installing $TORCH_SPEC, pytest, ninja, numpy into $VENV (about a minute)"
        "$PY" -m pip install -q --upgrade pip
        "$PY" -m pip install -q "$TORCH_SPEC" pytest ninja numpy
    fi
}

# Test-only peers: the tests compare with flash-linear-attention (its ops and its GLA models,
# which need transformers). Never imported by gla_ext itself outside gla_ext/integrations/.
TEST_PEERS="fla-core==0.6.0 flash-linear-attention==0.6.0 transformers"

setup_test_peers() {
    if ! "$PY" -c "import fla, transformers, einops" 2>/dev/null; then
        echo "[run.sh] installing the test peers: $TEST_PEERS"
        "$PY" -m pip install -q $TEST_PEERS
    fi
}

# Plots of the benchmarks (benchmarks/common.py draws them when matplotlib is importable).
setup_bench_peers() {
    if ! "$PY" -c "import matplotlib" 2>/dev/null; then
        echo "[run.sh] installing matplotlib (benchmark plots)"
        "$PY" -m pip install -q matplotlib
    fi
}

source_stamp() {
    { "$PY" -c "import torch; print(torch.__version__)"
      env | grep -E '^(GLA_EXT_|CUDA_HOME=)' | sort || true
      find csrc setup.py -type f | sort | xargs sha256sum; } | sha256sum | cut -d' ' -f1
}

build() {
    if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
        export CUDA_HOME=/usr/local/cuda   # the nvcc on PATH may be a wrapper
    fi
    export MAX_JOBS="${MAX_JOBS:-$(nproc)}"
    local stamp
    stamp="$(source_stamp)"
    if [ -f .build_stamp ] && [ "$(cat .build_stamp)" = "$stamp" ] \
        && "$PY" -c "import gla_ext._C" 2>/dev/null; then
        return 0
    fi
    echo "[run.sh] building gla_ext._C (CUDA sources too when torch has CUDA and nvcc is found)"
    local started=$SECONDS
    if ! "$PY" -m pip show -q gla_ext >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-build-isolation --no-deps -e .
    else
        "$PY" setup.py -q build_ext --inplace
    fi
    echo "$stamp" > .build_stamp
    echo "[run.sh] build done in $((SECONDS - started)) s"
}

cmd="${1:-demo}"
shift || true
setup_env
build
case "$cmd" in
    demo|check|info) exec "$PY" -m gla_ext "$cmd" "$@" ;;
    bench) setup_bench_peers
           "$PY" -m gla_ext bench "$@"
           exec "$PY" benchmarks/bench_cpu.py --quick --out bench_out ;;
    test) setup_test_peers; exec "$PY" -m pytest -q tests "$@" ;;
    *) echo "usage: ./run.sh {demo|test|check|info|bench}" >&2; exit 2 ;;
esac
