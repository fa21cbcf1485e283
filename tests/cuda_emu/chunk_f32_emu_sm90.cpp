// chunk_f32_emu.cpp built as the sm_90 device code (tf32 operands rounded by cvt.rn.tf32.f32).
#define GLA_EMU_ARCH 900
#include "chunk_f32_emu.cpp"
