#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "common/trits.h"

using namespace memboost::trits;

TEST(Trits, CodeIsTritPlusOne) {
  for (int t = -1; t <= 1; ++t) {
    EXPECT_EQ(encode(t), t + 1);
    EXPECT_EQ(decode(encode(t)), t);
  }
  EXPECT_EQ(kZeroByte, (kZeroCode << 6) | (kZeroCode << 4) | (kZeroCode << 2) | kZeroCode);
}

TEST(Trits, RowsPadToWholeChunks) {
  EXPECT_EQ(padded_cols(1), 128);
  EXPECT_EQ(padded_cols(128), 128);
  EXPECT_EQ(padded_cols(129), 256);
  EXPECT_EQ(row_bytes(576), 160);
  EXPECT_EQ(row_bytes(4096), 1024);
}

TEST(Trits, IndexMathPlacesTrit32sPlusMInByteMAtShift2s) {
  for (int64_t chunk = 0; chunk < 3; ++chunk)
    for (int s = 0; s < 4; ++s)
      for (int m = 0; m < 32; ++m) {
        const int64_t col = chunk * 128 + 32 * s + m;
        EXPECT_EQ(byte_of(col), chunk * 32 + m);
        EXPECT_EQ(shift_of(col), 2 * s);
      }
}

TEST(Trits, PackChunkUnpackChunkRoundTripAndPadding) {
  std::mt19937 rng(1);
  std::uniform_int_distribution<int> trit(-1, 1);
  std::vector<int8_t> t(128);
  for (auto& v : t) v = static_cast<int8_t>(trit(rng));
  uint8_t bytes[32];
  pack_chunk(t.data(), 100, bytes);  // trits 100..127 are padding
  int8_t back[128];
  unpack_chunk(bytes, back);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(back[i], t[i]) << i;
  for (int i = 100; i < 128; ++i) EXPECT_EQ(back[i], 0) << i;
  for (int i = 0; i < 100; ++i) EXPECT_EQ(decode(code_at(bytes, i)), t[i]) << i;
  pack_chunk(t.data(), 128, bytes);
  for (int m = 0; m < 32; ++m) EXPECT_EQ(pack_chunk_byte(t.data(), m), bytes[m]);
}

TEST(Trits, ScaleGroups) {
  EXPECT_EQ(num_groups(600, 0), 1);
  EXPECT_EQ(num_groups(600, 256), 3);
  EXPECT_EQ(chunks_per_group(600, 256), 2);
  EXPECT_EQ(chunks_per_group(600, 0), 5);
  EXPECT_EQ(scale_offset(7, 1, 1), 0);
  EXPECT_EQ(scale_offset(7, 10, 3), 21);
}
