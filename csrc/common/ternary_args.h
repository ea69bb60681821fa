// Validation of the ternary op arguments, shared by the CPU and CUDA ops
// (layout: common/trits.h).
#pragma once
#include <vector>

#include "common/checks.h"
#include "common/trits.h"

namespace memboost {
namespace ternary {

struct TernaryDims {
  int64_t rows;         // N (out features)
  int64_t cols;         // K (in features)
  int64_t row_bytes;    // packed bytes per row = padded_cols / 4
  int64_t chunks;       // 128-trit chunks per row
  int64_t group_size;   // 0: one scale per row (or per tensor)
  int64_t groups;       // scales per row
  int64_t scale_rows;   // 1 (per tensor) or rows
  int64_t chunks_per_group;
};

inline TernaryDims check_ternary_args(const at::Tensor& packed, const at::Tensor& scales, int64_t cols,
                                      int64_t group_size) {
  MB_CHECK_DTYPE(packed, at::kByte, "packed");
  MB_CHECK_DTYPE(scales, at::kFloat, "scales");
  MB_CHECK_DIM(packed, 2, "packed");
  MB_CHECK_DIM(scales, 2, "scales");
  MB_CHECK_SAME_DEVICE(scales, packed, "scales", "packed");
  MB_CHECK(cols >= 1, "'cols' (in_features) must be positive, got ", cols);
  MB_CHECK(group_size == 0 || (group_size > 0 && group_size % trits::kChunkTrits == 0),
           "'group_size' must be 0 (one scale per row or tensor) or a positive multiple of ", trits::kChunkTrits,
           ", got ", group_size);
  TernaryDims d;
  d.rows = packed.size(0);
  d.cols = cols;
  d.row_bytes = trits::row_bytes(cols);
  d.chunks = d.row_bytes / trits::kChunkBytes;
  MB_CHECK(packed.size(1) == d.row_bytes, "'packed' must have ", d.row_bytes, " bytes per row for cols=", cols,
           " (rows padded to a multiple of ", trits::kChunkTrits, " trits, 4 per byte), got shape ", packed.sizes());
  d.group_size = group_size;
  d.groups = trits::num_groups(cols, group_size);
  d.chunks_per_group = trits::chunks_per_group(cols, group_size);
  d.scale_rows = scales.size(0);
  MB_CHECK((d.scale_rows == d.rows || d.scale_rows == 1) && scales.size(1) == d.groups, "'scales' must have shape [",
           d.rows, " or 1, ", d.groups, "] for ", d.rows, " rows, cols=", cols, " and group_size=", group_size,
           ", got ", scales.sizes());
  MB_CHECK(packed.is_contiguous() && scales.is_contiguous(), "'packed' and 'scales' must be contiguous");
  return d;
}

inline void check_activation(const at::Tensor& x, const TernaryDims& d, const c10::optional<at::Tensor>& bias,
                             const at::Tensor& packed) {
  check_linear_input(x, d.cols, d.rows, bias, packed, "packed");
}

// lort_linear's factors: A float16 [rows, rank], B float16 [cols, rank],
// contiguous, on the weight's device. Returns rank (0 allowed: no low-rank part).
inline int64_t check_low_rank_factors(const at::Tensor& a, const at::Tensor& b, const TernaryDims& d,
                                      const at::Tensor& packed) {
  MB_CHECK_DTYPE(a, at::kHalf, "A");
  MB_CHECK_DTYPE(b, at::kHalf, "B");
  MB_CHECK_DIM(a, 2, "A");
  MB_CHECK_DIM(b, 2, "B");
  MB_CHECK_SAME_DEVICE(a, packed, "A", "packed");
  MB_CHECK_SAME_DEVICE(b, packed, "B", "packed");
  MB_CHECK(a.size(0) == d.rows, "'A' must have shape [", d.rows, ", rank] (out_features rows), got ", a.sizes());
  MB_CHECK(b.size(0) == d.cols && b.size(1) == a.size(1), "'B' must have shape [", d.cols, ", ", a.size(1),
           "] (in_features, A's rank), got ", b.sizes());
  MB_CHECK(a.is_contiguous() && b.is_contiguous(), "'A' and 'B' must be contiguous");
  return a.size(1);
}

inline void check_act_bits(int64_t act_bits) {
  MB_CHECK(act_bits == 0 || act_bits == 8,
           "'act_bits' must be 0 (exact float activations) or 8 (int8 activations, W1.58A8), got ", act_bits);
}

// Every ternary_linear argument.
inline TernaryDims check_ternary_linear_args(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                                             const c10::optional<at::Tensor>& bias, int64_t cols, int64_t group_size,
                                             int64_t act_bits) {
  const TernaryDims d = check_ternary_args(packed, scales, cols, group_size);
  check_activation(x, d, bias, packed);
  check_act_bits(act_bits);
  return d;
}

// Every lort_linear argument: the ternary part's (group_size 0), x, bias,
// act_bits and the factors. Returns the dims; *rank is A's.
inline TernaryDims check_lort_args(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& alpha,
                                   const at::Tensor& a, const at::Tensor& b, const c10::optional<at::Tensor>& bias,
                                   int64_t cols, int64_t act_bits, int64_t* rank) {
  const TernaryDims d = check_ternary_linear_args(x, packed, alpha, bias, cols, 0, act_bits);
  *rank = check_low_rank_factors(a, b, d, packed);
  return d;
}


// ternary_pack: int8 trits [..., cols] -> uint8 [..., row_bytes(cols)].
inline std::vector<int64_t> packed_sizes(const at::Tensor& trits_in) {
  MB_CHECK_DTYPE(trits_in, at::kChar, "trits");
  MB_CHECK(trits_in.dim() >= 1 && trits_in.size(-1) >= 1, "'trits' must have a non-empty last dimension, got shape ",
           trits_in.sizes());
  std::vector<int64_t> s(trits_in.sizes().begin(), trits_in.sizes().end());
  s.back() = trits::row_bytes(s.back());
  return s;
}

// ternary_unpack: uint8 [..., row_bytes(cols)] -> int8 [..., cols].
inline std::vector<int64_t> unpacked_sizes(const at::Tensor& packed, int64_t cols) {
  MB_CHECK_DTYPE(packed, at::kByte, "packed");
  MB_CHECK(cols >= 1, "'cols' must be positive, got ", cols);
  MB_CHECK(packed.dim() >= 1 && packed.size(-1) == trits::row_bytes(cols), "'packed' must have last dimension ",
           trits::row_bytes(cols), " for cols=", cols, ", got shape ", packed.sizes());
  std::vector<int64_t> s(packed.sizes().begin(), packed.sizes().end());
  s.back() = cols;
  return s;
}

}  // namespace ternary
}  // namespace memboost
