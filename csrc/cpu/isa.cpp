// Run-time instruction-set choice for the CPU kernels (see isa.h).
#include "isa.h"

#include <ATen/Version.h>

#include <string>

namespace vitattn::cpu {

Isa cpu_isa() {
  static const Isa isa = [] {
#if defined(VITATTN_CPU_MULTI_ISA)
    // "DEFAULT", "AVX2", "AVX512" (or "ZVECTOR", "VSX", "SVE256" elsewhere)
    const std::string cap = at::get_cpu_capability();
    if (cap == "AVX512") return Isa::AVX512;
    if (cap == "AVX2") return Isa::AVX2;
    return Isa::DEFAULT;
#else
    return Isa::DEFAULT;
#endif
  }();
  return isa;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::AVX512: return "avx512";
    case Isa::AVX2: return "avx2";
    default: return "default";
  }
}

bool cpu_has_avx512_bf16() {
#if defined(VITATTN_CPU_MULTI_ISA) && (defined(__GNUC__) || defined(__clang__))
  static const bool ok = cpu_isa() == Isa::AVX512 && __builtin_cpu_supports("avx512bf16");
  return ok;
#else
  return false;
#endif
}

}  // namespace vitattn::cpu
