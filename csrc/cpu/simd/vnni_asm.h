// The asm text of vpdpbusd for the VNNI quantized tiles (csrc/cpu/linear_qdot_tile.h says why
// asm): operands %0 = the int32 accumulator (read and written), %1 = the unsigned bytes,
// %2 = the signed bytes, in AT&T order (source 2, source 1, destination). AVX-VNNI needs the
// {vex} prefix (%{ %} escapes the braces): without it the assembler picks AVX512-VNNI's
// EVEX encoding of the ymm form. tests/test_quantize_simde.py checks that both assemble to
// what GCC emits for the intrinsics.
#pragma once

#define GLA_ASM_VPDPBUSD "vpdpbusd %2, %1, %0"
#define GLA_ASM_VPDPBUSD_VEX "%{vex%} vpdpbusd %2, %1, %0"
