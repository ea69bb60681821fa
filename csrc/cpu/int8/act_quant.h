// int8 activations: the shared first step of every integer CPU kernel
// (llama.cpp's Q8 blocks, BitNet's W1.58A8 per-token quantization). A row of
// x is quantized with one scale, x ~= q * scale, q in [-127, 127], and the
// int32 sum of q over each block of 32 is kept so kernels whose weight codes
// carry an offset (code = value + offset) subtract offset * sum once per block.
//
// The row kernel below has no torch dependency (GoogleTest checks it); the
// ATen wrapper is quantize_activations().
#pragma once
#include <cmath>
#include <cstdint>

#include "cpu/int8/isa.h"

namespace memboost {
namespace cpu {

constexpr int64_t kActBlock = 32;  // block of the int32 sums

// Quantizes x[0, cols) into q[0, padded) (zero-padded; padded a multiple of
// kActBlock, >= cols) and sums[0, padded / kActBlock); returns the scale.
// An all-zero row gets scale 0 and zero codes.
// Round to nearest, ties to even (nearbyint in the default rounding mode)
// for |v| < 2^22, in two float additions: std::nearbyint and std::fmax are
// library calls without SSE4.1 (this file builds for baseline x86-64), and
// per value they cost more than the rest of a small layer's call.
inline float round_half_even_small(float v) {
  constexpr float kMagic = 12582912.f;  // 1.5 * 2^23: the sum's ulp is 1
  return (v + kMagic) - kMagic;
}

inline float quantize_row_int8(const float* x, int64_t cols, int64_t padded, int8_t* q, int32_t* sums) {
  float amax = 0.f;
  for (int64_t i = 0; i < cols; ++i) {
    const float a = std::fabs(x[i]);
    amax = a > amax ? a : amax;  // a NaN is skipped, as std::fmax skips it
  }
  const float scale = amax / 127.f;
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  for (int64_t i = 0; i < cols; ++i) q[i] = static_cast<int8_t>(round_half_even_small(x[i] * inv));
  for (int64_t i = cols; i < padded; ++i) q[i] = 0;
  for (int64_t b = 0; b < padded / kActBlock; ++b) {
    int32_t s = 0;
    for (int64_t j = 0; j < kActBlock; ++j) s += q[b * kActBlock + j];
    sums[b] = s;
  }
  return scale;
}

#if MB_HAVE_X86_KERNELS
// Eight codes of quantize_row_int8 as int32 (a NaN product gives 0).
MB_TARGET_AVX2 inline __m256i codes8_avx2(const float* x, __m256 inv) {
  const __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x), inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  return _mm256_and_si256(_mm256_cvttps_epi32(v), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_ORD_Q)));
}

// quantize_row_int8 on AVX2 (used on AVX-512 CPUs too: a row is a few hundred
// values, and the 8-wide loop already costs less than the call around it).
// The same results: max is order-free and skips a NaN as the scalar compare
// does (vmaxps returns its second operand on a NaN), the float products are
// the same, vroundps in nearest-even mode is round_half_even_small in the int8
// range, and a NaN product gives code 0 as the scalar conversion does on x86.
MB_TARGET_AVX2 inline float quantize_row_int8_avx2(const float* x, int64_t cols, int64_t padded, int8_t* q,
                                                   int32_t* sums) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  __m256 vmax = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= cols; i += 8) vmax = _mm256_max_ps(_mm256_and_ps(_mm256_loadu_ps(x + i), abs_mask), vmax);
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
  float amax = _mm_cvtss_f32(m4);
  for (; i < cols; ++i) {
    const float a = std::fabs(x[i]);
    amax = a > amax ? a : amax;
  }
  const float scale = amax / 127.f;
  const float inv = amax > 0.f ? 127.f / amax : 0.f;
  const __m256 vinv = _mm256_set1_ps(inv);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  i = 0;
  for (; i + 32 <= cols; i += 32) {
    // four vectors of eight, packed to 32 bytes (packs works per 128-bit lane: the permute restores the order)
    const __m256i w01 = _mm256_packs_epi32(codes8_avx2(x + i, vinv), codes8_avx2(x + i + 8, vinv));
    const __m256i w23 = _mm256_packs_epi32(codes8_avx2(x + i + 16, vinv), codes8_avx2(x + i + 24, vinv));
    const __m256i b = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w01, w23), order);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + i), b);
  }
  for (; i < cols; ++i) q[i] = static_cast<int8_t>(round_half_even_small(x[i] * inv));
  for (; i < padded; ++i) q[i] = 0;
  const __m256i ones8 = _mm256_set1_epi8(1), ones16 = _mm256_set1_epi16(1);
  for (int64_t b = 0; b < padded / kActBlock; ++b) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + b * kActBlock));
    const __m256i s = _mm256_madd_epi16(_mm256_maddubs_epi16(ones8, v), ones16);
    __m128i t = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
    t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
    sums[b] = _mm_cvtsi128_si32(t);
  }
  return scale;
}
#endif

// quantize_row_int8 on the best path `simd` allows (false: the scalar loop).
inline float quantize_row_int8_on(bool simd, const float* x, int64_t cols, int64_t padded, int8_t* q, int32_t* sums) {
#if MB_HAVE_X86_KERNELS
  if (simd) return quantize_row_int8_avx2(x, cols, padded, q, sums);
#else
  (void)simd;
#endif
  return quantize_row_int8(x, cols, padded, q, sums);
}

// The same with one scale per block of `block` values (block a multiple of
// kActBlock dividing padded): activations with a few huge channels, as LLMs
// have, keep their small values' precision outside the huge channels' block
// (llama.cpp's Q8 activations do the same with blocks of 32). scales gets
// padded / block entries.
inline void quantize_row_int8_blocks(const float* x, int64_t cols, int64_t padded, int64_t block, int8_t* q,
                                     float* scales, int32_t* sums, bool simd = false) {
  for (int64_t b0 = 0; b0 < padded; b0 += block) {
    const int64_t valid = b0 >= cols ? 0 : (cols - b0 < block ? cols - b0 : block);
    scales[b0 / block] = quantize_row_int8_on(simd, x + b0, valid, block, q + b0, sums + b0 / kActBlock);
  }
}

}  // namespace cpu
}  // namespace memboost


#if __has_include(<ATen/ATen.h>) && !defined(MEMBOOST_NO_TORCH)
#include <ATen/ATen.h>

namespace memboost {
namespace cpu {

struct Int8Activations {
  at::Tensor values;  // int8 [rows, padded], zero-padded past cols
  at::Tensor scales;  // float32 [rows] (or [rows, padded / block]): x ~= values * scale
  at::Tensor sums;    // int32 [rows, padded / kActBlock]
  int64_t rows = 0, cols = 0, padded = 0, block = 0;
};

// x: float32 [rows, cols], contiguous, on the CPU; padded: a multiple of
// kActBlock >= cols (kernels pad to their weight layout's chunk). block = 0:
// one scale per row; else one per block of that many values (a multiple of
// kActBlock dividing padded).
Int8Activations quantize_activations(const at::Tensor& x, int64_t padded, int64_t block = 0);

// The same into caller-owned memory (no tensor allocations: a kernel at batch
// 1 keeps its buffers on the stack or in a vector): x [rows, cols] float32,
// q [rows, padded], scales [rows] or [rows, padded / block], sums
// [rows, padded / kActBlock]. The SIMD row loop runs when simd (callers pass
// active_isa() != Isa::Portable, read once per call).
void quantize_activations_into(bool simd, const float* x, int64_t rows, int64_t cols, int64_t padded, int64_t block, int8_t* q,
                               float* scales, int32_t* sums);

}  // namespace cpu
}  // namespace memboost
#endif
