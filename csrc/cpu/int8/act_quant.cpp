#include "cpu/int8/act_quant.h"

#include <ATen/Parallel.h>

#include "common/checks.h"
#include "cpu/int8/isa.h"

namespace memboost {
namespace cpu {

Int8Activations quantize_activations(const at::Tensor& x, int64_t padded, int64_t block) {
  MB_CHECK_DTYPE(x, at::kFloat, "x");
  MB_CHECK_DIM(x, 2, "x");
  MB_CHECK(x.is_contiguous() && x.device().is_cpu(), "activations must be contiguous CPU tensors");
  MB_CHECK(padded >= x.size(1) && padded % kActBlock == 0, "activation padding ", padded, " must be a multiple of ",
           kActBlock, " >= ", x.size(1));
  MB_CHECK(block == 0 || (block % kActBlock == 0 && padded % block == 0), "activation block ", block,
           " must be a multiple of ", kActBlock, " dividing ", padded);
  Int8Activations a;
  a.rows = x.size(0);
  a.cols = x.size(1);
  a.padded = padded;
  a.block = block;
  const int64_t scales_per_row = block == 0 ? 1 : padded / block;
  a.values = at::empty({a.rows, padded}, x.options().dtype(at::kChar));
  a.scales = block == 0 ? at::empty({a.rows}, x.options()) : at::empty({a.rows, scales_per_row}, x.options());
  a.sums = at::empty({a.rows, padded / kActBlock}, x.options().dtype(at::kInt));
  quantize_activations_into(active_isa() != Isa::Portable, x.data_ptr<float>(), a.rows, a.cols, padded, block, a.values.data_ptr<int8_t>(),
                            a.scales.data_ptr<float>(), a.sums.data_ptr<int32_t>());
  return a;
}

void quantize_activations_into(bool simd, const float* xp, int64_t rows, int64_t cols, int64_t padded, int64_t block, int8_t* qp,
                               float* sp, int32_t* bp) {
  const int64_t scales_per_row = block == 0 ? 1 : padded / block, blocks = padded / kActBlock;
  auto quantize = [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      if (block == 0) {
        sp[r] = quantize_row_int8_on(simd, xp + r * cols, cols, padded, qp + r * padded, bp + r * blocks);
      } else {
        quantize_row_int8_blocks(xp + r * cols, cols, padded, block, qp + r * padded, sp + r * scales_per_row,
                                 bp + r * blocks, simd);
      }
    }
  };
  // a few operations per value: parallel only from about a million values
  const int64_t grain = std::max<int64_t>(4, (int64_t(1) << 20) / std::max<int64_t>(1, cols));
  if (rows <= grain) quantize(0, rows);  // no parallel region at all for small work
  else at::parallel_for(0, rows, grain, quantize);
}

}  // namespace cpu
}  // namespace memboost
