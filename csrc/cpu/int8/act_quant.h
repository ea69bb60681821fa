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

// The same with one scale per block of `block` values (block a multiple of
// kActBlock dividing padded): activations with a few huge channels, as LLMs
// have, keep their small values' precision outside the huge channels' block
// (llama.cpp's Q8 activations do the same with blocks of 32). scales gets
// padded / block entries.
inline void quantize_row_int8_blocks(const float* x, int64_t cols, int64_t padded, int64_t block, int8_t* q,
                                     float* scales, int32_t* sums) {
  for (int64_t b0 = 0; b0 < padded; b0 += block) {
    const int64_t valid = b0 >= cols ? 0 : (cols - b0 < block ? cols - b0 : block);
    scales[b0 / block] = quantize_row_int8(x + b0, valid, block, q + b0, sums + b0 / kActBlock);
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

}  // namespace cpu
}  // namespace memboost
#endif
