// Argument checks with messages that name the argument and what was expected.
#pragma once
#include <ATen/ATen.h>

#define MB_CHECK_DTYPE(t, dt, name) \
  TORCH_CHECK((t).scalar_type() == (dt), "memboost: '", name, "' must have dtype ", (dt), ", got ", (t).scalar_type())

#define MB_CHECK_DIM(t, d, name) \
  TORCH_CHECK((t).dim() == (d), "memboost: '", name, "' must be ", (d), "-D, got shape ", (t).sizes())

#define MB_CHECK_SAME_DEVICE(a, b, name_a, name_b)                                                           \
  TORCH_CHECK((a).device() == (b).device(), "memboost: '", name_a, "' is on ", (a).device(), " but '", name_b, \
              "' is on ", (b).device())

#define MB_CHECK_SHAPE(t, expected, name)                                                                  \
  TORCH_CHECK((t).sizes() == at::IntArrayRef(expected), "memboost: '", name, "' must have shape ", \
              at::IntArrayRef(expected), ", got ", (t).sizes())
