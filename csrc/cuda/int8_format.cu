// CUDA kernels of the int8 weight format (layout: csrc/common/int8_args.h).
//
// int8_linear, batch <= kMaxGemvBatch: one warp per output row; each lane
// reads one block of 32 int8 values (two 16-byte loads) and its float16
// scale per step and uses them for every activation row; a warp reduction
// finishes the row. Larger batches dequantize once to float32 and use cuBLAS
// through at::linear. act_bits = 8 is a CPU instruction-set path; the GPU
// computes exactly (memory bound either way).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "common/int8_args.h"
#include "cuda/dtype.cuh"
#include "cuda/launch.cuh"

namespace memboost {
namespace int8w {
namespace {

constexpr int64_t kMaxGemvBatch = 8;
constexpr int kWarpsPerBlock = 8;

template <typename T>
__global__ void dequantize_kernel(const int8_t* __restrict__ values, const __half* __restrict__ scales, int64_t numel,
                                  T* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < numel; i += int64_t(gridDim.x) * blockDim.x) {
    // element i's block is i / 32 of the flattened scales: rows hold whole blocks
    out[i] = from_float<T>(__fmul_rn(static_cast<float>(values[i]), __half2float(scales[i / kBlock])));
  }
}

at::Tensor dequantize_impl(const at::Tensor& values, const at::Tensor& scales, at::ScalarType dtype) {
  auto out = at::empty(values.sizes(), values.options().dtype(dtype));
  const int64_t numel = values.numel();
  if (numel > 0) {
    MB_DISPATCH_FLOAT_TYPES(dtype, T, [&] {
      dequantize_kernel<T><<<grid_for(numel, 256), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
          values.data_ptr<int8_t>(), reinterpret_cast<const __half*>(scales.data_ptr<at::Half>()), numel,
          reinterpret_cast<T*>(out.data_ptr()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return out;
}

at::Tensor int8_dequantize_cuda(const at::Tensor& values, const at::Tensor& scales, at::ScalarType dtype) {
  check_int8_state(values, scales);
  MB_CHECK_FLOAT_DTYPE(dtype, "dtype");
  const c10::cuda::CUDAGuard guard(values.device());
  return dequantize_impl(values.contiguous(), scales.contiguous(), dtype);
}

// One warp per output row, one 32-weight block per lane and step.
template <int MT>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    gemv_kernel(const int8_t* __restrict__ values, const __half* __restrict__ scales, const float* __restrict__ x,
                int64_t rows, int64_t k, float* __restrict__ y) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * kWarpsPerBlock, blocks = k / kBlock;
  for (int64_t r = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / 32; r < rows; r += warps) {
    float acc[MT];
#pragma unroll
    for (int i = 0; i < MT; ++i) acc[i] = 0.f;
    for (int64_t b = lane; b < blocks; b += 32) {
      const int8_t* wb = values + r * k + b * kBlock;
      const float s = __half2float(scales[r * blocks + b]);
      float part[MT];
#pragma unroll
      for (int i = 0; i < MT; ++i) part[i] = 0.f;
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        const uint4 raw = __ldg(reinterpret_cast<const uint4*>(wb + 16 * h));
        const int8_t* w = reinterpret_cast<const int8_t*>(&raw);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
#pragma unroll
          for (int i = 0; i < MT; ++i) {
            const float4 xx = __ldg(reinterpret_cast<const float4*>(x + i * k + b * kBlock + 16 * h) + q);
            part[i] += float(w[4 * q]) * xx.x + float(w[4 * q + 1]) * xx.y + float(w[4 * q + 2]) * xx.z +
                       float(w[4 * q + 3]) * xx.w;
          }
        }
      }
#pragma unroll
      for (int i = 0; i < MT; ++i) acc[i] += part[i] * s;
    }
#pragma unroll
    for (int i = 0; i < MT; ++i) {
      const float total = warp_sum(acc[i]);
      if (lane == 0) y[i * rows + r] = total;
    }
  }
}

template <int MT>
void launch_gemv(const int8_t* values, const __half* scales, const float* x, int64_t rows, int64_t k, float* y,
                 cudaStream_t stream) {
  gemv_kernel<MT><<<grid_for(rows, kWarpsPerBlock), kWarpsPerBlock * 32, 0, stream>>>(values, scales, x, rows, k, y);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor int8_linear_cuda(const at::Tensor& x, const at::Tensor& values, const at::Tensor& scales,
                            const c10::optional<at::Tensor>& bias, int64_t act_bits) {
  MB_CHECK(act_bits == 0 || act_bits == 8, "'act_bits' must be 0 (exact float) or 8 (int8 activations), got ",
           act_bits);
  const Int8Dims d = check_int8_state(values, scales);
  check_linear_input(x, d.cols, d.rows, bias, values, "values");
  const c10::cuda::CUDAGuard guard(x.device());
  const auto vals = aligned(values.contiguous(), 16), sc = scales.contiguous();  // 16-byte loads
  const int64_t k = d.cols, n = d.rows;
  const auto x2 = x.reshape({-1, k});
  const int64_t m_rows = x2.size(0);
  at::Tensor y;
  if (m_rows <= kMaxGemvBatch && m_rows > 0 && n > 0 && k > 0) {
    const auto xf = aligned(x2.to(at::kFloat).contiguous(), 16);
    auto yf = at::empty({m_rows, n}, xf.options());
    const auto stream = at::cuda::getCurrentCUDAStream();
    const int8_t* vp = vals.data_ptr<int8_t>();
    const __half* sp = reinterpret_cast<const __half*>(sc.data_ptr<at::Half>());
    const float* xp = xf.data_ptr<float>();
    float* yp = yf.data_ptr<float>();
    switch (m_rows) {  // exactly m_rows activation rows are read
      case 1: launch_gemv<1>(vp, sp, xp, n, k, yp, stream); break;
      case 2: launch_gemv<2>(vp, sp, xp, n, k, yp, stream); break;
      case 3: launch_gemv<3>(vp, sp, xp, n, k, yp, stream); break;
      case 4: launch_gemv<4>(vp, sp, xp, n, k, yp, stream); break;
      case 5: launch_gemv<5>(vp, sp, xp, n, k, yp, stream); break;
      case 6: launch_gemv<6>(vp, sp, xp, n, k, yp, stream); break;
      case 7: launch_gemv<7>(vp, sp, xp, n, k, yp, stream); break;
      default: launch_gemv<8>(vp, sp, xp, n, k, yp, stream); break;
    }
    if (bias.has_value()) yf.add_(bias->to(at::kFloat));
    y = yf.to(x.scalar_type());
  } else {
    // float32 weight and product, one rounding to x's dtype (as the CPU kernel and the reference)
    const auto w = dequantize_impl(vals, sc, at::kFloat);
    c10::optional<at::Tensor> b;
    if (bias.has_value()) b = bias->to(at::kFloat);
    y = at::linear(x2.to(at::kFloat), w, b).to(x.scalar_type());
  }
  return y.reshape(linear_output_shape(x, n));
}

}  // namespace

TORCH_LIBRARY_IMPL(memboost, CUDA, m) {
  m.impl("int8_dequantize", &int8_dequantize_cuda);
  m.impl("int8_linear", &int8_linear_cuda);
}

}  // namespace int8w
}  // namespace memboost
