// Validation of the rms_norm op arguments, shared by the CPU and CUDA ops.
#pragma once
#include <cmath>

#include "common/checks.h"

namespace memboost {
namespace rms {

// x [..., n] (n >= 1) of a float dtype, weight [n] of x's dtype on x's device, eps finite and >= 0.
inline int64_t check_rms_norm_args(const at::Tensor& x, const at::Tensor& weight, double eps) {
  MB_CHECK_FLOAT_DTYPE(x.scalar_type(), "x");
  MB_CHECK(x.dim() >= 1 && x.size(-1) >= 1, "'x' must have a non-empty last dimension, got shape ", x.sizes());
  const int64_t n = x.size(-1);
  MB_CHECK(weight.dim() == 1 && weight.size(0) == n, "'weight' must have shape [", n,
           "] (x's last dimension), got ", weight.sizes());
  MB_CHECK(weight.scalar_type() == x.scalar_type(), "'weight' must have x's dtype ",
           torch_dtype_name(x.scalar_type()), ", got ", torch_dtype_name(weight.scalar_type()));
  MB_CHECK_SAME_DEVICE(weight, x, "weight", "x");
  MB_CHECK(std::isfinite(eps) && eps >= 0, "'eps' must be a finite number >= 0, got ", eps);
  return n;
}

}  // namespace rms
}  // namespace memboost
