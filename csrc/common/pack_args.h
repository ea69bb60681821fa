// Argument checks and output shapes of the pack/unpack ops (CPU and CUDA).
#pragma once
#include "common/checks.h"

namespace memboost {

struct PackShape {
  int64_t rows;      // product of the leading dimensions
  int64_t length;    // values per row (last dimension)
  int64_t words;     // packed words per row
  std::vector<int64_t> out_sizes;
};

inline PackShape pack_shape(const at::Tensor& values, int values_per_word) {
  MB_CHECK_DTYPE(values, at::kByte, "values");
  MB_CHECK(values.dim() >= 1, "'values' must have at least one dimension, got a scalar");
  PackShape s;
  s.length = values.size(-1);
  s.words = (s.length + values_per_word - 1) / values_per_word;
  s.rows = s.length == 0 ? 0 : values.numel() / s.length;
  s.out_sizes.assign(values.sizes().begin(), values.sizes().end());
  s.out_sizes.back() = s.words;
  if (s.length == 0) {
    s.rows = 1;
    for (int64_t d = 0; d + 1 < values.dim(); ++d) s.rows *= values.size(d);
  }
  return s;
}

inline PackShape unpack_shape(const at::Tensor& packed, int64_t num_elements, int values_per_word) {
  MB_CHECK_DTYPE(packed, at::kInt, "packed");
  MB_CHECK(packed.dim() >= 1, "'packed' must have at least one dimension, got a scalar");
  PackShape s;
  s.words = packed.size(-1);
  MB_CHECK(num_elements >= 0 && num_elements <= s.words * values_per_word, "'num_elements' must be in [0, ",
              s.words * values_per_word, "] for ", s.words, " packed words per row, got ", num_elements);
  s.length = num_elements;
  s.rows = 1;
  for (int64_t d = 0; d + 1 < packed.dim(); ++d) s.rows *= packed.size(d);
  s.out_sizes.assign(packed.sizes().begin(), packed.sizes().end());
  s.out_sizes.back() = num_elements;
  return s;
}

}  // namespace memboost
