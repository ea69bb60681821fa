#include <gtest/gtest.h>

#include <cmath>

#include "common/mixed_format.h"

using namespace memboost;
using namespace memboost::mixed;

TEST(MixedFormat, GroupParamsDecodeRangeAndZero) {
  // code 3, zero nibble 6, row grid base -4, step 0.5: range 2^(-4 + 1.5)
  const uint8_t meta = static_cast<uint8_t>(3 | (6 << 4));
  const float range = std::exp2(-2.5f);
  const GroupParams two = group_params(meta, false, -4.0f, 0.5f);
  EXPECT_FLOAT_EQ(two.step, range / 3.0f);
  EXPECT_FLOAT_EQ(two.zero_step, 1.5f * range / 3.0f);  // 2-bit: zero in quarter steps
  const GroupParams four = group_params(meta, true, -4.0f, 0.5f);
  EXPECT_FLOAT_EQ(four.step, range / 15.0f);
  EXPECT_FLOAT_EQ(four.zero_step, 6.0f * range / 15.0f);  // 4-bit: whole steps
  EXPECT_TRUE(four.four_bit);
}

TEST(MixedFormat, CodeJoinsHighAndLowPlanes) {
  // element 0: high bits 2, low bits 1 -> 4-bit code 9; 2-bit groups ignore the low plane
  const uint32_t hi = 2u, lo = 1u;
  EXPECT_EQ(code_at(hi, lo, true, 0), 9u);
  EXPECT_EQ(code_at(hi, lo, false, 0), 2u);
  for (uint32_t q = 0; q < 16; ++q) {
    const uint32_t h = insert_value<2>(0u, 7, q >> 2), l = insert_value<2>(0u, 7, q & 3u);
    EXPECT_EQ(code_at(h, l, true, 7), q);
  }
}

TEST(MixedFormat, DequantizedZeroIsExact) {
  // A whole zero point gives exactly 0.0 at q == zero (all-zero groups and rows rely on it).
  for (int zero = 0; zero < 4; ++zero) {
    const GroupParams two = group_params(static_cast<uint8_t>(5 | ((4 * zero) << 4)), false, -7.0f, 0.3f);
    EXPECT_EQ(static_cast<float>(zero) * two.step - two.zero_step, 0.0f);
  }
  for (int zero = 0; zero < 16; ++zero) {
    const GroupParams four = group_params(static_cast<uint8_t>(5 | (zero << 4)), true, -7.0f, 0.3f);
    EXPECT_EQ(static_cast<float>(zero) * four.step - four.zero_step, 0.0f);
  }
}

TEST(MixedFormat, RowRangesMatchPerGroupExp2) {
  // The CPU GEMV's per-row table must agree with group_params within 1e-6 relative,
  // over the spread of row grids the quantizer writes (log2 steps up to ~1.5).
  for (const float base : {-20.0f, -7.3f, 0.0f, 3.1f}) {
    for (const float step : {0.05f, 0.37f, 1.5f}) {
      const RowRanges t = row_ranges(base, step);
      for (int code = 0; code < 16; ++code) {
        const float want = group_params(static_cast<uint8_t>(code), false, base, step).step * 3.0f;
        EXPECT_NEAR(t.range[code], want, 1e-6f * want) << "base " << base << " step " << step << " code " << code;
      }
    }
  }
}
