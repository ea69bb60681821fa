// The one run-time choice of CPU instruction set for every CPU kernel of
// memboost (mixed, ternary, NF4): the best this CPU has, capped by the
// environment variable MEMBOOST_CPU_ISA (portable | avx2 | avx512), read at
// each call so tests can force every path in one process.
#pragma once
#include <string>

namespace memboost {
namespace cpu {

enum class Isa : int {
  Portable = 0,    // plain C++, any CPU
  Avx2 = 1,        // AVX2 + FMA (maddubs/madd integer dot products)
  Avx512Vnni = 2,  // AVX-512 F/BW/VL + VNNI (vpdpbusd)
};

// What this CPU supports (detected once).
Isa supported_isa();
// supported_isa() capped by MEMBOOST_CPU_ISA; "generic" is read as portable.
Isa active_isa();
const char* isa_name(Isa isa);

}  // namespace cpu
}  // namespace memboost

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define MB_HAVE_X86_KERNELS 1
#include <immintrin.h>
// Function attributes that compile one function for one instruction set.
#define MB_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define MB_TARGET_AVX512 __attribute__((target("avx2,fma,avx512f,avx512bw,avx512vl,avx512vnni")))
#else
#define MB_HAVE_X86_KERNELS 0
#endif

#if MB_HAVE_X86_KERNELS
namespace memboost {
namespace cpu {
// The sum of a vector of 8 floats (AVX2), for every kernel's horizontal reductions.
MB_TARGET_AVX2 inline float hsum_ps256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}
}  // namespace cpu
}  // namespace memboost
#endif
