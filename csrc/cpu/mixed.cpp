// CPU kernels of the mixed 2/4/16-bit format: decode a row into a float
// buffer (in L1), then use it for every activation row; rows are spread
// across threads with ATen's parallel_for.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common/mixed_args.h"
#include "cpu/decoded_gemm.h"
#include "cpu/int8/isa.h"

namespace memboost {
namespace mixed {
namespace {

struct MixedView {
  const uint32_t* plane2;
  const uint32_t* lowbits;
  const uint8_t* meta;
  const uint32_t* mask;
  const float* row_scale;
  const int32_t* rowptr;
  const uint16_t* cols;
  const at::Half* vals;
  MixedDims d;
};

MixedView make_view(const at::Tensor& plane2, const at::Tensor& lowbits, const at::Tensor& meta, const at::Tensor& mask,
                    const at::Tensor& row_scale, const at::Tensor& rowptr, const at::Tensor& cols,
                    const at::Tensor& vals, const MixedDims& d) {
  return MixedView{reinterpret_cast<const uint32_t*>(plane2.data_ptr<int32_t>()),
                   reinterpret_cast<const uint32_t*>(lowbits.data_ptr<int32_t>()),
                   meta.data_ptr<uint8_t>(),
                   reinterpret_cast<const uint32_t*>(mask.data_ptr<int32_t>()),
                   row_scale.data_ptr<float>(),
                   rowptr.data_ptr<int32_t>(),
                   reinterpret_cast<const uint16_t*>(cols.data_ptr<int16_t>()),
                   vals.data_ptr<at::Half>(),
                   d};
}

// 16 weights of a 2-bit group (portable path).
#define MB_INLINE inline __attribute__((always_inline))

MB_INLINE void decode_word2(uint32_t word, float step, float zero_step,
                                                                    float* out) {
  for (int j = 0; j < 16; ++j) out[j] = static_cast<float>((word >> (2 * j)) & 3u) * step - zero_step;
}

MB_INLINE void decode_word4(uint32_t hi, uint32_t lo, float step,
                                                                    float zero_step, float* out) {
  for (int j = 0; j < 16; ++j) {
    const uint32_t q = (((hi >> (2 * j)) & 3u) << 2) | ((lo >> (2 * j)) & 3u);
    out[j] = static_cast<float>(q) * step - zero_step;
  }
}

MB_INLINE float dot(const float* a, const float* b, int64_t n) {
  // Eight partial sums so the loop vectorizes without -ffast-math.
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * b[i + l];
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Decodes row r of the weight (outliers included) into out[K].
MB_INLINE void decode_row(const MixedView& v, int64_t r, float* out) {
  const MixedDims& d = v.d;
  const uint32_t* plane_row = v.plane2 + r * d.plane_words;
  const uint32_t* low_row = v.lowbits + r * d.low_words;
  const uint32_t* mask_row = v.mask + r * d.mask_words;
  const uint8_t* meta_row = v.meta + r * d.groups;
  const RowRanges ranges = row_ranges(v.row_scale[2 * r], v.row_scale[2 * r + 1]);
  const int64_t words_per_group = d.group_size / kWeightsPerWord;
  int64_t low_group = 0;
  for (int64_t g = 0; g < d.groups; ++g) {
    const bool four = test_bit(mask_row, static_cast<int>(g));
    const GroupParams p = group_params_from_range(meta_row[g], four, ranges.range[meta_row[g] & 0xF]);
    for (int64_t w = 0; w < words_per_group; ++w) {
      const int64_t word_index = g * words_per_group + w;
      float* o = out + word_index * kWeightsPerWord;
      if (four) {
        decode_word4(plane_row[word_index], low_row[low_group * words_per_group + w], p.step, p.zero_step, o);
      } else {
        decode_word2(plane_row[word_index], p.step, p.zero_step, o);
      }
    }
    low_group += four;
  }
  for (int32_t e = v.rowptr[r]; e < v.rowptr[r + 1]; ++e) out[v.cols[e]] += static_cast<float>(v.vals[e]);
}

// Decodes rows [begin, end) into out, row r at out + (r - first_row) * cols.
void decode_rows(const MixedView& v, int64_t begin, int64_t end, float* out, int64_t first_row = 0) {
  for (int64_t r = begin; r < end; ++r) decode_row(v, r, out + (r - first_row) * v.d.cols);
}

// Portable path: y[m, r] = W[r] . x[m] for rows [begin, end); each row is
// decoded once into an L1-resident buffer and reused for every activation row.
void linear_rows_generic(const MixedView& v, int64_t begin, int64_t end, const float* x, int64_t m_rows, float* y) {
  std::vector<float> row(v.d.cols);
  for (int64_t r = begin; r < end; ++r) {
    decode_row(v, r, row.data());
    for (int64_t m = 0; m < m_rows; ++m) y[m * v.d.rows + r] = dot(row.data(), x + m * v.d.cols, v.d.cols);
  }
}

#if defined(__x86_64__)
// AVX2 path: codes are decoded in registers and never stored. Per group,
//   W[r, group] . x = step * (q . x) - zero_step * sum(x over the group),
// so a group costs one vector FMA per 8 weights per activation row, the
// group sums of x are computed once per call, and the step is applied with
// one FMA per group.
__attribute__((target("avx2,fma"))) inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

template <int MT>
__attribute__((target("avx2,fma"))) void linear_rows_avx2_tile(const MixedView& v, int64_t begin, int64_t end,
                                                              const float* x, const float* xsum, float* y) {
  const MixedDims& d = v.d;
  const int64_t words_per_group = d.group_size / kWeightsPerWord;
  const __m256i shift_lo = _mm256_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14);
  const __m256i shift_hi = _mm256_setr_epi32(16, 18, 20, 22, 24, 26, 28, 30);
  const __m256i three = _mm256_set1_epi32(3);
  for (int64_t r = begin; r < end; ++r) {
    const uint32_t* plane_row = v.plane2 + r * d.plane_words;
    const uint32_t* low_row = v.lowbits + r * d.low_words;
    const uint32_t* mask_row = v.mask + r * d.mask_words;
    const uint8_t* meta_row = v.meta + r * d.groups;
    const RowRanges ranges = row_ranges(v.row_scale[2 * r], v.row_scale[2 * r + 1]);
    __m256 acc[MT];
    float corr[MT];
    for (int i = 0; i < MT; ++i) {
      acc[i] = _mm256_setzero_ps();
      corr[i] = 0.f;
    }
    int64_t low_group = 0;
    for (int64_t g = 0; g < d.groups; ++g) {
      const bool four = test_bit(mask_row, static_cast<int>(g));
      const GroupParams p = group_params_from_range(meta_row[g], four, ranges.range[meta_row[g] & 0xF]);
      // Two partial sums per activation row (low and high half of each
      // word) so consecutive FMAs do not wait on each other's latency.
      __m256 dots[MT], dots_hi[MT];
      for (int i = 0; i < MT; ++i) dots[i] = dots_hi[i] = _mm256_setzero_ps();
      for (int64_t w = 0; w < words_per_group; ++w) {
        const int64_t word_index = g * words_per_group + w;
        const __m256i word = _mm256_set1_epi32(static_cast<int>(plane_row[word_index]));
        __m256i c0 = _mm256_and_si256(_mm256_srlv_epi32(word, shift_lo), three);
        __m256i c1 = _mm256_and_si256(_mm256_srlv_epi32(word, shift_hi), three);
        if (four) {
          const __m256i low = _mm256_set1_epi32(static_cast<int>(low_row[low_group * words_per_group + w]));
          c0 = _mm256_or_si256(_mm256_slli_epi32(c0, 2), _mm256_and_si256(_mm256_srlv_epi32(low, shift_lo), three));
          c1 = _mm256_or_si256(_mm256_slli_epi32(c1, 2), _mm256_and_si256(_mm256_srlv_epi32(low, shift_hi), three));
        }
        const __m256 q0 = _mm256_cvtepi32_ps(c0), q1 = _mm256_cvtepi32_ps(c1);
        const float* xk = x + word_index * kWeightsPerWord;
        for (int i = 0; i < MT; ++i) {
          dots[i] = _mm256_fmadd_ps(q0, _mm256_loadu_ps(xk + i * d.cols), dots[i]);
          dots_hi[i] = _mm256_fmadd_ps(q1, _mm256_loadu_ps(xk + i * d.cols + 8), dots_hi[i]);
        }
      }
      const __m256 step = _mm256_set1_ps(p.step);
      for (int i = 0; i < MT; ++i) {
        acc[i] = _mm256_fmadd_ps(_mm256_add_ps(dots[i], dots_hi[i]), step, acc[i]);
        corr[i] += p.zero_step * xsum[i * d.groups + g];
      }
      low_group += four;
    }
    for (int i = 0; i < MT; ++i) {
      float out = hsum(acc[i]) - corr[i];
      for (int32_t e = v.rowptr[r]; e < v.rowptr[r + 1]; ++e)
        out += static_cast<float>(v.vals[e]) * x[i * d.cols + v.cols[e]];
      y[i * d.rows + r] = out;
    }
  }
}

void linear_rows_avx2(const MixedView& v, int64_t begin, int64_t end, const float* x, const float* xsum,
                      int64_t m_rows, float* y) {
  // Activation rows in tiles of up to 4 (4 accumulators stay in registers).
  for (int64_t m0 = 0; m0 < m_rows; m0 += 4) {
    const float* xt = x + m0 * v.d.cols;
    const float* st = xsum + m0 * v.d.groups;
    float* yt = y + m0 * v.d.rows;
    switch (std::min<int64_t>(4, m_rows - m0)) {
      case 1: linear_rows_avx2_tile<1>(v, begin, end, xt, st, yt); break;
      case 2: linear_rows_avx2_tile<2>(v, begin, end, xt, st, yt); break;
      case 3: linear_rows_avx2_tile<3>(v, begin, end, xt, st, yt); break;
      default: linear_rows_avx2_tile<4>(v, begin, end, xt, st, yt); break;
    }
  }
}
#endif

// From this many activation rows on, decoding a block of weight rows once
// into a cache-sized float buffer and multiplying it with ATen's GEMM beats
// the fused kernel, which decodes every weight once per 4 activation rows.
constexpr int64_t kGemmMinRows = 32;

// Blocks of weight rows decoded into a cache-sized buffer + ATen GEMM
// (cpu/decoded_gemm.h, shared with the ternary format).
void linear_rows_gemm(const MixedView& v, const at::Tensor& xf, at::Tensor& y) {
  cpu::linear_decoded_blocks(v.d.rows, v.d.cols, xf, y, [&](int64_t begin, int64_t end, float* out, int64_t r0) {
    decode_rows(v, begin, end, out, r0);
  });
}

// The AVX2 path runs when the CPU has it, unless MEMBOOST_CPU_ISA caps the
// instruction set (cpu/int8/isa.h: read at each call, so tests exercise both).
bool use_avx2() { return cpu::active_isa() != cpu::Isa::Portable; }

at::Tensor mixed_dequantize_cpu(const at::Tensor& plane2, const at::Tensor& lowbits, const at::Tensor& meta,
                                const at::Tensor& mask, const at::Tensor& row_scale, const at::Tensor& rowptr,
                                const at::Tensor& cols, const at::Tensor& vals, int64_t group_size,
                                at::ScalarType dtype) {
  const MixedDims d = check_mixed_args(plane2, lowbits, meta, mask, row_scale, rowptr, cols, vals, group_size);
  MB_CHECK_FLOAT_DTYPE(dtype, "dtype");
  auto out_f = at::empty({d.rows, d.cols}, plane2.options().dtype(at::kFloat));
  const MixedView v = make_view(plane2, lowbits, meta, mask, row_scale, rowptr, cols, vals, d);
  float* out = out_f.data_ptr<float>();
  at::parallel_for(0, d.rows, 16, [&](int64_t begin, int64_t end) { decode_rows(v, begin, end, out); });
  return dtype == at::kFloat ? out_f : out_f.to(dtype);
}

at::Tensor mixed_linear_cpu(const at::Tensor& x, const at::Tensor& plane2, const at::Tensor& lowbits,
                            const at::Tensor& meta, const at::Tensor& mask, const at::Tensor& row_scale,
                            const at::Tensor& rowptr, const at::Tensor& cols, const at::Tensor& vals,
                            const c10::optional<at::Tensor>& bias, int64_t group_size) {
  const MixedDims d = check_mixed_args(plane2, lowbits, meta, mask, row_scale, rowptr, cols, vals, group_size);
  check_activation(x, d, bias, plane2);
  const auto xf = x.reshape({-1, d.cols}).to(at::kFloat).contiguous();
  const int64_t m_rows = xf.size(0);
  auto y = at::empty({m_rows, d.rows}, x.options().dtype(at::kFloat));
  if (m_rows > 0 && d.rows > 0) {
    const MixedView v = make_view(plane2, lowbits, meta, mask, row_scale, rowptr, cols, vals, d);
    const float* xp = xf.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    if (m_rows >= kGemmMinRows) {
      linear_rows_gemm(v, xf, y);
    } else if (use_avx2()) {
#if defined(__x86_64__)
      // Group sums of x, by hand: at::sum's dispatch costs more than the sums
      // for the small layers that dominate a 135M-parameter model.
      std::vector<float> xsum(m_rows * d.groups);
      for (int64_t i = 0; i < m_rows * d.groups; ++i) {
        const float* xg = xp + i * d.group_size;
        float s = 0.f;
        for (int64_t j = 0; j < d.group_size; ++j) s += xg[j];
        xsum[i] = s;
      }
      const float* sp = xsum.data();
      at::parallel_for(0, d.rows, 16, [&](int64_t begin, int64_t end) {
        linear_rows_avx2(v, begin, end, xp, sp, m_rows, yp);
      });
#endif
    } else {
      at::parallel_for(0, d.rows, 8, [&](int64_t begin, int64_t end) {
        linear_rows_generic(v, begin, end, xp, m_rows, yp);
      });
    }
  }
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  return y.to(x.scalar_type()).reshape(linear_output_shape(x, d.rows));
}

}  // namespace

TORCH_LIBRARY_IMPL(memboost, CPU, m) {
  m.impl("mixed_dequantize", &mixed_dequantize_cpu);
  m.impl("mixed_linear", &mixed_linear_cpu);
}

}  // namespace mixed
}  // namespace memboost
