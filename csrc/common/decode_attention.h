// Arithmetic of decode_attention shared by the CPU and CUDA kernels: the
// rotary embedding transformers' Llama-family modules apply
// (apply_rotary_pos_emb with rotate_half: element i of a head of width D
// pairs with element i + D/2), in float32.
#pragma once
#include <cstdint>

#include "common/host_device.h"

namespace memboost {
namespace attention {

// Element i of x * cos + rotate_half(x) * sin for one head x[0, D); get(j) reads x[j] as float.
template <typename Get>
MB_HD float rotated(Get get, int64_t i, int64_t d, float cos_i, float sin_i) {
  const int64_t half = d / 2;
  const float partner = i < half ? -get(i + half) : get(i - half);
  return get(i) * cos_i + partner * sin_i;
}

}  // namespace attention
}  // namespace memboost
