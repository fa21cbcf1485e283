"""Command line: python -m gla_ext {info,check,demo,bench}."""
from __future__ import annotations

import argparse
import platform
import sys

import torch

from . import __version__, _ext


def kernel_table() -> list[tuple[str, str, str]]:
    """(op, backend, what runs) for every op/backend pair on this install."""
    rows = [("chunk_gla", "reference", "pure PyTorch, chunked (gla_ext.reference)"),
            ("fused_recurrent_gla", "reference", "pure PyTorch, token loop (gla_ext.reference)")]
    if _ext.has_cpu():
        info = _ext.build_info()
        rows.append(("chunk_gla", "cpu", info.get("chunk_cpu", "C++ chunked kernel")))
        rows.append(("fused_recurrent_gla", "cpu", "C++ fused recurrent kernel"))
    if _ext.has_cuda():
        rows.append(("chunk_gla", "cuda", _ext.build_info().get("chunk_cuda", "CUDA kernels")))
        rows.append(("fused_recurrent_gla", "cuda", "CUDA fused recurrent kernel"))
    return rows


def quantized_kernels() -> str:
    """Which kernels run gla_ext.quantize_'s int8 / int4 weights on this install and CPU."""
    if not _ext.loaded():
        return "quantized weights (int8, int4): dequantized per call (no compiled kernels)"
    kernels = _ext._C.linear_qdot_kernels()   # e.g. "avx512 + AVX512-VNNI (vpdpbusd)"
    return (f"quantized weights (int8, int4): packed {kernels} integer kernels on this CPU "
            "[GLA_EXT_CPU_VNNI] (activations rounded to int8 per group, integer dot products) "
            "for the decode step of GLA models (GLA.step, StatePool.step) and fla LMs; dequantized per call "
            "elsewhere (prefill: float32 or, where measured faster, bf16 GEMM; training; CUDA)")


def bf16_products() -> str:
    """How products of float32 activations with bf16 weights run on this CPU (gla_ext.matmul16:
    measured now unless GLA_EXT_MATMUL16 forces a route)."""
    from . import matmul16
    try:
        widened = matmul16.widen_weights(torch.bfloat16)
    except ValueError as e:   # a bad GLA_EXT_MATMUL16: say so, as the calls would
        return f"bf16 weights x float32 activations: {e}"
    how = ("weights widened to float32 per block, float32 GEMM" if widened
           else "bf16 GEMM, inputs rounded to bf16")
    return (f"bf16 weights x float32 activations (fused engine's vendor GEMM, fla LM prefill): "
            f"{how} [GLA_EXT_MATMUL16={matmul16.mode()}]")


def cmd_info(_args) -> int:
    print(f"gla_ext {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__} "
          f"(CUDA {torch.version.cuda or 'none'})")
    if torch.cuda.is_available():
        print(f"GPU: {torch.cuda.get_device_name()} (sm_{''.join(map(str, torch.cuda.get_device_capability()))})")
    else:
        print("GPU: none visible")
    if _ext.loaded():
        info = _ext.build_info()
        print(f"extension gla_ext._C: loaded (built against torch {info.get('torch_version_built', '?')}, "
              f"OpenMP {'on' if info.get('openmp') else 'off'}, {torch.get_num_threads()} CPU threads)")
        print(f"CPU vector path: {_ext._C.cpu_isa_summary()} [GLA_EXT_CPU_ISA]")
        if info.get("cuda"):
            archs = ", ".join("sm_" + a for a in info.get("cuda_archs", []))
            print(f"CUDA kernels: built for {archs or '?'}")
            prec = torch.get_float32_matmul_precision()  # read again at every call
            print(f"float32 chunk_gla forward and backward on CUDA: tf32 tensor cores, "
                  f"matmul precision '{prec}' -> {'3xTF32' if prec == 'highest' else '1xTF32'} "
                  "(docs/cuda_float32.md)")
        else:
            print(f"CUDA kernels: not built ({info.get('cuda_skipped_because') or 'unknown reason'})")
    else:
        print(f"extension gla_ext._C: NOT loaded ({_ext.LOAD_ERROR})")
        print("  only backend='reference' works; build with `pip install --no-build-isolation .`")
    print(quantized_kernels())
    print(bf16_products())
    print("\nbackends:")
    for op, backend, what in kernel_table():
        print(f"  {op:20} {backend:10} {what}")
    return 0


def cmd_check(_args) -> int:
    from .selfcheck import run_check
    return run_check()


def cmd_demo(_args) -> int:
    from .demo import run_demo
    return run_demo()


def cmd_bench(args) -> int:
    from .quickbench import run_quickbench
    return run_quickbench(args.T)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gla_ext", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, built backends and CUDA archs").set_defaults(fn=cmd_info)
    sub.add_parser("check", help="numerical self-test of every built backend").set_defaults(
        fn=cmd_check)
    sub.add_parser("demo", help="build the default model, run forward + streaming decode").set_defaults(
        fn=cmd_demo)
    bench = sub.add_parser("bench", help="quick op timings on this machine")
    bench.add_argument("--T", type=int, default=1024, help="sequence length")
    bench.set_defaults(fn=cmd_bench)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
