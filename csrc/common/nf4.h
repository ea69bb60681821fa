// NF4 (4-bit NormalFloat, QLoRA / bitsandbytes) layout: the one place in C++
// where the codebook, the nibble order, the block layout and the rounding
// rules are defined. Host + device, no torch dependency (GoogleTested).
//
// A weight of n elements is flattened (row-major) and cut into blocks of
// block_size consecutive elements (the last block may be short). Per block:
//   absmax = max |w|  (float32),  code = nearest NF4 value to w * (1 / absmax)
// and w ~= kCodebook[code] * absmax. Codes are packed two per byte, element 2i
// in the HIGH nibble of byte i and 2i+1 in the low nibble; an odd n pads the
// last low nibble with the code of 0.0 (7). This is bitsandbytes' layout.
//
// Rounding (bitsandbytes' reference backend, which the tests check byte for
// byte): x = clamp(w * (1 / max(absmax, 1e-38)), -1, 1) in float32 and
// code = number of float32 midpoints (c[i] + c[i+1]) / 2 strictly below x,
// so a value exactly on a midpoint takes the lower code.
//
// Double quantization (bitsandbytes' compress_statistics): offset =
// mean(absmax) and (absmax - offset) is quantized again in blocks of 256 with
// the signed 8-bit "dynamic" map (256 sorted values in [-1, 1], built in
// memboost/reference.py exactly as bitsandbytes builds it and stored with the
// weight): nested_absmax = max |absmax - offset| per 256-block, and the code
// is chosen as bitsandbytes' CPU kernel chooses it (nested_map_code below).
// A block's scale is then map[code] * nested_absmax + offset, rounded after
// the product and after the sum (no fused multiply-add), as bitsandbytes
// computes it.
#pragma once
#include <cstdint>

#include "common/host_device.h"

namespace memboost {
namespace nf4 {

constexpr int kNumCodes = 16;
constexpr int kZeroCode = 7;           // the code of 0.0 (padding nibble)
constexpr int64_t kMaxBlockSize = int64_t(1) << 20;  // far above bitsandbytes' 4096; bounds per-block buffers
constexpr int kNestedMapSize = 256;    // entries of the 8-bit dynamic map
constexpr int kNestedBlockSize = 256;  // bitsandbytes' fixed nested block size

// The NF4 codebook (float32), index 0..15, sorted ascending.
inline constexpr float kCodebook[kNumCodes] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
    -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
    0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
    0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};
// The codebook times 127, rounded to int8: the integer CPU path's weights
// (llama.cpp's IQ4_NL recipe). The rounding moves a weight by at most
// 0.5 / 127 of its block's absmax (0.39%); measured by the tests.
inline constexpr int8_t kCodebookInt8[kNumCodes] = {-127, -88, -67, -50, -36, -23, -12, 0,
                                                    10, 20, 31, 43, 56, 71, 92, 127};

// Host code reads the namespace-scope tables (a local array would be rebuilt
// on the stack at every call); device code cannot index host variables, so
// it keeps a local copy, which nvcc places in registers or constant memory.
MB_HD float codebook(int i) {
#if defined(__CUDA_ARCH__)
  constexpr float kLocal[kNumCodes] = {
      -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
      -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
      0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f, 0.33791524171829224f,
      0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f, 1.0f};
  return kLocal[i];
#else
  return kCodebook[i];
#endif
}

// Midpoint i (between codes i and i+1), as float32 arithmetic computes it.
MB_HD float midpoint(int i) { return (codebook(i) + codebook(i + 1)) / 2.0f; }

MB_HD int8_t codebook_int8(int i) {
#if defined(__CUDA_ARCH__)
  constexpr int8_t kLocal[kNumCodes] = {-127, -88, -67, -50, -36, -23, -12, 0, 10, 20, 31, 43, 56, 71, 92, 127};
  return kLocal[i];
#else
  return kCodebookInt8[i];
#endif
}

// 1 / max(absmax, 1e-38): the factor a block's values are scaled by.
MB_HD float inverse_absmax(float absmax) { return 1.0f / (absmax > 1e-38f ? absmax : 1e-38f); }

// Code of a value already scaled by inverse_absmax (clamped to [-1, 1] first).
MB_HD uint8_t nearest_code(float scaled) {
  const float x = scaled < -1.0f ? -1.0f : (scaled > 1.0f ? 1.0f : scaled);
  int q = 0;
#if defined(__CUDA_ARCH__)
  for (int i = 0; i < kNumCodes - 1; ++i) q += x > midpoint(i) ? 1 : 0;
#else
  // The midpoints as compile-time constants (the same float32 arithmetic).
  constexpr float m[kNumCodes - 1] = {
      (kCodebook[0] + kCodebook[1]) / 2.0f, (kCodebook[1] + kCodebook[2]) / 2.0f,
      (kCodebook[2] + kCodebook[3]) / 2.0f, (kCodebook[3] + kCodebook[4]) / 2.0f,
      (kCodebook[4] + kCodebook[5]) / 2.0f, (kCodebook[5] + kCodebook[6]) / 2.0f,
      (kCodebook[6] + kCodebook[7]) / 2.0f, (kCodebook[7] + kCodebook[8]) / 2.0f,
      (kCodebook[8] + kCodebook[9]) / 2.0f, (kCodebook[9] + kCodebook[10]) / 2.0f,
      (kCodebook[10] + kCodebook[11]) / 2.0f, (kCodebook[11] + kCodebook[12]) / 2.0f,
      (kCodebook[12] + kCodebook[13]) / 2.0f, (kCodebook[13] + kCodebook[14]) / 2.0f,
      (kCodebook[14] + kCodebook[15]) / 2.0f};
  for (int i = 0; i < kNumCodes - 1; ++i) q += x > m[i] ? 1 : 0;
#endif
  return static_cast<uint8_t>(q);
}

// Nibble order: element e of the flattened weight is in byte e / 2, high
// nibble for even e.
MB_HD uint8_t code_at(const uint8_t* packed, int64_t e) {
  const uint8_t byte = packed[e >> 1];
  return (e & 1) ? static_cast<uint8_t>(byte & 0xF) : static_cast<uint8_t>(byte >> 4);
}
MB_HD uint8_t pack_pair(uint8_t even_code, uint8_t odd_code) {
  return static_cast<uint8_t>((even_code << 4) | (odd_code & 0xF));
}

MB_HD int64_t num_blocks(int64_t n, int64_t block_size) { return (n + block_size - 1) / block_size; }
MB_HD int64_t packed_bytes(int64_t n) { return (n + 1) / 2; }

// Double quantization's code choice, exactly as bitsandbytes' CPU kernel
// makes it (csrc/cpu_ops.cpp, quantize_cpu_impl; checked against 0.50.2 by
// tests/test_nf4_bnb_kernels.py): with z = (absmax - offset) * (1 / nested)
// clamped to [-1, 1], i = uint16((z + 1) * 0.5 * 65535 + 0.5) picks one of
// 65,536 evenly spaced points v_i = -1 + 2i / 65535 (every operation rounded
// to float32), and the code is the number of map midpoints
// 0.5 * (map[j] + map[j + 1]) strictly below v_i. This is not always the
// entry nearest to z (bitsandbytes' pure-PyTorch path takes that one): z is
// first snapped to the 65,536-point grid. A block whose values are all zero
// takes code 0 (nested_inverse returns 0 for it).
constexpr int kNestedGridPoints = 65536;

// 1 / nested_absmax, or 0 for an all-zero block (bitsandbytes writes code 0 there).
MB_HD float nested_inverse(float nested_absmax) {
#if defined(__CUDA_ARCH__)
  return nested_absmax > 0.0f ? __fdiv_rn(1.0f, nested_absmax) : 0.0f;
#else
  return nested_absmax > 0.0f ? 1.0f / nested_absmax : 0.0f;
#endif
}

// Grid index of z (rounded after every operation, no fused multiply-add).
MB_HD int nested_grid_index(float z) {
  const float c = z < -1.0f ? -1.0f : (z > 1.0f ? 1.0f : z);
#if defined(__CUDA_ARCH__)
  const float t = __fmul_rn(__fadd_rn(c, 1.0f), 0.5f);
  return static_cast<int>(__fadd_rn(__fmul_rn(t, 65535.0f), 0.5f));
#else
  const float t = (c + 1.0f) * 0.5f;
  volatile float p = t * 65535.0f;  // volatile: the compiler may not contract into an FMA
  return static_cast<int>(p + 0.5f);
#endif
}

// Grid point i: -1 + (2 * i) / 65535 in float32.
MB_HD float nested_grid_value(int i) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(-1.0f, __fdiv_rn(2.0f * static_cast<float>(i), 65535.0f));
#else
  return -1.0f + (2.0f * static_cast<float>(i)) / 65535.0f;
#endif
}

// Code of one centred absmax: `inv` is nested_inverse of its nested block.
MB_HD uint8_t nested_map_code(const float* map, float centred, float inv) {
  if (inv == 0.0f) return 0;
#if defined(__CUDA_ARCH__)
  const float z = __fmul_rn(centred, inv);
#else
  const float z = centred * inv;
#endif
  const float v = nested_grid_value(nested_grid_index(z));
  int lo = 0, hi = kNestedMapSize - 1;  // the first midpoint not below v, or 255
  while (lo < hi) {
    const int mid = (lo + hi) >> 1;
    if (0.5f * (map[mid] + map[mid + 1]) < v) lo = mid + 1;
    else hi = mid;
  }
  return static_cast<uint8_t>(lo);
}

// Unfused a * b + c, each rounded to float32 (bitsandbytes' order).
MB_HD float mul_add_unfused(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(a, b), c);
#else
  volatile float p = a * b;  // volatile: the compiler may not contract into an FMA
  return p + c;
#endif
}

// A block's scale under double quantization.
MB_HD float nested_scale(const float* map, uint8_t code, float nested_absmax, float offset) {
  return mul_add_unfused(map[code], nested_absmax, offset);
}

}  // namespace nf4
}  // namespace memboost
