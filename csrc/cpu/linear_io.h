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

// x as a contiguous float32 [M, cols] matrix: x itself when it already is one.
inline at::Tensor float_rows(const at::Tensor& x, int64_t cols) {
  if (x.dim() == 2 && x.scalar_type() == at::kFloat && x.is_contiguous()) return x;
  return x.reshape({-1, cols}).to(at::kFloat).contiguous();
}

// The float32 result y [M, out_features] in x's dtype and leading shape.
inline at::Tensor linear_result(const at::Tensor& y, const at::Tensor& x, int64_t out_features) {
  if (x.dim() == 2 && x.scalar_type() == at::kFloat) return y;
  return y.to(x.scalar_type()).reshape(linear_output_shape(x, out_features));
}

}  // namespace cpu
}  // namespace memboost
