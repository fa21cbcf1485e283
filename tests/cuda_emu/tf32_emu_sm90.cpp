// tf32_emu.cpp built as the sm_90 device code (cvt_tf32 = cvt.rn.tf32.f32, ties to even).
#define GLA_EMU_ARCH 900
#include "tf32_emu.cpp"
