// The mixed 2/4/16-bit weight format (arXiv 2311.16442 style), as the kernels
// read it. The Python side (memboost/formats/mixed.py) writes it; the pure-PyTorch
// reference (memboost/reference.py) decodes it the same way.
//
// For a weight W [N, K] with groups of `group_size` consecutive columns
// (G = K / group_size groups per row, group_size a multiple of 16):
//   plane2   int32 [N, K/16]   two bits per weight, pack_2bit layout. For a
//                              2-bit group: the code; for a 4-bit group: the
//                              code's high two bits. Regular, so every kernel
//                              streams it with wide coalesced loads.
//   lowbits  int32 [N, n4*group_size/16]  the low two bits of the 4-bit
//                              groups, in group order; every row has the same
//                              number n4 of 4-bit groups.
//   meta     uint8 [N, G]      low nibble: log2-quantized scale code,
//                              high nibble: zero point z, in quarter steps
//                              for 2-bit groups (zero = z / 4, so the four
//                              levels need not include 0) and whole steps
//                              for 4-bit groups (zero = z).
//   mask     int32 [N, ceil(G/32)]  bit g set when group g is 4-bit.
//   row_scale float32 [N, 2]   (log2_base, log2_step) of the row's scale codes.
//   outliers CSR: rowptr int32 [N+1], cols int16 (read as uint16) [nnz],
//            vals float16 [nnz]; added to the dequantized weight.
// A group dequantizes as w = (q - zero) * step, where
//   step = exp2(log2_base + code * log2_step) / (2^bits - 1)
// i.e. the code stores the group's quantization range, shared by both widths.
#pragma once
#include <cstdint>
#include <cmath>

#include "common/bitpack.h"

namespace memboost {
namespace mixed {

constexpr int kWeightsPerWord = WordLayout<2>::kValuesPerWord;  // 16

struct GroupParams {
  float step;       // quantization step
  float zero_step;  // zero * step, so that w = q * step - zero_step
  bool four_bit;
};

MB_HD float exp2_fast(float v) {
#if defined(__CUDA_ARCH__)
  return exp2f(v);
#else
  return std::exp2(v);
#endif
}

MB_HD GroupParams group_params_from_range(uint8_t meta, bool four_bit, float range) {
  const float step = range * (four_bit ? (1.0f / 15.0f) : (1.0f / 3.0f));
  // zero / 4 is exact in float, so the kernels and the reference agree bit for bit.
  const float zero = static_cast<float>(meta >> 4) * (four_bit ? 1.0f : 0.25f);
  return GroupParams{step, zero * step, four_bit};
}

MB_HD GroupParams group_params(uint8_t meta, bool four_bit, float log2_base, float log2_step) {
  return group_params_from_range(meta, four_bit, exp2_fast(log2_base + static_cast<float>(meta & 0xF) * log2_step));
}

// The 16 ranges a row's scale codes can take, with two exp2 instead of one
// per group: range[c] = exp2(log2_base) * exp2(log2_step)^c. The repeated
// product is within about 1e-6 (relative) of exp2(log2_base + c * log2_step).
struct RowRanges {
  float range[16];
};

inline RowRanges row_ranges(float log2_base, float log2_step) {
  RowRanges t;
  const float ratio = exp2_fast(log2_step);
  float r = exp2_fast(log2_base);
  for (int c = 0; c < 16; ++c, r *= ratio) t.range[c] = r;
  return t;
}

// Code of element j (0..15) of a word: 2-bit groups read plane2 alone, 4-bit
// groups join the high bits from plane2 with the low bits from lowbits.
MB_HD uint32_t code_at(uint32_t plane_word, uint32_t low_word, bool four_bit, int j) {
  const uint32_t hi = extract_value<2>(plane_word, j);
  return four_bit ? ((hi << 2) | extract_value<2>(low_word, j)) : hi;
}

}  // namespace mixed
}  // namespace memboost
