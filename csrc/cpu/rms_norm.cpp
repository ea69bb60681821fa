// CPU kernel of rms_norm (arithmetic: csrc/common/rms_norm.h). A decode step
// normalizes one row of a few hundred to a few thousand values twice per
// layer: transformers' module spends ~8 ATen calls on it, this one call. The
// sum of squares is the only reduction; it runs 16 (AVX-512) or 8 (AVX2)
// lanes wide, chosen at run time like every CPU kernel (cpu/int8/isa.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <vector>

#include "common/rms_norm.h"
#include "common/rms_norm_args.h"
#include "cpu/int8/isa.h"
#include "cpu/linear_io.h"

namespace memboost {
namespace rms {
namespace {

float sum_squares_portable(const float* x, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += x[i] * x[i];
  return s;
}

#if MB_HAVE_X86_KERNELS
MB_TARGET_AVX2 float sum_squares_avx2(const float* x, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 v = _mm256_loadu_ps(x + i);
    acc = _mm256_fmadd_ps(v, v, acc);
  }
  float total = cpu::hsum_ps256(acc);
  for (; i < n; ++i) total += x[i] * x[i];
  return total;
}

MB_TARGET_AVX512 float sum_squares_avx512(const float* x, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m512 v = _mm512_loadu_ps(x + i);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  if (i < n) {  // the tail, masked
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - i)) - 1);
    const __m512 v = _mm512_maskz_loadu_ps(tail, x + i);
    acc = _mm512_fmadd_ps(v, v, acc);
  }
  return _mm512_reduce_add_ps(acc);
}
#endif

float sum_squares(cpu::Isa isa, const float* x, int64_t n) {
#if MB_HAVE_X86_KERNELS
  if (isa == cpu::Isa::Avx512Vnni) return sum_squares_avx512(x, n);
  if (isa == cpu::Isa::Avx2) return sum_squares_avx2(x, n);
#endif
  return sum_squares_portable(x, n);
}

template <typename T>
void rows(const T* x, const T* w, T* y, int64_t begin, int64_t end, int64_t n, float eps, bool weight_offset,
          cpu::Isa isa) {
  std::vector<float> xf, wf(n);
  if (!std::is_same<T, float>::value) xf.resize(n);
  for (int64_t j = 0; j < n; ++j) wf[j] = static_cast<float>(w[j]);
  const auto round = [](float v) { return static_cast<float>(static_cast<T>(v)); };
  for (int64_t r = begin; r < end; ++r) {
    const T* xr = x + r * n;
    const float* row;
    if constexpr (std::is_same<T, float>::value) {
      row = xr;
    } else {
      for (int64_t j = 0; j < n; ++j) xf[j] = static_cast<float>(xr[j]);
      row = xf.data();
    }
    const float inv = inverse_rms(sum_squares(isa, row, n), n, eps);
    T* yr = y + r * n;
    for (int64_t j = 0; j < n; ++j) yr[j] = static_cast<T>(output(row[j], inv, wf[j], weight_offset, round));
  }
}

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps, bool weight_offset) {
  const int64_t n = check_rms_norm_args(x, weight, eps);
  const auto xc = x.contiguous();
  const auto wc = weight.contiguous();
  auto y = at::empty_like(xc);
  const int64_t m = xc.numel() / n;
  const cpu::Isa isa = cpu::active_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xc.scalar_type(), "rms_norm", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* wp = wc.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    // A decode step's one row runs on the calling thread (cpu/linear_io.h's task size).
    at::parallel_for(0, m, cpu::task_grain(n), [&](int64_t begin, int64_t end) {
      rows<scalar_t>(xp, wp, yp, begin, end, n, static_cast<float>(eps), weight_offset, isa);
    });
  });
  return y;
}

}  // namespace

TORCH_LIBRARY_IMPL(memboost, CPU, m) { m.impl("rms_norm", &rms_norm_cpu); }

}  // namespace rms
}  // namespace memboost
