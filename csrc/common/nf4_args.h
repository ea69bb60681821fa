// Validation of the NF4 op arguments, shared by the CPU and CUDA ops.
#pragma once
#include <vector>

#include "common/checks.h"
#include "common/nf4.h"

namespace memboost {
namespace nf4 {

struct Nf4Dims {
  int64_t numel;
  int64_t block_size;
  int64_t nested_block_size;
  int64_t blocks;
  bool double_quant;  // absmax holds uint8 codes of the nested quantization
};

// codes uint8 [ceil(numel/2)]; absmax float32 [blocks] (plain) or uint8
// [blocks] (double quantization, with nested_absmax float32
// [ceil(blocks/nested_block_size)], nested_map float32 [256] and
// nested_offset float32 [1]; empty otherwise).
inline Nf4Dims check_nf4_state(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& nested_absmax,
                               const at::Tensor& nested_map, const at::Tensor& nested_offset, int64_t numel,
                               int64_t block_size, int64_t nested_block_size) {
  MB_CHECK(block_size > 0 && block_size <= kMaxBlockSize, "'block_size' must be in [1, ", kMaxBlockSize, "], got ",
           block_size);
  MB_CHECK(nested_block_size > 0 && nested_block_size <= kMaxBlockSize, "'nested_block_size' must be in [1, ",
           kMaxBlockSize, "], got ", nested_block_size);
  MB_CHECK(numel >= 0, "the weight's element count must be >= 0, got ", numel);
  MB_CHECK_DTYPE(codes, at::kByte, "codes");
  MB_CHECK_DIM(codes, 1, "codes");
  MB_CHECK_DIM(absmax, 1, "absmax");
  for (const at::Tensor* t : {&absmax, &nested_absmax, &nested_map, &nested_offset}) {
    MB_CHECK_SAME_DEVICE(*t, codes, "NF4 statistics", "codes");
  }
  Nf4Dims d;
  d.numel = numel;
  d.block_size = block_size;
  d.nested_block_size = nested_block_size;
  d.blocks = num_blocks(numel, block_size);
  MB_CHECK(codes.numel() == packed_bytes(numel), "'codes' must hold ", packed_bytes(numel), " bytes for ", numel,
           " weights, got ", codes.numel());
  MB_CHECK(absmax.numel() == d.blocks, "'absmax' must have ", d.blocks, " entries (one per block of ", block_size,
           "), got ", absmax.numel());
  MB_CHECK(absmax.scalar_type() == at::kFloat || absmax.scalar_type() == at::kByte,
           "'absmax' must have dtype torch.float32 (plain) or torch.uint8 (double quantization), got ",
           torch_dtype_name(absmax.scalar_type()));
  d.double_quant = absmax.scalar_type() == at::kByte;
  if (d.double_quant) {
    MB_CHECK_DTYPE(nested_absmax, at::kFloat, "nested_absmax");
    MB_CHECK_DTYPE(nested_map, at::kFloat, "nested_map");
    MB_CHECK_DTYPE(nested_offset, at::kFloat, "nested_offset");
    const int64_t nested_blocks = num_blocks(d.blocks, nested_block_size);
    MB_CHECK(nested_absmax.dim() == 1 && nested_absmax.numel() == nested_blocks, "'nested_absmax' must have ",
             nested_blocks, " entries, got shape ", nested_absmax.sizes());
    MB_CHECK(nested_map.dim() == 1 && nested_map.numel() == kNestedMapSize, "'nested_map' must have ",
             kNestedMapSize, " entries, got shape ", nested_map.sizes());
    MB_CHECK(nested_offset.numel() == 1, "'nested_offset' must hold one value, got shape ", nested_offset.sizes());
  } else {
    MB_CHECK(nested_absmax.numel() == 0 && nested_map.numel() == 0 && nested_offset.numel() == 0,
             "a float32 'absmax' means no double quantization: nested_absmax, nested_map and nested_offset must "
             "be empty");
  }
  return d;
}

inline void check_nf4_activation(const at::Tensor& x, int64_t out_features, const Nf4Dims& d,
                                 const c10::optional<at::Tensor>& bias, const at::Tensor& codes) {
  MB_CHECK(x.dim() >= 1, "'x' must have at least one dimension");
  MB_CHECK(out_features >= 0, "'out_features' must be >= 0, got ", out_features);
  const int64_t k = x.size(-1);
  MB_CHECK(out_features * k == d.numel, "'x' has ", k, " features but the NF4 weight holds ", d.numel,
           " elements, not out_features ", out_features, " x ", k);
  check_linear_input(x, k, out_features, bias, codes, "codes", /*bias_same_dtype=*/false);
}

}  // namespace nf4
}  // namespace memboost
