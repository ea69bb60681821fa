// Argument checks with messages that name the argument and what was expected.
// Every failed check raises ValueError in Python (c10::ValueError), the family
// memboost's Python checks raise too (memboost.MemboostError is a ValueError),
// and dtypes are printed with torch's names (torch.float32, not Float).
#pragma once
#include <ATen/ATen.h>

#include <array>
#include <string>
#include <vector>

namespace memboost {

inline std::string torch_dtype_name(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

}  // namespace memboost

#define MB_CHECK(cond, ...) TORCH_CHECK_VALUE(cond, "memboost: ", __VA_ARGS__)

#define MB_CHECK_DTYPE(t, dt, name)                                                                \
  MB_CHECK((t).scalar_type() == (dt), "'", name, "' must have dtype ", ::memboost::torch_dtype_name(dt), \
           ", got ", ::memboost::torch_dtype_name((t).scalar_type()))

// float16, bfloat16 or float32: the activation and output dtypes every op accepts.
#define MB_CHECK_FLOAT_DTYPE(dt, name)                                                                  \
  MB_CHECK((dt) == at::kFloat || (dt) == at::kHalf || (dt) == at::kBFloat16, "'", name,                    \
           "' must be torch.float16, torch.bfloat16 or torch.float32, got ", ::memboost::torch_dtype_name(dt))

#define MB_CHECK_DIM(t, d, name) MB_CHECK((t).dim() == (d), "'", name, "' must be ", (d), "-D, got shape ", (t).sizes())

#define MB_CHECK_SAME_DEVICE(a, b, name_a, name_b) \
  MB_CHECK((a).device() == (b).device(), "'", name_a, "' is on ", (a).device(), " but '", name_b, "' is on ", (b).device())

#define MB_CHECK_SHAPE(t, expected, name) \
  MB_CHECK((t).sizes() == at::IntArrayRef(expected), "'", name, "' must have shape ", at::IntArrayRef(expected), ", got ", (t).sizes())

namespace memboost {

// The activation and bias of every *_linear op: x [..., in_features] of a
// float dtype on the weight's device, bias [out_features] on x's device (of
// x's dtype when the kernel reads it as x's type).
inline void check_linear_input(const at::Tensor& x, int64_t in_features, int64_t out_features,
                               const c10::optional<at::Tensor>& bias, const at::Tensor& weight,
                               const char* weight_name, bool bias_same_dtype = true) {
  MB_CHECK_FLOAT_DTYPE(x.scalar_type(), "x");
  MB_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "'x' must have last dimension in_features=", in_features,
           ", got shape ", x.sizes());
  MB_CHECK_SAME_DEVICE(x, weight, "x", weight_name);
  if (bias.has_value()) {
    MB_CHECK(bias->dim() == 1 && bias->size(0) == out_features, "'bias' must have shape [", out_features, "], got ",
             bias->sizes());
    if (bias_same_dtype) {
      MB_CHECK(bias->scalar_type() == x.scalar_type(), "'bias' dtype ", torch_dtype_name(bias->scalar_type()),
               " must match x dtype ", torch_dtype_name(x.scalar_type()));
    } else {
      MB_CHECK_FLOAT_DTYPE(bias->scalar_type(), "bias");
    }
    MB_CHECK_SAME_DEVICE(*bias, x, "bias", "x");
  }
}

// x's shape with its last dimension replaced by out_features.
inline std::vector<int64_t> linear_output_shape(const at::Tensor& x, int64_t out_features) {
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = out_features;
  return shape;
}

}  // namespace memboost
