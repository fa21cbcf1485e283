// Body of engine_isa.cpp's per-ISA copies (cpu/simd/per_isa.h): the layer math and both
// engine loops, with the chunk kernel's forward for the window. No include guard on purpose.

#include "cpu/chunk_fwd.h"
#include "cpu/engine/math_impl.h"
#include "cpu/engine/step_impl.h"
#include "cpu/engine/window_impl.h"

const EngineKernels kKernels{&step_thread, &window_ws_bytes, &window_run, &window_panel,
                             &attn_rows, &rms_norm_rows, &swiglu_rows};
