// float <-> storage type conversions and 16-wide activation loads.
#pragma once
#include <cuda_bf16.h>

#include "common/checks.h"
#include <cuda_fp16.h>

namespace memboost {

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// Loads 16 consecutive values (16-byte aligned) as floats with 16-byte loads.
template <typename T>
__device__ __forceinline__ void load16(const T* __restrict__ p, float (&out)[16]) {
  static_assert(sizeof(T) == 2 || sizeof(T) == 4, "2- or 4-byte types");
  constexpr int kPerVec = 16 / sizeof(T);
  const uint4* src = reinterpret_cast<const uint4*>(p);
#pragma unroll
  for (int v = 0; v < 16 / kPerVec; ++v) {
    const uint4 raw = __ldg(src + v);
    const T* vals = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int j = 0; j < kPerVec; ++j) out[v * kPerVec + j] = to_float<T>(vals[j]);
  }
}

// Stores 16 consecutive floats (16-byte aligned destination) as T.
template <typename T>
__device__ __forceinline__ void store16(T* __restrict__ p, const float (&in)[16]) {
  constexpr int kPerVec = 16 / sizeof(T);
  uint4* dst = reinterpret_cast<uint4*>(p);
#pragma unroll
  for (int v = 0; v < 16 / kPerVec; ++v) {
    uint4 raw;
    T* vals = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int j = 0; j < kPerVec; ++j) vals[j] = from_float<T>(in[v * kPerVec + j]);
    dst[v] = raw;
  }
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

}  // namespace memboost

// at::ScalarType -> CUDA storage type.
#define MB_DISPATCH_FLOAT_TYPES(stype, T, ...)                                    \
  [&] {                                                                          \
    switch (stype) {                                                             \
      case at::kFloat: { using T = float; return __VA_ARGS__(); }                \
      case at::kHalf: { using T = __half; return __VA_ARGS__(); }                \
      case at::kBFloat16: { using T = __nv_bfloat16; return __VA_ARGS__(); }     \
      default: MB_CHECK(false, "unsupported dtype ", ::memboost::torch_dtype_name(stype));        \
    }                                                                            \
  }()
