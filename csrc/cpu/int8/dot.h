// Integer dot-product building blocks per instruction set, shared by the
// CPU kernels: unsigned 8-bit weight codes times signed int8 activations,
// accumulated in int32 (x86's maddubs/madd on AVX2, vpdpbusd on AVX-512 VNNI).
// A kernel decodes its own bit layout into u8 codes and calls these.
#pragma once
#include <cstdint>

#include "cpu/int8/isa.h"

namespace memboost {
namespace cpu {

// Portable: sum of u[i] * s[i].
inline int32_t dot_u8s8(const uint8_t* u, const int8_t* s, int64_t n) {
  int32_t acc = 0;
  for (int64_t i = 0; i < n; ++i) acc += static_cast<int32_t>(u[i]) * static_cast<int32_t>(s[i]);
  return acc;
}

#if MB_HAVE_X86_KERNELS
// acc[l] += sum over bytes 4l..4l+3 of u * s. Exact while u < 128 (maddubs
// saturates its int16 pair sums beyond that): every code width memboost
// packs (2 and 4 bits) is far below.
MB_TARGET_AVX2 inline __m256i dpbusd_avx2(__m256i acc, __m256i u, __m256i s) {
  const __m256i pairs = _mm256_maddubs_epi16(u, s);
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

MB_TARGET_AVX512 inline __m256i dpbusd_vnni256(__m256i acc, __m256i u, __m256i s) {
  return _mm256_dpbusd_epi32(acc, u, s);
}

MB_TARGET_AVX512 inline __m128i dpbusd_vnni128(__m128i acc, __m128i u, __m128i s) {
  return _mm_dpbusd_epi32(acc, u, s);
}

MB_TARGET_AVX512 inline __m512i dpbusd_vnni512(__m512i acc, __m512i u, __m512i s) {
  return _mm512_dpbusd_epi32(acc, u, s);
}

MB_TARGET_AVX2 inline int32_t hsum_epi32_avx2(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

MB_TARGET_AVX512 inline int32_t hsum_epi32_512(__m512i v) { return _mm512_reduce_add_epi32(v); }
#endif

}  // namespace cpu
}  // namespace memboost
