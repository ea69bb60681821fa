// CPU kernels of the mixed 2/4/16-bit format: decode a row into a float
// buffer (in L1), then use it for every activation row; rows are spread
// across threads with ATen's parallel_for.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include "common/mixed_args.h"
#include "cpu/decoded_gemm.h"
#include "cpu/int8/act_quant.h"
#include "cpu/int8/dot.h"
#include "cpu/int8/isa.h"
#include "cpu/linear_io.h"

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
MB_TARGET_AVX2 inline float hsum(__m256 v) { return cpu::hsum_ps256(v); }

// The mixed kernels request their weight streams into L2 (_MM_HINT_T1), not
// L1: a row tile reads five streams (plane, low bits, metadata, mask, ranges)
// and prefetching 16 KiB of plane plus 24 rows of the rest into a 32 KiB L1
// evicted lines before their use. Streamed act_bits=8 calls on 2048x8192
// took 0.79-0.88 of the time with T1 (benchmarks/bench_ops.py-style copies,
// 2 threads, two alternating runs per hint); NF4's and ternary's single
// streams gained nothing from it and keep T0. The exact path's row
// prefetch shares the hint; it was not measured on its own.
constexpr _mm_hint kStreamHint = _MM_HINT_T1;

// Rows ahead whose streams a kernel requests while it works on row r. Besides
// the 2-bit plane a row reads its 4-bit low bits, group metadata, mask and
// range: separate arrays the hardware prefetcher does not follow well all at
// once (the int8 kernel stalled on its low-bit loads before this). At 8 rows
// ahead the int8 kernel still stalled on them in SmolLM2's decode; 24 (about a
// microsecond of work on 576 columns) decoded faster, 48 no faster than 24.
constexpr int64_t kRowsAhead = 24;

// Requests row r's low bits, metadata, mask and range (and its plane when
// `plane`): every cache line of each. r past the last row requests nothing.
inline void prefetch_row(const MixedView& v, int64_t r, bool plane) {
  const MixedDims& d = v.d;
  if (r >= d.rows) return;
  auto lines = [](const void* p, int64_t bytes) {
    const char* c = static_cast<const char*>(p);
    for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(c + off, kStreamHint);
    _mm_prefetch(c + bytes - 1, kStreamHint);  // the last line when p is not line-aligned
  };
  if (plane) lines(v.plane2 + r * d.plane_words, d.plane_words * 4);
  if (d.low_words > 0) lines(v.lowbits + r * d.low_words, d.low_words * 4);
  lines(v.meta + r * d.groups, d.groups);
  _mm_prefetch(reinterpret_cast<const char*>(v.mask + r * d.mask_words), kStreamHint);
  _mm_prefetch(reinterpret_cast<const char*>(v.row_scale + 2 * r), kStreamHint);
}

// row_ranges with two vector exp2 (cpu::exp2_ps256): range[c] = exp2(log2_base + c * log2_step)
// as the reference computes it (the same multiply and add), within 1e-7
// relative, where the scalar table costs two exp2f calls and 16 chained products per row.
MB_TARGET_AVX2 inline RowRanges row_ranges_avx2(float log2_base, float log2_step) {
  const __m256 base = _mm256_set1_ps(log2_base), step = _mm256_set1_ps(log2_step);
  const __m256 codes = _mm256_setr_ps(0.f, 1.f, 2.f, 3.f, 4.f, 5.f, 6.f, 7.f);
  RowRanges t;
  _mm256_storeu_ps(t.range, cpu::exp2_ps256(_mm256_add_ps(base, _mm256_mul_ps(codes, step))));
  _mm256_storeu_ps(t.range + 8, cpu::exp2_ps256(_mm256_add_ps(
                                    base, _mm256_mul_ps(_mm256_add_ps(codes, _mm256_set1_ps(8.f)), step))));
  return t;
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
    prefetch_row(v, r + kRowsAhead, /*plane=*/true);
    const uint32_t* plane_row = v.plane2 + r * d.plane_words;
    const uint32_t* low_row = v.lowbits + r * d.low_words;
    const uint32_t* mask_row = v.mask + r * d.mask_words;
    const uint8_t* meta_row = v.meta + r * d.groups;
    const RowRanges ranges = row_ranges_avx2(v.row_scale[2 * r], v.row_scale[2 * r + 1]);
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

// The sums of x over each group (group_size a multiple of 16, as
// check_mixed_args requires), 16 lanes at a time: the compiler keeps a scalar
// loop's float adds in order, one dependent chain per group.
MB_TARGET_AVX2 void group_sums_avx2(const float* x, int64_t n_groups, int64_t group_size, float* out) {
  for (int64_t g = 0; g < n_groups; ++g, x += group_size) {
    __m256 a = _mm256_setzero_ps(), b = _mm256_setzero_ps();
    for (int64_t j = 0; j < group_size; j += 16) {
      a = _mm256_add_ps(a, _mm256_loadu_ps(x + j));
      b = _mm256_add_ps(b, _mm256_loadu_ps(x + j + 8));
    }
    out[g] = hsum(_mm256_add_ps(a, b));
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
// bytes against them (cpu/int8/dot.h), one float FMA per 128 weights for the
// scales and one per group (vectorized per row) for the zero points:
//   W[r, g] . x = sum_blocks step_g * ascale_b * (q . x8)_b - zero_step_g * sum_g(x_hat).
//
// Layout. A 16-byte run of plane2 holds a chunk of 64 codes, byte k holding
// elements 4k..4k+3 at bits 0, 2, 4, 6. A 32-byte load takes two chunks (a
// "pair"); shifting it right by 2s and masking gives, in each 128-bit half h,
// element 4k + s of chunk h at byte k. The activations are permuted into that
// order once per call:
//   xp[128p + 32s + 16h + k] = x[128p + 64h + 4k + s],
// so four shifts and four 4-byte dot products (vpdpbusd, or maddubs + madd)
// cover 128 weights. Int32 lane j of half h then sums bytes 4j..4j+3, which
// belong to block 2h + (j >= 2) of the pair: the scale pattern is
// (b0, b0, b1, b1 | b2, b2, b3, b3). A 4-bit group adds its low bits the same
// way, its high bits shifted left by 2 (per half, so a pair may mix widths).
constexpr int64_t kChunk = 64;   // codes per 16-byte run
constexpr int64_t kPair = 128;   // activations per pair of chunks

struct Int8Rows {
  std::vector<int8_t> x;       // [m, padded] int8 in pair order, zero-padded to whole pairs
  std::vector<float> pattern;  // [m, pairs, 8] the pair's four block scales in the lane pattern
  std::vector<float> gsum;     // [m, groups] sum of the dequantized activations per group
  // [m, 2 * pairs, 64] the same int8 activations chunk by chunk (x86 kernels):
  // xc[64c + 16s + k] = x[64c + 4k + s], so that one chunk's four slices are
  // one contiguous 64-byte run for the 4-bit groups' low-bit walk. Chunk c's
  // block scales are pattern[4c .. 4c + 3] = (b0, b0, b1, b1).
  std::vector<int8_t> xc;
  int64_t padded = 0, pairs = 0;
  // the quantizer's output before reordering
  std::vector<int8_t> q;
  std::vector<float> scales;
  std::vector<int32_t> sums;
};

#if MB_HAVE_X86_KERNELS
// The pair order of one activation row on AVX2: per half of a pair, a
// byte shuffle per 16 (4 x 4 bytes to s-major), a dword unpack and permute
// (4 x 4 dwords across the four 16-byte lanes), then the two halves' 16-byte
// runs are interleaved. The block scales' lane pattern is one permute per pair.
MB_TARGET_AVX2 void pair_order_avx2(const int8_t* src, const float* sc, int64_t pairs, int8_t* dst, float* pattern) {
  const __m256i s_major = _mm256_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15,  //
                                           0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  const __m256i k_order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  const __m256i block_lanes = _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3);
  for (int64_t p = 0; p < pairs; ++p) {
    const __m256i* in = reinterpret_cast<const __m256i*>(src + p * kPair);
    __m256i r01[2], r23[2];  // per half h: [D_0 | D_1], [D_2 | D_3], D_s = elements 64h + 4k + s, k = 0..15
    for (int h = 0; h < 2; ++h) {
      const __m256i a = _mm256_shuffle_epi8(_mm256_loadu_si256(in + 2 * h), s_major);
      const __m256i b = _mm256_shuffle_epi8(_mm256_loadu_si256(in + 2 * h + 1), s_major);
      r01[h] = _mm256_permutevar8x32_epi32(_mm256_unpacklo_epi32(a, b), k_order);
      r23[h] = _mm256_permutevar8x32_epi32(_mm256_unpackhi_epi32(a, b), k_order);
    }
    __m256i* out = reinterpret_cast<__m256i*>(dst + p * kPair);
    _mm256_storeu_si256(out, _mm256_permute2x128_si256(r01[0], r01[1], 0x20));
    _mm256_storeu_si256(out + 1, _mm256_permute2x128_si256(r01[0], r01[1], 0x31));
    _mm256_storeu_si256(out + 2, _mm256_permute2x128_si256(r23[0], r23[1], 0x20));
    _mm256_storeu_si256(out + 3, _mm256_permute2x128_si256(r23[0], r23[1], 0x31));
    _mm256_storeu_ps(pattern + p * 8,
                     _mm256_permutevar8x32_ps(_mm256_castps128_ps256(_mm_loadu_ps(sc + 4 * p)), block_lanes));
  }
}
#endif

// Fills `out`, whose buffers are reused from call to call (a thread_local of
// the caller): at batch 1 on a small layer, allocating them each call was a
// measurable part of it.
void quantize_activations_pairs(const at::Tensor& xf, const MixedDims& d, cpu::Isa isa, Int8Rows& out) {
  const int64_t m_rows = xf.size(0), padded = (d.cols + kPair - 1) / kPair * kPair;
  const int64_t blocks = padded / cpu::kActBlock;
  std::vector<int8_t>& q = out.q;
  std::vector<float>& scales = out.scales;
  std::vector<int32_t>& sums = out.sums;
  q.resize(m_rows * padded);
  scales.resize(m_rows * blocks);
  sums.resize(m_rows * blocks);
  cpu::quantize_activations_into(isa != cpu::Isa::Portable, xf.data_ptr<float>(), m_rows, d.cols, padded,
                                 cpu::kActBlock, q.data(), scales.data(), sums.data());
  out.padded = padded;
  out.pairs = padded / kPair;
  out.x.resize(m_rows * padded);
  out.pattern.resize(m_rows * out.pairs * 8);
  out.gsum.assign(m_rows * d.groups, 0.f);
  if (isa != cpu::Isa::Portable) out.xc.resize(m_rows * padded);
  for (int64_t i = 0; i < m_rows; ++i) {
    const int8_t* src = q.data() + i * padded;
    int8_t* dst = out.x.data() + i * padded;
    const float* sc = scales.data() + i * blocks;
#if MB_HAVE_X86_KERNELS
    if (isa != cpu::Isa::Portable) {
      pair_order_avx2(src, sc, out.pairs, dst, out.pattern.data() + i * out.pairs * 8);
      int8_t* xc = out.xc.data() + i * padded;
      for (int64_t c = 0; c < 2 * out.pairs; ++c)
        for (int s = 0; s < 4; ++s)
          std::memcpy(xc + c * kChunk + 16 * s, dst + (c / 2) * kPair + 32 * s + 16 * (c % 2), 16);
    } else
#endif
    {
      for (int64_t p = 0; p < out.pairs; ++p)
        for (int s = 0; s < 4; ++s)
          for (int h = 0; h < 2; ++h)
            for (int k = 0; k < 16; ++k) dst[p * kPair + 32 * s + 16 * h + k] = src[p * kPair + 64 * h + 4 * k + s];
      for (int64_t p = 0; p < out.pairs; ++p)
        for (int l = 0; l < 8; ++l) out.pattern[(i * out.pairs + p) * 8 + l] = sc[4 * p + 2 * (l >> 2) + ((l >> 1) & 1)];
    }
    for (int64_t b = 0; b < d.cols / cpu::kActBlock; ++b)
      out.gsum[i * d.groups + b * cpu::kActBlock / d.group_size] += sc[b] * static_cast<float>(sums[i * blocks + b]);
  }
}

struct RowParams {
  const uint8_t* plane;
  const uint8_t* low;
  const uint32_t* mask;
  const uint8_t* meta;
  RowRanges ranges;
};

inline RowParams row_params_without_ranges(const MixedView& v, int64_t r) {
  const MixedDims& d = v.d;
  return RowParams{reinterpret_cast<const uint8_t*>(v.plane2 + r * d.plane_words),
                   reinterpret_cast<const uint8_t*>(v.lowbits + r * d.low_words), v.mask + r * d.mask_words,
                   v.meta + r * d.groups, RowRanges{}};
}

inline RowParams row_params(const MixedView& v, int64_t r) {
  RowParams p = row_params_without_ranges(v, r);
  p.ranges = row_ranges(v.row_scale[2 * r], v.row_scale[2 * r + 1]);
  return p;
}

// Every group's step and zero * step of one row (the float operations of group_params_from_range).
inline void row_group_params(const RowParams& p, int64_t groups, float* step, float* zero_step) {
  for (int64_t g = 0; g < groups; ++g) {
    const GroupParams gp = group_params_from_range(p.meta[g], test_bit(p.mask, static_cast<int>(g)),
                                                   p.ranges.range[p.meta[g] & 0xF]);
    step[g] = gp.step;
    zero_step[g] = gp.zero_step;
  }
}

inline float outlier_dot(const MixedView& v, int64_t r, const float* x) {
  float out = 0.f;
  for (int32_t e = v.rowptr[r]; e < v.rowptr[r + 1]; ++e) out += static_cast<float>(v.vals[e]) * x[v.cols[e]];
  return out;
}

// Where each chunk's low bits are (nullptr for 2-bit groups) and its group's step.
struct ChunkTable {
  std::vector<const uint8_t*> low;
  std::vector<float> step;
  std::vector<float> zero_step;  // per group
  std::vector<float> group_step;
};

inline void fill_chunk_table(const MixedView& v, const RowParams& p, ChunkTable& t) {
  const MixedDims& d = v.d;
  const int64_t chunks_per_group = d.group_size / kChunk;
  row_group_params(p, d.groups, t.group_step.data(), t.zero_step.data());
  int64_t low_group = 0;
  for (int64_t g = 0; g < d.groups; ++g) {
    const bool four = test_bit(p.mask, static_cast<int>(g));
    for (int64_t c = 0; c < chunks_per_group; ++c) {
      t.low[g * chunks_per_group + c] = four ? p.low + (low_group * chunks_per_group + c) * 16 : nullptr;
      t.step[g * chunks_per_group + c] = t.group_step[g];
    }
    low_group += four;
  }
}

inline ChunkTable make_chunk_table(const MixedDims& d) {
  const int64_t chunks = (d.cols / kPair + 1) * 2;  // whole pairs
  ChunkTable t;
  t.low.assign(chunks, nullptr);
  t.step.assign(chunks, 0.f);
  t.zero_step.resize(d.groups);
  t.group_step.resize(d.groups);
  return t;
}

inline float zero_point_share(const ChunkTable& t, const float* gsum, int64_t groups) {
  float corr = 0.f;
  for (int64_t g = 0; g < groups; ++g) corr += t.zero_step[g] * gsum[g];
  return corr;
}

void linear_rows_int8_portable(const MixedView& v, int64_t begin, int64_t end, const Int8Rows& a, const float* xf,
                               int64_t m_rows, float* y) {
  const MixedDims& d = v.d;
  const int64_t chunks = d.cols / kChunk;
  ChunkTable t = make_chunk_table(d);
  for (int64_t r = begin; r < end; ++r) {
    const RowParams p = row_params(v, r);
    fill_chunk_table(v, p, t);
    for (int64_t i = 0; i < m_rows; ++i) {
      const int8_t* xi = a.x.data() + i * a.padded;
      const float* pat = a.pattern.data() + i * a.pairs * 8;
      float acc = 0.f;
      for (int64_t c = 0; c < chunks; ++c) {
        const int64_t pair = c / 2, h = c % 2;
        int32_t dot[2] = {0, 0};  // the chunk's two blocks of 32
        for (int s = 0; s < 4; ++s)
          for (int k = 0; k < 16; ++k) {
            uint32_t code = (p.plane[c * 16 + k] >> (2 * s)) & 3u;
            if (t.low[c]) code = (code << 2) | ((t.low[c][k] >> (2 * s)) & 3u);
            dot[k >> 3] += static_cast<int32_t>(code) * xi[pair * kPair + 32 * s + 16 * h + k];
          }
        const float* sc = pat + pair * 8 + 4 * h;
        acc += t.step[c] * (static_cast<float>(dot[0]) * sc[0] + static_cast<float>(dot[1]) * sc[2]);
      }
      y[i * d.rows + r] = acc - zero_point_share(t, a.gsum.data() + i * d.groups, d.groups) +
                          outlier_dot(v, r, xf + i * d.cols);
    }
  }
}

#if MB_HAVE_X86_KERNELS
MB_TARGET_AVX2 inline RowParams row_params_avx2(const MixedView& v, int64_t r) {
  RowParams p = row_params_without_ranges(v, r);
  p.ranges = row_ranges_avx2(v.row_scale[2 * r], v.row_scale[2 * r + 1]);
  return p;
}

// row_group_params for 8 groups at a time: the 16 ranges of the row are two
// registers, looked up with two permutes and a blend. Same float operations.
MB_TARGET_AVX2 inline void row_group_params_avx2(const RowParams& p, int64_t groups, float* step, float* zero_step) {
  const __m256 ranges_lo = _mm256_loadu_ps(p.ranges.range), ranges_hi = _mm256_loadu_ps(p.ranges.range + 8);
  const __m256i bit = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
  int64_t g0 = 0;
  for (; g0 + 8 <= groups; g0 += 8) {
    uint64_t meta_bytes;
    std::memcpy(&meta_bytes, p.meta + g0, 8);
    const __m256i meta = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(meta_bytes)));
    const __m256i code = _mm256_and_si256(meta, _mm256_set1_epi32(15));
    const __m256i index = _mm256_and_si256(code, _mm256_set1_epi32(7));
    const __m256 upper = _mm256_castsi256_ps(_mm256_cmpgt_epi32(code, _mm256_set1_epi32(7)));
    const __m256 range = _mm256_blendv_ps(_mm256_permutevar8x32_ps(ranges_lo, index),
                                          _mm256_permutevar8x32_ps(ranges_hi, index), upper);
    const int flags = static_cast<int>((p.mask[g0 >> 5] >> (g0 & 31)) & 0xFFu);
    const __m256 four = _mm256_castsi256_ps(
        _mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(flags), bit), bit));
    const __m256 st = _mm256_mul_ps(range, _mm256_blendv_ps(_mm256_set1_ps(1.0f / 3.0f), _mm256_set1_ps(1.0f / 15.0f), four));
    const __m256 zero = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(meta, 4)),
                                      _mm256_blendv_ps(_mm256_set1_ps(0.25f), _mm256_set1_ps(1.0f), four));
    _mm256_storeu_ps(step + g0, st);
    _mm256_storeu_ps(zero_step + g0, _mm256_mul_ps(zero, st));
  }
  for (; g0 < groups; ++g0) {
    const GroupParams gp = group_params_from_range(p.meta[g0], test_bit(p.mask, static_cast<int>(g0)),
                                                   p.ranges.range[p.meta[g0] & 0xF]);
    step[g0] = gp.step;
    zero_step[g0] = gp.zero_step;
  }
}

// The int8 GEMV kernel, one body for both instruction sets. A tile of
// kInt8RowTile weight rows shares every activation load (as the ternary
// kernel does), and the walk over the 2-bit plane has no branch: a 4-bit
// group's code is 4 * hi + lo, so in those groups the plane's dot product is
// scaled by 4 * step, and the low bits are added by a second, short walk over
// the row's 4-bit groups only (found by scanning the mask's set bits), one
// 64-code chunk per vector against the chunk-major copy of the activations.
// Per pair of chunks (128 weights) and row: one 32-byte load, four dot
// products of 2-bit codes against the permuted activations, one float FMA
// with the pair's (chunk step * block scale) lane pattern. The tile's group
// tables (steps, zero points) are computed 8 groups per vector across its
// rows (int8_tile_tables): at 576 columns they were a third of the kernel.
constexpr int kInt8RowTile = 4;

// Codes 0..3 against int8 activations, four 4-byte dot products summed per
// int32 lane. AVX2: the four maddubs int16 sums stay within 4 * 2 * 3 * 127,
// so they are added before one madd widens them.
struct DotAvx2 {
  MB_TARGET_AVX2 static __m256i dot4(__m256i c0, __m256i c1, __m256i c2, __m256i c3, __m256i x0, __m256i x1,
                                     __m256i x2, __m256i x3) {
    const __m256i s = _mm256_add_epi16(_mm256_add_epi16(_mm256_maddubs_epi16(c0, x0), _mm256_maddubs_epi16(c1, x1)),
                                       _mm256_add_epi16(_mm256_maddubs_epi16(c2, x2), _mm256_maddubs_epi16(c3, x3)));
    return _mm256_madd_epi16(s, _mm256_set1_epi16(1));
  }
  // One chunk's 64 low-bit codes (16 bytes, element 4k + s at bits 2s of byte
  // k) against its chunk-major activations xc[16s + k]: the 16 bytes in both
  // halves, shifted by 2s per half. Int32 lane j of each half sums elements of
  // block j / 2 of the chunk, so the lanes' scales are (b0, b0, b1, b1) twice:
  // acc + dot * step * (the chunk's four lane scales at pat4, in both halves).
  using LowAcc = __m256;
  MB_TARGET_AVX2 static LowAcc low_zero() { return _mm256_setzero_ps(); }
  MB_TARGET_AVX2 static LowAcc low_chunk(const uint8_t* low, const int8_t* xc, float step, const float* pat4,
                                         LowAcc acc) {
    const __m256i lo = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(low)));
    const __m256i three = _mm256_set1_epi8(3);
    const __m256i c01 = _mm256_and_si256(_mm256_srlv_epi32(lo, _mm256_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2)), three);
    const __m256i c23 = _mm256_and_si256(_mm256_srlv_epi32(lo, _mm256_setr_epi32(4, 4, 4, 4, 6, 6, 6, 6)), three);
    const __m256i s = _mm256_add_epi16(
        _mm256_maddubs_epi16(c01, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xc))),
        _mm256_maddubs_epi16(c23, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xc + 32))));
    const __m256i dot = _mm256_madd_epi16(s, _mm256_set1_epi16(1));
    return _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot),
                           _mm256_mul_ps(_mm256_set1_ps(step), _mm256_broadcast_ps(reinterpret_cast<const __m128*>(pat4))),
                           acc);
  }
  MB_TARGET_AVX2 static __m256 low_fold(LowAcc acc) { return acc; }
};
// AVX-512 VNNI: two chains of two vpdpbusd each.
struct DotVnni {
  MB_TARGET_AVX512 static __m256i dot4(__m256i c0, __m256i c1, __m256i c2, __m256i c3, __m256i x0, __m256i x1,
                                       __m256i x2, __m256i x3) {
    const __m256i a = cpu::dpbusd_vnni256(cpu::dpbusd_vnni256(_mm256_setzero_si256(), c0, x0), c2, x2);
    const __m256i b = cpu::dpbusd_vnni256(cpu::dpbusd_vnni256(_mm256_setzero_si256(), c1, x1), c3, x3);
    return _mm256_add_epi32(a, b);
  }
  // DotAvx2::low_chunk with one 512-bit vpdpbusd (quarter s of the vector
  // shifted by 2s), whose four quarters have the same lane scales: the sums
  // stay 512-bit until low_fold, one fold per row instead of one per chunk.
  using LowAcc = __m512;
  MB_TARGET_AVX512 static LowAcc low_zero() { return _mm512_setzero_ps(); }
  MB_TARGET_AVX512 static LowAcc low_chunk(const uint8_t* low, const int8_t* xc, float step, const float* pat4,
                                           LowAcc acc) {
    const __m512i lo = _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(low)));
    const __m512i shifts = _mm512_setr_epi32(0, 0, 0, 0, 2, 2, 2, 2, 4, 4, 4, 4, 6, 6, 6, 6);
    const __m512i codes = _mm512_and_si512(_mm512_srlv_epi32(lo, shifts), _mm512_set1_epi8(3));
    const __m512i dot = cpu::dpbusd_vnni512(_mm512_setzero_si512(), codes, _mm512_loadu_si512(xc));
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot),
                           _mm512_mul_ps(_mm512_set1_ps(step), _mm512_broadcast_f32x4(_mm_loadu_ps(pat4))), acc);
  }
  MB_TARGET_AVX512 static __m256 low_fold(LowAcc acc) {
    return _mm256_add_ps(_mm512_castps512_ps256(acc),
                         _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc), 1)));
  }
};

// Float tables of one tile of rows, allocated once per parallel task. Row i
// of the tile has its groups' entries at i * groups (its chunks' at i * chunks);
// every array has a vector of slack past the tile.
struct Int8TileScratch {
  int64_t chunks = -1;  // per row
  // Lane t of the tile's groups (zero in the slack), so that one vector of 8
  // lanes covers groups of several rows: 2 * its row in the tile (where the
  // row's log2_base is among the tile's row scales), the index of its mask
  // word from the tile's first, and its bit in that word.
  std::vector<int32_t> lane_row2, lane_word, lane_bit;
  std::vector<float> zero_step, plane_step, chunk_step;
  int64_t groups = -1, mask_words = -1;
  // Sized and filled for layers of d's shape; kept as they are when the last
  // layer had the same shape (the tables are per thread and reused, so a
  // small layer's call allocates nothing).
  void prepare(const MixedDims& d) {
    if (d.groups == groups && d.mask_words == mask_words && d.cols / kChunk == chunks) return;
    groups = d.groups;
    mask_words = d.mask_words;
    chunks = d.cols / kChunk;
    const int64_t lanes = kInt8RowTile * groups + 16;  // a 16-lane vector of slack
    lane_row2.assign(lanes, 0);
    lane_word.assign(lanes, 0);
    lane_bit.assign(lanes, 0);
    for (int64_t t = 0; t < kInt8RowTile * groups; ++t) {
      const int64_t row = t / groups, group = t % groups;
      lane_row2[t] = static_cast<int32_t>(2 * row);
      lane_word[t] = static_cast<int32_t>(row * d.mask_words + group / 32);
      lane_bit[t] = static_cast<int32_t>(group % 32);
    }
    zero_step.assign(lanes, 0.f);
    plane_step.assign(lanes, 0.f);
    chunk_step.assign(kInt8RowTile * chunks + 8, 0.f);
  }
};

// The tile's steps per chunk (row i's at i * chunks): the plane steps
// themselves when a group is one chunk, else each repeated per chunk.
inline const float* tile_chunk_steps(const MixedDims& d, int64_t lanes, Int8TileScratch& s) {
  const int64_t cpg = d.group_size / kChunk;
  if (cpg == 1) return s.plane_step.data();
  for (int64_t t = 0; t < lanes; ++t)
    for (int64_t c = 0; c < cpg; ++c) s.chunk_step[t * cpg + c] = s.plane_step[t];
  return s.chunk_step.data();
}

// Every group's zero * step and plane step (step, or 4 * step in 4-bit
// groups, whose plane holds the code's high bits) of rows [r0, r0 + rt), 8
// groups per vector across row boundaries: a row's metadata and ranges are
// contiguous with the next row's, and a small layer has only a few groups
// per row (9 for 576 columns), so per-row vectors would be mostly slack.
// The float operations of group_params (exp2 of log2_base + code * log2_step).
// Returns the tile's chunk steps: row i's at i * chunks.
template <int rt>
MB_TARGET_AVX2 inline const float* int8_tile_tables(const MixedView& v, int64_t r0, Int8TileScratch& s) {
  const MixedDims& d = v.d;
  const int64_t lanes = rt * d.groups;
  float scales[2 * kInt8RowTile] = {};
  std::memcpy(scales, v.row_scale + 2 * r0, 2 * rt * sizeof(float));
  const __m256 row_scale = _mm256_loadu_ps(scales);  // (log2_base, log2_step) of each row
  const uint8_t* meta = v.meta + r0 * d.groups;
  const int* mask = reinterpret_cast<const int*>(v.mask + r0 * d.mask_words);
  const __m256i one = _mm256_set1_epi32(1), lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  // The tile's mask words in one register when they fit (up to 2048 columns
  // at group size 64): a permute per vector instead of a gather.
  const bool few_words = rt * d.mask_words <= 8;
  int words_copy[8] = {};
  if (few_words) for (int64_t k = 0; k < rt * d.mask_words; ++k) words_copy[k] = mask[k];
  const __m256i tile_words = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(words_copy));
  for (int64_t t = 0; t < lanes; t += 8) {
    uint64_t meta_bytes = 0;  // the tile's metadata ends at `lanes`: no read past it
    if (t + 8 <= lanes) std::memcpy(&meta_bytes, meta + t, 8);
    else for (int64_t k = t; k < lanes; ++k) meta_bytes |= static_cast<uint64_t>(meta[k]) << (8 * (k - t));
    const __m256i m = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(meta_bytes)));
    const __m256i row2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s.lane_row2.data() + t));
    const __m256i word_index = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s.lane_word.data() + t));
    const __m256 base = _mm256_permutevar8x32_ps(row_scale, row2);
    const __m256 lstep = _mm256_permutevar8x32_ps(row_scale, _mm256_add_epi32(row2, one));
    // The group's mask bit; lanes past the tile gather nothing (they read as 2-bit).
    __m256i words;
    if (few_words) {
      words = _mm256_permutevar8x32_epi32(tile_words, word_index);
    } else {
      const __m256i valid = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(lanes - t)), lane);
      words = _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), mask, word_index, valid, 4);
    }
    const __m256i bit = _mm256_and_si256(
        _mm256_srlv_epi32(words, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s.lane_bit.data() + t))), one);
    const __m256 four = _mm256_castsi256_ps(_mm256_cmpeq_epi32(bit, one));
    const __m256 code = _mm256_cvtepi32_ps(_mm256_and_si256(m, _mm256_set1_epi32(15)));
    const __m256 range = cpu::exp2_ps256(_mm256_add_ps(base, _mm256_mul_ps(code, lstep)));
    const __m256 st = _mm256_mul_ps(range, _mm256_blendv_ps(_mm256_set1_ps(1.0f / 3.0f), _mm256_set1_ps(1.0f / 15.0f), four));
    const __m256 zero = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_srli_epi32(m, 4)),
                                      _mm256_blendv_ps(_mm256_set1_ps(0.25f), _mm256_set1_ps(1.0f), four));
    _mm256_storeu_ps(s.zero_step.data() + t, _mm256_mul_ps(zero, st));
    _mm256_storeu_ps(s.plane_step.data() + t,
                     _mm256_mul_ps(st, _mm256_blendv_ps(_mm256_set1_ps(1.0f), _mm256_set1_ps(4.0f), four)));
  }
  return tile_chunk_steps(d, lanes, s);
}

// int8_tile_tables on AVX-512, 16 groups per vector, with the same values bit
// for bit: each tile row's 16 ranges are computed once (row_ranges_avx2: the
// same multiply, add and exp2) and looked up per group with permutes, where
// int8_tile_tables takes an exp2 per group. A 2048-column row has 32 groups,
// so the exp2s were most of the tables' work there.
template <int rt>
MB_TARGET_AVX512 inline const float* int8_tile_tables_vnni(const MixedView& v, int64_t r0, Int8TileScratch& s) {
  static_assert(rt == 1 || rt == kInt8RowTile, "the lookup below takes one row or a whole tile");
  const MixedDims& d = v.d;
  const int64_t lanes = rt * d.groups;
  __m512 ranges[rt];  // row i's range of code c in lane c
  for (int i = 0; i < rt; ++i)
    ranges[i] = _mm512_loadu_ps(row_ranges_avx2(v.row_scale[2 * (r0 + i)], v.row_scale[2 * (r0 + i) + 1]).range);
  const uint8_t* meta = v.meta + r0 * d.groups;
  const uint32_t* mask = v.mask + r0 * d.mask_words;
  const __m512i one = _mm512_set1_epi32(1);
  // The tile's mask words in one register when they fit (up to 8192 columns
  // at group size 64): a permute per vector instead of a gather.
  const bool few_words = rt * d.mask_words <= 16;
  const __m512i tile_words =
      few_words ? _mm512_maskz_loadu_epi32(static_cast<__mmask16>((1u << (rt * d.mask_words)) - 1), mask)
                : _mm512_setzero_si512();
  for (int64_t t = 0; t < lanes; t += 16) {
    // lanes past the tile read no metadata or mask (the lane tables' slack is zero there)
    const __mmask16 valid = lanes - t >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << (lanes - t)) - 1);
    const __m512i m = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(valid, meta + t));
    const __m512i row2 = _mm512_loadu_si512(s.lane_row2.data() + t);
    const __m512i word_index = _mm512_loadu_si512(s.lane_word.data() + t);
    const __m512i words = few_words ? _mm512_permutexvar_epi32(word_index, tile_words)
                                    : _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), valid, word_index, mask, 4);
    const __mmask16 four = _mm512_test_epi32_mask(
        _mm512_srlv_epi32(words, _mm512_loadu_si512(s.lane_bit.data() + t)), one);
    // 16 * (the lane's row in the tile) + its code: an index into the tile's ranges
    const __m512i index = _mm512_add_epi32(_mm512_slli_epi32(row2, 3), _mm512_and_si512(m, _mm512_set1_epi32(15)));
    __m512 range;
    if constexpr (rt == 1) {
      range = _mm512_permutexvar_ps(index, ranges[0]);
    } else {  // rows 0-1 and 2-3 are two 32-entry tables, chosen by the index's bit 5
      range = _mm512_mask_blend_ps(_mm512_test_epi32_mask(index, _mm512_set1_epi32(32)),
                                   _mm512_permutex2var_ps(ranges[0], index, ranges[1]),
                                   _mm512_permutex2var_ps(ranges[2], index, ranges[3]));
    }
    const __m512 st = _mm512_mul_ps(range, _mm512_mask_blend_ps(four, _mm512_set1_ps(1.0f / 3.0f),
                                                                _mm512_set1_ps(1.0f / 15.0f)));
    const __m512 zero = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(m, 4)),
                                      _mm512_mask_blend_ps(four, _mm512_set1_ps(0.25f), _mm512_set1_ps(1.0f)));
    _mm512_storeu_ps(s.zero_step.data() + t, _mm512_mul_ps(zero, st));
    _mm512_storeu_ps(s.plane_step.data() + t,
                     _mm512_mul_ps(st, _mm512_mask_blend_ps(four, _mm512_set1_ps(1.0f), _mm512_set1_ps(4.0f))));
  }
  return tile_chunk_steps(d, lanes, s);
}

// The tile tables of each instruction set, chosen by the tile body's Dot.
template <int rt>
MB_TARGET_AVX2 inline const float* tile_tables(DotAvx2, const MixedView& v, int64_t r0, Int8TileScratch& s) {
  return int8_tile_tables<rt>(v, r0, s);
}
template <int rt>
MB_TARGET_AVX512 inline const float* tile_tables(DotVnni, const MixedView& v, int64_t r0, Int8TileScratch& s) {
  return int8_tile_tables_vnni<rt>(v, r0, s);
}

// outlier_dot with F16C conversions (every AVX2 CPU has F16C), cheaper than
// at::Half's portable bit manipulation; the same float operations.
__attribute__((target("avx2,fma,f16c"))) float outlier_dot_f16c(const MixedView& v, int64_t r, const float* x) {
  const uint16_t* vals = reinterpret_cast<const uint16_t*>(v.vals);
  float out = 0.f;
  for (int32_t e = v.rowptr[r]; e < v.rowptr[r + 1]; ++e) out += _cvtsh_ss(vals[e]) * x[v.cols[e]];
  return out;
}

// Per tile row: the 4-bit groups' low bits, one chunk per set mask bit,
// minus the zero points' share (the sum over groups of zero_step * gsum): the
// starting values of the rows' accumulators, from one activation row (a
// block of MB_INT8_TILE_BODY, below). Groups of 64 (one chunk each) walk the
// mask without a chunk loop or a running group count, and the last groups'
// zero points take one masked vector instead of a scalar loop: with one
// horizontal sum for a tile's four rows, 5% fewer instructions per
// SmolLM2-sized call (benchmarks/callgrind_ops.py, AVX2).
#define MB_INT8_LOW_PASS_BODY                                                                                      \
  const int64_t cpg = d.group_size / kChunk;                                                                       \
  const __m256i lane_index = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);                                            \
  for (int i = 0; i < RT; ++i) {                                                                                   \
    const int64_t r = r0 + i;                                                                                      \
    const float* plane_step = scratch.plane_step.data() + i * d.groups; /* 4 * step in 4-bit groups */             \
    const uint8_t* low = reinterpret_cast<const uint8_t*>(v.lowbits + r * d.low_words);                            \
    const uint32_t* mask = v.mask + r * d.mask_words;                                                              \
    typename Dot::LowAcc low_sum = Dot::low_zero();                                                                \
    if (cpg == 1) { /* group size 64, the common case: a group is one chunk */                                     \
      for (int64_t word = 0; word < d.mask_words; ++word) {                                                        \
        const float* ps = plane_step + 32 * word;                                                                  \
        const float* pw = pat + 4 * 32 * word;                                                                     \
        const int8_t* xw = xc + 32 * kChunk * word;                                                                \
        for (uint32_t bits = mask[word]; bits != 0; bits &= bits - 1, low += 16) {                                 \
          const int b = __builtin_ctz(bits);                                                                       \
          low_sum = Dot::low_chunk(low, xw + b * kChunk, ps[b], pw + 4 * b, low_sum);                              \
        }                                                                                                          \
      }                                                                                                            \
    } else {                                                                                                       \
      for (int64_t word = 0; word < d.mask_words; ++word) {                                                        \
        for (uint32_t bits = mask[word]; bits != 0; bits &= bits - 1) {                                            \
          const int64_t g = word * 32 + __builtin_ctz(bits);                                                       \
          for (int64_t c = g * cpg; c < (g + 1) * cpg; ++c, low += 16)                                             \
            low_sum = Dot::low_chunk(low, xc + c * kChunk, plane_step[g], pat + 4 * c, low_sum);                   \
        }                                                                                                          \
      }                                                                                                            \
    }                                                                                                              \
    /* plane_step is 4 * step in 4-bit groups: a quarter of it is the low bits' step (exact in binary) */          \
    __m256 low_acc = _mm256_mul_ps(Dot::low_fold(low_sum), _mm256_set1_ps(0.25f));                               \
    const float* zs = scratch.zero_step.data() + i * d.groups;                                                     \
    int64_t g = 0;                                                                                                 \
    for (; g + 8 <= d.groups; g += 8)                                                                              \
      low_acc = _mm256_fnmadd_ps(_mm256_loadu_ps(zs + g), _mm256_loadu_ps(gs + g), low_acc);                       \
    if (g < d.groups) { /* the last groups: masked loads read nothing past either array */                         \
      const __m256i tail = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(d.groups - g)), lane_index);      \
      low_acc = _mm256_fnmadd_ps(_mm256_maskload_ps(zs + g, tail), _mm256_maskload_ps(gs + g, tail), low_acc);     \
    }                                                                                                              \
    acc[i] = low_acc;                                                                                              \
  }

#define MB_INT8_TILE_BODY                                                                                          \
  const MixedDims& d = v.d;                                                                                        \
  const int64_t chunks = d.cols / kChunk, full_pairs = chunks / 2;                                                 \
  const __m256i three = _mm256_set1_epi8(3);                                                                       \
  const __m256i half_lanes = _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);                                            \
  const uint8_t* plane[RT];                                                                                        \
  const float* cs[RT];                                                                                             \
  const float* tile_cs = tile_tables<RT>(Dot{}, v, r0, scratch);                                                  \
  for (int i = 0; i < RT; ++i) {                                                                                   \
    prefetch_row(v, r0 + i + kRowsAhead, /*plane=*/false); /* the plane: kPrefetchBytes ahead, below */            \
    plane[i] = reinterpret_cast<const uint8_t*>(v.plane2 + (r0 + i) * d.plane_words);                              \
    cs[i] = tile_cs + i * scratch.chunks;                                                                          \
  }                                                                                                                \
  for (int64_t m = 0; m < m_rows; ++m) {                                                                           \
    const int8_t* xq = a.x.data() + m * a.padded;                                                                  \
    const float* pat = a.pattern.data() + m * a.pairs * 8;                                                         \
    const int8_t* xc = a.xc.data() + m * a.padded;                                                                 \
    const float* gs = a.gsum.data() + m * d.groups;                                                                \
    __m256 acc[RT];                                                                                                \
    { MB_INT8_LOW_PASS_BODY }                                                                                      \
    int64_t p_start = 0;                                                                                           \
    MB_INT8_WIDE_PAIRS                                                                                             \
    for (int64_t p = p_start; p < a.pairs; ++p) {                                                                  \
      const int8_t* xp = xq + p * kPair;                                                                           \
      const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp));                                 \
      const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 32));                            \
      const __m256i x2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 64));                            \
      const __m256i x3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 96));                            \
      const __m256 pair_pat = _mm256_loadu_ps(pat + p * 8);                                                        \
      const bool full = p < full_pairs;                                                                            \
      for (int i = 0; i < RT; ++i) {                                                                               \
        const uint8_t* w = plane[i] + p * 32;                                                                      \
        _mm_prefetch(reinterpret_cast<const char*>(w + cpu::kPrefetchBytes), kStreamHint);                         \
        /* an odd last chunk: its upper half reads as codes 0 against zero padding */                              \
        const __m256i hi = full ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w))                          \
                                : _mm256_zextsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w)));    \
        const __m256i dot = Dot::dot4(_mm256_and_si256(hi, three), _mm256_and_si256(_mm256_srli_epi16(hi, 2), three), \
                                      _mm256_and_si256(_mm256_srli_epi16(hi, 4), three),                           \
                                      _mm256_and_si256(_mm256_srli_epi16(hi, 6), three), x0, x1, x2, x3);          \
        const __m256 steps = _mm256_permutevar8x32_ps(                                                             \
            _mm256_castps128_ps256(_mm_castsi128_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(cs[i] + 2 * p)))), \
            half_lanes);                                                                                           \
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_mul_ps(steps, pair_pat), acc[i]);                 \
      }                                                                                                            \
    }                                                                                                              \
    float* out = y + m * d.rows + r0;                                                                              \
    const float* xm = xf + m * d.cols;                                                                             \
    if constexpr (RT == 4) { /* the four rows' sums in one vector */                                               \
      const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]), _mm256_hadd_ps(acc[2], acc[3]));             \
      float sums[4];                                                                                               \
      _mm_storeu_ps(sums, _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1)));                     \
      for (int i = 0; i < RT; ++i) out[i] = sums[i] + outlier_dot_f16c(v, r0 + i, xm);                             \
    } else {                                                                                                       \
      for (int i = 0; i < RT; ++i) out[i] = hsum(acc[i]) + outlier_dot_f16c(v, r0 + i, xm);                        \
    }                                                                                                              \
  }

// AVX2 walks one pair per step; VNNI first takes two pairs per 512-bit step
// (half the instructions per weight) and leaves the last pair or half to the 256-bit loop.
#define MB_INT8_WIDE_PAIRS

template <int RT>
MB_TARGET_AVX2 void int8_tile_avx2(const MixedView& v, int64_t r0, const Int8Rows& a, const float* xf,
                                   int64_t m_rows, Int8TileScratch& scratch, float* y) {
  using Dot = DotAvx2;
  MB_INT8_TILE_BODY
}

#undef MB_INT8_WIDE_PAIRS
#define MB_INT8_WIDE_PAIRS                                                                                         \
  {                                                                                                                \
    const __m512i three512 = _mm512_set1_epi8(3);                                                                  \
    const __m512i quad_lanes = _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);                  \
    __m512 wide[RT];                                                                                               \
    for (int i = 0; i < RT; ++i) wide[i] = _mm512_setzero_ps();                                                    \
    for (; p_start + 2 <= full_pairs; p_start += 2) {                                                              \
      const int8_t* xp = xq + p_start * kPair;                                                                     \
      __m512i xs[4];                                                                                               \
      for (int s = 0; s < 4; ++s)                                                                                  \
        xs[s] = _mm512_inserti64x4(                                                                                \
            _mm512_castsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + 32 * s))),             \
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xp + kPair + 32 * s)), 1);                         \
      const __m512 quad_pat = _mm512_loadu_ps(pat + p_start * 8);                                                  \
      for (int i = 0; i < RT; ++i) {                                                                               \
        const uint8_t* w = plane[i] + p_start * 32;                                                                \
        _mm_prefetch(reinterpret_cast<const char*>(w + cpu::kPrefetchBytes), kStreamHint);                         \
        const __m512i hi = _mm512_loadu_si512(w);                                                                  \
        const __m512i d0 = cpu::dpbusd_vnni512(cpu::dpbusd_vnni512(_mm512_setzero_si512(),                         \
                                               _mm512_and_si512(hi, three512), xs[0]),                             \
                                               _mm512_and_si512(_mm512_srli_epi16(hi, 4), three512), xs[2]);       \
        const __m512i d1 = cpu::dpbusd_vnni512(cpu::dpbusd_vnni512(_mm512_setzero_si512(),                         \
                                               _mm512_and_si512(_mm512_srli_epi16(hi, 2), three512), xs[1]),       \
                                               _mm512_and_si512(_mm512_srli_epi16(hi, 6), three512), xs[3]);       \
        const __m512 steps = _mm512_permutexvar_ps(quad_lanes, _mm512_castps128_ps512(_mm_loadu_ps(cs[i] + 2 * p_start))); \
        wide[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_add_epi32(d0, d1)), _mm512_mul_ps(steps, quad_pat), wide[i]); \
      }                                                                                                            \
    }                                                                                                              \
    for (int i = 0; i < RT; ++i)                                                                                   \
      acc[i] = _mm256_add_ps(acc[i], _mm256_add_ps(_mm512_castps512_ps256(wide[i]),                                \
                                                   _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(wide[i]), 1)))); \
  }

template <int RT>
MB_TARGET_AVX512 void int8_tile_vnni(const MixedView& v, int64_t r0, const Int8Rows& a, const float* xf,
                                     int64_t m_rows, Int8TileScratch& scratch, float* y) {
  using Dot = DotVnni;
  MB_INT8_TILE_BODY
}
#undef MB_INT8_TILE_BODY
#undef MB_INT8_LOW_PASS_BODY
#undef MB_INT8_WIDE_PAIRS

// The calling thread's tile tables, reached through a call the optimizer
// cannot look into: given the thread_local itself, GCC specialized the tile
// kernels for its address and looked that up (__tls_get_addr) at every use
// inside them, about 6% of a 576x576 call's instructions (callgrind).
__attribute__((noipa)) Int8TileScratch& thread_tile_scratch() {
  static thread_local Int8TileScratch scratch;
  return scratch;
}

void int8_rows_x86(bool vnni, const MixedView& v, int64_t begin, int64_t end, const Int8Rows& a, const float* xf,
                   int64_t m_rows, float* y) {
  Int8TileScratch& scratch = thread_tile_scratch();
  scratch.prepare(v.d);
  int64_t r = begin;
  for (; r + kInt8RowTile <= end; r += kInt8RowTile) {
    if (vnni) int8_tile_vnni<kInt8RowTile>(v, r, a, xf, m_rows, scratch, y);
    else int8_tile_avx2<kInt8RowTile>(v, r, a, xf, m_rows, scratch, y);
  }
  for (; r < end; ++r) {
    if (vnni) int8_tile_vnni<1>(v, r, a, xf, m_rows, scratch, y);
    else int8_tile_avx2<1>(v, r, a, xf, m_rows, scratch, y);
  }
}
#endif

// Rows per parallel task (cpu/linear_io.h): a small layer runs on the calling thread.
inline int64_t row_grain(const MixedDims& d, int64_t m_rows) { return cpu::task_grain(d.cols * m_rows, 16); }

void linear_int8(const MixedView& v, const at::Tensor& xf, float* y) {
  const cpu::Isa isa = cpu::active_isa();
  // the calling thread's buffers, read by every task (a thread_local named
  // in the lambda would be each worker's own, empty one)
  static thread_local Int8Rows rows;
  const Int8Rows& a = rows;
  quantize_activations_pairs(xf, v.d, isa, rows);
  const float* xp = xf.data_ptr<float>();
  const int64_t m_rows = xf.size(0);
  at::parallel_for(0, v.d.rows, row_grain(v.d, m_rows), [&](int64_t begin, int64_t end) {
#if MB_HAVE_X86_KERNELS
    if (isa != cpu::Isa::Portable) return int8_rows_x86(isa == cpu::Isa::Avx512Vnni, v, begin, end, a, xp, m_rows, y);
#endif
    linear_rows_int8_portable(v, begin, end, a, xp, m_rows, y);
  });
}

// ---------------------------------------------------------------------------
// int8 GEMM (act_bits = 8, from kInt8GemmMinRows activation rows on): a panel
// of kPanelRows weight rows is decoded once into u8 codes laid out for
// vpdpbusd and reused by every activation row. Lane j of a vector is weight
// row j; its four bytes are the codes of elements 16w + 4i + s (i = 0..3) of
// word w, which is where (word >> 2s) & 0x03030303 puts them, so the panel is
// the plane's words, shifted, masked and (in 4-bit groups) joined with the
// low bits. The activations are permuted within each 16-element word to
// match: xw[16w + 4s + i] = x[16w + 4i + s]. Per block of 32 activations
// (two words, 8 dot products) the int32 sums meet the float scale
// step(row, group) * scale(activation row, block) in one FMA; the zero points
// (one small float GEMM over the groups) and the outliers are added after.
constexpr int64_t kPanelRows = 16;
constexpr int64_t kInt8GemmMinRows = 12;

struct Int8GemmActs {
  std::vector<int8_t> x;  // [m, cols] in word order
  at::Tensor scale;       // float [m, cols / 32]
  at::Tensor gsum;        // float [m, groups]: sum of the dequantized activations per group
};

Int8GemmActs quantize_activations_words(const at::Tensor& xf, const MixedDims& d) {
  const int64_t m_rows = xf.size(0), blocks = d.cols / cpu::kActBlock;
  const cpu::Int8Activations a = cpu::quantize_activations(xf, d.cols, cpu::kActBlock);
  Int8GemmActs out;
  out.x.resize(m_rows * d.cols);
  out.scale = a.scales;
  out.gsum = at::zeros({m_rows, d.groups}, xf.options());
  const int8_t* q = a.values.data_ptr<int8_t>();
  const float* sc = a.scales.data_ptr<float>();
  const int32_t* sums = a.sums.data_ptr<int32_t>();
  float* gsum = out.gsum.data_ptr<float>();
  at::parallel_for(0, m_rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int8_t* src = q + i * d.cols;
      int8_t* dst = out.x.data() + i * d.cols;
      for (int64_t w = 0; w < d.cols / kWeightsPerWord; ++w)
        for (int s = 0; s < 4; ++s)
          for (int k = 0; k < 4; ++k) dst[16 * w + 4 * s + k] = src[16 * w + 4 * k + s];
      for (int64_t b = 0; b < blocks; ++b)
        gsum[i * d.groups + b * cpu::kActBlock / d.group_size] += sc[i * blocks + b] * static_cast<float>(sums[i * blocks + b]);
    }
  });
  return out;
}


#if MB_HAVE_X86_KERNELS
// Rows [r0, r0 + n) (n <= kPanelRows; the others read as zero) into the panel:
// panel[(4w + s) * kPanelRows + j] holds row r0 + j's four codes for step
// (w, s); steps[b * kPanelRows + j] the step of its group holding block b;
// zero_step[(r0 + j) * groups + g] its zero * step per group.
// Eight rows' plane words transposed 8x8 so that each
// (w, s) of eight rows is one shift, one mask and one 32-byte store; the
// 4-bit groups' low bits are then joined row by row (a tenth of the words at
// the usual ratio_4bit).
MB_TARGET_AVX2 void pack_panel_avx2(const MixedView& v, int64_t r0, int64_t n, const uint32_t* zero_row,
                                    uint32_t* panel, float* steps, float* zero_step) {
  const MixedDims& d = v.d;
  const int64_t wpg = d.group_size / kWeightsPerWord, blocks_per_group = d.group_size / cpu::kActBlock;
  const int64_t blocks = d.cols / cpu::kActBlock;
  const __m256i m03 = _mm256_set1_epi32(0x03030303);
  for (int64_t h = 0; h < kPanelRows / 8; ++h) {
    const uint32_t* src[8];
    for (int j = 0; j < 8; ++j) src[j] = 8 * h + j < n ? v.plane2 + (r0 + 8 * h + j) * d.plane_words : zero_row;
    int64_t w0 = 0;
    for (; w0 + 8 <= d.plane_words; w0 += 8) {
      __m256i r[8], t[8], u[8];
      for (int j = 0; j < 8; ++j) r[j] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src[j] + w0));
      for (int j = 0; j < 8; j += 2) {
        t[j] = _mm256_unpacklo_epi32(r[j], r[j + 1]);
        t[j + 1] = _mm256_unpackhi_epi32(r[j], r[j + 1]);
      }
      for (int j = 0; j < 8; j += 4) {
        u[j] = _mm256_unpacklo_epi64(t[j], t[j + 2]);
        u[j + 1] = _mm256_unpackhi_epi64(t[j], t[j + 2]);
        u[j + 2] = _mm256_unpacklo_epi64(t[j + 1], t[j + 3]);
        u[j + 3] = _mm256_unpackhi_epi64(t[j + 1], t[j + 3]);
      }
      for (int i = 0; i < 8; ++i) {
        const __m256i col = i < 4 ? _mm256_permute2x128_si256(u[i], u[i + 4], 0x20)
                                  : _mm256_permute2x128_si256(u[i - 4], u[i], 0x31);
        uint32_t* dst = panel + 4 * (w0 + i) * kPanelRows + 8 * h;
        for (int s = 0; s < 4; ++s)
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + s * kPanelRows),
                              _mm256_and_si256(_mm256_srli_epi32(col, 2 * s), m03));
      }
    }
    for (; w0 < d.plane_words; ++w0)
      for (int j = 0; j < 8; ++j)
        for (int s = 0; s < 4; ++s) panel[(4 * w0 + s) * kPanelRows + 8 * h + j] = (src[j][w0] >> (2 * s)) & 0x03030303u;
  }
  std::vector<float> step(d.groups + 8);
  for (int64_t j = 0; j < kPanelRows; ++j) {
    if (j >= n) {
      for (int64_t b = 0; b < blocks; ++b) steps[b * kPanelRows + j] = 0.f;
      continue;
    }
    const int64_t r = r0 + j;
    const RowParams p = row_params_avx2(v, r);
    row_group_params_avx2(p, d.groups, step.data(), zero_step + r * d.groups);
    for (int64_t g = 0; g < d.groups; ++g)
      for (int64_t b = g * blocks_per_group; b < (g + 1) * blocks_per_group; ++b) steps[b * kPanelRows + j] = step[g];
    const uint32_t* low = v.lowbits + r * d.low_words;
    int64_t jj = 0;  // the 4-bit groups before this one
    for (int64_t word = 0; word < d.mask_words; ++word)
      for (uint32_t bits = p.mask[word]; bits != 0; bits &= bits - 1, ++jj) {
        const int64_t g = word * 32 + __builtin_ctz(bits);
        for (int64_t k = 0; k < wpg; ++k) {
          const uint32_t lo = low[jj * wpg + k];
          uint32_t* c = panel + 4 * (g * wpg + k) * kPanelRows + j;
          for (int s = 0; s < 4; ++s) c[s * kPanelRows] = (c[s * kPanelRows] << 2) | ((lo >> (2 * s)) & 0x03030303u);
        }
      }
  }
}

// Block accumulators: AVX2 adds the eight maddubs int16 results of a block of
// 32 (each at most 2 * 15 * 127, the sum at most 30480 < 32767) and widens
// once; VNNI accumulates in int32 directly.
struct GemmDotAvx2 {
  MB_TARGET_AVX2 static __m256i step(__m256i acc, __m256i codes, __m256i x) {
    return _mm256_add_epi16(acc, _mm256_maddubs_epi16(codes, x));
  }
  MB_TARGET_AVX2 static __m256i finish(__m256i acc) { return _mm256_madd_epi16(acc, _mm256_set1_epi16(1)); }
};
struct GemmDotVnni {
  MB_TARGET_AVX512 static __m256i step(__m256i acc, __m256i codes, __m256i x) {
    return cpu::dpbusd_vnni256(acc, codes, x);
  }
  MB_TARGET_AVX512 static __m256i finish(__m256i acc) { return acc; }
};

// y[m0 + i, r0 + 8 * rv0 + 8 * v + l] for i < MR, v < RV, l < 8 (columns below n_valid).
#define MB_INT8_GEMM_TILE_BODY                                                                                     \
  __m256 f[MR][RV];                                                                                                \
  for (int i = 0; i < MR; ++i)                                                                                     \
    for (int u = 0; u < RV; ++u) f[i][u] = _mm256_setzero_ps();                                                    \
  const uint32_t* pn = panel + 8 * rv0;                                                                            \
  const float* st = steps + 8 * rv0;                                                                               \
  for (int64_t b = 0; b < blocks; ++b) {                                                                           \
    __m256i acc[MR][RV];                                                                                           \
    for (int i = 0; i < MR; ++i)                                                                                   \
      for (int u = 0; u < RV; ++u) acc[i][u] = _mm256_setzero_si256();                                             \
    for (int t = 0; t < 8; ++t) {                                                                                  \
      const int64_t ts = 8 * b + t;                                                                                \
      __m256i codes[RV];                                                                                           \
      for (int u = 0; u < RV; ++u)                                                                                 \
        codes[u] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pn + ts * kPanelRows + 8 * u));             \
      for (int i = 0; i < MR; ++i) {                                                                               \
        int32_t four_x;                                                                                            \
        std::memcpy(&four_x, x + i * cols + 4 * ts, 4);                                                            \
        const __m256i xb = _mm256_set1_epi32(four_x);                                                              \
        for (int u = 0; u < RV; ++u) acc[i][u] = Dot::step(acc[i][u], codes[u], xb);                               \
      }                                                                                                            \
    }                                                                                                              \
    __m256 bs[RV];                                                                                                 \
    for (int u = 0; u < RV; ++u) bs[u] = _mm256_loadu_ps(st + b * kPanelRows + 8 * u);                             \
    for (int i = 0; i < MR; ++i) {                                                                                 \
      const __m256 as = _mm256_set1_ps(ascale[i * blocks + b]);                                                    \
      for (int u = 0; u < RV; ++u)                                                                                 \
        f[i][u] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(Dot::finish(acc[i][u])), _mm256_mul_ps(bs[u], as), f[i][u]);  \
    }                                                                                                              \
  }                                                                                                                \
  for (int i = 0; i < MR; ++i)                                                                                     \
    for (int u = 0; u < RV; ++u) {                                                                                 \
      const int64_t c0 = 8 * (rv0 + u);                                                                            \
      if (c0 + 8 <= n_valid) {                                                                                     \
        _mm256_storeu_ps(y + i * ystride + c0, f[i][u]);                                                           \
      } else {                                                                                                     \
        alignas(32) float tmp[8];                                                                                  \
        _mm256_store_ps(tmp, f[i][u]);                                                                             \
        for (int64_t l = 0; c0 + l < n_valid; ++l) y[i * ystride + c0 + l] = tmp[l];                               \
      }                                                                                                            \
    }

template <int MR, int RV>
MB_TARGET_AVX2 void int8_gemm_tile_avx2(const uint32_t* panel, const float* steps, int rv0, int64_t blocks,
                                        const int8_t* x, int64_t cols, const float* ascale, float* y,
                                        int64_t ystride, int64_t n_valid) {
  using Dot = GemmDotAvx2;
  MB_INT8_GEMM_TILE_BODY
}

template <int MR, int RV>
MB_TARGET_AVX512 void int8_gemm_tile_vnni(const uint32_t* panel, const float* steps, int rv0, int64_t blocks,
                                          const int8_t* x, int64_t cols, const float* ascale, float* y,
                                          int64_t ystride, int64_t n_valid) {
  using Dot = GemmDotVnni;
  MB_INT8_GEMM_TILE_BODY
}
#undef MB_INT8_GEMM_TILE_BODY

// Activation rows [m0, m0 + MR) against one packed panel: VNNI takes the
// panel's 16 rows at once (32 vector registers), AVX2 8 at a time.
template <int MR>
void int8_gemm_rows(bool vnni, const uint32_t* panel, const float* steps, int64_t blocks, const int8_t* x,
                    int64_t cols, const float* ascale, float* y, int64_t ystride, int64_t n_valid) {
  if (vnni) return int8_gemm_tile_vnni<MR, 2>(panel, steps, 0, blocks, x, cols, ascale, y, ystride, n_valid);
  int8_gemm_tile_avx2<MR, 1>(panel, steps, 0, blocks, x, cols, ascale, y, ystride, n_valid);
  if (n_valid > 8) int8_gemm_tile_avx2<MR, 1>(panel, steps, 1, blocks, x, cols, ascale, y, ystride, n_valid);
}

constexpr int kGemmActTile = 4;  // activation rows per register tile

void linear_int8_gemm(const MixedView& v, const at::Tensor& xf, at::Tensor& y, bool vnni) {
  const MixedDims& d = v.d;
  const Int8GemmActs a = quantize_activations_words(xf, d);
  const int64_t m_rows = xf.size(0), blocks = d.cols / cpu::kActBlock;
  auto zero_step = at::empty({d.rows, d.groups}, xf.options());
  float* yp = y.data_ptr<float>();
  float* zp = zero_step.data_ptr<float>();
  const float* ascale = a.scale.data_ptr<float>();
  const int64_t panels = (d.rows + kPanelRows - 1) / kPanelRows;
  // at least ~2 M multiply-adds per task, so small layers do not pay a fork/join for little work
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 21) / (kPanelRows * d.cols * m_rows));
  at::parallel_for(0, panels, grain, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> panel(4 * d.plane_words * kPanelRows);
    std::vector<float> steps(blocks * kPanelRows);
    const std::vector<uint32_t> zero_row(d.plane_words, 0u);
    for (int64_t pi = begin; pi < end; ++pi) {
      const int64_t r0 = pi * kPanelRows, n = std::min(kPanelRows, d.rows - r0);
      pack_panel_avx2(v, r0, n, zero_row.data(), panel.data(), steps.data(), zp);
      for (int64_t m0 = 0; m0 < m_rows; m0 += kGemmActTile) {
        const int8_t* x = a.x.data() + m0 * d.cols;
        const float* as = ascale + m0 * blocks;
        float* yt = yp + m0 * d.rows + r0;
        switch (std::min<int64_t>(kGemmActTile, m_rows - m0)) {
          case 1: int8_gemm_rows<1>(vnni, panel.data(), steps.data(), blocks, x, d.cols, as, yt, d.rows, n); break;
          case 2: int8_gemm_rows<2>(vnni, panel.data(), steps.data(), blocks, x, d.cols, as, yt, d.rows, n); break;
          case 3: int8_gemm_rows<3>(vnni, panel.data(), steps.data(), blocks, x, d.cols, as, yt, d.rows, n); break;
          default: int8_gemm_rows<4>(vnni, panel.data(), steps.data(), blocks, x, d.cols, as, yt, d.rows, n); break;
        }
      }
    }
  });
  // zero points: y -= gsum @ zero_step.T (a float GEMM over the groups)
  y.addmm_(a.gsum, zero_step.t(), 1.0, -1.0);
  // outliers against the exact activations: for each, a row of x.T scaled into a row of y.T
  if (v.rowptr[d.rows] > 0) {
    const auto xt = xf.t().contiguous();
    auto extra = at::zeros({d.rows, m_rows}, xf.options());
    const float* xtp = xt.data_ptr<float>();
    float* ep = extra.data_ptr<float>();
    at::parallel_for(0, d.rows, 64, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        for (int32_t e = v.rowptr[r]; e < v.rowptr[r + 1]; ++e) {
          const float val = static_cast<float>(v.vals[e]);
          const float* xc = xtp + static_cast<int64_t>(v.cols[e]) * m_rows;
          float* er = ep + r * m_rows;
          for (int64_t i = 0; i < m_rows; ++i) er[i] += val * xc[i];
        }
    });
    y.add_(extra.t());
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
                            const c10::optional<at::Tensor>& bias, int64_t group_size, int64_t act_bits) {
  const MixedDims d = check_mixed_args(plane2, lowbits, meta, mask, row_scale, rowptr, cols, vals, group_size);
  check_activation(x, d, bias, plane2);
  MB_CHECK(act_bits == 0 || act_bits == 8, "'act_bits' must be 0 (exact float) or 8, got ", act_bits);
  const auto xf = cpu::float_rows(x, d.cols);
  const int64_t m_rows = xf.size(0);
  auto y = at::empty({m_rows, d.rows}, xf.options());
  if (m_rows > 0 && d.rows > 0) {
    const MixedView v = make_view(plane2, lowbits, meta, mask, row_scale, rowptr, cols, vals, d);
    const float* xp = xf.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    const bool int8 = act_bits == 8 && d.group_size % kChunk == 0;
    const cpu::Isa isa = cpu::active_isa();
    if (int8 && m_rows >= kInt8GemmMinRows && isa != cpu::Isa::Portable) {
#if MB_HAVE_X86_KERNELS
      linear_int8_gemm(v, xf, y, isa == cpu::Isa::Avx512Vnni);
#endif
    } else if (int8) {
      linear_int8(v, xf, yp);
    } else if (m_rows >= kGemmMinRows) {
      linear_rows_gemm(v, xf, y);
    } else if (use_avx2()) {
#if defined(__x86_64__)
      // Group sums of x, by hand: at::sum's dispatch costs more than the sums
      // for the small layers that dominate a 135M-parameter model.
      std::vector<float> xsum(m_rows * d.groups);
      group_sums_avx2(xp, m_rows * d.groups, d.group_size, xsum.data());
      const float* sp = xsum.data();
      at::parallel_for(0, d.rows, row_grain(d, m_rows), [&](int64_t begin, int64_t end) {
        linear_rows_avx2(v, begin, end, xp, sp, m_rows, yp);
      });
#endif
    } else {
      at::parallel_for(0, d.rows, row_grain(d, m_rows), [&](int64_t begin, int64_t end) {
        linear_rows_generic(v, begin, end, xp, m_rows, yp);
      });
    }
  }
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  return cpu::linear_result(y, x, d.rows);
}

}  // namespace

TORCH_LIBRARY_IMPL(memboost, CPU, m) {
  m.impl("mixed_dequantize", &mixed_dequantize_cpu);
  m.impl("mixed_linear", &mixed_linear_cpu);
}

}  // namespace mixed
}  // namespace memboost
