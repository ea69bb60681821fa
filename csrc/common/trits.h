// The ternary (BitNet b1.58) packing: the one definition of how memboost
// stores trits, used by every kernel (CPU, CUDA), by memboost/reference.py,
// by the LoRT format and by the GGUF exporter. No torch dependency.
//
// Code: a trit t in {-1, 0, +1} is stored as the 2-bit code c = t + 1 in
// {0, 1, 2}; code 3 is invalid (QuantizedTensor validation refuses it, the
// kernels do not check). This is the offset coding of llama.cpp's TQ2_0 and
// bitnet.cpp's I2_S: integer kernels multiply the unsigned codes with int8
// activations (maddubs / vpdpbusd take u8 x s8) and subtract the activation
// sum once, since sum((c - 1) * q) = sum(c * q) - sum(q).
//
// Layout: each row of K trits is padded to Kp = ceil(K / 128) * 128 trits
// with code 1 (zero) and stored as Kp / 4 bytes, in chunks of 128 trits =
// 32 bytes. Trit 32*s + m of a chunk (s in 0..3, m in 0..31) sits in byte m
// of the chunk at bits 2s..2s+1:
//
//   byte(col) = (col / 128) * 32 + col % 32        shift(col) = 2 * ((col % 128) / 32)
//
// So one 32-byte load of a chunk, shifted right by 2s and masked with 3,
// gives the 32 consecutive codes of trits 32s..32s+31: a SIMD kernel needs
// one shift and one AND per 32 weights, and the activations it multiplies
// are 32 consecutive values. It is exactly the byte order of GGUF TQ2_0's
// `qs` (a 256-trit TQ2_0 block is two of our chunks), so exporting a row
// whose length is a multiple of 256 copies the bytes.
#pragma once
#include <cstdint>

#include "common/bitpack.h"  // MB_HD

namespace memboost {
namespace trits {

constexpr int kChunkTrits = 128;                     // trits per chunk
constexpr int kChunkBytes = kChunkTrits / 4;         // 32 bytes per chunk
constexpr int kTritsPerByte = 4;
constexpr uint8_t kZeroCode = 1;                     // code of trit 0 (and of the padding)
constexpr uint8_t kZeroByte = 0x55;                  // four zero trits

MB_HD int64_t padded_cols(int64_t cols) { return (cols + kChunkTrits - 1) / kChunkTrits * kChunkTrits; }
MB_HD int64_t row_bytes(int64_t cols) { return padded_cols(cols) / kTritsPerByte; }

// Where trit `col` of a row lives.
MB_HD int64_t byte_of(int64_t col) { return (col / kChunkTrits) * kChunkBytes + col % kChunkBytes; }
MB_HD int shift_of(int64_t col) { return static_cast<int>(2 * ((col % kChunkTrits) / kChunkBytes)); }

MB_HD uint8_t encode(int t) { return static_cast<uint8_t>(t + 1); }
MB_HD int decode(uint32_t code) { return static_cast<int>(code) - 1; }
MB_HD uint32_t code_at(const uint8_t* row, int64_t col) { return (row[byte_of(col)] >> shift_of(col)) & 3u; }

// Byte m of a chunk from its 128 trits t[0..127] (values -1, 0, +1).
MB_HD uint8_t pack_chunk_byte(const int8_t* chunk_trits, int m) {
  uint32_t b = 0;
  for (int s = 0; s < 4; ++s) b |= static_cast<uint32_t>(encode(chunk_trits[32 * s + m])) << (2 * s);
  return static_cast<uint8_t>(b);
}

// Packs `count` (<= 128) trits of one chunk into its 32 bytes; missing trits
// are padding (code 1).
MB_HD void pack_chunk(const int8_t* chunk_trits, int count, uint8_t* out) {
  for (int m = 0; m < kChunkBytes; ++m) {
    uint32_t b = 0;
    for (int s = 0; s < 4; ++s) {
      const int i = 32 * s + m;
      b |= static_cast<uint32_t>(i < count ? encode(chunk_trits[i]) : kZeroCode) << (2 * s);
    }
    out[m] = static_cast<uint8_t>(b);
  }
}

// The 128 trits of one chunk.
MB_HD void unpack_chunk(const uint8_t* chunk, int8_t* out) {
  for (int s = 0; s < 4; ++s)
    for (int m = 0; m < kChunkBytes; ++m) out[32 * s + m] = static_cast<int8_t>(decode((chunk[m] >> (2 * s)) & 3u));
}

// Scales (float32 [scale_rows, groups]): group_size 0 means one scale per row
// (scale_rows = rows) or for the whole tensor (scale_rows = 1, groups = 1);
// group_size > 0 (a multiple of kChunkTrits, so a group is whole chunks and
// never splits a SIMD load) means ceil(cols / group_size) groups of
// consecutive columns per row, the last one possibly shorter.
MB_HD int64_t num_groups(int64_t cols, int64_t group_size) {
  return group_size > 0 ? (cols + group_size - 1) / group_size : 1;
}
MB_HD int64_t chunks_per_group(int64_t cols, int64_t group_size) {
  return group_size > 0 ? group_size / kChunkTrits : padded_cols(cols) / kChunkTrits;
}
// Offset of row r's scales in the scales tensor.
MB_HD int64_t scale_offset(int64_t row, int64_t scale_rows, int64_t groups) { return scale_rows == 1 ? 0 : row * groups; }

}  // namespace trits
}  // namespace memboost
