// CUDA kernels of NF4 (layout and rounding: csrc/common/nf4.h).
//
// nf4_linear, batch <= kMaxGemvBatch (and rows made of whole 32-weight
// chunks): one warp per output row; each lane loads 16 bytes (32 codes) at a
// time, looks them up in the codebook held in shared memory, multiplies by
// the block scale once per chunk and reuses the codes for every activation
// row; a warp reduction finishes the row. Larger batches (or odd shapes)
// dequantize once and use cuBLAS through at::linear.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/nf4_args.h"
#include "cuda/dtype.cuh"
#include "cuda/launch.cuh"

namespace memboost {
namespace nf4 {
namespace {

constexpr int64_t kMaxGemvBatch = 8;
constexpr int kWarpsPerBlock = 8;

struct DeviceView {
  const uint8_t* __restrict__ codes;
  const float* __restrict__ absmax_f;
  const uint8_t* __restrict__ absmax_q;
  const float* __restrict__ nested;
  const float* __restrict__ map;
  const float* __restrict__ offset;
  int64_t numel, block_size, nested_block_size;
  bool double_quant;
  int nested_shift;  // log2(nested_block_size) when a power of two, else -1 (64-bit division is slow)

  __device__ __forceinline__ float scale(int64_t block) const {
    if (!double_quant) return absmax_f[block];
    const int64_t outer = nested_shift >= 0 ? block >> nested_shift : block / nested_block_size;
    return nested_scale(map, absmax_q[block], nested[outer], __ldg(offset));
  }
};

DeviceView make_view(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& nested_absmax,
                     const at::Tensor& nested_map, const at::Tensor& nested_offset, const Nf4Dims& d) {
  DeviceView v{codes.data_ptr<uint8_t>(), nullptr, nullptr, nullptr, nullptr, nullptr,
               d.numel, d.block_size, d.nested_block_size, d.double_quant, -1};
  if ((d.nested_block_size & (d.nested_block_size - 1)) == 0) {
    v.nested_shift = 0;
    while ((int64_t(1) << v.nested_shift) < d.nested_block_size) ++v.nested_shift;
  }
  if (d.double_quant) {
    v.absmax_q = absmax.data_ptr<uint8_t>();
    v.nested = nested_absmax.data_ptr<float>();
    v.map = nested_map.data_ptr<float>();
    v.offset = nested_offset.data_ptr<float>();
  } else {
    v.absmax_f = absmax.data_ptr<float>();
  }
  return v;
}

// ---------------------------------------------------------------- quantize
template <typename T>
__global__ void absmax_kernel(const T* __restrict__ w, int64_t n, int64_t block_size, float* __restrict__ absmax,
                              int64_t blocks) {
  // one warp per block
  const int lane = threadIdx.x & 31;
  for (int64_t b = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32; b < blocks;
       b += int64_t(gridDim.x) * blockDim.x / 32) {
    float m = 0.f;
    const int64_t end = min(n, (b + 1) * block_size);
    for (int64_t e = b * block_size + lane; e < end; e += 32) m = fmaxf(m, fabsf(to_float<T>(w[e])));
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, off));
    if (lane == 0) absmax[b] = m;
  }
}

template <typename T>
__global__ void codes_kernel(const T* __restrict__ w, int64_t n, int64_t block_size, const float* __restrict__ absmax,
                             uint8_t* __restrict__ codes) {
  const int64_t bytes = packed_bytes(n);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < bytes; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t e0 = 2 * i, e1 = 2 * i + 1;
    // __fmul_rn: the same rounding as the CPU (no contraction is possible here anyway)
    const uint8_t c0 = nearest_code(__fmul_rn(to_float<T>(w[e0]), inverse_absmax(absmax[e0 / block_size])));
    const uint8_t c1 = e1 < n ? nearest_code(__fmul_rn(to_float<T>(w[e1]), inverse_absmax(absmax[e1 / block_size])))
                              : uint8_t(kZeroCode);
    codes[i] = pack_pair(c0, c1);
  }
}

std::tuple<at::Tensor, at::Tensor> nf4_quantize_cuda(const at::Tensor& w, int64_t block_size) {
  MB_CHECK_FLOAT_DTYPE(w.scalar_type(), "w");
  MB_CHECK(block_size > 0 && block_size % 2 == 0 && block_size <= kMaxBlockSize,
           "'block_size' must be positive, even and at most ", kMaxBlockSize, ", got ", block_size);
  const c10::cuda::CUDAGuard guard(w.device());
  const auto wc = w.reshape({-1}).contiguous();
  const int64_t n = wc.numel(), blocks = num_blocks(n, block_size);
  auto absmax = at::empty({blocks}, wc.options().dtype(at::kFloat));
  auto codes = at::empty({packed_bytes(n)}, wc.options().dtype(at::kByte));
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (n > 0) {
    MB_DISPATCH_FLOAT_TYPES(wc.scalar_type(), T, [&] {
      const T* wp = reinterpret_cast<const T*>(wc.data_ptr());
      absmax_kernel<T><<<grid_for(blocks * 32, 256), 256, 0, stream>>>(wp, n, block_size, absmax.data_ptr<float>(),
                                                                      blocks);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      codes_kernel<T><<<grid_for(packed_bytes(n), 256), 256, 0, stream>>>(wp, n, block_size,
                                                                         absmax.data_ptr<float>(),
                                                                         codes.data_ptr<uint8_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return {codes, absmax};
}

// One thread block of 256 threads per nested block (block_size <= 1024 by
// the check below); the map sits in shared memory for the search.
__global__ void quantize_absmax_kernel(const float* __restrict__ absmax, int64_t n, const float* __restrict__ offset,
                                       const float* __restrict__ map, int64_t block_size, uint8_t* __restrict__ codes,
                                       float* __restrict__ nested, int64_t blocks) {
  __shared__ float smap[kNestedMapSize];
  __shared__ float warp_max[32];
  for (int i = threadIdx.x; i < kNestedMapSize; i += blockDim.x) smap[i] = map[i];
  const float off = offset[0];
  for (int64_t b = blockIdx.x; b < blocks; b += gridDim.x) {
    const int64_t begin = b * block_size, end = min(n, begin + block_size);
    float m = 0.f;
    for (int64_t e = begin + threadIdx.x; e < end; e += blockDim.x) m = fmaxf(m, fabsf(__fsub_rn(absmax[e], off)));
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
    __syncthreads();
    if ((threadIdx.x & 31) == 0) warp_max[threadIdx.x / 32] = m;
    __syncthreads();
    float block_max = 0.f;
    for (int i = 0; i < int(blockDim.x / 32); ++i) block_max = fmaxf(block_max, warp_max[i]);
    if (threadIdx.x == 0) nested[b] = block_max;
    const float inv = nested_inverse(block_max);
    for (int64_t e = begin + threadIdx.x; e < end; e += blockDim.x)
      codes[e] = nested_map_code(smap, __fsub_rn(absmax[e], off), inv);
  }
}

std::tuple<at::Tensor, at::Tensor> nf4_quantize_absmax_cuda(const at::Tensor& absmax, const at::Tensor& offset,
                                                            const at::Tensor& nested_map, int64_t block_size) {
  MB_CHECK_DTYPE(absmax, at::kFloat, "absmax");
  MB_CHECK_DTYPE(offset, at::kFloat, "offset");
  MB_CHECK_DTYPE(nested_map, at::kFloat, "nested_map");
  MB_CHECK_DIM(absmax, 1, "absmax");
  MB_CHECK(offset.numel() == 1, "'offset' must hold one value, got shape ", offset.sizes());
  MB_CHECK(nested_map.dim() == 1 && nested_map.numel() == kNestedMapSize, "'nested_map' must have ", kNestedMapSize,
           " entries, got shape ", nested_map.sizes());
  MB_CHECK(block_size > 0 && block_size <= kMaxBlockSize, "'block_size' must be in [1, ", kMaxBlockSize, "], got ",
           block_size);
  MB_CHECK_SAME_DEVICE(offset, absmax, "offset", "absmax");
  MB_CHECK_SAME_DEVICE(nested_map, absmax, "nested_map", "absmax");
  const c10::cuda::CUDAGuard guard(absmax.device());
  const auto a = absmax.contiguous(), o = offset.contiguous(), m = nested_map.contiguous();
  const int64_t n = a.numel(), blocks = num_blocks(n, block_size);
  auto nested = at::empty({blocks}, a.options());
  auto codes = at::empty({n}, a.options().dtype(at::kByte));
  if (n > 0) {
    quantize_absmax_kernel<<<grid_for(blocks, 1), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
        a.data_ptr<float>(), n, o.data_ptr<float>(), m.data_ptr<float>(), block_size, codes.data_ptr<uint8_t>(),
        nested.data_ptr<float>(), blocks);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {codes, nested};
}

// -------------------------------------------------------------- dequantize
template <typename T>
__global__ void dequantize_kernel(DeviceView v, T* __restrict__ out) {
  // The codebook in shared memory: indexed by data, a local array would live
  // in local memory.
  __shared__ float cb[kNumCodes];
  if (threadIdx.x < kNumCodes) cb[threadIdx.x] = codebook(threadIdx.x);
  __syncthreads();
  const int64_t bytes = packed_bytes(v.numel);
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < bytes; i += int64_t(gridDim.x) * blockDim.x) {
    const uint8_t byte = v.codes[i];
    const int64_t e0 = 2 * i;
    out[e0] = from_float<T>(__fmul_rn(cb[byte >> 4], v.scale(e0 / v.block_size)));
    if (e0 + 1 < v.numel) out[e0 + 1] = from_float<T>(__fmul_rn(cb[byte & 0xF], v.scale((e0 + 1) / v.block_size)));
  }
}

at::Tensor dequantize_impl(const DeviceView& v, at::ScalarType dtype, const at::TensorOptions& options) {
  auto out = at::empty({v.numel}, options.dtype(dtype));
  if (v.numel > 0) {
    MB_DISPATCH_FLOAT_TYPES(dtype, T, [&] {
      dequantize_kernel<T><<<grid_for(packed_bytes(v.numel), 256), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
          v, reinterpret_cast<T*>(out.data_ptr()));
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return out;
}

at::Tensor nf4_dequantize_cuda(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& nested_absmax,
                               const at::Tensor& nested_map, const at::Tensor& nested_offset, int64_t numel,
                               int64_t block_size, int64_t nested_block_size, at::ScalarType dtype) {
  const Nf4Dims d =
      check_nf4_state(codes, absmax, nested_absmax, nested_map, nested_offset, numel, block_size, nested_block_size);
  MB_CHECK_FLOAT_DTYPE(dtype, "dtype");
  const c10::cuda::CUDAGuard guard(codes.device());
  const auto c = codes.contiguous(), a = absmax.contiguous(), na = nested_absmax.contiguous(),
             nm = nested_map.contiguous(), no = nested_offset.contiguous();
  return dequantize_impl(make_view(c, a, na, nm, no, d), dtype, codes.options());
}

// ------------------------------------------------------------------ linear
// One warp per output row, 32 weights (16 bytes) per lane and step.
template <int MT>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    gemv_kernel(DeviceView v, const float* __restrict__ x, int64_t rows, int64_t k, float* __restrict__ y) {
  __shared__ float cb[kNumCodes];
  if (threadIdx.x < kNumCodes) cb[threadIdx.x] = codebook(threadIdx.x);
  __syncthreads();
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * kWarpsPerBlock;
  for (int64_t r = blockIdx.x * int64_t(kWarpsPerBlock) + threadIdx.x / 32; r < rows; r += warps) {
    float acc[MT];
#pragma unroll
    for (int i = 0; i < MT; ++i) acc[i] = 0.f;
    const uint8_t* row = v.codes + r * k / 2;
    for (int64_t c = int64_t(lane) * 32; c < k; c += 32 * 32) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(row + c / 2));
      const float s = v.scale((r * k + c) / v.block_size);  // a 32-chunk never straddles blocks
      float part[MT];
#pragma unroll
      for (int i = 0; i < MT; ++i) part[i] = 0.f;
      // Four weights (bytes 2q and 2q+1, high nibble first) decoded per step and
      // used for every activation row: decoding all 32 first kept them live
      // across the rows and spilled (ptxas -v).
#pragma unroll
      for (int q = 0; q < 8; ++q) {
        const uint32_t word = q < 2 ? raw.x : q < 4 ? raw.y : q < 6 ? raw.z : raw.w;
        const uint32_t pair = word >> (16 * (q & 1));
        const float w0 = cb[(pair >> 4) & 0xF], w1 = cb[pair & 0xF], w2 = cb[(pair >> 12) & 0xF],
                    w3 = cb[(pair >> 8) & 0xF];
#pragma unroll
        for (int i = 0; i < MT; ++i) {
          const float4 xx = __ldg(reinterpret_cast<const float4*>(x + i * k + c) + q);
          part[i] += w0 * xx.x + w1 * xx.y + w2 * xx.z + w3 * xx.w;
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
void launch_gemv(const DeviceView& v, const float* x, int64_t rows, int64_t k, float* y, cudaStream_t stream) {
  gemv_kernel<MT><<<grid_for(rows, kWarpsPerBlock), kWarpsPerBlock * 32, 0, stream>>>(v, x, rows, k, y);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor nf4_linear_cuda(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& absmax,
                           const at::Tensor& nested_absmax, const at::Tensor& nested_map,
                           const at::Tensor& nested_offset, int64_t out_features, int64_t block_size,
                           int64_t nested_block_size, const c10::optional<at::Tensor>& bias, int64_t act_bits) {
  MB_CHECK(act_bits == 0 || act_bits == 8, "'act_bits' must be 0 (exact float) or 8 (int8 activations), got ",
           act_bits);
  // act_bits = 8 is a CPU instruction-set path; on the GPU the exact kernel is as fast (memory bound).
  const int64_t k = x.dim() >= 1 ? x.size(-1) : 0;
  const Nf4Dims d = check_nf4_state(codes, absmax, nested_absmax, nested_map, nested_offset, out_features * k,
                                    block_size, nested_block_size);
  check_nf4_activation(x, out_features, d, bias, codes);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto c = aligned(codes.contiguous(), 16);  // 16-byte loads
  const auto a = absmax.contiguous(), na = nested_absmax.contiguous(), nm = nested_map.contiguous(),
             no = nested_offset.contiguous();
  const DeviceView v = make_view(c, a, na, nm, no, d);
  const auto x2 = x.reshape({-1, k});
  const int64_t m_rows = x2.size(0);
  at::Tensor y;
  if (m_rows <= kMaxGemvBatch && k % 32 == 0 && block_size % 32 == 0 && m_rows > 0 && out_features > 0) {
    // float4 loads: a float32 input that is a view at an odd offset comes back
    // from .to().contiguous() unchanged, so it is copied when misaligned.
    const auto xf = aligned(x2.to(at::kFloat).contiguous(), 16);
    auto yf = at::empty({m_rows, out_features}, xf.options());
    const auto stream = at::cuda::getCurrentCUDAStream();
    const float* xp = xf.data_ptr<float>();
    float* yp = yf.data_ptr<float>();
    switch (m_rows) {  // exactly m_rows activation rows are read
      case 1: launch_gemv<1>(v, xp, out_features, k, yp, stream); break;
      case 2: launch_gemv<2>(v, xp, out_features, k, yp, stream); break;
      case 3: launch_gemv<3>(v, xp, out_features, k, yp, stream); break;
      case 4: launch_gemv<4>(v, xp, out_features, k, yp, stream); break;
      case 5: launch_gemv<5>(v, xp, out_features, k, yp, stream); break;
      case 6: launch_gemv<6>(v, xp, out_features, k, yp, stream); break;
      case 7: launch_gemv<7>(v, xp, out_features, k, yp, stream); break;
      default: launch_gemv<8>(v, xp, out_features, k, yp, stream); break;
    }
    if (bias.has_value()) yf.add_(bias->to(at::kFloat));
    y = yf.to(x.scalar_type());
  } else {
    // Compute-bound regime: one dequantization in float32 (a 16-bit copy
    // would round the weight again), the product in float32 and one rounding
    // to x's dtype, as the CPU kernel and the reference do.
    const auto w = dequantize_impl(v, at::kFloat, codes.options()).view({out_features, k});
    c10::optional<at::Tensor> b;
    if (bias.has_value()) b = bias->to(at::kFloat);
    y = at::linear(x2.to(at::kFloat), w, b).to(x.scalar_type());
  }
  return y.reshape(linear_output_shape(x, out_features));
}

}  // namespace

TORCH_LIBRARY_IMPL(memboost, CUDA, m) {
  m.impl("nf4_quantize", &nf4_quantize_cuda);
  m.impl("nf4_quantize_absmax", &nf4_quantize_absmax_cuda);
  m.impl("nf4_dequantize", &nf4_dequantize_cuda);
  m.impl("nf4_linear", &nf4_linear_cuda);
}

}  // namespace nf4
}  // namespace memboost
