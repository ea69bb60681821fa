// Argument checks with messages that name the argument and what was expected.
// Every failed check raises ValueError in Python (c10::ValueError), the family
// memboost's Python checks raise too (memboost.MemboostError is a ValueError),
// and dtypes are printed with torch's names (torch.float32, not Float).
#pragma once
#include <ATen/ATen.h>

#include <string>

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
