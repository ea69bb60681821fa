// y += (x @ B) @ A.T with the factors read as they are stored (float16 or
// float32): the low-rank part of a LoRT weight (memboost::lort_linear) and
// of a healed layer's corrector (memboost::low_rank_linear). At batch 1 the
// factors are a few hundred KiB at most, and two ATen matmuls (with float16
// factors converted per call) cost more than the product.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

namespace memboost {
namespace cpu {

// lort_linear and low_rank_linear: from this batch on the factors are
// converted once for ATen's GEMMs; below, add_low_rank reads them as stored.
constexpr int64_t kLowRankGemmMinRows = 16;

// x float32 [m_rows, k], b [k, rank], a [n, rank] (row-major, contiguous;
// float16 or float32), y float32 [m_rows, n] accumulated into. simd: the
// AVX2 + F16C path (every AVX2 CPU has F16C), else the portable loops.
void add_low_rank(const float* x, int64_t m_rows, int64_t k, const at::Half* b, const at::Half* a, int64_t n,
                  int64_t rank, float* y, bool simd);
void add_low_rank(const float* x, int64_t m_rows, int64_t k, const float* b, const float* a, int64_t n,
                  int64_t rank, float* y, bool simd);

// y [m_rows, n] float32 += (xf @ B) @ A.T for A [n, rank], B [k, rank] of
// one dtype (float16 or float32): add_low_rank below kLowRankGemmMinRows
// activation rows, two ATen GEMMs (factors converted once) from there.
void add_low_rank_rows(const at::Tensor& xf, const at::Tensor& a, const at::Tensor& b, at::Tensor& y);

}  // namespace cpu
}  // namespace memboost
