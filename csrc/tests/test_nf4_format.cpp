// NF4 layout helpers (csrc/common/nf4.h).
#include <gtest/gtest.h>

#include <cmath>
#include <vector>

#include "common/nf4.h"

using namespace memboost::nf4;

TEST(Nf4Format, CodebookIsSortedSymmetricEndsAndZero) {
  EXPECT_EQ(codebook(0), -1.0f);
  EXPECT_EQ(codebook(kNumCodes - 1), 1.0f);
  EXPECT_EQ(codebook(kZeroCode), 0.0f);
  for (int i = 1; i < kNumCodes; ++i) EXPECT_LT(codebook(i - 1), codebook(i));
}

TEST(Nf4Format, Int8CodebookIsRoundedTimes127) {
  for (int i = 0; i < kNumCodes; ++i) EXPECT_EQ(codebook_int8(i), static_cast<int>(std::lround(codebook(i) * 127.0f)));
}

TEST(Nf4Format, NearestCodeUsesMidpointsTiesGoLow) {
  for (int i = 0; i < kNumCodes; ++i) EXPECT_EQ(nearest_code(codebook(i)), i);
  for (int i = 0; i + 1 < kNumCodes; ++i) {
    const float mid = midpoint(i);
    EXPECT_EQ(nearest_code(mid), i) << "a midpoint takes the lower code";
    EXPECT_EQ(nearest_code(std::nextafter(mid, 2.0f)), i + 1);
  }
  EXPECT_EQ(nearest_code(-5.0f), 0);  // clamped
  EXPECT_EQ(nearest_code(5.0f), 15);
}

TEST(Nf4Format, NibbleOrderEvenElementHigh) {
  const uint8_t packed[2] = {pack_pair(0xA, 0x3), pack_pair(0x7, 0xF)};
  EXPECT_EQ(packed[0], 0xA3);
  EXPECT_EQ(code_at(packed, 0), 0xA);
  EXPECT_EQ(code_at(packed, 1), 0x3);
  EXPECT_EQ(code_at(packed, 2), 0x7);
  EXPECT_EQ(code_at(packed, 3), 0xF);
  EXPECT_EQ(packed_bytes(7), 4);
  EXPECT_EQ(num_blocks(130, 64), 3);
}

TEST(Nf4Format, NestedGrid) {
  EXPECT_EQ(nested_grid_index(-1.0f), 0);
  EXPECT_EQ(nested_grid_index(-5.0f), 0);  // clamped
  EXPECT_EQ(nested_grid_index(0.0f), kNestedGridPoints / 2);
  EXPECT_EQ(nested_grid_index(1.0f), kNestedGridPoints - 1);
  EXPECT_EQ(nested_grid_value(0), -1.0f);
  EXPECT_EQ(nested_grid_value(kNestedGridPoints - 1), 1.0f);
  EXPECT_EQ(nested_inverse(0.0f), 0.0f);
  EXPECT_EQ(nested_inverse(4.0f), 0.25f);
}

TEST(Nf4Format, NestedMapCodeSnapsToTheGridFirst) {
  std::vector<float> map(kNestedMapSize);
  // irregular spacing (an evenly spaced map's midpoints fall exactly halfway between grid points)
  for (int i = 0; i < kNestedMapSize; ++i) map[i] = std::sin(1.5707963f * (-1.0f + 2.0f * i / (kNestedMapSize - 1)));
  map[0] = -1.0f;
  map[kNestedMapSize - 1] = 1.0f;
  // map entries are far apart on the grid (spacing 2/255 against 2/65535): each finds itself
  for (int i = 0; i < kNestedMapSize; ++i) EXPECT_EQ(nested_map_code(map.data(), map[i], 1.0f), i);
  EXPECT_EQ(nested_map_code(map.data(), -1.0f, 1.0f), 0);
  EXPECT_EQ(nested_map_code(map.data(), 1.0f, 1.0f), kNestedMapSize - 1);
  EXPECT_EQ(nested_map_code(map.data(), 0.9f, 0.0f), 0) << "an all-zero block writes code 0";
  // Just past a midpoint whose nearest grid point lies below it, the grid
  // keeps the lower code although the upper entry is nearer (and the mirror
  // case below a midpoint): bitsandbytes' kernel, not the nearest entry.
  int above = 0, below = 0;
  for (int i = 0; i + 1 < kNestedMapSize; ++i) {
    const float mid = 0.5f * (map[i] + map[i + 1]);
    const float up = std::nextafter(mid, 2.0f), down = std::nextafter(mid, -2.0f);
    const float v_up = nested_grid_value(nested_grid_index(up));
    const float v_down = nested_grid_value(nested_grid_index(down));
    if (v_up < mid && double(map[i + 1]) - up < up - double(map[i])) {  // map[i + 1] is nearer
      EXPECT_EQ(nested_map_code(map.data(), up, 1.0f), i);
      ++above;
    }
    if (v_down > mid && down - double(map[i]) < double(map[i + 1]) - down) {  // map[i] is nearer
      EXPECT_EQ(nested_map_code(map.data(), down, 1.0f), i + 1);
      ++below;
    }
  }
  EXPECT_GT(above, 10);
  EXPECT_GT(below, 10);
}

TEST(Nf4Format, NestedScaleIsUnfused) {
  // 1/3 * 3 - 1 differs between a fused and an unfused multiply-add.
  float map[kNestedMapSize] = {};
  map[0] = 1.0f / 3.0f;
  const float unfused = (map[0] * 3.0f) + -1.0f;
  EXPECT_EQ(nested_scale(map, 0, 3.0f, -1.0f), unfused);
  EXPECT_EQ(inverse_absmax(0.0f), 1.0f / 1e-38f);
}
