// y += (x @ B) @ A.T with float16 (converted in registers) or float32
// factors (low_rank.h), and the op memboost::low_rank_linear.
// Two passes per activation row: t = x @ B (rank floats, kept in registers
// for rank <= 64, one chunk of 64 at a time beyond), then one dot product of
// length rank per output row, split over threads when the layer is large
// enough (cpu/linear_io.h). Sums are float32 in both paths; the SIMD path
// adds in a different order than the portable one.
#include "cpu/low_rank.h"

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "cpu/int8/isa.h"
#include "common/low_rank_args.h"
#include "cpu/linear_io.h"

#if MB_HAVE_X86_KERNELS
#include <immintrin.h>
#endif

namespace memboost {
namespace cpu {
namespace {

constexpr int64_t kChunk = 64;  // rank columns whose sums stay in registers (8 AVX2 vectors)

template <typename T>
void t_portable(const float* x, int64_t k, const T* b, int64_t rank, float* t) {
  std::fill(t, t + rank, 0.f);
  for (int64_t i = 0; i < k; ++i) {
    const float xi = x[i];
    const T* row = b + i * rank;
    for (int64_t r = 0; r < rank; ++r) t[r] += xi * static_cast<float>(row[r]);
  }
}

template <typename T>
void rows_portable(const T* a, int64_t begin, int64_t end, int64_t rank, const float* t, float* y) {
  for (int64_t j = begin; j < end; ++j) {
    const T* row = a + j * rank;
    float s = 0.f;
    for (int64_t r = 0; r < rank; ++r) s += static_cast<float>(row[r]) * t[r];
    y[j] += s;
  }
}

#if MB_HAVE_X86_KERNELS
#define MB_TARGET_F16C __attribute__((target("avx2,fma,f16c")))

// 8 factors as floats: F16C conversion of float16, a plain load of float32.
MB_TARGET_F16C inline __m256 load8(const at::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
MB_TARGET_F16C inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

// t[c0 .. c0+width) for width <= 64: NB vectors of 8 sums. A row's load
// reads 8*NB halves from c0, which may run past the chunk into the next
// columns or row (those lanes are never stored); a row whose load would run
// past the end of B is read from a zero-padded copy.
template <int NB, typename T>
MB_TARGET_F16C void t_chunk_avx2(const float* x, int64_t k, const T* b, int64_t rank, int64_t c0,
                                 int64_t width, float* t) {
  __m256 acc[NB];
  for (int v = 0; v < NB; ++v) acc[v] = _mm256_setzero_ps();
  alignas(32) T last[kChunk];
  const int64_t total = k * rank;
  for (int64_t i = 0; i < k; ++i) {
    const T* p = b + i * rank + c0;
    if (i * rank + c0 + 8 * NB > total) {
      std::memset(static_cast<void*>(last), 0, sizeof(last));
      std::memcpy(static_cast<void*>(last), p, width * sizeof(T));
      p = last;
    }
    const __m256 xv = _mm256_set1_ps(x[i]);
    for (int v = 0; v < NB; ++v) acc[v] = _mm256_fmadd_ps(xv, load8(p + 8 * v), acc[v]);
  }
  alignas(32) float out[kChunk];
  for (int v = 0; v < NB; ++v) _mm256_store_ps(out + 8 * v, acc[v]);
  std::copy(out, out + width, t + c0);
}

template <typename T>
MB_TARGET_F16C void t_avx2(const float* x, int64_t k, const T* b, int64_t rank, float* t) {
  for (int64_t c0 = 0; c0 < rank; c0 += kChunk) {
    const int64_t width = std::min(kChunk, rank - c0);
    switch ((width + 7) / 8) {
      case 1: t_chunk_avx2<1, T>(x, k, b, rank, c0, width, t); break;
      case 2: t_chunk_avx2<2, T>(x, k, b, rank, c0, width, t); break;
      case 3: t_chunk_avx2<3, T>(x, k, b, rank, c0, width, t); break;
      case 4: t_chunk_avx2<4, T>(x, k, b, rank, c0, width, t); break;
      case 5: t_chunk_avx2<5, T>(x, k, b, rank, c0, width, t); break;
      case 6: t_chunk_avx2<6, T>(x, k, b, rank, c0, width, t); break;
      case 7: t_chunk_avx2<7, T>(x, k, b, rank, c0, width, t); break;
      default: t_chunk_avx2<8, T>(x, k, b, rank, c0, width, t); break;
    }
  }
}

// y[j] += A[j, :] . t over rows [begin, end); t is zero-padded to a multiple
// of 8 and the lanes of a row's last vector past rank are masked to zero
// (they hold the next row's first factors); a tail that would run past the
// end of A is read from a padded copy.
template <typename T>
MB_TARGET_F16C void rows_avx2(const T* a, int64_t begin, int64_t end, int64_t n, int64_t rank,
                              const float* tpad, float* y) {
  const int64_t full = rank / 8, tail = rank % 8;
  alignas(32) int32_t lane_mask[8];
  for (int i = 0; i < 8; ++i) lane_mask[i] = i < tail ? -1 : 0;
  const __m256 mask = _mm256_castsi256_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(lane_mask)));
  for (int64_t j = begin; j < end; ++j) {
    const T* row = a + j * rank;
    __m256 acc = _mm256_setzero_ps();
    for (int64_t v = 0; v < full; ++v) acc = _mm256_fmadd_ps(load8(row + 8 * v), _mm256_loadu_ps(tpad + 8 * v), acc);
    if (tail) {
      alignas(32) T last[8];
      const T* p = row + 8 * full;
      if (j * rank + 8 * full + 8 > n * rank) {
        std::memset(static_cast<void*>(last), 0, sizeof(last));
        std::memcpy(static_cast<void*>(last), p, tail * sizeof(T));
        p = last;
      }
      const __m256 av = _mm256_and_ps(load8(p), mask);
      acc = _mm256_fmadd_ps(av, _mm256_loadu_ps(tpad + 8 * full), acc);
    }
    y[j] += hsum_ps256(acc);
  }
}
#endif

template <typename T>
void add_low_rank_impl(const float* x, int64_t m_rows, int64_t k, const T* b, const T* a, int64_t n, int64_t rank,
                       float* y, bool simd) {
  if (rank == 0 || n == 0 || m_rows == 0) return;
#if !MB_HAVE_X86_KERNELS
  simd = false;
#endif
  // t padded with zeros to whole vectors for the row pass
  const int64_t padded = (rank + 7) / 8 * 8;
  std::vector<float> t(m_rows * padded, 0.f);
  for (int64_t m = 0; m < m_rows; ++m) {
#if MB_HAVE_X86_KERNELS
    if (simd) {
      t_avx2(x + m * k, k, b, rank, t.data() + m * padded);
      continue;
    }
#endif
    t_portable(x + m * k, k, b, rank, t.data() + m * padded);
  }
  at::parallel_for(0, n, task_grain(rank * m_rows), [&](int64_t begin, int64_t end) {
    for (int64_t m = 0; m < m_rows; ++m) {
#if MB_HAVE_X86_KERNELS
      if (simd) {
        rows_avx2(a, begin, end, n, rank, t.data() + m * padded, y + m * n);
        continue;
      }
#endif
      rows_portable(a, begin, end, rank, t.data() + m * padded, y + m * n);
    }
  });
}

}  // namespace

void add_low_rank(const float* x, int64_t m_rows, int64_t k, const at::Half* b, const at::Half* a, int64_t n,
                  int64_t rank, float* y, bool simd) {
  add_low_rank_impl(x, m_rows, k, b, a, n, rank, y, simd);
}

void add_low_rank(const float* x, int64_t m_rows, int64_t k, const float* b, const float* a, int64_t n,
                  int64_t rank, float* y, bool simd) {
  add_low_rank_impl(x, m_rows, k, b, a, n, rank, y, simd);
}

void add_low_rank_rows(const at::Tensor& xf, const at::Tensor& a, const at::Tensor& b, at::Tensor& y) {
  const int64_t m_rows = xf.size(0), n = a.size(0), rank = a.size(1);
  if (rank == 0 || m_rows == 0 || n == 0) return;
  if (m_rows >= kLowRankGemmMinRows) {
    y.addmm_(at::mm(xf, b.to(at::kFloat)), a.to(at::kFloat).t());
    return;
  }
  const bool simd = active_isa() != Isa::Portable;
  if (a.scalar_type() == at::kHalf) {
    add_low_rank(xf.data_ptr<float>(), m_rows, xf.size(1), b.data_ptr<at::Half>(), a.data_ptr<at::Half>(), n, rank,
                 y.data_ptr<float>(), simd);
  } else {
    add_low_rank(xf.data_ptr<float>(), m_rows, xf.size(1), b.data_ptr<float>(), a.data_ptr<float>(), n, rank,
                 y.data_ptr<float>(), simd);
  }
}

namespace {

at::Tensor low_rank_linear_cpu(const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                               const c10::optional<at::Tensor>& base) {
  const int64_t rank = low_rank::check_args(x, a, b, base);
  const int64_t n = a.size(0);
  const auto xf = float_rows(x, b.size(0));
  at::Tensor y;
  if (base.has_value()) {
    // a new tensor, never base itself (the op is functional)
    y = base->reshape({xf.size(0), n}).to(at::kFloat, /*non_blocking=*/false, /*copy=*/true).contiguous();
  } else {
    y = at::zeros({xf.size(0), n}, xf.options());
  }
  if (rank > 0) add_low_rank_rows(xf, a, b, y);
  return linear_result(y, x, n);
}

}  // namespace

TORCH_LIBRARY_IMPL(memboost, CPU, m) { m.impl("low_rank_linear", &low_rank_linear_cpu); }

}  // namespace cpu
}  // namespace memboost
