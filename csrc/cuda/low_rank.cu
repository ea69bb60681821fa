// memboost::low_rank_linear on CUDA: two cuBLAS GEMMs on float32 factors,
// in float32 until the one conversion to x's dtype (not run yet: no GPU).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/low_rank_args.h"

namespace memboost {
namespace low_rank {
namespace {

at::Tensor low_rank_linear_cuda(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                                const c10::optional<at::Tensor>& base) {
  const int64_t rank = check_args(x, a, b, base);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t n = a.size(0);
  const auto xf = x.reshape({-1, b.size(0)}).to(at::kFloat);
  at::Tensor y = base.has_value() ? base->reshape({xf.size(0), n}).to(at::kFloat, /*non_blocking=*/false, /*copy=*/true)
                                  : at::zeros({xf.size(0), n}, xf.options());
  if (rank > 0 && xf.size(0) > 0 && n > 0) y.addmm_(at::mm(xf, b.to(at::kFloat)), a.to(at::kFloat).t());
  return y.to(x.scalar_type()).reshape(linear_output_shape(x, n));
}

}  // namespace

TORCH_LIBRARY_IMPL(memboost, CUDA, m) { m.impl("low_rank_linear", &low_rank_linear_cuda); }

}  // namespace low_rank
}  // namespace memboost
