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

TEST(Nf4Format, NearestMapCodeOnASortedMap) {
  std::vector<float> map(kNestedMapSize);
  for (int i = 0; i < kNestedMapSize; ++i) map[i] = -1.0f + 2.0f * i / (kNestedMapSize - 1);
  for (int i = 0; i < kNestedMapSize; ++i) EXPECT_EQ(nearest_map_code(map.data(), map[i]), i);
  const float mid = (map[10] + map[11]) / 2.0f;
  EXPECT_EQ(nearest_map_code(map.data(), mid), 10);
  EXPECT_EQ(nearest_map_code(map.data(), std::nextafter(mid, 2.0f)), 11);
  EXPECT_EQ(nearest_map_code(map.data(), -1.0f), 0);
  EXPECT_EQ(nearest_map_code(map.data(), 1.0f), kNestedMapSize - 1);
}

TEST(Nf4Format, NestedScaleIsUnfused) {
  // 1/3 * 3 - 1 differs between a fused and an unfused multiply-add.
  float map[kNestedMapSize] = {};
  map[0] = 1.0f / 3.0f;
  const float unfused = (map[0] * 3.0f) + -1.0f;
  EXPECT_EQ(nested_scale(map, 0, 3.0f, -1.0f), unfused);
  EXPECT_EQ(inverse_absmax(0.0f), 1.0f / 1e-38f);
}
