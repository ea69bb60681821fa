// RMSNorm arithmetic shared by the CPU and CUDA kernels (memboost::rms_norm),
// written to reproduce transformers' RMSNorm modules of the Llama family and
// of Gemma, which differ in where they round:
//   r = 1 / sqrt(sum(x^2) / n + eps)            (float32, any input dtype)
//   weight_offset = false (Llama, Mistral, Qwen2): y = w * T(x * r), the
//     normalized value rounded to the input type T before the weight
//     multiplies it (both in T, one more rounding);
//   weight_offset = true (Gemma): y = T(x * r * (1 + w)), one rounding.
// The sum's order differs between the kernels, so results agree within a few
// float32 ulps of r, not bit for bit.
#pragma once
#include <cmath>
#include <cstdint>

#include "common/host_device.h"

namespace memboost {
namespace rms {

MB_HD float inverse_rms(float sum_squares, int64_t n, float eps) {
  // IEEE division and square root (no rsqrt approximation): the project's CUDA flags keep them exact.
  return 1.0f / sqrtf(sum_squares / static_cast<float>(n) + eps);
}

// One output element; round(v) rounds a float32 to the input type and back.
template <typename Round>
MB_HD float output(float x, float r, float w, bool weight_offset, Round round) {
  return weight_offset ? x * r * (1.0f + w) : round(w * round(x * r));
}

}  // namespace rms
}  // namespace memboost
