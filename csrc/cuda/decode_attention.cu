// CUDA kernels of decode_attention (arithmetic: csrc/common/decode_attention.h).
// First a grid-stride kernel writes every row's rotated keys and its values
// into the caches at position start; then one warp per (row, query head)
// walks the cached keys: each lane holds head_dim / 32 of the dimensions, a
// warp reduction gives each score, and an online softmax (running maximum and
// sum) rescales the lane's part of the weighted value sum. head_dim <= 256.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/decode_attention.h"
#include "common/decode_attention_args.h"
#include "cuda/dtype.cuh"
#include "cuda/launch.cuh"

namespace memboost {
namespace attention {
namespace {

constexpr int kMaxPerLane = 8;  // head_dim <= 32 * 8
constexpr int kWarpsPerBlock = 4;

template <typename T>
__global__ void write_kernel(const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ cos,
                             const T* __restrict__ sin, T* __restrict__ key_cache, T* __restrict__ value_cache,
                             DecodeDims d) {
  const int64_t D = d.head_dim, total = d.batch * d.kv_heads * D;
  for (int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; idx < total;
       idx += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = idx % D, bg = idx / D, b = bg / d.kv_heads;
    const T* kh = k + bg * D;
    const auto key_at = [kh](int64_t j) { return to_float<T>(kh[j]); };
    const int64_t dst = (bg * d.max_length + d.start) * D + i;
    key_cache[dst] = from_float<T>(rotated(key_at, i, D, to_float<T>(cos[b * D + i]), to_float<T>(sin[b * D + i])));
    value_cache[dst] = v[bg * D + i];
  }
}

template <typename T>
__global__ void attend_kernel(const T* __restrict__ q, const T* __restrict__ cos, const T* __restrict__ sin,
                              const T* __restrict__ key_cache, const T* __restrict__ value_cache,
                              const bool* __restrict__ mask, int64_t mask_stride, float scale, T* __restrict__ out,
                              DecodeDims d) {
  const int lane = threadIdx.x & 31;
  const int64_t warps = int64_t(gridDim.x) * kWarpsPerBlock, D = d.head_dim, group = d.heads / d.kv_heads;
  for (int64_t w = blockIdx.x * int64_t(kWarpsPerBlock) + (threadIdx.x >> 5); w < d.batch * d.heads; w += warps) {
    const int64_t b = w / d.heads, h = w % d.heads, g = h / group;
    const T* qh = q + w * D;
    const auto query_at = [qh](int64_t j) { return to_float<T>(qh[j]); };
    float qr[kMaxPerLane], acc[kMaxPerLane];
#pragma unroll
    for (int s = 0; s < kMaxPerLane; ++s) {
      const int64_t i = lane + 32 * s;
      qr[s] = i < D ? rotated(query_at, i, D, to_float<T>(cos[b * D + i]), to_float<T>(sin[b * D + i])) : 0.f;
      acc[s] = 0.f;
    }
    const int64_t head_base = (b * d.kv_heads + g) * d.max_length * D;
    float top = -INFINITY, total = 0.f;
    for (int64_t j = 0; j <= d.start; ++j) {
      if (mask != nullptr && !mask[b * mask_stride + j]) continue;
      const T* kj = key_cache + head_base + j * D;
      float part = 0.f;
#pragma unroll
      for (int s = 0; s < kMaxPerLane; ++s) {
        const int64_t i = lane + 32 * s;
        if (i < D) part += qr[s] * to_float<T>(kj[i]);
      }
      for (int offset = 16; offset > 0; offset >>= 1) part += __shfl_xor_sync(0xffffffffu, part, offset);
      const float score = scale * part;
      const float next = fmaxf(top, score);
      const float shrink = expf(top - next);  // 0 for the first key (top = -inf)
      const float p = expf(score - next);
      total = total * shrink + p;
      const T* vj = value_cache + head_base + j * D;
#pragma unroll
      for (int s = 0; s < kMaxPerLane; ++s) {
        const int64_t i = lane + 32 * s;
        if (i < D) acc[s] = acc[s] * shrink + p * to_float<T>(vj[i]);
      }
      top = next;
    }
    // no key seen: total is 0 and every output NaN (0 / 0), as scaled_dot_product_attention gives
#pragma unroll
    for (int s = 0; s < kMaxPerLane; ++s) {
      const int64_t i = lane + 32 * s;
      if (i < D) out[w * D + i] = from_float<T>(acc[s] / total);
    }
  }
}

template <typename T>
void launch(const DecodeDims& d, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
            const at::Tensor& sin, at::Tensor& key_cache, at::Tensor& value_cache, const at::Tensor& mask,
            float scale, at::Tensor& out) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  const auto p = [](const at::Tensor& t) { return reinterpret_cast<const T*>(t.data_ptr()); };
  const int64_t writes = d.batch * d.kv_heads * d.head_dim;
  if (writes > 0) {
    write_kernel<T><<<grid_for(writes, 256), 256, 0, stream>>>(p(k), p(v), p(cos), p(sin),
                                                                 reinterpret_cast<T*>(key_cache.data_ptr()),
                                                                 reinterpret_cast<T*>(value_cache.data_ptr()), d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const int64_t warps = d.batch * d.heads;
  if (warps > 0) {
    attend_kernel<T><<<grid_for(warps, kWarpsPerBlock), 32 * kWarpsPerBlock, 0, stream>>>(
        p(q), p(cos), p(sin), p(key_cache), p(value_cache), mask.defined() ? mask.data_ptr<bool>() : nullptr,
        mask.defined() ? mask.size(1) : 0, scale, reinterpret_cast<T*>(out.data_ptr()), d);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

at::Tensor decode_attention_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                                 const at::Tensor& sin, at::Tensor& key_cache, at::Tensor& value_cache, int64_t start,
                                 const c10::optional<at::Tensor>& key_mask, double scale) {
  const DecodeDims d = check_decode_attention_args(q, k, v, cos, sin, key_cache, value_cache, start, key_mask, scale);
  MB_CHECK(d.head_dim <= 32 * kMaxPerLane, "decode_attention on CUDA takes head_dim <= ", 32 * kMaxPerLane, ", got ",
           d.head_dim);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), cc = cos.contiguous(),
             sc = sin.contiguous();
  at::Tensor mask;
  if (key_mask.has_value()) mask = key_mask->contiguous();
  auto out = at::empty({d.batch, 1, d.heads * d.head_dim}, q.options());
  const float s = static_cast<float>(scale);
  switch (q.scalar_type()) {
    case at::kFloat: launch<float>(d, qc, kc, vc, cc, sc, key_cache, value_cache, mask, s, out); break;
    case at::kHalf: launch<__half>(d, qc, kc, vc, cc, sc, key_cache, value_cache, mask, s, out); break;
    default: launch<__nv_bfloat16>(d, qc, kc, vc, cc, sc, key_cache, value_cache, mask, s, out);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(memboost, CUDA, m) { m.impl("decode_attention", &decode_attention_cuda); }

}  // namespace attention
}  // namespace memboost
