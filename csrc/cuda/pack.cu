#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/bitpack.h"
#include "common/pack_args.h"
#include "cuda/launch.cuh"

namespace memboost {
namespace {

template <int BITS>
__global__ void pack_kernel(const uint8_t* __restrict__ src, uint32_t* __restrict__ dst, int64_t length,
                            int64_t words, int64_t total) {
  constexpr int kPer = WordLayout<BITS>::kValuesPerWord;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / words, first = (i % words) * kPer;
    const int count = static_cast<int>(length - first < kPer ? length - first : kPer);
    dst[i] = pack_word<BITS>(src + row * length + first, count);
  }
}

template <int BITS>
__global__ void unpack_kernel(const uint32_t* __restrict__ src, uint8_t* __restrict__ dst, int64_t length,
                              int64_t words, int64_t total) {
  constexpr int kPer = WordLayout<BITS>::kValuesPerWord;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / length, col = i % length;
    dst[i] = static_cast<uint8_t>(extract_value<BITS>(src[row * words + col / kPer], static_cast<int>(col % kPer)));
  }
}

template <int BITS>
at::Tensor pack_cuda(const at::Tensor& values) {
  const PackShape s = pack_shape(values, WordLayout<BITS>::kValuesPerWord);
  const c10::cuda::CUDAGuard guard(values.device());
  auto out = at::empty(s.out_sizes, values.options().dtype(at::kInt));
  if (out.numel() == 0) return out;
  const auto v = values.contiguous();
  const int64_t total = s.rows * s.words;
  pack_kernel<BITS><<<grid_for(total, 256), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
      v.data_ptr<uint8_t>(), reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>()), s.length, s.words, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

template <int BITS>
at::Tensor unpack_cuda(const at::Tensor& packed, int64_t num_elements) {
  const PackShape s = unpack_shape(packed, num_elements, WordLayout<BITS>::kValuesPerWord);
  const c10::cuda::CUDAGuard guard(packed.device());
  auto out = at::empty(s.out_sizes, packed.options().dtype(at::kByte));
  if (out.numel() == 0) return out;
  const auto p = packed.contiguous();
  const int64_t total = s.rows * s.length;
  unpack_kernel<BITS><<<grid_for(total, 256), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
      reinterpret_cast<const uint32_t*>(p.data_ptr<int32_t>()), out.data_ptr<uint8_t>(), s.length, s.words, total);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(memboost, CUDA, m) {
  m.impl("pack_2bit", &pack_cuda<2>);
  m.impl("unpack_2bit", &unpack_cuda<2>);
  m.impl("pack_4bit", &pack_cuda<4>);
  m.impl("unpack_4bit", &unpack_cuda<4>);
}

}  // namespace memboost
