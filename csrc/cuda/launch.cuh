// Launch helpers: grid-stride loops everywhere, so no grid-dimension limit.
#pragma once
#include <cstdint>
#include <algorithm>

namespace memboost {

inline unsigned grid_for(int64_t work_items, int block) {
  const int64_t blocks = (work_items + block - 1) / block;
  return static_cast<unsigned>(std::max<int64_t>(1, std::min<int64_t>(blocks, 65535LL * 16)));
}

}  // namespace memboost
