// CPU kernels of the mixed 2/4/16-bit format: decode a row into a float
// buffer (in L1), then use it for every activation row; rows are spread
// across threads with ATen's parallel_for.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "common/mixed_args.h"

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

// 16 weights of a 2-bit group; written branch-free so the compiler vectorizes
// the variable shifts (AVX2 clone picked at run time).
__attribute__((target_clones("avx2", "default"))) void decode_word2(uint32_t word, float step, float zero_step,
                                                                    float* out) {
  for (int j = 0; j < 16; ++j) out[j] = static_cast<float>((word >> (2 * j)) & 3u) * step - zero_step;
}

__attribute__((target_clones("avx2", "default"))) void decode_word4(uint32_t hi, uint32_t lo, float step,
                                                                    float zero_step, float* out) {
  for (int j = 0; j < 16; ++j) {
    const uint32_t q = (((hi >> (2 * j)) & 3u) << 2) | ((lo >> (2 * j)) & 3u);
    out[j] = static_cast<float>(q) * step - zero_step;
  }
}

__attribute__((target_clones("avx2", "default"))) float dot(const float* a, const float* b, int64_t n) {
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
void decode_row(const MixedView& v, int64_t r, float* out) {
  const MixedDims& d = v.d;
  const uint32_t* plane_row = v.plane2 + r * d.plane_words;
  const uint32_t* low_row = v.lowbits + r * d.low_words;
  const uint32_t* mask_row = v.mask + r * d.mask_words;
  const uint8_t* meta_row = v.meta + r * d.groups;
  const float log2_base = v.row_scale[2 * r], log2_step = v.row_scale[2 * r + 1];
  const int64_t words_per_group = d.group_size / kWeightsPerWord;
  int64_t low_group = 0;
  for (int64_t g = 0; g < d.groups; ++g) {
    const bool four = test_bit(mask_row, static_cast<int>(g));
    const GroupParams p = group_params(meta_row[g], four, log2_base, log2_step);
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

at::Tensor mixed_dequantize_cpu(const at::Tensor& plane2, const at::Tensor& lowbits, const at::Tensor& meta,
                                const at::Tensor& mask, const at::Tensor& row_scale, const at::Tensor& rowptr,
                                const at::Tensor& cols, const at::Tensor& vals, int64_t group_size,
                                at::ScalarType dtype) {
  const MixedDims d = check_mixed_args(plane2, lowbits, meta, mask, row_scale, rowptr, cols, vals, group_size);
  TORCH_CHECK(at::isFloatingType(dtype), "memboost: 'dtype' must be a floating dtype, got ", dtype);
  auto out_f = at::empty({d.rows, d.cols}, plane2.options().dtype(at::kFloat));
  const MixedView v = make_view(plane2, lowbits, meta, mask, row_scale, rowptr, cols, vals, d);
  float* out = out_f.data_ptr<float>();
  at::parallel_for(0, d.rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) decode_row(v, r, out + r * d.cols);
  });
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
    at::parallel_for(0, d.rows, 8, [&](int64_t begin, int64_t end) {
      std::vector<float> row(d.cols);
      for (int64_t r = begin; r < end; ++r) {
        decode_row(v, r, row.data());
        for (int64_t m = 0; m < m_rows; ++m) yp[m * d.rows + r] = dot(row.data(), xp + m * d.cols, d.cols);
      }
    });
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
