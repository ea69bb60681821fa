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

// 2^v for 8 floats with |v| < 250 (AVX2): v = n + f with n = round(v), |f| <= 1/2; 2^f by
// its Taylor series in f * ln 2 to degree 7 (truncation below 1e-8 relative, under
// float's rounding); 2^n as two exponent-field factors, so that results below
// float's normal range round into subnormals as exp2f's do. About 20
// instructions for 8 values, where a scalar exp2f costs about 25 for one.
MB_TARGET_AVX2 inline __m256 exp2_ps256(__m256 v) {
  const __m256 n = _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 t = _mm256_mul_ps(_mm256_sub_ps(v, n), _mm256_set1_ps(0.693147180559945309f));
  __m256 p = _mm256_set1_ps(1.f / 5040.f);
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.f / 720.f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.f / 120.f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.f / 24.f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.f / 6.f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.f));
  p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.f));
  const __m256i ni = _mm256_cvtps_epi32(n), half = _mm256_srai_epi32(ni, 1), bias = _mm256_set1_epi32(127);
  const __m256 a = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(half, bias), 23));
  const __m256 b = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_sub_epi32(ni, half), bias), 23));
  return _mm256_mul_ps(_mm256_mul_ps(p, a), b);
}
}  // namespace cpu
}  // namespace memboost
#endif
