// Launch helpers: grid-stride loops everywhere, so no grid-dimension limit.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>

namespace memboost {

inline unsigned grid_for(int64_t work_items, int block) {
  const int64_t blocks = (work_items + block - 1) / block;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, 65535LL * 16)));
}

// Vector loads need aligned bases; a tensor that is a view into a larger
// buffer may not be, so such inputs are copied once.
inline at::Tensor aligned(const at::Tensor& t, uintptr_t bytes) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0 ? t : t.clone();
}

}  // namespace memboost
