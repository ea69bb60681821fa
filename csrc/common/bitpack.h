// Bit layouts shared by every kernel and the C++ unit tests: the one place in
// C++ where a packing order is defined. No torch dependency.
#pragma once
#include <cstdint>

#include "common/host_device.h"

namespace memboost {

// BITS-wide unsigned values packed LSB first into 32-bit words: element j of a
// word sits at bits [BITS*j, BITS*j + BITS). For BITS=2 this is the seed's
// pack_2bit layout (16 values per int32), for BITS=4 eight values per int32.
template <int BITS>
struct WordLayout {
  static_assert(BITS == 2 || BITS == 4, "only 2- and 4-bit words are used");
  static constexpr int kBits = BITS;
  static constexpr int kValuesPerWord = 32 / BITS;
  static constexpr uint32_t kMask = (1u << BITS) - 1u;
};

template <int BITS>
MB_HD uint32_t extract_value(uint32_t word, int j) {
  return (word >> (BITS * j)) & WordLayout<BITS>::kMask;
}

template <int BITS>
MB_HD uint32_t insert_value(uint32_t word, int j, uint32_t value) {
  const uint32_t shift = BITS * j;
  return (word & ~(WordLayout<BITS>::kMask << shift)) | ((value & WordLayout<BITS>::kMask) << shift);
}

// Packs up to kValuesPerWord values (missing tail = 0, i.e. zero padding).
template <int BITS>
MB_HD uint32_t pack_word(const uint8_t* values, int count) {
  uint32_t word = 0;
  for (int j = 0; j < count; ++j) {
    word |= (static_cast<uint32_t>(values[j]) & WordLayout<BITS>::kMask) << (BITS * j);
  }
  return word;
}

MB_HD int popcount32(uint32_t v) {
#if defined(__CUDA_ARCH__)
  return __popc(v);
#else
  return __builtin_popcount(v);
#endif
}

// Number of set bits strictly before bit `index` in a bitset stored as words.
MB_HD int count_set_before(const uint32_t* bits, int index) {
  int count = 0;
  const int full_words = index >> 5;
  for (int w = 0; w < full_words; ++w) count += popcount32(bits[w]);
  const int rem = index & 31;
  if (rem) count += popcount32(bits[full_words] & ((1u << rem) - 1u));
  return count;
}

MB_HD bool test_bit(const uint32_t* bits, int index) {
  return (bits[index >> 5] >> (index & 31)) & 1u;
}

}  // namespace memboost
