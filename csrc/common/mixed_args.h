// Validation of the mixed-format tensors, shared by the CPU and CUDA ops.
#pragma once
#include "common/checks.h"
#include "common/mixed_format.h"

namespace memboost {
namespace mixed {

struct MixedDims {
  int64_t rows;             // N (out features)
  int64_t cols;             // K (in features)
  int64_t groups;           // G per row
  int64_t group_size;
  int64_t plane_words;      // K / 16 words per row in plane2
  int64_t low_words;        // words per row in lowbits
  int64_t mask_words;       // words per row in mask
};

inline MixedDims check_mixed_args(const at::Tensor& plane2, const at::Tensor& lowbits, const at::Tensor& meta,
                                  const at::Tensor& mask, const at::Tensor& row_scale,
                                  const at::Tensor& outlier_rowptr, const at::Tensor& outlier_cols,
                                  const at::Tensor& outlier_vals, int64_t group_size) {
  MB_CHECK(group_size >= 16 && group_size % 16 == 0, "'group_size' must be a positive multiple of 16, got ",
              group_size);
  MB_CHECK_DTYPE(plane2, at::kInt, "plane2");
  MB_CHECK_DTYPE(lowbits, at::kInt, "lowbits");
  MB_CHECK_DTYPE(meta, at::kByte, "meta");
  MB_CHECK_DTYPE(mask, at::kInt, "mask");
  MB_CHECK_DTYPE(row_scale, at::kFloat, "row_scale");
  MB_CHECK_DTYPE(outlier_rowptr, at::kInt, "outlier_rowptr");
  MB_CHECK_DTYPE(outlier_cols, at::kShort, "outlier_cols");
  MB_CHECK_DTYPE(outlier_vals, at::kHalf, "outlier_vals");
  MB_CHECK_DIM(plane2, 2, "plane2");
  MB_CHECK_DIM(lowbits, 2, "lowbits");
  MB_CHECK_DIM(meta, 2, "meta");
  MB_CHECK_DIM(mask, 2, "mask");
  MB_CHECK_DIM(outlier_rowptr, 1, "outlier_rowptr");
  MB_CHECK_DIM(outlier_cols, 1, "outlier_cols");
  MB_CHECK_DIM(outlier_vals, 1, "outlier_vals");
  for (const at::Tensor* t : {&lowbits, &meta, &mask, &row_scale, &outlier_rowptr, &outlier_cols, &outlier_vals}) {
    MB_CHECK_SAME_DEVICE(*t, plane2, "quantized tensors", "plane2");
  }
  MixedDims d;
  d.rows = plane2.size(0);
  d.plane_words = plane2.size(1);
  d.cols = d.plane_words * kWeightsPerWord;
  d.group_size = group_size;
  MB_CHECK(d.cols % group_size == 0, "plane2 holds ", d.cols, " columns, not a multiple of group_size ",
              group_size);
  d.groups = d.cols / group_size;
  d.mask_words = (d.groups + 31) / 32;
  d.low_words = lowbits.size(1);
  MB_CHECK(d.low_words % (group_size / kWeightsPerWord) == 0 && d.low_words / (group_size / kWeightsPerWord) <= d.groups,
              "'lowbits' has ", d.low_words, " words per row, not a whole number of 4-bit groups of size ",
              group_size);
  MB_CHECK(lowbits.size(0) == d.rows, "'lowbits' must have ", d.rows, " rows, got ", lowbits.size(0));
  MB_CHECK_SHAPE(meta, (std::array<int64_t, 2>{d.rows, d.groups}), "meta");
  MB_CHECK_SHAPE(mask, (std::array<int64_t, 2>{d.rows, d.mask_words}), "mask");
  MB_CHECK_SHAPE(row_scale, (std::array<int64_t, 2>{d.rows, 2}), "row_scale");
  MB_CHECK_SHAPE(outlier_rowptr, (std::array<int64_t, 1>{d.rows + 1}), "outlier_rowptr");
  MB_CHECK(outlier_cols.numel() == outlier_vals.numel(), "'outlier_cols' and 'outlier_vals' differ in length (",
              outlier_cols.numel(), " vs ", outlier_vals.numel(), ")");
  MB_CHECK(outlier_vals.numel() == 0 || d.cols <= 65536,
              "outlier column indices are 16-bit; in_features ", d.cols, " > 65536 needs outlier_fraction=0");
  for (const at::Tensor* t : {&plane2, &lowbits, &meta, &mask, &row_scale, &outlier_rowptr, &outlier_cols, &outlier_vals}) {
    MB_CHECK(t->is_contiguous(), "quantized tensors must be contiguous");
  }
  return d;
}

inline void check_activation(const at::Tensor& x, const MixedDims& d, const c10::optional<at::Tensor>& bias,
                             const at::Tensor& plane2) {
  check_linear_input(x, d.cols, d.rows, bias, plane2, "plane2");
}

}  // namespace mixed
}  // namespace memboost
