// CUDA kernel of rms_norm (arithmetic: csrc/common/rms_norm.h): one block
// per row (grid-stride over rows), each thread sums the squares of a strided
// part of the row, a warp-shuffle and shared-memory reduction gives the sum,
// and every thread writes its part of the output.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/rms_norm.h"
#include "common/rms_norm_args.h"
#include "cuda/dtype.cuh"
#include "cuda/launch.cuh"

namespace memboost {
namespace rms {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void rms_norm_kernel(const T* __restrict__ x, const T* __restrict__ w, T* __restrict__ y, int64_t rows,
                                int64_t n, float eps, bool weight_offset) {
  __shared__ float partial[kThreads / 32];
  __shared__ float inv_shared;
  const auto round = [](float v) { return to_float<T>(from_float<T>(v)); };
  for (int64_t r = blockIdx.x; r < rows; r += gridDim.x) {
    const T* xr = x + r * n;
    float s = 0.f;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
      const float v = to_float<T>(xr[j]);
      s += v * v;
    }
    for (int offset = 16; offset > 0; offset >>= 1) s += __shfl_xor_sync(0xffffffffu, s, offset);
    if ((threadIdx.x & 31) == 0) partial[threadIdx.x >> 5] = s;
    __syncthreads();
    if (threadIdx.x < 32) {
      float t = threadIdx.x < (blockDim.x >> 5) ? partial[threadIdx.x] : 0.f;
      for (int offset = 16; offset > 0; offset >>= 1) t += __shfl_xor_sync(0xffffffffu, t, offset);
      if (threadIdx.x == 0) inv_shared = inverse_rms(t, n, eps);
    }
    __syncthreads();
    const float inv = inv_shared;
    T* yr = y + r * n;
    for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
      yr[j] = from_float<T>(output(to_float<T>(xr[j]), inv, to_float<T>(w[j]), weight_offset, round));
    __syncthreads();  // partial and inv_shared are reused by the next row
  }
}

at::Tensor rms_norm_cuda(const at::Tensor& x, const at::Tensor& weight, double eps, bool weight_offset) {
  const int64_t n = check_rms_norm_args(x, weight, eps);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto xc = x.contiguous();
  const auto wc = weight.contiguous();
  auto y = at::empty_like(xc);
  const int64_t rows = xc.numel() / n;
  if (rows == 0) return y;
  const unsigned grid = static_cast<unsigned>(std::min<int64_t>(rows, 65535LL * 16));
  const auto stream = at::cuda::getCurrentCUDAStream();
  const float e = static_cast<float>(eps);
  switch (xc.scalar_type()) {
    case at::kFloat:
      rms_norm_kernel<float><<<grid, kThreads, 0, stream>>>(xc.data_ptr<float>(), wc.data_ptr<float>(),
                                                           y.data_ptr<float>(), rows, n, e, weight_offset);
      break;
    case at::kHalf:
      rms_norm_kernel<__half><<<grid, kThreads, 0, stream>>>(
          reinterpret_cast<const __half*>(xc.data_ptr()), reinterpret_cast<const __half*>(wc.data_ptr()),
          reinterpret_cast<__half*>(y.data_ptr()), rows, n, e, weight_offset);
      break;
    default:  // bfloat16 (check_rms_norm_args admits only the three)
      rms_norm_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(
          reinterpret_cast<const __nv_bfloat16*>(xc.data_ptr()),
          reinterpret_cast<const __nv_bfloat16*>(wc.data_ptr()), reinterpret_cast<__nv_bfloat16*>(y.data_ptr()),
          rows, n, e, weight_offset);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(memboost, CUDA, m) { m.impl("rms_norm", &rms_norm_cuda); }

}  // namespace rms
}  // namespace memboost
