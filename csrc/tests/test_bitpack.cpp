#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "common/bitpack.h"

using namespace memboost;

TEST(BitPack, SeedExampleIsLsbFirst) {
  // [0,1,2,3] * 4: every byte is 0b11'10'01'00 = 0xE4.
  std::vector<uint8_t> values;
  for (int i = 0; i < 16; ++i) values.push_back(static_cast<uint8_t>(i % 4));
  EXPECT_EQ(pack_word<2>(values.data(), 16), 0xE4E4E4E4u);
}

TEST(BitPack, FourBitLayout) {
  const uint8_t values[8] = {1, 2, 3, 4, 5, 6, 7, 8};
  EXPECT_EQ(pack_word<4>(values, 8), 0x87654321u);
}

template <int BITS>
void round_trip() {
  std::mt19937 rng(BITS);
  constexpr int kPer = WordLayout<BITS>::kValuesPerWord;
  for (int trial = 0; trial < 200; ++trial) {
    uint8_t values[kPer];
    for (auto& v : values) v = static_cast<uint8_t>(rng() & WordLayout<BITS>::kMask);
    const int count = 1 + static_cast<int>(rng() % kPer);
    const uint32_t word = pack_word<BITS>(values, count);
    for (int j = 0; j < kPer; ++j) {
      EXPECT_EQ(extract_value<BITS>(word, j), j < count ? values[j] : 0u) << "element " << j;
    }
  }
}

TEST(BitPack, RoundTrip2Bit) { round_trip<2>(); }
TEST(BitPack, RoundTrip4Bit) { round_trip<4>(); }

TEST(BitPack, InsertReplacesOnlyItsField) {
  uint32_t word = 0xFFFFFFFFu;
  word = insert_value<2>(word, 5, 1);
  EXPECT_EQ(extract_value<2>(word, 5), 1u);
  for (int j = 0; j < 16; ++j)
    if (j != 5) EXPECT_EQ(extract_value<2>(word, j), 3u);
  // Values wider than the field are masked, never spill into a neighbour.
  EXPECT_EQ(insert_value<4>(0u, 0, 0x1F), 0xFu);
}

TEST(BitSet, CountSetBeforeMatchesNaive) {
  std::mt19937 rng(7);
  std::vector<uint32_t> bits(5);
  for (auto& w : bits) w = rng();
  for (int index = 0; index <= 5 * 32 - 1; ++index) {
    int naive = 0;
    for (int i = 0; i < index; ++i) naive += test_bit(bits.data(), i);
    EXPECT_EQ(count_set_before(bits.data(), index), naive) << "index " << index;
  }
}
