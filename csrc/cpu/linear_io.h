// What every CPU *_linear op does around its kernel, without dispatcher calls
// in the common case. At batch 1 on a small layer the kernel takes a few
// microseconds, so the reshape / to / contiguous / reshape views a call
// makes and parallel tasks too small to pay for waking the thread pool are
// a large part of the call; ATen and llama.cpp likewise run small work on
// the calling thread.
#pragma once
#include <ATen/ATen.h>

#include <algorithm>

#include "common/checks.h"

namespace memboost {
namespace cpu {

// At least this many weight x activation-row products per parallel task (a
// few microseconds of work): a smaller layer runs on the calling thread,
// where a fork/join would cost more than it saves. 2^15 splits every layer of
// a 135M-parameter model at batch 1 over two threads: on 2 quiet cores its
// decode ran 10-20% faster than with 2^19 (most layers on one thread), since
// one thread alone does not keep the weight stream from DRAM busy. (When
// another process holds a core, any fork/join can stall for milliseconds:
// give torch.set_num_threads only the free cores.)
constexpr int64_t kMinTaskWork = int64_t(1) << 15;

// Software prefetch distance in bytes along a weight stream: at batch 1 every
// kernel reads its weights once, from DRAM, and the hardware prefetcher alone
// leaves a single row stream about 1.6x slower (measured on the ternary
// kernel, 4096x4096, one thread; 4 to 64 KiB performed alike).
constexpr int64_t kPrefetchBytes = 16384;

// at::parallel_for grain, in items of work_per_item products each (at least min_items).
inline int64_t task_grain(int64_t work_per_item, int64_t min_items = 1) {
  return std::max<int64_t>(min_items, kMinTaskWork / std::max<int64_t>(1, work_per_item));
}

// Element-wise conversions for float_rows and linear_result: a decode step
// calls every *_linear op with a few thousand bf16 or fp16 values, where
// x.to(kFloat) and y.to(dtype) cost a dispatcher round trip each (about 5 us;
// together 3% of a 1B model's decode in a torch.profiler trace); these loops
// take well under a microsecond.
// The same values as ATen's conversions: half and bf16 widen exactly, and
// float narrows by c10's round-to-nearest-even.
template <typename Half16>
inline void widen(const Half16* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}
template <typename Half16>
inline void narrow(const float* src, Half16* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<Half16>(src[i]);
}

// x as a contiguous float32 [M, cols] matrix: x itself when it already is one.
inline at::Tensor float_rows(const at::Tensor& x, int64_t cols) {
  const auto dtype = x.scalar_type();
  if (dtype == at::kFloat && x.is_contiguous()) {
    // A decode step's [batch, 1, cols]: one view (reshape, to and contiguous
    // were three dispatcher calls, each on every op call).
    return x.dim() == 2 ? x : x.view({-1, cols});
  }
  if (x.is_contiguous() && (dtype == at::kBFloat16 || dtype == at::kHalf)) {
    at::Tensor xf = at::empty({x.numel() / cols, cols}, x.options().dtype(at::kFloat));
    if (dtype == at::kBFloat16) widen(x.const_data_ptr<at::BFloat16>(), xf.mutable_data_ptr<float>(), x.numel());
    else widen(x.const_data_ptr<at::Half>(), xf.mutable_data_ptr<float>(), x.numel());
    return xf;
  }
  return x.reshape({-1, cols}).to(at::kFloat).contiguous();
}

// The float32 result y [M, out_features] in x's dtype and leading shape.
inline at::Tensor linear_result(const at::Tensor& y, const at::Tensor& x, int64_t out_features) {
  const auto dtype = x.scalar_type();
  if (dtype == at::kFloat && y.is_contiguous())
    return x.dim() == 2 ? y : y.view(linear_output_shape(x, out_features));
  if (y.is_contiguous() && (dtype == at::kBFloat16 || dtype == at::kHalf)) {
    at::Tensor out = at::empty(linear_output_shape(x, out_features), y.options().dtype(dtype));
    if (dtype == at::kBFloat16) narrow(y.const_data_ptr<float>(), out.mutable_data_ptr<at::BFloat16>(), y.numel());
    else narrow(y.const_data_ptr<float>(), out.mutable_data_ptr<at::Half>(), y.numel());
    return out;
  }
  return y.to(x.scalar_type()).reshape(linear_output_shape(x, out_features));
}

}  // namespace cpu
}  // namespace memboost
