# Sourced by .ci/run and tools/avx512_emulated_check.sh: the test files that run the CPU
# kernels (ops, chunk, recurrent, pools, linear, decode, prefill, serving, model, fla
# integration, quantized weights); globs that match nothing are skipped.
shopt -s nullglob
CPU_KERNEL_TESTS=(tests/test_ops_cpu.py tests/test_ops_pool.py tests/test_nan_gates.py
                  tests/test_cpu_*.py tests/test_decode_cpu.py tests/test_prefill_cpu.py
                  tests/test_prefill_gemm.py tests/test_serving.py tests/test_model.py
                  tests/test_fla_*.py tests/test_quantize*.py)
# The files whose kernels have per-ISA copies (simd/per_isa.h): what the emulated AVX-512 run
# in .ci/run covers (tools/avx512_emulated_check.sh runs the whole list above by default).
CPU_ISA_KERNEL_TESTS=(tests/test_cpu_simd.py tests/test_ops_cpu.py tests/test_cpu_chunk.py
                      tests/test_ops_pool.py tests/test_nan_gates.py tests/test_cpu_linear.py
                      tests/test_quantize_kernels.py tests/test_decode_cpu.py
                      tests/test_prefill_cpu.py)
