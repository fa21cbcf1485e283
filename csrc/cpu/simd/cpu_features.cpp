// CPU feature detection (cpuid + xgetbv) and the GLA_EXT_CPU_ISA choice; see cpu_features.h.
#include "cpu/simd/cpu_features.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace gla {
namespace {

#if defined(__x86_64__) || defined(__i386__)
bool bit(unsigned reg, int b) { return (reg >> b) & 1u; }

unsigned long long read_xcr0() {
  unsigned lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (static_cast<unsigned long long>(hi) << 32) | lo;
}

// Linux keeps AMX tile data disabled until a process asks (kernel 5.16+); without the
// permission the first tile instruction faults.
bool request_amx_permission() {
#if defined(__linux__) && defined(__x86_64__)
  constexpr long kArchGetXcompPerm = 0x1022, kArchReqXcompPerm = 0x1023;
  constexpr int kXfeatureXtiledata = 18;
  if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0) return false;
  unsigned long long mask = 0;
  if (syscall(SYS_arch_prctl, kArchGetXcompPerm, &mask) != 0) return false;
  return (mask >> kXfeatureXtiledata) & 1u;
#else
  return false;
#endif
}

CpuFeatures detect() {
  CpuFeatures f;
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = bit(c, 27), avx = bit(c, 28), fma = bit(c, 12), f16c = bit(c, 29);
  const unsigned long long xcr0 = osxsave ? read_xcr0() : 0;
  f.os_avx = (xcr0 & 0x6) == 0x6;             // XMM and YMM state
  f.os_avx512 = f.os_avx && (xcr0 & 0xe0) == 0xe0;  // opmask, ZMM_Hi256, Hi16_ZMM
  f.os_amx = (xcr0 & 0x60000) == 0x60000;     // TILECFG and TILEDATA
  f.fma = f.os_avx && avx && fma;
  f.f16c = f.os_avx && avx && f16c;
  unsigned max_leaf = __get_cpuid_max(0, nullptr);
  if (max_leaf < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  const unsigned b7 = b, c7 = c, d7 = d;
  f.avx2 = f.os_avx && bit(b7, 5);
  f.avx512f = f.os_avx512 && bit(b7, 16);
  f.avx512dq = f.avx512f && bit(b7, 17);
  f.avx512bw = f.avx512f && bit(b7, 30);
  f.avx512vl = f.avx512f && bit(b7, 31);
  f.avx512_vnni = f.avx512f && bit(c7, 11);
  const bool amx_tile = bit(d7, 24), amx_bf16 = bit(d7, 22), amx_int8 = bit(d7, 25);
  __cpuid_count(7, 1, a, b, c, d);
  f.avx_vnni = f.os_avx && bit(a, 4);
  f.avx512_bf16 = f.avx512f && bit(a, 5);
  if (amx_tile && f.os_amx) {
    f.amx_permitted = request_amx_permission();
    f.amx_tile = f.amx_permitted;
    f.amx_bf16 = f.amx_permitted && amx_bf16;
    f.amx_int8 = f.amx_permitted && amx_int8;
  }
  return f;
}
#else
CpuFeatures detect() { return CpuFeatures{}; }
#endif

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures features = detect();
  return features;
}

CpuIsa best_cpu_isa() {
#if GLA_MULTI_ISA
  const CpuFeatures& f = cpu_features();
  const bool avx2 = f.avx2 && f.fma && f.f16c;
  if (avx2 && f.avx512f && f.avx512bw && f.avx512vl && f.avx512dq) return CpuIsa::kAvx512;
  if (avx2) return CpuIsa::kAvx2;
#endif
  return CpuIsa::kGeneric;
}

CpuIsa pick_cpu_isa() {
  const CpuIsa best = best_cpu_isa();
  const char* env = std::getenv("GLA_EXT_CPU_ISA");
  const std::string want = env ? env : "";
#if GLA_EMULATE_AVX512
  // Test build (simd/avx512_emulated.h): the AVX-512 copy runs on any AVX2 CPU, when asked.
  if (want == "avx512" && best != CpuIsa::kGeneric) return CpuIsa::kAvx512;
#endif
  if (want.empty() || want == "auto" || want == "avx512") return best;
  if (want == "generic") return CpuIsa::kGeneric;
  if (want == "avx2") return best == CpuIsa::kGeneric ? best : CpuIsa::kAvx2;
  TORCH_CHECK_VALUE(false, "gla_ext: GLA_EXT_CPU_ISA='", want,
                    "' is not one of auto, generic, avx2, avx512");
}

const char* cpu_vnni_name(CpuIsa isa) {
  return isa == CpuIsa::kAvx512 ? "AVX512-VNNI" : isa == CpuIsa::kAvx2 ? "AVX-VNNI" : nullptr;
}

bool pick_cpu_vnni(CpuIsa isa) {
  const char* env = std::getenv("GLA_EXT_CPU_VNNI");
  const std::string want = env ? env : "";
  TORCH_CHECK_VALUE(want.empty() || want == "auto" || want == "off", "gla_ext: GLA_EXT_CPU_VNNI='",
                    want, "' is not one of auto, off");
  if (want == "off" || !GLA_MULTI_ISA) return false;
  const CpuFeatures& f = cpu_features();
  // the emulated build: vpdpbusd of either width is SIMDe's portable code (avx512_emulated.h)
  const bool emulated = GLA_EMULATE_AVX512;
  if (isa == CpuIsa::kAvx512) return emulated || f.avx512_vnni;
  if (isa == CpuIsa::kAvx2) return emulated || f.avx_vnni;
  return false;
}

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx2: return "avx2";
    default: return "generic";
  }
}

std::string cpu_isa_summary() {
  const CpuFeatures& f = cpu_features();
  std::string s;
  const std::pair<bool, const char*> names[] = {
      {f.avx2, "AVX2"}, {f.fma, "FMA"}, {f.f16c, "F16C"}, {f.avx512f, "AVX512F"},
      {f.avx512bw, "AVX512BW"}, {f.avx512vl, "AVX512VL"}, {f.avx512dq, "AVX512DQ"},
      {f.avx512_bf16, "AVX512_BF16"}, {f.avx512_vnni, "AVX512_VNNI"}, {f.avx_vnni, "AVX_VNNI"},
      {f.amx_tile, "AMX_TILE"}, {f.amx_bf16, "AMX_BF16"}, {f.amx_int8, "AMX_INT8"}};
  for (const auto& n : names)
    if (n.first) s += std::string(s.empty() ? "" : " ") + n.second;
#if GLA_EMULATE_AVX512
  const char* build = "; test build: avx512, AVX512-VNNI and AVX-VNNI emulated by SIMDe";
#else
  const char* build = "";
#endif
  return std::string(cpu_isa_name(pick_cpu_isa())) + " (best " + cpu_isa_name(best_cpu_isa()) +
         "; " + (s.empty() ? "no vector extensions" : s) + build + ")";
}

}  // namespace gla
