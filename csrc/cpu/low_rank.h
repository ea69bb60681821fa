// y += (x @ B) @ A.T with float16 factors read as they are stored: the
// low-rank part of a LoRT weight (memboost::lort_linear). At batch 1 the
// factors are a few hundred KiB at most, so converting them to float32 per
// call, as two ATen matmuls would, costs more than the product.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

namespace memboost {
namespace cpu {

// x float32 [m_rows, k], b float16 [k, rank], a float16 [n, rank] (row-major,
// contiguous), y float32 [m_rows, n] accumulated into. simd: the AVX2 + F16C
// path (every AVX2 CPU has F16C), else the portable loops.
void add_low_rank_f16(const float* x, int64_t m_rows, int64_t k, const at::Half* b, const at::Half* a, int64_t n,
                      int64_t rank, float* y, bool simd);

}  // namespace cpu
}  // namespace memboost
