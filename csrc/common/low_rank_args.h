// Validation of memboost::low_rank_linear's arguments, shared by the CPU and
// CUDA ops.
#pragma once
#include "common/checks.h"

namespace memboost {
namespace low_rank {

// x [..., k] float16/bfloat16/float32; A [n, rank] and B [k, rank] of one
// dtype, float16 or float32, contiguous, on x's device; base (optional) of
// the output's shape [..., n] and x's dtype. Returns rank.
inline int64_t check_args(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                          const c10::optional<at::Tensor>& base) {
  MB_CHECK_FLOAT_DTYPE(x.scalar_type(), "x");
  MB_CHECK(a.scalar_type() == at::kHalf || a.scalar_type() == at::kFloat,
           "'A' must have dtype torch.float16 or torch.float32, got ", torch_dtype_name(a.scalar_type()));
  MB_CHECK(b.scalar_type() == a.scalar_type(), "'B' must have A's dtype ", torch_dtype_name(a.scalar_type()),
           ", got ", torch_dtype_name(b.scalar_type()));
  MB_CHECK_DIM(a, 2, "A");
  MB_CHECK_DIM(b, 2, "B");
  MB_CHECK(b.size(1) == a.size(1), "'B' must have shape [in_features, ", a.size(1), "] (A's rank), got ",
           b.sizes());
  MB_CHECK(x.dim() >= 1 && x.size(-1) == b.size(0), "'x' must have last dimension in_features=", b.size(0),
           " (B's rows), got shape ", x.sizes());
  MB_CHECK_SAME_DEVICE(a, x, "A", "x");
  MB_CHECK_SAME_DEVICE(b, x, "B", "x");
  MB_CHECK(a.is_contiguous() && b.is_contiguous(), "'A' and 'B' must be contiguous");
  if (base.has_value()) {
    MB_CHECK(base->scalar_type() == x.scalar_type(), "'base' dtype ", torch_dtype_name(base->scalar_type()),
             " must match x dtype ", torch_dtype_name(x.scalar_type()));
    const auto want = linear_output_shape(x, a.size(0));
    MB_CHECK(base->sizes() == at::IntArrayRef(want), "'base' must have shape ", at::IntArrayRef(want), ", got ",
             base->sizes());
    MB_CHECK_SAME_DEVICE(*base, x, "base", "x");
  }
  return a.size(1);
}

}  // namespace low_rank
}  // namespace memboost
