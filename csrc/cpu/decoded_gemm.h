// Large-batch CPU path shared by the formats whose fused kernels decode the
// weight in registers (mixed, ternary): from a few dozen activation rows on,
// decoding a block of weight rows once into a cache-sized float buffer and
// multiplying it with ATen's GEMM beats re-decoding every weight per few
// activation rows. The full float weight is never built, and each block is
// still in cache between its decoding and its GEMM.
#pragma once
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>

namespace memboost {
namespace cpu {

// y[:, r0:r0+n] = xf @ W[r0:r0+n].T for blocks of about 2 MiB of float32
// weight rows. decode_rows(begin, end, out) writes float32 rows [begin, end)
// of W to out (row r at out + (r - first_row) * cols, first_row the block's
// first row, passed as the fourth argument). xf: float32 [M, cols]; y:
// float32 [M, rows].
template <class DecodeRows>
void linear_decoded_blocks(int64_t rows, int64_t cols, const at::Tensor& xf, at::Tensor& y,
                           const DecodeRows& decode_rows) {
  const int64_t block = std::min(rows, std::max<int64_t>(16, (int64_t(1) << 19) / std::max<int64_t>(1, cols)));
  auto buffer = at::empty({block, cols}, xf.options());
  for (int64_t r0 = 0; r0 < rows; r0 += block) {
    const int64_t n = std::min(block, rows - r0);
    float* out = buffer.data_ptr<float>();
    at::parallel_for(r0, r0 + n, 16, [&](int64_t begin, int64_t end) { decode_rows(begin, end, out, r0); });
    auto y_block = y.narrow(1, r0, n);
    at::mm_out(y_block, xf, buffer.narrow(0, 0, n).t());
  }
}

}  // namespace cpu
}  // namespace memboost
