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
#include "cpu/int8/act_quant.h"
#include "cpu/int8/dot.h"
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

// ---------------------------------------------------------------------------
// int8 path (act_bits = 8): activations quantized to int8 with one scale per
// block of 32 (cpu/int8/act_quant.h, llama.cpp's Q8_0 granularity: a huge
// channel spoils only its own block), weight codes multiplied as unsigned
// bytes against them (cpu/int8/dot.h), one float FMA per 64-code chunk for
// the scales and one per group for the zero point:
//   W[r, g] . x = sum_blocks step_g * ascale_b * (q . x8)_b - zero_step_g * sum_g(x_hat).
// A 16-byte run of plane2 holds 64 codes, byte k holding elements 4k..4k+3 at
// bits 0, 2, 4, 6. Expanding it with one shift per element position s gives
// the codes in "s-major" order (position 16s + k holds element 4k + s), so
// the activations are permuted into that order once per call and every code
// expansion is a broadcast, a shift and a mask. In that order the bytes
// 16s + 0..7 of a chunk belong to its first block of 32 and 16s + 8..15 to
// its second, so after a 4-byte dot product the int32 lanes alternate in
// pairs between the two blocks: lane pattern (b0, b0, b1, b1) per 128 bits.
constexpr int64_t kChunk = 64;  // codes per 16-byte run

struct Int8Rows {
  std::vector<int8_t> x;       // [m, cols] int8, s-major within each chunk
  std::vector<float> scale;    // [m, cols / 32] activation scale per block of 32
  std::vector<float> pattern;  // [m, chunks, 16] the chunk's two scales in the int32 lane pattern
  std::vector<float> gsum;     // [m, groups] sum of the dequantized activations per group
};

Int8Rows quantize_activations_s_major(const at::Tensor& xf, const MixedDims& d) {
  const int64_t m_rows = xf.size(0), chunks = d.cols / kChunk, blocks = d.cols / cpu::kActBlock;
  const cpu::Int8Activations a = cpu::quantize_activations(xf, d.cols, cpu::kActBlock);
  Int8Rows out;
  out.x.resize(m_rows * d.cols);
  out.scale.assign(a.scales.data_ptr<float>(), a.scales.data_ptr<float>() + m_rows * blocks);
  out.gsum.assign(m_rows * d.groups, 0.f);
  out.pattern.resize(m_rows * chunks * 16);
  const int8_t* q = a.values.data_ptr<int8_t>();
  const int32_t* sums = a.sums.data_ptr<int32_t>();
  const int64_t sums_per_row = d.cols / cpu::kActBlock, chunks_per_group = d.group_size / kChunk;
  for (int64_t i = 0; i < m_rows; ++i) {
    for (int64_t c = 0; c < chunks; ++c) {
      const int8_t* src = q + i * d.cols + c * kChunk;
      int8_t* dst = out.x.data() + i * d.cols + c * kChunk;
      for (int s = 0; s < 4; ++s)
        for (int k = 0; k < 16; ++k) dst[16 * s + k] = src[4 * k + s];
      for (int64_t b = 2 * c; b < 2 * c + 2; ++b)
        out.gsum[i * d.groups + c / chunks_per_group] +=
            out.scale[i * blocks + b] * static_cast<float>(sums[i * sums_per_row + b]);
      float* pat = out.pattern.data() + (i * chunks + c) * 16;
      for (int l = 0; l < 16; ++l) pat[l] = out.scale[i * blocks + 2 * c + ((l >> 1) & 1)];
    }
  }
  return out;
}

// 64 codes of a 16-byte run in s-major order (portable).
inline void expand_chunk(const uint8_t* bytes, uint8_t* codes) {
  for (int s = 0; s < 4; ++s)
    for (int k = 0; k < 16; ++k) codes[16 * s + k] = (bytes[k] >> (2 * s)) & 3u;
}

struct RowParams {
  const uint8_t* plane;
  const uint8_t* low;
  const uint32_t* mask;
  const uint8_t* meta;
  RowRanges ranges;
};

inline RowParams row_params(const MixedView& v, int64_t r) {
  const MixedDims& d = v.d;
  return RowParams{reinterpret_cast<const uint8_t*>(v.plane2 + r * d.plane_words),
                   reinterpret_cast<const uint8_t*>(v.lowbits + r * d.low_words), v.mask + r * d.mask_words,
                   v.meta + r * d.groups, row_ranges(v.row_scale[2 * r], v.row_scale[2 * r + 1])};
}

inline float outlier_dot(const MixedView& v, int64_t r, const float* x) {
  float out = 0.f;
  for (int32_t e = v.rowptr[r]; e < v.rowptr[r + 1]; ++e) out += static_cast<float>(v.vals[e]) * x[v.cols[e]];
  return out;
}

void linear_rows_int8_portable(const MixedView& v, int64_t begin, int64_t end, const Int8Rows& a, const float* xf,
                               int64_t m_rows, float* y) {
  const MixedDims& d = v.d;
  const int64_t chunks_per_group = d.group_size / kChunk, blocks = d.cols / cpu::kActBlock;
  uint8_t codes[kChunk], low[kChunk];
  for (int64_t r = begin; r < end; ++r) {
    const RowParams p = row_params(v, r);
    for (int64_t i = 0; i < m_rows; ++i) {
      const int8_t* xi = a.x.data() + i * d.cols;
      float acc = 0.f, corr = 0.f;
      int64_t low_group = 0;
      for (int64_t g = 0; g < d.groups; ++g) {
        const bool four = test_bit(p.mask, static_cast<int>(g));
        const GroupParams gp = group_params_from_range(p.meta[g], four, p.ranges.range[p.meta[g] & 0xF]);
        for (int64_t c = 0; c < chunks_per_group; ++c) {
          const int64_t chunk = g * chunks_per_group + c;
          expand_chunk(p.plane + chunk * 16, codes);
          if (four) {
            expand_chunk(p.low + (low_group * chunks_per_group + c) * 16, low);
            for (int j = 0; j < kChunk; ++j) codes[j] = static_cast<uint8_t>((codes[j] << 2) | low[j]);
          }
          // s-major bytes 16s + 0..7 are the chunk's first block of 32, 16s + 8..15 its second
          int32_t dot[2] = {0, 0};
          for (int j = 0; j < kChunk; ++j)
            dot[(j >> 3) & 1] += static_cast<int32_t>(codes[j]) * static_cast<int32_t>(xi[chunk * kChunk + j]);
          acc += gp.step * (static_cast<float>(dot[0]) * a.scale[i * blocks + 2 * chunk] +
                            static_cast<float>(dot[1]) * a.scale[i * blocks + 2 * chunk + 1]);
        }
        corr += gp.zero_step * a.gsum[i * d.groups + g];
        low_group += four;
      }
      y[i * d.rows + r] = acc - corr + outlier_dot(v, r, xf + i * d.cols);
    }
  }
}

#if MB_HAVE_X86_KERNELS
// expand_chunk with AVX2: codes 0..31 and 32..63 of the s-major order.
MB_TARGET_AVX2 inline void expand_chunk_avx2(const uint8_t* bytes, __m256i& c01, __m256i& c23) {
  const __m128i three = _mm_set1_epi8(3);
  const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes));
  const __m128i v0 = _mm_and_si128(b, three), v1 = _mm_and_si128(_mm_srli_epi16(b, 2), three);
  const __m128i v2 = _mm_and_si128(_mm_srli_epi16(b, 4), three), v3 = _mm_and_si128(_mm_srli_epi16(b, 6), three);
  c01 = _mm256_set_m128i(v1, v0);
  c23 = _mm256_set_m128i(v3, v2);
}

// expand_chunk with AVX-512: the run broadcast to four 128-bit lanes, lane s
// shifted right by 2s, so element 4k + s lands at byte 16s + k.
MB_TARGET_AVX512 inline __m512i expand_chunk_avx512(const uint8_t* bytes) {
  const __m512i shifts = _mm512_set_epi64(0x0006000600060006LL, 0x0006000600060006LL, 0x0004000400040004LL,
                                          0x0004000400040004LL, 0x0002000200020002LL, 0x0002000200020002LL, 0, 0);
  const __m512i b = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(bytes)));
  return _mm512_and_si512(_mm512_srlv_epi16(b, shifts), _mm512_set1_epi8(3));
}

template <int MT>
MB_TARGET_AVX2 void linear_rows_int8_avx2_tile(const MixedView& v, int64_t begin, int64_t end, const Int8Rows& a,
                                               int64_t m0, const float* xf, float* y) {
  const MixedDims& d = v.d;
  const int64_t chunks_per_group = d.group_size / kChunk, chunks = d.cols / kChunk;
  for (int64_t r = begin; r < end; ++r) {
    const RowParams p = row_params(v, r);
    __m256 acc[MT];
    float corr[MT];
    for (int i = 0; i < MT; ++i) {
      acc[i] = _mm256_setzero_ps();
      corr[i] = 0.f;
    }
    int64_t low_group = 0;
    for (int64_t g = 0; g < d.groups; ++g) {
      const bool four = test_bit(p.mask, static_cast<int>(g));
      const GroupParams gp = group_params_from_range(p.meta[g], four, p.ranges.range[p.meta[g] & 0xF]);
      for (int64_t c = 0; c < chunks_per_group; ++c) {
        const int64_t chunk = g * chunks_per_group + c;
        __m256i c01, c23;
        expand_chunk_avx2(p.plane + chunk * 16, c01, c23);
        if (four) {
          __m256i l01, l23;
          expand_chunk_avx2(p.low + (low_group * chunks_per_group + c) * 16, l01, l23);
          c01 = _mm256_or_si256(_mm256_slli_epi16(c01, 2), l01);
          c23 = _mm256_or_si256(_mm256_slli_epi16(c23, 2), l23);
        }
        for (int i = 0; i < MT; ++i) {
          const int8_t* xc = a.x.data() + (m0 + i) * d.cols + chunk * kChunk;
          __m256i dot = cpu::dpbusd_avx2(_mm256_setzero_si256(), c01,
                                         _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xc)));
          dot = cpu::dpbusd_avx2(dot, c23, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xc + 32)));
          const __m256 scale =
              _mm256_mul_ps(_mm256_set1_ps(gp.step), _mm256_loadu_ps(a.pattern.data() + ((m0 + i) * chunks + chunk) * 16));
          acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc[i]);
        }
      }
      for (int i = 0; i < MT; ++i) corr[i] += gp.zero_step * a.gsum[(m0 + i) * d.groups + g];
      low_group += four;
    }
    for (int i = 0; i < MT; ++i)
      y[(m0 + i) * d.rows + r] = hsum(acc[i]) - corr[i] + outlier_dot(v, r, xf + (m0 + i) * d.cols);
  }
}

// Every group's step and zero * step of one row at once: the 16 scale-code
// ranges of a row fit one register, so a permute looks them up for 16 groups.
// The same float operations as group_params_from_range, so the same values.
MB_TARGET_AVX512 inline void row_group_params_avx512(const RowParams& p, int64_t groups, float* step,
                                                      float* zero_step) {
  const __m512 ranges = _mm512_loadu_ps(p.ranges.range);
  for (int64_t g0 = 0; g0 < groups; g0 += 16) {
    const int64_t n = std::min<int64_t>(16, groups - g0);
    const __mmask16 lanes = static_cast<__mmask16>(n == 16 ? 0xFFFFu : (1u << n) - 1u);
    const __m512i meta = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(lanes, p.meta + g0));
    const __m512 range = _mm512_permutexvar_ps(_mm512_and_si512(meta, _mm512_set1_epi32(15)), ranges);
    const __mmask16 four = static_cast<__mmask16>((p.mask[g0 >> 5] >> (g0 & 31)) & 0xFFFFu);
    const __m512 st = _mm512_mul_ps(range, _mm512_mask_blend_ps(four, _mm512_set1_ps(1.0f / 3.0f),
                                                                 _mm512_set1_ps(1.0f / 15.0f)));
    const __m512 zero = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(meta, 4)),
                                      _mm512_mask_blend_ps(four, _mm512_set1_ps(0.25f), _mm512_set1_ps(1.0f)));
    _mm512_mask_storeu_ps(step + g0, lanes, st);
    _mm512_mask_storeu_ps(zero_step + g0, lanes, _mm512_mul_ps(zero, st));
  }
}

template <int MT>
MB_TARGET_AVX512 void linear_rows_int8_avx512_tile(const MixedView& v, int64_t begin, int64_t end,
                                                   const Int8Rows& a, int64_t m0, const float* xf, float* y) {
  const MixedDims& d = v.d;
  const int64_t chunks_per_group = d.group_size / kChunk, chunks = d.cols / kChunk;
  std::vector<float> step(d.groups), zero_step(d.groups);
  for (int64_t r = begin; r < end; ++r) {
    const RowParams p = row_params(v, r);
    row_group_params_avx512(p, d.groups, step.data(), zero_step.data());
    // two accumulators per activation row, alternating by chunk, so the FMAs do not wait on each other
    __m512 acc[MT][2];
    for (int i = 0; i < MT; ++i) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    int64_t low_group = 0;
    for (int64_t g = 0; g < d.groups; ++g) {
      const bool four = test_bit(p.mask, static_cast<int>(g));
      const __m512 group_step = _mm512_set1_ps(step[g]);
      for (int64_t c = 0; c < chunks_per_group; ++c) {
        const int64_t chunk = g * chunks_per_group + c;
        __m512i codes = expand_chunk_avx512(p.plane + chunk * 16);
        if (four) {
          codes = _mm512_or_si512(_mm512_slli_epi16(codes, 2),
                                  expand_chunk_avx512(p.low + (low_group * chunks_per_group + c) * 16));
        }
        for (int i = 0; i < MT; ++i) {
          const int8_t* xc = a.x.data() + (m0 + i) * d.cols + chunk * kChunk;
          const __m512i dot = cpu::dpbusd_vnni512(_mm512_setzero_si512(), codes, _mm512_loadu_si512(xc));
          const __m512 scale =
              _mm512_mul_ps(group_step, _mm512_loadu_ps(a.pattern.data() + ((m0 + i) * chunks + chunk) * 16));
          acc[i][chunk & 1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc[i][chunk & 1]);
        }
      }
      low_group += four;
    }
    for (int i = 0; i < MT; ++i) {
      // the zero points' share: sum over groups of zero_step * (sum of the group's activations)
      const float* gsum = a.gsum.data() + (m0 + i) * d.groups;
      __m512 corr = _mm512_setzero_ps();
      int64_t g = 0;
      for (; g + 16 <= d.groups; g += 16)
        corr = _mm512_fmadd_ps(_mm512_loadu_ps(zero_step.data() + g), _mm512_loadu_ps(gsum + g), corr);
      float tail = 0.f;
      for (; g < d.groups; ++g) tail += zero_step[g] * gsum[g];
      y[(m0 + i) * d.rows + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc[i][0], acc[i][1])) -
                                 (_mm512_reduce_add_ps(corr) + tail) + outlier_dot(v, r, xf + (m0 + i) * d.cols);
    }
  }
}

template <template <int> class Tile>
void int8_tiles(const MixedView& v, int64_t begin, int64_t end, const Int8Rows& a, const float* xf, int64_t m_rows,
                float* y) {
  for (int64_t m0 = 0; m0 < m_rows; m0 += 4) {
    switch (std::min<int64_t>(4, m_rows - m0)) {
      case 1: Tile<1>::run(v, begin, end, a, m0, xf, y); break;
      case 2: Tile<2>::run(v, begin, end, a, m0, xf, y); break;
      case 3: Tile<3>::run(v, begin, end, a, m0, xf, y); break;
      default: Tile<4>::run(v, begin, end, a, m0, xf, y); break;
    }
  }
}

template <int MT>
struct Avx2Tile {
  static void run(const MixedView& v, int64_t b, int64_t e, const Int8Rows& a, int64_t m0, const float* xf, float* y) {
    linear_rows_int8_avx2_tile<MT>(v, b, e, a, m0, xf, y);
  }
};

template <int MT>
struct Avx512Tile {
  static void run(const MixedView& v, int64_t b, int64_t e, const Int8Rows& a, int64_t m0, const float* xf, float* y) {
    linear_rows_int8_avx512_tile<MT>(v, b, e, a, m0, xf, y);
  }
};
#endif

// Rows per parallel task: at least ~half a million weights each, so a small
// layer runs on one thread (a fork/join costs more than it saves there, and
// far more when another process holds a core).
inline int64_t row_grain(const MixedDims& d) { return std::max<int64_t>(16, (int64_t(1) << 19) / d.cols); }

void linear_int8(const MixedView& v, const at::Tensor& xf, float* y) {
  const Int8Rows a = quantize_activations_s_major(xf, v.d);
  const float* xp = xf.data_ptr<float>();
  const int64_t m_rows = xf.size(0);
  const cpu::Isa isa = cpu::active_isa();
  at::parallel_for(0, v.d.rows, row_grain(v.d), [&](int64_t begin, int64_t end) {
#if MB_HAVE_X86_KERNELS
    if (isa == cpu::Isa::Avx512Vnni) return int8_tiles<Avx512Tile>(v, begin, end, a, xp, m_rows, y);
    if (isa == cpu::Isa::Avx2) return int8_tiles<Avx2Tile>(v, begin, end, a, xp, m_rows, y);
#endif
    linear_rows_int8_portable(v, begin, end, a, xp, m_rows, y);
  });
}

// From this many activation rows on, decoding a block of weight rows once
// into a cache-sized float buffer and multiplying it with ATen's GEMM beats
// the fused kernel, which decodes every weight once per 4 activation rows.
constexpr int64_t kGemmMinRows = 32;

// y[:, block] = x @ W[block].T for blocks of weight rows decoded into a
// ~2 MiB buffer: the full float weight is never built, and the buffer stays
// in cache between its decoding and its GEMM.
void linear_rows_gemm(const MixedView& v, const at::Tensor& xf, at::Tensor& y) {
  const int64_t block = std::min(v.d.rows, std::max<int64_t>(16, (int64_t(1) << 19) / v.d.cols));
  auto buffer = at::empty({block, v.d.cols}, xf.options());
  for (int64_t r0 = 0; r0 < v.d.rows; r0 += block) {
    const int64_t rows = std::min(block, v.d.rows - r0);
    float* out = buffer.data_ptr<float>();
    at::parallel_for(r0, r0 + rows, 16, [&](int64_t begin, int64_t end) { decode_rows(v, begin, end, out, r0); });
    auto y_block = y.narrow(1, r0, rows);
    at::mm_out(y_block, xf, buffer.narrow(0, 0, rows).t());
  }
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
                            const c10::optional<at::Tensor>& bias, int64_t group_size, int64_t act_bits) {
  const MixedDims d = check_mixed_args(plane2, lowbits, meta, mask, row_scale, rowptr, cols, vals, group_size);
  check_activation(x, d, bias, plane2);
  MB_CHECK(act_bits == 0 || act_bits == 8, "'act_bits' must be 0 (exact float) or 8, got ", act_bits);
  const auto xf = x.reshape({-1, d.cols}).to(at::kFloat).contiguous();
  const int64_t m_rows = xf.size(0);
  auto y = at::empty({m_rows, d.rows}, x.options().dtype(at::kFloat));
  if (m_rows > 0 && d.rows > 0) {
    const MixedView v = make_view(plane2, lowbits, meta, mask, row_scale, rowptr, cols, vals, d);
    const float* xp = xf.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    if (m_rows >= kGemmMinRows) {
      linear_rows_gemm(v, xf, y);
    } else if (act_bits == 8 && d.group_size % kChunk == 0) {
      linear_int8(v, xf, yp);
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
      at::parallel_for(0, d.rows, row_grain(d), [&](int64_t begin, int64_t end) {
        linear_rows_avx2(v, begin, end, xp, sp, m_rows, yp);
      });
#endif
    } else {
      at::parallel_for(0, d.rows, row_grain(d), [&](int64_t begin, int64_t end) {
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
