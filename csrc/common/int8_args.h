// The int8 weight format (memboost/formats/int8.py; llama.cpp's Q8_0 layout
// without the interleaving): values int8 [out_features, in_features] and one
// float16 scale per block of 32 along in_features, scales [out_features,
// in_features / 32]; W[r, c] = values[r, c] * scales[r, c / 32]. Validation
// shared by the CPU and CUDA ops.
#pragma once
#include "common/checks.h"

namespace memboost {
namespace int8w {

constexpr int64_t kBlock = 32;  // weights per scale (GGUF's QK8_0)

struct Int8Dims {
  int64_t rows, cols, blocks;  // blocks per row
};

inline Int8Dims check_int8_state(const at::Tensor& values, const at::Tensor& scales) {
  MB_CHECK_DTYPE(values, at::kChar, "values");
  MB_CHECK_DTYPE(scales, at::kHalf, "scales");
  MB_CHECK_DIM(values, 2, "values");
  MB_CHECK_DIM(scales, 2, "scales");
  MB_CHECK_SAME_DEVICE(scales, values, "scales", "values");
  Int8Dims d{values.size(0), values.size(1), values.size(1) / kBlock};
  MB_CHECK(d.cols % kBlock == 0, "'values' must have a multiple of ", kBlock, " columns (in_features), got ", d.cols);
  MB_CHECK(scales.size(0) == d.rows && scales.size(1) == d.blocks, "'scales' must have shape [", d.rows, ", ",
           d.blocks, "] (one per block of ", kBlock, " weights), got ", scales.sizes());
  return d;
}

}  // namespace int8w
}  // namespace memboost
