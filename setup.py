"""Builds gla_ext._C: the C++ CPU kernels always, the CUDA kernels when torch has CUDA and nvcc is found.

Environment:
  GLA_EXT_CUDA_ARCH   CUDA targets, e.g. "90a" or "80;90a" (default "80;90a")
  GLA_EXT_NO_CUDA=1   build the CPU kernels only, even when CUDA is available
  MAX_JOBS            parallel compile jobs (torch's ninja builder)
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

# The `nvcc` on PATH may be a wrapper; prefer the real toolkit when nobody chose one.
if not os.environ.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
    os.environ["CUDA_HOME"] = "/usr/local/cuda"

import torch  # noqa: E402
from torch.utils.cpp_extension import (  # noqa: E402
    CUDA_HOME, BuildExtension, CppExtension, CUDAExtension)

HERE = os.path.dirname(os.path.abspath(__file__))
# Test builds only: the AVX-512 kernel copies through SIMDe's portable intrinsics, so an
# AVX2-only CPU can run them with GLA_EXT_CPU_ISA=avx512 (csrc/cpu/simd/avx512_emulated.h).
EMULATE_AVX512 = os.environ.get("GLA_EXT_EMULATE_AVX512", "0") == "1"
DEFAULT_ARCHS = "80;90a"


def cuda_archs():
    """GLA_EXT_CUDA_ARCH ("80;90a") -> ["80", "90a"]."""
    raw = os.environ.get("GLA_EXT_CUDA_ARCH", DEFAULT_ARCHS)
    archs = [a.strip().replace(".", "").replace("sm_", "") for a in raw.replace(",", ";").split(";")]
    return [a for a in archs if a]


def want_cuda():
    if os.environ.get("GLA_EXT_NO_CUDA", "0") == "1":
        return False, "GLA_EXT_NO_CUDA=1"
    if torch.version.cuda is None:
        return False, "torch has no CUDA"
    if CUDA_HOME is None or not (os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc"))
                                 or shutil.which("nvcc")):
        return False, "nvcc not found (set CUDA_HOME)"
    return True, ""


def gencode_flags(archs):
    flags = []
    for a in archs:
        flags.append(f"-gencode=arch=compute_{a},code=sm_{a}")
    return flags


def write_build_config(with_cuda, archs, reason):
    """gla_ext/_build_config.py records what this build contains, for `python -m gla_ext info`."""
    path = os.path.join(HERE, "gla_ext", "_build_config.py")
    with open(path, "w") as f:
        f.write("# Written by setup.py at build time.\n")
        f.write(f"TORCH_VERSION = {torch.__version__!r}\n")
        f.write(f"TORCH_CUDA_VERSION = {torch.version.cuda!r}\n")
        f.write(f"WITH_CUDA = {with_cuda!r}\n")
        f.write(f"CUDA_ARCHS = {archs if with_cuda else []!r}\n")
        f.write(f"CUDA_SKIPPED_BECAUSE = {reason!r}\n")
        f.write(f"EMULATED_AVX512 = {EMULATE_AVX512!r}\n")


def extension():
    with_cuda, reason = want_cuda()
    archs = cuda_archs() if with_cuda else []
    write_build_config(with_cuda, archs, reason)
    sources = ["csrc/bindings.cpp"] + sorted(glob.glob("csrc/cpu/**/*.cpp", recursive=True))
    # -g0: no debug info (Python's own CFLAGS carry -g): a third less compile time and
    # objects ~40x smaller; symbols stay for perf.
    cxx = ["-O3", "-g0", "-fopenmp", "-ffast-math", "-fno-finite-math-only"]
    if os.environ.get("GLA_EXT_NATIVE", "0") == "1":
        cxx.append("-march=native")
    include_dirs = [os.path.join(HERE, "csrc")]
    macros = [("GLA_EMULATE_AVX512", "1")] if EMULATE_AVX512 else []
    if with_cuda:
        # Our -gencode flags make torch skip its own TORCH_CUDA_ARCH_LIST handling.
        nvcc = ["-O3", "--use_fast_math", "--expt-relaxed-constexpr",
                "-lineinfo"] + gencode_flags(archs)
        return CUDAExtension(
            "gla_ext._C", sources + sorted(glob.glob("csrc/cuda/*.cu")),
            include_dirs=include_dirs, define_macros=[("GLA_WITH_CUDA", None)] + macros,
            extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"])
    print(f"gla_ext: building CPU kernels only ({reason})")
    return CppExtension("gla_ext._C", sources, include_dirs=include_dirs, define_macros=macros,
                        extra_compile_args={"cxx": cxx}, extra_link_args=["-fopenmp"])


setup(
    name="gla_ext",
    version="0.1.0",
    description="Gated Linear Attention as a compiled PyTorch extension",
    packages=find_packages(include=["gla_ext", "gla_ext.*"]),
    ext_modules=[extension()],
    cmdclass={"build_ext": BuildExtension},
    install_requires=["torch"],
    python_requires=">=3.9",
)
