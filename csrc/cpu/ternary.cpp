// CPU kernels of the ternary (BitNet b1.58) format; layout in common/trits.h.
//
// ternary_linear, act_bits=8 (W1.58A8, the way bitnet.cpp's I2_S and
// llama.cpp's TQ2_0 kernels work): each activation row is quantized to int8
// with one scale (cpu/int8/act_quant.h), then per group of columns
//   sum_k (c_k - 1) q_k = sum_k c_k q_k - sum_k q_k
// with the unsigned 2-bit codes c_k multiplied against the int8 q_k by
// maddubs (AVX2) or vpdpbusd (AVX-512 VNNI), and the block sums of q
// subtracting the offset once per group. y = x_scale * sum_g s_g * dot_g.
// Four weight rows are processed together so each activation load serves
// four rows; the integer accumulators stay in registers; the int8 results are
// exact, so every ISA path returns the same bits up to the float sum over
// groups. act_bits=0: the exact float path, batch < 32: trits converted to
// float in registers and FMA'd with float32 x, four rows per activation load
// (AVX2; the portable path decodes a row into an L1 buffer), s applied per
// group; from batch 32 blocks of rows decoded for ATen's GEMM
// (cpu/decoded_gemm.h).
//
// lort_linear: the same product plus the low-rank part (x @ B) @ A.T read
// from the float16 factors (cpu/low_rank.h), one call for a LoRT layer.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <vector>

#include "common/ternary_args.h"
#include "cpu/decoded_gemm.h"
#include "cpu/int8/act_quant.h"
#include "cpu/int8/dot.h"
#include "cpu/int8/isa.h"
#include "cpu/linear_io.h"
#include "cpu/low_rank.h"

namespace memboost {
namespace ternary {
namespace {

#define MB_INLINE inline __attribute__((always_inline))

constexpr int kRowTile = 4;          // weight rows sharing each activation load
// A tile's rows are contiguous, so while chunk c of row i is read, the byte
// cpu::kPrefetchBytes further on (a later tile) is requested.
constexpr int64_t kGemmMinRows = 32;  // exact path: decoded blocks + GEMM from this batch on

struct WeightView {
  const uint8_t* packed;
  const float* scales;
  TernaryDims d;
  MB_INLINE const uint8_t* row(int64_t r) const { return packed + r * d.row_bytes; }
  MB_INLINE const float* row_scales(int64_t r) const { return scales + trits::scale_offset(r, d.scale_rows, d.groups); }
};

WeightView make_view(const at::Tensor& packed, const at::Tensor& scales, const TernaryDims& d) {
  return WeightView{packed.data_ptr<uint8_t>(), scales.data_ptr<float>(), d};
}

// ---------------------------------------------------------------------------
// Decoding to float (dequantize, exact path). Plain loops over the 32 bytes
// of a chunk: they vectorize with whatever instruction set the caller is
// compiled for (inlined into the AVX2 functions below, they use AVX2).

// Row r as floats s_g * t over the padded width (padding decodes to 0).
MB_INLINE void decode_row_float(const WeightView& v, int64_t r, float* out) {
  const uint8_t* row = v.row(r);
  const float* s = v.row_scales(r);
  const int64_t cpg = v.d.chunks_per_group;
  for (int64_t c = 0; c < v.d.chunks; ++c) {
    const float scale = s[c / cpg];
    const uint8_t* b = row + c * trits::kChunkBytes;
    float* o = out + c * trits::kChunkTrits;
    for (int sh = 0; sh < 4; ++sh)
      for (int m = 0; m < trits::kChunkBytes; ++m)
        o[32 * sh + m] = scale * static_cast<float>(static_cast<int>((b[m] >> (2 * sh)) & 3u) - 1);
  }
}

MB_INLINE float dot_f32(const float* a, const float* b, int64_t n) {
  // Eight partial sums so the loop vectorizes without -ffast-math.
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * b[i + l];
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Portable exact path: each row decoded once into an L1-resident buffer and
// reused for every activation row.
void exact_rows_portable(const WeightView& v, int64_t begin, int64_t end, const float* x, int64_t m_rows, float* y) {
  std::vector<float> row(trits::padded_cols(v.d.cols));
  for (int64_t r = begin; r < end; ++r) {
    decode_row_float(v, r, row.data());
    for (int64_t m = 0; m < m_rows; ++m) y[m * v.d.rows + r] = dot_f32(row.data(), x + m * v.d.cols, v.d.cols);
  }
}

#if MB_HAVE_X86_KERNELS
// 32 trits (int8 -1, 0, 1) as four vectors of 8 floats.
MB_TARGET_AVX2 MB_INLINE void trits_to_float(__m256i t, __m256 (&f)[4]) {
  const __m128i lo = _mm256_castsi256_si128(t), hi = _mm256_extracti128_si256(t, 1);
  f[0] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(lo));
  f[1] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(lo, 8)));
  f[2] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(hi));
  f[3] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(hi, 8)));
}

// The 32 trits at shift 2*sh of a chunk's 32 bytes: code - 1, as int8.
MB_TARGET_AVX2 MB_INLINE __m256i chunk_trits(__m256i bytes, int sh) {
  const __m256i codes = _mm256_and_si256(_mm256_srli_epi16(bytes, 2 * sh), _mm256_set1_epi8(3));
  return _mm256_sub_epi8(codes, _mm256_set1_epi8(1));
}

MB_TARGET_AVX2 MB_INLINE float hsum_ps(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
  return _mm_cvtss_f32(s);
}

// Exact path, AVX2+FMA, float32 activations padded to whole chunks: per group
// s * sum_k t_k x_k, the trits converted to float in registers (never
// stored; t itself, not the code, so the sum rounds like the dequantized
// product's), four weight rows sharing each activation load.
template <int RT>
MB_TARGET_AVX2 void exact_tile_avx2(const WeightView& v, int64_t r0, const float* x, int64_t xstride,
                                    int64_t m_rows, float* y) {
  const uint8_t* w[RT];
  const float* s[RT];
  for (int i = 0; i < RT; ++i) {
    w[i] = v.row(r0 + i);
    s[i] = v.row_scales(r0 + i);
  }
  // Prefetching past the weight's end is harmless (a hint, never a fault).
  const int64_t prefetch = cpu::kPrefetchBytes;
  for (int64_t m = 0; m < m_rows; ++m) {
    const float* xm = x + m * xstride;
    float out[RT];
    for (int i = 0; i < RT; ++i) out[i] = 0.f;
    for (int64_t g = 0; g < v.d.groups; ++g) {
      const int64_t c0 = g * v.d.chunks_per_group, c1 = std::min(c0 + v.d.chunks_per_group, v.d.chunks);
      __m256 acc[RT];
      for (int i = 0; i < RT; ++i) acc[i] = _mm256_setzero_ps();
      for (int64_t c = c0; c < c1; ++c) {
        __m256i b[RT];
        for (int i = 0; i < RT; ++i) {
          _mm_prefetch(reinterpret_cast<const char*>(w[i] + c * trits::kChunkBytes + prefetch), _MM_HINT_T0);
          b[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[i] + c * trits::kChunkBytes));
        }
        for (int sh = 0; sh < 4; ++sh) {
          const float* xc = xm + c * trits::kChunkTrits + 32 * sh;
          const __m256 x0 = _mm256_loadu_ps(xc), x1 = _mm256_loadu_ps(xc + 8), x2 = _mm256_loadu_ps(xc + 16),
                       x3 = _mm256_loadu_ps(xc + 24);
          for (int i = 0; i < RT; ++i) {
            __m256 f[4];
            trits_to_float(chunk_trits(b[i], sh), f);
            acc[i] = _mm256_fmadd_ps(f[0], x0, acc[i]);
            acc[i] = _mm256_fmadd_ps(f[1], x1, acc[i]);
            acc[i] = _mm256_fmadd_ps(f[2], x2, acc[i]);
            acc[i] = _mm256_fmadd_ps(f[3], x3, acc[i]);
          }
        }
      }
      for (int i = 0; i < RT; ++i) out[i] += s[i][g] * hsum_ps(acc[i]);
    }
    for (int i = 0; i < RT; ++i) y[m * v.d.rows + r0 + i] = out[i];
  }
}

void exact_rows_avx2(const WeightView& v, int64_t begin, int64_t end, const float* x, int64_t xstride,
                     int64_t m_rows, float* y) {
  int64_t r = begin;
  for (; r + kRowTile <= end; r += kRowTile) exact_tile_avx2<kRowTile>(v, r, x, xstride, m_rows, y);
  for (; r < end; ++r) exact_tile_avx2<1>(v, r, x, xstride, m_rows, y);
}

// Row r as floats s_g * t over the padded width, AVX2.
MB_TARGET_AVX2 void decode_row_avx2(const WeightView& v, int64_t r, float* out) {
  const uint8_t* row = v.row(r);
  const float* s = v.row_scales(r);
  for (int64_t c = 0; c < v.d.chunks; ++c) {
    const __m256 scale = _mm256_set1_ps(s[c / v.d.chunks_per_group]);
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c * trits::kChunkBytes));
    float* o = out + c * trits::kChunkTrits;
    for (int sh = 0; sh < 4; ++sh) {
      __m256 f[4];
      trits_to_float(chunk_trits(b, sh), f);
      for (int j = 0; j < 4; ++j) _mm256_storeu_ps(o + 32 * sh + 8 * j, _mm256_mul_ps(scale, f[j]));
    }
  }
}

void decode_rows_avx2(const WeightView& v, int64_t begin, int64_t end, float* out, int64_t first) {
  const int64_t padded = trits::padded_cols(v.d.cols);
  if (padded == v.d.cols) {
    for (int64_t r = begin; r < end; ++r) decode_row_avx2(v, r, out + (r - first) * v.d.cols);
    return;
  }
  std::vector<float> row(padded);
  for (int64_t r = begin; r < end; ++r) {
    decode_row_avx2(v, r, row.data());
    std::copy(row.begin(), row.begin() + v.d.cols, out + (r - first) * v.d.cols);
  }
}
#endif

void decode_rows_portable(const WeightView& v, int64_t begin, int64_t end, float* out, int64_t first) {
  std::vector<float> row(trits::padded_cols(v.d.cols));
  for (int64_t r = begin; r < end; ++r) {
    decode_row_float(v, r, row.data());
    std::copy(row.begin(), row.begin() + v.d.cols, out + (r - first) * v.d.cols);
  }
}

void decode_rows(const WeightView& v, int64_t begin, int64_t end, float* out, int64_t first) {
#if MB_HAVE_X86_KERNELS
  if (cpu::active_isa() != cpu::Isa::Portable) return decode_rows_avx2(v, begin, end, out, first);
#endif
  decode_rows_portable(v, begin, end, out, first);
}

// ---------------------------------------------------------------------------
// int8 path. Everything one tile of weight rows needs about the activations.
struct Int8Acts {
  const int8_t* q;       // [m_rows, padded] int8, zero past cols
  const float* scale;    // [m_rows]
  const int32_t* gsum;   // [m_rows, groups]: sum of q over each group's columns
  int64_t padded, m_rows;
};

// y[m, r] for one row and one activation row, any ISA: the portable kernel.
MB_INLINE float int8_row_portable(const WeightView& v, int64_t r, const int8_t* q, const int32_t* gsum) {
  const uint8_t* row = v.row(r);
  const float* s = v.row_scales(r);
  float y = 0.f;
  for (int64_t g = 0; g < v.d.groups; ++g) {
    const int64_t c0 = g * v.d.chunks_per_group, c1 = std::min(c0 + v.d.chunks_per_group, v.d.chunks);
    int32_t acc = 0;
    for (int64_t c = c0; c < c1; ++c) {
      const uint8_t* b = row + c * trits::kChunkBytes;
      const int8_t* qc = q + c * trits::kChunkTrits;
      for (int sh = 0; sh < 4; ++sh)
        for (int m = 0; m < trits::kChunkBytes; ++m)
          acc += static_cast<int32_t>((b[m] >> (2 * sh)) & 3u) * static_cast<int32_t>(qc[32 * sh + m]);
    }
    y += s[g] * static_cast<float>(acc - gsum[g]);
  }
  return y;
}

void int8_rows_portable(const WeightView& v, int64_t begin, int64_t end, const Int8Acts& a, float* y) {
  for (int64_t r = begin; r < end; ++r)
    for (int64_t m = 0; m < a.m_rows; ++m)
      y[m * v.d.rows + r] = a.scale[m] * int8_row_portable(v, r, a.q + m * a.padded, a.gsum + m * v.d.groups);
}

#if MB_HAVE_X86_KERNELS
// AVX2: maddubs gives int16 sums of two code * q products (|.| <= 2 * 2 * 127);
// four of them per chunk (<= 2032) are added in int16 for up to
// kInt16Chunks chunks (<= 16256 < 32767) before one madd widens them to int32.
constexpr int64_t kInt16Chunks = 8;

template <int RT>
MB_TARGET_AVX2 void int8_tile_avx2(const WeightView& v, int64_t r0, const Int8Acts& a, float* y) {
  const __m256i three = _mm256_set1_epi8(3);
  const __m256i ones = _mm256_set1_epi16(1);
  const uint8_t* w[RT];
  const float* s[RT];
  for (int i = 0; i < RT; ++i) {
    w[i] = v.row(r0 + i);
    s[i] = v.row_scales(r0 + i);
  }
  // Prefetching past the weight's end is harmless (a hint, never a fault).
  const int64_t prefetch = cpu::kPrefetchBytes;
  for (int64_t m = 0; m < a.m_rows; ++m) {
    const int8_t* q = a.q + m * a.padded;
    const int32_t* gsum = a.gsum + m * v.d.groups;
    float out[RT];
    for (int i = 0; i < RT; ++i) out[i] = 0.f;
    for (int64_t g = 0; g < v.d.groups; ++g) {
      const int64_t c0 = g * v.d.chunks_per_group, c1 = std::min(c0 + v.d.chunks_per_group, v.d.chunks);
      __m256i acc[RT];
      for (int i = 0; i < RT; ++i) acc[i] = _mm256_setzero_si256();
      for (int64_t cb = c0; cb < c1; cb += kInt16Chunks) {
        const int64_t ce = std::min(cb + kInt16Chunks, c1);
        __m256i acc16[RT];
        for (int i = 0; i < RT; ++i) acc16[i] = _mm256_setzero_si256();
        for (int64_t c = cb; c < ce; ++c) {
          const int8_t* qc = q + c * trits::kChunkTrits;
          const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qc));
          const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qc + 32));
          const __m256i x2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qc + 64));
          const __m256i x3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qc + 96));
          for (int i = 0; i < RT; ++i) {
            _mm_prefetch(reinterpret_cast<const char*>(w[i] + c * trits::kChunkBytes + prefetch), _MM_HINT_T0);
            const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[i] + c * trits::kChunkBytes));
            const __m256i p0 = _mm256_maddubs_epi16(_mm256_and_si256(b, three), x0);
            const __m256i p1 = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(b, 2), three), x1);
            const __m256i p2 = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(b, 4), three), x2);
            const __m256i p3 = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(b, 6), three), x3);
            acc16[i] = _mm256_add_epi16(acc16[i], _mm256_add_epi16(_mm256_add_epi16(p0, p1), _mm256_add_epi16(p2, p3)));
          }
        }
        for (int i = 0; i < RT; ++i) acc[i] = _mm256_add_epi32(acc[i], _mm256_madd_epi16(acc16[i], ones));
      }
      for (int i = 0; i < RT; ++i) out[i] += s[i][g] * static_cast<float>(cpu::hsum_epi32_avx2(acc[i]) - gsum[g]);
    }
    for (int i = 0; i < RT; ++i) y[m * v.d.rows + r0 + i] = a.scale[m] * out[i];
  }
}

// AVX-512 VNNI: vpdpbusd multiplies and accumulates in int32 in one
// instruction. 256-bit vectors: the same chunk walk as AVX2 (a chunk is 32
// bytes), and on the AMD cores this targets a 512-bit vpdpbusd issues as two
// 256-bit halves anyway. Two accumulators per row keep eight independent
// dependency chains in flight.
template <int RT>
MB_TARGET_AVX512 void int8_tile_vnni(const WeightView& v, int64_t r0, const Int8Acts& a, float* y) {
  const __m256i three = _mm256_set1_epi8(3);
  const uint8_t* w[RT];
  const float* s[RT];
  for (int i = 0; i < RT; ++i) {
    w[i] = v.row(r0 + i);
    s[i] = v.row_scales(r0 + i);
  }
  // Prefetching past the weight's end is harmless (a hint, never a fault).
  const int64_t prefetch = cpu::kPrefetchBytes;
  for (int64_t m = 0; m < a.m_rows; ++m) {
    const int8_t* q = a.q + m * a.padded;
    const int32_t* gsum = a.gsum + m * v.d.groups;
    float out[RT];
    for (int i = 0; i < RT; ++i) out[i] = 0.f;
    for (int64_t g = 0; g < v.d.groups; ++g) {
      const int64_t c0 = g * v.d.chunks_per_group, c1 = std::min(c0 + v.d.chunks_per_group, v.d.chunks);
      __m256i acc[RT], acc_b[RT];
      for (int i = 0; i < RT; ++i) acc[i] = acc_b[i] = _mm256_setzero_si256();
      for (int64_t c = c0; c < c1; ++c) {
        const int8_t* qc = q + c * trits::kChunkTrits;
        const __m256i x0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qc));
        const __m256i x1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qc + 32));
        const __m256i x2 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qc + 64));
        const __m256i x3 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qc + 96));
        for (int i = 0; i < RT; ++i) {
          _mm_prefetch(reinterpret_cast<const char*>(w[i] + c * trits::kChunkBytes + prefetch), _MM_HINT_T0);
          const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[i] + c * trits::kChunkBytes));
          acc[i] = cpu::dpbusd_vnni256(acc[i], _mm256_and_si256(b, three), x0);
          acc_b[i] = cpu::dpbusd_vnni256(acc_b[i], _mm256_and_si256(_mm256_srli_epi16(b, 2), three), x1);
          acc[i] = cpu::dpbusd_vnni256(acc[i], _mm256_and_si256(_mm256_srli_epi16(b, 4), three), x2);
          acc_b[i] = cpu::dpbusd_vnni256(acc_b[i], _mm256_and_si256(_mm256_srli_epi16(b, 6), three), x3);
        }
      }
      for (int i = 0; i < RT; ++i)
        out[i] += s[i][g] * static_cast<float>(cpu::hsum_epi32_avx2(_mm256_add_epi32(acc[i], acc_b[i])) - gsum[g]);
    }
    for (int i = 0; i < RT; ++i) y[m * v.d.rows + r0 + i] = a.scale[m] * out[i];
  }
}

void int8_rows_avx2(const WeightView& v, int64_t begin, int64_t end, const Int8Acts& a, float* y) {
  int64_t r = begin;
  for (; r + kRowTile <= end; r += kRowTile) int8_tile_avx2<kRowTile>(v, r, a, y);
  for (; r < end; ++r) int8_tile_avx2<1>(v, r, a, y);
}

void int8_rows_vnni(const WeightView& v, int64_t begin, int64_t end, const Int8Acts& a, float* y) {
  int64_t r = begin;
  for (; r + kRowTile <= end; r += kRowTile) int8_tile_vnni<kRowTile>(v, r, a, y);
  for (; r < end; ++r) int8_tile_vnni<1>(v, r, a, y);
}
#endif

// ---------------------------------------------------------------------------
// Ops.

at::Tensor ternary_pack_cpu(const at::Tensor& trits_in) {
  const auto sizes = packed_sizes(trits_in);
  auto out = at::empty(sizes, trits_in.options().dtype(at::kByte));
  const auto t = trits_in.contiguous();
  const int64_t cols = t.size(-1), row_bytes = sizes.back();
  const int64_t rows = cols ? t.numel() / cols : 0;
  const int8_t* src = t.data_ptr<int8_t>();
  uint8_t* dst = out.data_ptr<uint8_t>();
  std::atomic<bool> bad{false};
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int8_t* row = src + r * cols;
      bool row_bad = false;
      for (int64_t k = 0; k < cols; ++k) row_bad |= (row[k] < -1 || row[k] > 1);
      if (row_bad) bad = true;
      for (int64_t c = 0; c * trits::kChunkTrits < cols; ++c) {
        const int count = static_cast<int>(std::min<int64_t>(trits::kChunkTrits, cols - c * trits::kChunkTrits));
        trits::pack_chunk(row + c * trits::kChunkTrits, count, dst + r * row_bytes + c * trits::kChunkBytes);
      }
    }
  });
  MB_CHECK(!bad.load(), "'trits' must hold only -1, 0 and +1");
  return out;
}

at::Tensor ternary_unpack_cpu(const at::Tensor& packed, int64_t cols) {
  const auto sizes = unpacked_sizes(packed, cols);
  auto out = at::empty(sizes, packed.options().dtype(at::kChar));
  const auto p = packed.contiguous();
  const int64_t row_bytes = p.size(-1), rows = out.numel() / cols;
  const uint8_t* src = p.data_ptr<uint8_t>();
  int8_t* dst = out.data_ptr<int8_t>();
  at::parallel_for(0, rows, 64, [&](int64_t begin, int64_t end) {
    int8_t chunk[trits::kChunkTrits];
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t c = 0; c * trits::kChunkTrits < cols; ++c) {
        trits::unpack_chunk(src + r * row_bytes + c * trits::kChunkBytes, chunk);
        const int64_t count = std::min<int64_t>(trits::kChunkTrits, cols - c * trits::kChunkTrits);
        std::copy(chunk, chunk + count, dst + r * cols + c * trits::kChunkTrits);
      }
    }
  });
  return out;
}

at::Tensor ternary_dequantize_cpu(const at::Tensor& packed, const at::Tensor& scales, int64_t cols,
                                  int64_t group_size, at::ScalarType dtype) {
  const TernaryDims d = check_ternary_args(packed, scales, cols, group_size);
  MB_CHECK_FLOAT_DTYPE(dtype, "dtype");
  auto out = at::empty({d.rows, d.cols}, packed.options().dtype(at::kFloat));
  if (d.rows > 0) {
    const WeightView v = make_view(packed, scales, d);
    float* o = out.data_ptr<float>();
    at::parallel_for(0, d.rows, 16, [&](int64_t begin, int64_t end) { decode_rows(v, begin, end, o, 0); });
  }
  return dtype == at::kFloat ? out : out.to(dtype);
}

// xf float32 [M, cols] -> y = xf @ W.T, float32 [M, rows], no bias.
at::Tensor ternary_product(const at::Tensor& xf, const at::Tensor& packed, const at::Tensor& scales,
                           const TernaryDims& d, int64_t act_bits) {
  const int64_t m_rows = xf.size(0);
  auto y = at::empty({m_rows, d.rows}, xf.options());
  if (m_rows > 0 && d.rows > 0) {
    const WeightView v = make_view(packed, scales, d);
    float* yp = y.data_ptr<float>();
    const cpu::Isa isa = cpu::active_isa();
    // Blocks of kRowTile rows per task; small layers stay on the calling thread (cpu/linear_io.h).
    const int64_t grain = cpu::task_grain(d.cols * m_rows, kRowTile);
    if (act_bits == 8) {
      // Plain buffers: at batch 1 three at::empty cost more than quantizing the row.
      const int64_t padded = trits::padded_cols(d.cols), blocks = padded / cpu::kActBlock;
      std::vector<int8_t> q(m_rows * padded);
      std::vector<float> xs(m_rows);
      std::vector<int32_t> sums(m_rows * blocks);
      cpu::quantize_activations_into(isa != cpu::Isa::Portable, xf.data_ptr<float>(), m_rows, d.cols, padded, 0,
                                     q.data(), xs.data(), sums.data());
      // Per-group sums of q from the 32-column block sums.
      std::vector<int32_t> gsum(m_rows * d.groups, 0);
      const int64_t blocks_per_group = d.chunks_per_group * (trits::kChunkTrits / cpu::kActBlock);
      for (int64_t m = 0; m < m_rows; ++m)
        for (int64_t b = 0; b < blocks; ++b) gsum[m * d.groups + b / blocks_per_group] += sums[m * blocks + b];
      const Int8Acts a{q.data(), xs.data(), gsum.data(), padded, m_rows};
      at::parallel_for(0, (d.rows + kRowTile - 1) / kRowTile, std::max<int64_t>(1, grain / kRowTile),
                       [&](int64_t b0, int64_t b1) {
        const int64_t begin = b0 * kRowTile, end = std::min(d.rows, b1 * kRowTile);
#if MB_HAVE_X86_KERNELS
        if (isa == cpu::Isa::Avx512Vnni) return int8_rows_vnni(v, begin, end, a, yp);
        if (isa == cpu::Isa::Avx2) return int8_rows_avx2(v, begin, end, a, yp);
#endif
        int8_rows_portable(v, begin, end, a, yp);
      });
    } else if (m_rows >= kGemmMinRows) {
      cpu::linear_decoded_blocks(d.rows, d.cols, xf, y, [&](int64_t begin, int64_t end, float* out, int64_t r0) {
        decode_rows(v, begin, end, out, r0);
      });
    } else {
#if MB_HAVE_X86_KERNELS
      if (isa != cpu::Isa::Portable) {
        // x padded to whole chunks with zeros, so whole chunks can be read
        const int64_t padded = trits::padded_cols(d.cols);
        // (by hand: at::constant_pad_nd costs more than a small layer's kernel)
        at::Tensor xp_t = xf;
        if (padded != d.cols) {
          xp_t = at::empty({m_rows, padded}, xf.options());
          const float* src = xf.data_ptr<float>();
          float* dst = xp_t.data_ptr<float>();
          for (int64_t m = 0; m < m_rows; ++m) {
            std::copy(src + m * d.cols, src + (m + 1) * d.cols, dst + m * padded);
            std::fill(dst + m * padded + d.cols, dst + (m + 1) * padded, 0.f);
          }
        }
        const float* xp = xp_t.data_ptr<float>();
        at::parallel_for(0, (d.rows + kRowTile - 1) / kRowTile, std::max<int64_t>(1, grain / kRowTile),
                         [&](int64_t b0, int64_t b1) {
          exact_rows_avx2(v, b0 * kRowTile, std::min(d.rows, b1 * kRowTile), xp, padded, m_rows, yp);
        });
      } else
#endif
      {
        const float* xp = xf.data_ptr<float>();
        at::parallel_for(0, d.rows, grain, [&](int64_t begin, int64_t end) {
          exact_rows_portable(v, begin, end, xp, m_rows, yp);
        });
      }
    }
  }
  return y;
}

at::Tensor ternary_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                              const c10::optional<at::Tensor>& bias, int64_t cols, int64_t group_size,
                              int64_t act_bits) {
  const TernaryDims d = check_ternary_linear_args(x, packed, scales, bias, cols, group_size, act_bits);
  auto y = ternary_product(cpu::float_rows(x, d.cols), packed, scales, d, act_bits);
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  return cpu::linear_result(y, x, d.rows);
}

// LoRT: the ternary product plus (x @ B) @ A.T from the float16 factors
// (cpu/low_rank.h), in float32 until the one conversion to x's dtype.
at::Tensor lort_linear_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& alpha,
                           const at::Tensor& a, const at::Tensor& b, const c10::optional<at::Tensor>& bias,
                           int64_t cols, int64_t act_bits) {
  int64_t rank = 0;
  const TernaryDims d = check_lort_args(x, packed, alpha, a, b, bias, cols, act_bits, &rank);
  const auto xf = cpu::float_rows(x, d.cols);
  auto y = ternary_product(xf, packed, alpha, d, act_bits);
  if (rank > 0) cpu::add_low_rank_rows(xf, a, b, y);
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  return cpu::linear_result(y, x, d.rows);
}

}  // namespace

TORCH_LIBRARY_IMPL(memboost, CPU, m) {
  m.impl("ternary_pack", &ternary_pack_cpu);
  m.impl("ternary_unpack", &ternary_unpack_cpu);
  m.impl("ternary_dequantize", &ternary_dequantize_cpu);
  m.impl("ternary_linear", &ternary_linear_cpu);
  m.impl("lort_linear", &lort_linear_cpu);
}

}  // namespace ternary
}  // namespace memboost
