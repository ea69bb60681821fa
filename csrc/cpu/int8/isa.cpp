#include "cpu/int8/isa.h"

#include <cstdlib>
#include <cstring>

namespace memboost {
namespace cpu {

Isa supported_isa() {
#if MB_HAVE_X86_KERNELS
  static const Isa isa = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("fma"))
      return Isa::Avx512Vnni;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::Avx2;
    return Isa::Portable;
  }();
  return isa;
#else
  return Isa::Portable;
#endif
}

Isa active_isa() {
  const Isa best = supported_isa();
  const char* env = std::getenv("MEMBOOST_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  Isa cap = best;
  if (!std::strcmp(env, "portable") || !std::strcmp(env, "generic")) cap = Isa::Portable;
  else if (!std::strcmp(env, "avx2")) cap = Isa::Avx2;
  else if (!std::strcmp(env, "avx512")) cap = Isa::Avx512Vnni;
  return static_cast<int>(cap) < static_cast<int>(best) ? cap : best;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::Avx512Vnni: return "avx512";
    case Isa::Avx2: return "avx2";
    default: return "portable";
  }
}

}  // namespace cpu
}  // namespace memboost
