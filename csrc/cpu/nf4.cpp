// CPU kernels of NF4 (layout and rounding: csrc/common/nf4.h).
//
// nf4_linear, fewer than kGemmMinRows activation rows:
//  - act_bits = 0, exact float path: codes are looked up in the float
//    codebook held in registers (AVX-512: one vpermps over 16 entries; AVX2:
//    two 8-entry vpermps and a blend), multiplied with x by FMA and scaled
//    once per block. x is first reordered per 32-chunk into its even and odd
//    elements, so the high and low nibbles of a byte meet their activations
//    without any shuffle.
//  - act_bits = 8, integer path (llama.cpp's IQ4_NL recipe): x is quantized
//    per row to int8 (cpu/int8/act_quant.h), the codebook scaled to int8 sits
//    in a register and pshufb looks 32 (AVX2) or 64 (AVX-512) nibbles up at
//    once; AVX2 multiplies signed by signed with the sign trick + maddubs,
//    AVX-512 VNNI offsets the codebook by 128 to unsigned for vpdpbusd and
//    starts each block's int32 dot product from -128 * sum(x) per lane
//    (block_offsets_vnni, once per call), so the offset costs nothing per weight.
//  - both: block scales (double quantization decoded) come from a small
//    buffer filled 8 at a time per run of rows (with_row_scales); the code
//    stream is prefetched cpu::kPrefetchBytes ahead.
// From kGemmMinRows rows on, blocks of weight rows are decoded into a
// cache-sized float buffer and multiplied with ATen's GEMM.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "common/nf4_args.h"
#include "cpu/int8/act_quant.h"
#include "cpu/int8/dot.h"
#include "cpu/int8/isa.h"
#include "cpu/linear_io.h"

namespace memboost {
namespace nf4 {
namespace {

struct View {
  const uint8_t* codes;
  const float* absmax_f;   // plain
  const uint8_t* absmax_q;  // double quantization
  const float* nested;
  const float* map;
  float offset;
  Nf4Dims d;
  int nested_shift;  // log2(nested_block_size) when a power of two (always, in practice), else -1

  // A 64-bit division per block would cost more than decoding the block.
  float scale(int64_t block) const {
    if (!d.double_quant) return absmax_f[block];
    const int64_t outer = nested_shift >= 0 ? block >> nested_shift : block / d.nested_block_size;
    return nested_scale(map, absmax_q[block], nested[outer], offset);
  }
};

View make_view(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& nested_absmax,
               const at::Tensor& nested_map, const at::Tensor& nested_offset, const Nf4Dims& d) {
  View v{codes.data_ptr<uint8_t>(), nullptr, nullptr, nullptr, nullptr, 0.f, d, -1};
  if ((d.nested_block_size & (d.nested_block_size - 1)) == 0) {
    v.nested_shift = 0;
    while ((int64_t(1) << v.nested_shift) < d.nested_block_size) ++v.nested_shift;
  }
  if (d.double_quant) {
    v.absmax_q = absmax.data_ptr<uint8_t>();
    v.nested = nested_absmax.data_ptr<float>();
    v.map = nested_map.data_ptr<float>();
    v.offset = nested_offset.data_ptr<float>()[0];
  } else {
    v.absmax_f = absmax.data_ptr<float>();
  }
  return v;
}

// Elements [begin, end) of the flattened weight as float32.
void decode_range(const View& v, int64_t begin, int64_t end, float* out) {
  int64_t e = begin;
  while (e < end) {
    const int64_t block = e / v.d.block_size;
    const int64_t stop = std::min(end, (block + 1) * v.d.block_size);
    const float s = v.scale(block);
    for (; e < stop; ++e) *out++ = codebook(code_at(v.codes, e)) * s;
  }
}

template <typename T>
void dequantize_into(const View& v, T* out) {
  const int64_t bs = v.d.block_size;
  at::parallel_for(0, v.d.blocks, std::max<int64_t>(1, 16384 / bs), [&](int64_t b0, int64_t b1) {
    float buf[256];
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = b * bs, end = std::min(v.d.numel, begin + bs);
      for (int64_t e0 = begin; e0 < end; e0 += 256) {
        const int64_t e1 = std::min(end, e0 + 256);
        decode_range(v, e0, e1, buf);
        for (int64_t e = e0; e < e1; ++e) out[e] = static_cast<T>(buf[e - e0]);
      }
    }
  });
}

// ---------------------------------------------------------------- quantize
std::tuple<at::Tensor, at::Tensor> nf4_quantize_cpu(const at::Tensor& w, int64_t block_size) {
  MB_CHECK_FLOAT_DTYPE(w.scalar_type(), "w");
  MB_CHECK(block_size > 0 && block_size % 2 == 0 && block_size <= kMaxBlockSize,
           "'block_size' must be positive, even and at most ", kMaxBlockSize, ", got ", block_size);
  const auto wf = w.reshape({-1}).to(at::kFloat).contiguous();
  const int64_t n = wf.numel(), blocks = num_blocks(n, block_size);
  auto absmax = at::empty({blocks}, wf.options());
  auto codes = at::empty({packed_bytes(n)}, wf.options().dtype(at::kByte));
  const float* x = wf.data_ptr<float>();
  float* am = absmax.data_ptr<float>();
  uint8_t* out = codes.data_ptr<uint8_t>();
  at::parallel_for(0, blocks, std::max<int64_t>(1, 16384 / block_size), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      float m = 0.f;
      for (int64_t e = b * block_size, end = std::min(n, e + block_size); e < end; ++e) m = std::max(m, std::fabs(x[e]));
      am[b] = m;
    }
  });
  // Even blocks hold whole bytes: one reciprocal per block, then a loop
  // over its elements that the compiler vectorizes (15 compares each).
  at::parallel_for(0, blocks, std::max<int64_t>(1, 16384 / block_size), [&](int64_t b0, int64_t b1) {
    std::vector<uint8_t> q(block_size + 1);
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = b * block_size, len = std::min(block_size, n - begin);
      const float inv = inverse_absmax(am[b]);
      const float* xb = x + begin;
      uint8_t* qb = q.data();
      for (int64_t j = 0; j < len; ++j) qb[j] = nearest_code(xb[j] * inv);
      qb[len] = kZeroCode;  // the pad nibble of an odd total length
      uint8_t* ob = out + begin / 2;
      for (int64_t i = 0; i < (len + 1) / 2; ++i) ob[i] = pack_pair(qb[2 * i], qb[2 * i + 1]);
    }
  });
  return {codes, absmax};
}

std::tuple<at::Tensor, at::Tensor> nf4_quantize_absmax_cpu(const at::Tensor& absmax, const at::Tensor& offset,
                                                           const at::Tensor& nested_map, int64_t block_size) {
  MB_CHECK_DTYPE(absmax, at::kFloat, "absmax");
  MB_CHECK_DTYPE(offset, at::kFloat, "offset");
  MB_CHECK_DTYPE(nested_map, at::kFloat, "nested_map");
  MB_CHECK_DIM(absmax, 1, "absmax");
  MB_CHECK(offset.numel() == 1, "'offset' must hold one value, got shape ", offset.sizes());
  MB_CHECK(nested_map.dim() == 1 && nested_map.numel() == kNestedMapSize, "'nested_map' must have ", kNestedMapSize,
           " entries, got shape ", nested_map.sizes());
  MB_CHECK(block_size > 0 && block_size <= kMaxBlockSize, "'block_size' must be in [1, ", kMaxBlockSize, "], got ",
           block_size);
  const auto a = absmax.contiguous();
  const auto map_t = nested_map.contiguous();
  const int64_t n = a.numel(), blocks = num_blocks(n, block_size);
  auto nested = at::empty({blocks}, a.options());
  auto codes = at::empty({n}, a.options().dtype(at::kByte));
  const float* ap = a.data_ptr<float>();
  const float* map = map_t.data_ptr<float>();
  const float off = offset.contiguous().data_ptr<float>()[0];
  float* np = nested.data_ptr<float>();
  uint8_t* cp = codes.data_ptr<uint8_t>();
  at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t begin = b * block_size, end = std::min(n, begin + block_size);
      float m = 0.f;
      for (int64_t e = begin; e < end; ++e) m = std::max(m, std::fabs(ap[e] - off));
      np[b] = m;
      const float inv = nested_inverse(m);
      for (int64_t e = begin; e < end; ++e) cp[e] = nested_map_code(map, ap[e] - off, inv);
    }
  });
  return {codes, nested};
}

at::Tensor nf4_dequantize_cpu(const at::Tensor& codes, const at::Tensor& absmax, const at::Tensor& nested_absmax,
                              const at::Tensor& nested_map, const at::Tensor& nested_offset, int64_t numel,
                              int64_t block_size, int64_t nested_block_size, at::ScalarType dtype) {
  const Nf4Dims d =
      check_nf4_state(codes, absmax, nested_absmax, nested_map, nested_offset, numel, block_size, nested_block_size);
  MB_CHECK_FLOAT_DTYPE(dtype, "dtype");
  const auto c = codes.contiguous(), a = absmax.contiguous(), na = nested_absmax.contiguous(),
             nm = nested_map.contiguous();
  const View v = make_view(c, a, na, nm, nested_offset, d);
  auto out = at::empty({numel}, codes.options().dtype(dtype));
  if (dtype == at::kFloat) dequantize_into(v, out.data_ptr<float>());
  else if (dtype == at::kHalf) dequantize_into(v, out.data_ptr<at::Half>());
  else dequantize_into(v, out.data_ptr<at::BFloat16>());
  return out;
}

// ------------------------------------------------------------------ linear
constexpr int64_t kGemmMinRows = 32;
constexpr float kInv127 = 1.0f / 127.0f;  // the int8 codebook is the NF4 codebook x 127

float dot_float(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int l = 0; l < 8; ++l) acc[l] += a[i + l] * b[i + l];
  float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
  for (; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Block scales [b0, b0 + count) as float32 (double quantization decoded):
// the same float operations as View::scale (a product, rounded, then a sum).
void decode_scales_scalar(const View& v, int64_t b0, int64_t count, float* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = v.scale(b0 + i);
}

#if MB_HAVE_X86_KERNELS
// Eight scales per step: the nested-map codes gathered, the outer absmax
// broadcast (a run of eight blocks shares it except at a nested block edge).
MB_TARGET_AVX2 void decode_scales_avx2(const View& v, int64_t b0, int64_t count, float* out) {
  const __m256 offset = _mm256_set1_ps(v.offset);
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    const int64_t b = b0 + i;
    const __m256i code = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(v.absmax_q + b)));
    const __m256 mapped = _mm256_i32gather_ps(v.map, code, 4);
    const int64_t first = v.nested_shift >= 0 ? b >> v.nested_shift : b / v.d.nested_block_size;
    const int64_t last = v.nested_shift >= 0 ? (b + 7) >> v.nested_shift : (b + 7) / v.d.nested_block_size;
    __m256 product;
    if (first == last) {
      product = _mm256_mul_ps(mapped, _mm256_set1_ps(v.nested[first]));
    } else {
      alignas(32) float nested[8];
      for (int j = 0; j < 8; ++j)
        nested[j] = v.nested[v.nested_shift >= 0 ? (b + j) >> v.nested_shift : (b + j) / v.d.nested_block_size];
      product = _mm256_mul_ps(mapped, _mm256_load_ps(nested));
    }
    __asm__("" : "+x"(product));  // keeps the product rounded on its own (no FMA contraction)
    _mm256_storeu_ps(out + i, _mm256_add_ps(product, offset));
  }
  decode_scales_scalar(v, b0 + i, count - i, out + i);
}
#endif

// Runs kernel(r0, r1, scales) over rows [begin, end) in runs whose block
// scales fit a small buffer; scales[(r - r0) * blocks_per_row + b] is block b
// of row r. Without double quantization the stored absmax is used in place.
constexpr int64_t kScaleBuffer = 2048;

template <typename Kernel>
void with_row_scales(const View& v, int64_t blocks_per_row, int64_t begin, int64_t end, cpu::Isa isa,
                     Kernel&& kernel) {
  if (!v.d.double_quant) return kernel(begin, end, v.absmax_f + begin * blocks_per_row);
  const int64_t run = std::max<int64_t>(1, kScaleBuffer / std::max<int64_t>(1, blocks_per_row));
  // (not a std::vector: zero-filling 8 KiB per call costs more than decoding the scales)
  const auto buffer = std::make_unique_for_overwrite<float[]>(std::min(run, end - begin) * blocks_per_row);
  for (int64_t r0 = begin; r0 < end; r0 += run) {
    const int64_t r1 = std::min(end, r0 + run);
#if MB_HAVE_X86_KERNELS
    if (isa != cpu::Isa::Portable) decode_scales_avx2(v, r0 * blocks_per_row, (r1 - r0) * blocks_per_row, buffer.get());
    else
#endif
      decode_scales_scalar(v, r0 * blocks_per_row, (r1 - r0) * blocks_per_row, buffer.get());
    kernel(r0, r1, static_cast<const float*>(buffer.get()));
  }
}

// Any shape (blocks may straddle rows, odd rows start mid-byte): each weight
// row is decoded once into a buffer and reused for every activation row.
void linear_rows_generic(const View& v, int64_t k, int64_t begin, int64_t end, const float* x, int64_t m_rows,
                         int64_t n_rows, float* y) {
  std::vector<float> row(k);
  for (int64_t r = begin; r < end; ++r) {
    decode_range(v, r * k, (r + 1) * k, row.data());
    for (int64_t m = 0; m < m_rows; ++m) y[m * n_rows + r] = dot_float(row.data(), x + m * k, k);
  }
}

// x [m, k] reordered per chunk of `chunk` elements: its even elements, then
// its odd ones (the order of the high and low nibbles of its codes).
// A plain loop into a plain buffer: view + transpose + contiguous (or just an
// at::empty) cost more, through the dispatcher and TensorIterator, than the
// kernel on a small layer at batch 1.
std::vector<float> even_odd_order(const float* src, int64_t n, int64_t chunk) {
  const int64_t half = chunk / 2;
  std::vector<float> out(n);
  float* dst = out.data();
  for (int64_t c = 0; c < n; c += chunk)
    for (int64_t j = 0; j < half; ++j) {
      dst[c + j] = src[c + 2 * j];
      dst[c + half + j] = src[c + 2 * j + 1];
    }
  return out;
}

#if MB_HAVE_X86_KERNELS
using cpu::hsum_ps256;

// Kernel arguments: weight rows [begin, end), their block scales (row r's at
// scales + (r - begin) * blocks_per_row, see with_row_scales), MT activation
// rows of k values each.

// Exact float path, AVX-512: 32 weights (16 bytes) per step.
template <int MT>
MB_TARGET_AVX512 void linear_float_avx512(const View& v, int64_t k, int64_t begin, int64_t end, const float* scales,
                                          const float* xd, int64_t n_rows, float* y) {
  alignas(64) float table[16];
  for (int i = 0; i < 16; ++i) table[i] = codebook(i);
  const __m512 cb = _mm512_load_ps(table);
  const __m512i low4 = _mm512_set1_epi32(0xF);
  const int64_t bs = v.d.block_size, blocks_per_row = k / bs;
  for (int64_t r = begin; r < end; ++r) {
    const uint8_t* wp = v.codes + r * k / 2;  // the code bytes of the step, walked along the row
    const float* rs = scales + (r - begin) * blocks_per_row;
    __m512 acc[MT];
    for (int i = 0; i < MT; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks_per_row; ++b) {
      __m512 part[MT];
      for (int i = 0; i < MT; ++i) part[i] = _mm512_setzero_ps();
      for (int64_t c = b * bs; c < (b + 1) * bs; c += 32, wp += 16) {
        _mm_prefetch(reinterpret_cast<const char*>(wp + cpu::kPrefetchBytes), _MM_HINT_T0);
        const __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(wp)));
        const __m512 w_even = _mm512_permutexvar_ps(_mm512_srli_epi32(bytes, 4), cb);
        const __m512 w_odd = _mm512_permutexvar_ps(_mm512_and_si512(bytes, low4), cb);
        for (int i = 0; i < MT; ++i) {
          const float* xc = xd + i * k + c;
          part[i] = _mm512_fmadd_ps(w_even, _mm512_loadu_ps(xc), part[i]);
          part[i] = _mm512_fmadd_ps(w_odd, _mm512_loadu_ps(xc + 16), part[i]);
        }
      }
      const __m512 s = _mm512_set1_ps(rs[b]);
      for (int i = 0; i < MT; ++i) acc[i] = _mm512_fmadd_ps(part[i], s, acc[i]);
    }
    for (int i = 0; i < MT; ++i) y[i * n_rows + r] = _mm512_reduce_add_ps(acc[i]);
  }
}

// 16-entry float lookup on AVX2: two 8-entry permutes, blended on bit 3.
MB_TARGET_AVX2 inline __m256 lookup16_avx2(__m256i idx, __m256 lo_tab, __m256 hi_tab) {
  const __m256 lo = _mm256_permutevar8x32_ps(lo_tab, idx);
  const __m256 hi = _mm256_permutevar8x32_ps(hi_tab, idx);
  return _mm256_blendv_ps(lo, hi, _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
}

template <int MT>
MB_TARGET_AVX2 void linear_float_avx2(const View& v, int64_t k, int64_t begin, int64_t end, const float* scales,
                                      const float* xd, int64_t n_rows, float* y) {
  alignas(32) float table[16];
  for (int i = 0; i < 16; ++i) table[i] = codebook(i);
  const __m256 lo_tab = _mm256_load_ps(table), hi_tab = _mm256_load_ps(table + 8);
  const __m256i low4 = _mm256_set1_epi32(0xF);
  const int64_t bs = v.d.block_size, blocks_per_row = k / bs;
  for (int64_t r = begin; r < end; ++r) {
    const uint8_t* wp = v.codes + r * k / 2;  // the code bytes of the step, walked along the row
    const float* rs = scales + (r - begin) * blocks_per_row;
    __m256 acc[MT];
    for (int i = 0; i < MT; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks_per_row; ++b) {
      __m256 part[MT];
      for (int i = 0; i < MT; ++i) part[i] = _mm256_setzero_ps();
      for (int64_t c = b * bs; c < (b + 1) * bs; c += 32, wp += 16) {
        _mm_prefetch(reinterpret_cast<const char*>(wp + cpu::kPrefetchBytes), _MM_HINT_T0);
        for (int h = 0; h < 2; ++h) {  // bytes 8h..8h+7 of the chunk: x even/odd elements 8h..8h+7
          const __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(wp + 8 * h)));
          const __m256 w_even = lookup16_avx2(_mm256_srli_epi32(bytes, 4), lo_tab, hi_tab);
          const __m256 w_odd = lookup16_avx2(_mm256_and_si256(bytes, low4), lo_tab, hi_tab);
          for (int i = 0; i < MT; ++i) {
            const float* xc = xd + i * k + c + 8 * h;
            part[i] = _mm256_fmadd_ps(w_even, _mm256_loadu_ps(xc), part[i]);
            part[i] = _mm256_fmadd_ps(w_odd, _mm256_loadu_ps(xc + 16), part[i]);
          }
        }
      }
      const __m256 s = _mm256_set1_ps(rs[b]);
      for (int i = 0; i < MT; ++i) acc[i] = _mm256_fmadd_ps(part[i], s, acc[i]);
    }
    for (int i = 0; i < MT; ++i) y[i * n_rows + r] = hsum_ps256(acc[i]);
  }
}

// int8 codes of x [rows, k] (natural order, k a multiple of 64) reordered in
// place per 64-chunk into its 32 even elements, then its 32 odd ones: the
// high and low nibbles of the chunk's 32 code bytes.
MB_TARGET_AVX2 void even_odd_order_int8(int8_t* q, int64_t chunks) {
  const __m256i split = _mm256_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15,  //
                                         0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15);
  for (int64_t c = 0; c < chunks; ++c) {
    __m256i* p = reinterpret_cast<__m256i*>(q + 64 * c);
    // per 16 values: 8 even, 8 odd; then [even 0-15 | odd 0-15] per 32 values
    const __m256i a = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(_mm256_loadu_si256(p), split), 0xD8);
    const __m256i b = _mm256_permute4x64_epi64(_mm256_shuffle_epi8(_mm256_loadu_si256(p + 1), split), 0xD8);
    _mm256_storeu_si256(p, _mm256_permute2x128_si256(a, b, 0x20));
    _mm256_storeu_si256(p + 1, _mm256_permute2x128_si256(a, b, 0x31));
  }
}

// The VNNI kernel multiplies unsigned codes (codebook + 128) by x, so each
// block's dot product carries 128 * sum(x over the block). offsets gets, per
// activation row and weight block, 16 int32 lanes holding -128 * (the lane's
// four x codes summed over the block's chunks): loaded as the block's dot
// product accumulator, they cancel that term in the int32 domain, exactly.
MB_TARGET_AVX512 void block_offsets_vnni(const int8_t* xq, int64_t rows, int64_t k, int64_t block_size,
                                         int32_t* offsets) {
  const __m512i u128 = _mm512_set1_epi8(static_cast<char>(0x80));
  const int64_t blocks = k / block_size;
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t b = 0; b < blocks; ++b) {
      __m512i sum = _mm512_setzero_si512();
      for (int64_t c = b * block_size; c < (b + 1) * block_size; c += 64)
        sum = cpu::dpbusd_vnni512(sum, u128, _mm512_loadu_si512(xq + i * k + c));
      _mm512_storeu_si512(offsets + (i * blocks + b) * 16, _mm512_sub_epi32(_mm512_setzero_si512(), sum));
    }
}

// One weight block of the VNNI kernel for MT activation rows: int32 dot
// products (started from the block offsets) over the block's 64-chunks, then
// one float FMA with the block scale.
template <int MT>
MB_TARGET_AVX512 inline __attribute__((always_inline)) void chunk_vnni(const uint8_t* wp, const int8_t* xp, int64_t k,
                                                                       __m512i tab, __m512i low4, __m512i (&dot)[MT]) {
  _mm_prefetch(reinterpret_cast<const char*>(wp + cpu::kPrefetchBytes), _MM_HINT_T0);
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
  // high nibbles (even elements) in the lower half, low nibbles in the upper half
  const __m512i idx =
      _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(_mm256_srli_epi16(bytes, 4)), bytes, 1), low4);
  const __m512i w = _mm512_shuffle_epi8(tab, idx);  // codebook_int8 + 128, unsigned
  for (int i = 0; i < MT; ++i) dot[i] = cpu::dpbusd_vnni512(dot[i], w, _mm512_loadu_si512(xp + i * k));
}

// One weight block (chunks_per_block chunks of 64 at wp, activations at xp)
// for MT activation rows: int32 dot products started from the block offsets,
// then one float FMA with the block scale.
template <int MT>
MB_TARGET_AVX512 inline __attribute__((always_inline)) void block_vnni(const uint8_t* wp, const int8_t* xp,
                                                                       int64_t chunks_per_block, __m512i tab,
                                                                       __m512i low4, int64_t k,
                                                                       const int32_t* offsets, int64_t offset_stride,
                                                                       float scale, __m512 (&acc)[MT]) {
  __m512i dot[MT];
  for (int i = 0; i < MT; ++i) dot[i] = _mm512_loadu_si512(offsets + i * offset_stride);
  chunk_vnni<MT>(wp, xp, k, tab, low4, dot);  // every block has one chunk; most (block_size 64) only one
  for (int64_t j = 1; j < chunks_per_block; ++j) chunk_vnni<MT>(wp + 32 * j, xp + 64 * j, k, tab, low4, dot);
  const __m512 s = _mm512_set1_ps(scale);
  for (int i = 0; i < MT; ++i) acc[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot[i]), s, acc[i]);
}

// Integer path, AVX-512 VNNI: 64 weights (32 bytes) per step; xq is x's int8
// codes in even/odd order per 64-chunk, offsets from block_offsets_vnni.
// Two accumulators per activation row (even and odd blocks) keep consecutive
// FMAs off each other's latency.
template <int MT>
MB_TARGET_AVX512 void linear_int8_avx512(const View& v, int64_t k, int64_t begin, int64_t end, const float* scales,
                                         const int8_t* xq, const int32_t* offsets, const float* xscale,
                                         int64_t n_rows, float* y) {
  alignas(16) uint8_t table[16];
  for (int i = 0; i < 16; ++i) table[i] = static_cast<uint8_t>(codebook_int8(i) + 128);
  const __m512i tab = _mm512_broadcast_i32x4(_mm_load_si128(reinterpret_cast<const __m128i*>(table)));
  const __m512i low4 = _mm512_set1_epi8(0xF);
  const int64_t bs = v.d.block_size, blocks_per_row = k / bs, offset_stride = blocks_per_row * 16;
  for (int64_t r = begin; r < end; ++r) {
    const uint8_t* row = v.codes + r * k / 2;
    const float* rs = scales + (r - begin) * blocks_per_row;
    __m512 acc0[MT], acc1[MT];
    for (int i = 0; i < MT; ++i) acc0[i] = acc1[i] = _mm512_setzero_ps();
    const int64_t cpb = bs / 64, wstep = bs / 2;
    int64_t b = 0;
    for (; b + 2 <= blocks_per_row; b += 2) {
      block_vnni<MT>(row + b * wstep, xq + b * bs, cpb, tab, low4, k, offsets + b * 16, offset_stride, rs[b], acc0);
      block_vnni<MT>(row + (b + 1) * wstep, xq + (b + 1) * bs, cpb, tab, low4, k, offsets + (b + 1) * 16,
                     offset_stride, rs[b + 1], acc1);
    }
    if (b < blocks_per_row)
      block_vnni<MT>(row + b * wstep, xq + b * bs, cpb, tab, low4, k, offsets + b * 16, offset_stride, rs[b], acc0);
    for (int i = 0; i < MT; ++i)
      y[i * n_rows + r] = _mm512_reduce_add_ps(_mm512_add_ps(acc0[i], acc1[i])) * (xscale[i] * kInv127);
  }
}

// Integer path, AVX2: signed x signed through the sign trick (|w| and
// sign(w) * x), which keeps maddubs exact (|w| <= 127). 64 weights (32
// bytes at wp, activations at xp) per chunk, int32 sums into dot.
template <int MT>
MB_TARGET_AVX2 inline __attribute__((always_inline)) void chunk_avx2(const uint8_t* wp, const int8_t* xp, int64_t k,
                                                                     __m256i tab, __m256i low4, __m256i (&dot)[MT]) {
  _mm_prefetch(reinterpret_cast<const char*>(wp + cpu::kPrefetchBytes), _MM_HINT_T0);
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wp));
  const __m256i w_even = _mm256_shuffle_epi8(tab, _mm256_and_si256(_mm256_srli_epi16(bytes, 4), low4));
  const __m256i w_odd = _mm256_shuffle_epi8(tab, _mm256_and_si256(bytes, low4));
  const __m256i abs_even = _mm256_sign_epi8(w_even, w_even), abs_odd = _mm256_sign_epi8(w_odd, w_odd);
  for (int i = 0; i < MT; ++i) {
    const int8_t* xc = xp + i * k;
    dot[i] = cpu::dpbusd_avx2(dot[i], abs_even,
                              _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xc)), w_even));
    dot[i] = cpu::dpbusd_avx2(dot[i], abs_odd,
                              _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(xc + 32)), w_odd));
  }
}

// The int32 sums of a block's chunks meet the block scale in one FMA.
template <int MT>
MB_TARGET_AVX2 void linear_int8_avx2(const View& v, int64_t k, int64_t begin, int64_t end, const float* scales,
                                     const int8_t* xq, const float* xscale, int64_t n_rows, float* y) {
  alignas(16) int8_t table[16];
  for (int i = 0; i < 16; ++i) table[i] = codebook_int8(i);
  const __m256i tab = _mm256_broadcastsi128_si256(_mm_load_si128(reinterpret_cast<const __m128i*>(table)));
  const __m256i low4 = _mm256_set1_epi8(0xF);
  const int64_t bs = v.d.block_size, blocks_per_row = k / bs, cpb = bs / 64;
  for (int64_t r = begin; r < end; ++r) {
    const uint8_t* wp = v.codes + r * k / 2;
    const int8_t* xp = xq;
    const float* rs = scales + (r - begin) * blocks_per_row;
    __m256 acc[MT];
    for (int i = 0; i < MT; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks_per_row; ++b) {
      __m256i dot[MT];
      for (int i = 0; i < MT; ++i) dot[i] = _mm256_setzero_si256();
      chunk_avx2<MT>(wp, xp, k, tab, low4, dot);  // every block has one chunk; most (block_size 64) only one
      for (int64_t j = 1; j < cpb; ++j) chunk_avx2<MT>(wp + 32 * j, xp + 64 * j, k, tab, low4, dot);
      wp += 32 * cpb;
      xp += 64 * cpb;
      const __m256 sv = _mm256_set1_ps(rs[b]);
      for (int i = 0; i < MT; ++i) acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot[i]), sv, acc[i]);
    }
    for (int i = 0; i < MT; ++i) y[i * n_rows + r] = hsum_ps256(acc[i]) * (xscale[i] * kInv127);
  }
}
#endif

// Integer path, portable.
void linear_int8_portable(const View& v, int64_t k, int64_t begin, int64_t end, const int8_t* xq,
                          const float* xscale, int64_t m_rows, int64_t n_rows, float* y) {
  const int64_t bs = v.d.block_size, blocks_per_row = k / bs;
  std::vector<int8_t> w(bs);
  for (int64_t r = begin; r < end; ++r) {
    std::vector<float> acc(m_rows, 0.f);
    for (int64_t b = 0; b < blocks_per_row; ++b) {
      const int64_t e0 = r * k + b * bs;
      for (int64_t j = 0; j < bs; ++j) w[j] = codebook_int8(code_at(v.codes, e0 + j));
      const float s = v.scale(r * blocks_per_row + b);
      for (int64_t m = 0; m < m_rows; ++m) {
        const int8_t* xb = xq + m * k + b * bs;
        int32_t dot = 0;
        for (int64_t j = 0; j < bs; ++j) dot += static_cast<int32_t>(w[j]) * static_cast<int32_t>(xb[j]);
        acc[m] += s * static_cast<float>(dot);
      }
    }
    for (int64_t m = 0; m < m_rows; ++m) y[m * n_rows + r] = acc[m] * (xscale[m] * kInv127);
  }
}

template <typename Kernel>
void for_row_tiles(int64_t m_rows, Kernel&& kernel) {
  for (int64_t m0 = 0; m0 < m_rows; m0 += 4) {
    switch (std::min<int64_t>(4, m_rows - m0)) {
      case 1: kernel(std::integral_constant<int, 1>{}, m0); break;
      case 2: kernel(std::integral_constant<int, 2>{}, m0); break;
      case 3: kernel(std::integral_constant<int, 3>{}, m0); break;
      default: kernel(std::integral_constant<int, 4>{}, m0); break;
    }
  }
}

void linear_gemm(const View& v, int64_t k, int64_t n_rows, const at::Tensor& xf, at::Tensor& y) {
  // ~8 MiB buffers: few parallel regions (each costs a thread hand-off), and
  // the decoded block is still mostly in the last-level cache for its GEMM.
  const int64_t block = std::min(n_rows, std::max<int64_t>(16, (int64_t(1) << 21) / std::max<int64_t>(1, k)));
  auto buffer = at::empty({block, k}, xf.options());
  for (int64_t r0 = 0; r0 < n_rows; r0 += block) {
    const int64_t rows = std::min(block, n_rows - r0);
    float* out = buffer.data_ptr<float>();
    at::parallel_for(r0, r0 + rows, 4, [&](int64_t b, int64_t e) {
      decode_range(v, b * k, e * k, out + (b - r0) * k);
    });
    auto y_block = y.narrow(1, r0, rows);
    at::mm_out(y_block, xf, buffer.narrow(0, 0, rows).t());
  }
}

at::Tensor nf4_linear_cpu(const at::Tensor& x, const at::Tensor& codes, const at::Tensor& absmax,
                          const at::Tensor& nested_absmax, const at::Tensor& nested_map,
                          const at::Tensor& nested_offset, int64_t out_features, int64_t block_size,
                          int64_t nested_block_size, const c10::optional<at::Tensor>& bias, int64_t act_bits) {
  MB_CHECK(act_bits == 0 || act_bits == 8, "'act_bits' must be 0 (exact float) or 8 (int8 activations), got ",
           act_bits);
  const int64_t k = x.dim() >= 1 ? x.size(-1) : 0;
  const Nf4Dims d = check_nf4_state(codes, absmax, nested_absmax, nested_map, nested_offset, out_features * k,
                                    block_size, nested_block_size);
  check_nf4_activation(x, out_features, d, bias, codes);
  const auto xf = cpu::float_rows(x, k);
  const int64_t m_rows = xf.size(0), n_rows = out_features;
  auto y = at::empty({m_rows, n_rows}, xf.options());
  const auto c = codes.contiguous(), a = absmax.contiguous(), na = nested_absmax.contiguous(),
             nm = nested_map.contiguous();
  const View v = make_view(c, a, na, nm, nested_offset, d);
  const cpu::Isa isa = cpu::active_isa();
  float* yp = y.data_ptr<float>();
  // Rows per parallel task (cpu/linear_io.h): a small layer runs on the calling thread.
  const int64_t grain = cpu::task_grain(k * m_rows, 16);
  if (m_rows == 0 || n_rows == 0) {
    // nothing to compute
  } else if (m_rows >= kGemmMinRows && act_bits == 0) {
    linear_gemm(v, k, n_rows, xf, y);
  } else if (act_bits == 8 && k % 64 == 0 && block_size % 64 == 0 && k % block_size == 0) {
    if (isa == cpu::Isa::Portable) {
      const cpu::Int8Activations act = cpu::quantize_activations(xf, k);
      const int8_t* xq = act.values.data_ptr<int8_t>();
      const float* xs = act.scales.data_ptr<float>();
      at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
        linear_int8_portable(v, k, begin, end, xq, xs, m_rows, n_rows, yp);
      });
    } else {
#if MB_HAVE_X86_KERNELS
      // Plain buffers, not tensors: at batch 1 an at::empty costs about as
      // much as quantizing the row.
      const int64_t blocks_per_row = k / block_size;
      std::vector<int8_t> xq(m_rows * k);
      std::vector<float> xs(m_rows);
      std::vector<int32_t> sums(m_rows * k / cpu::kActBlock);
      cpu::quantize_activations_into(true, xf.data_ptr<float>(), m_rows, k, k, 0, xq.data(), xs.data(), sums.data());
      even_odd_order_int8(xq.data(), m_rows * k / 64);
      std::vector<int32_t> offsets;
      if (isa == cpu::Isa::Avx512Vnni) {
        offsets.resize(m_rows * blocks_per_row * 16);
        block_offsets_vnni(xq.data(), m_rows, k, block_size, offsets.data());
      }
      at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
        with_row_scales(v, blocks_per_row, begin, end, isa, [&](int64_t r0, int64_t r1, const float* scales) {
          for_row_tiles(m_rows, [&](auto mt, int64_t m0) {
            constexpr int MT = decltype(mt)::value;
            if (isa == cpu::Isa::Avx512Vnni)
              linear_int8_avx512<MT>(v, k, r0, r1, scales, xq.data() + m0 * k,
                                     offsets.data() + m0 * blocks_per_row * 16, xs.data() + m0, n_rows,
                                     yp + m0 * n_rows);
            else
              linear_int8_avx2<MT>(v, k, r0, r1, scales, xq.data() + m0 * k, xs.data() + m0, n_rows,
                                   yp + m0 * n_rows);
          });
        });
      });
#endif
    }
  } else if (isa != cpu::Isa::Portable && k % block_size == 0 && block_size % 32 == 0) {
#if MB_HAVE_X86_KERNELS
    const int64_t blocks_per_row = k / block_size;
    const std::vector<float> xd = even_odd_order(xf.data_ptr<float>(), m_rows * k, 32);
    const float* xp = xd.data();
    at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
      with_row_scales(v, blocks_per_row, begin, end, isa, [&](int64_t r0, int64_t r1, const float* scales) {
        for_row_tiles(m_rows, [&](auto mt, int64_t m0) {
          if (isa == cpu::Isa::Avx512Vnni)
            linear_float_avx512<decltype(mt)::value>(v, k, r0, r1, scales, xp + m0 * k, n_rows, yp + m0 * n_rows);
          else
            linear_float_avx2<decltype(mt)::value>(v, k, r0, r1, scales, xp + m0 * k, n_rows, yp + m0 * n_rows);
        });
      });
    });
#endif
  } else {
    const float* xp = xf.data_ptr<float>();
    at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
      linear_rows_generic(v, k, begin, end, xp, m_rows, n_rows, yp);
    });
  }
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  return cpu::linear_result(y, x, n_rows);
}

}  // namespace

TORCH_LIBRARY_IMPL(memboost, CPU, m) {
  m.impl("nf4_quantize", &nf4_quantize_cpu);
  m.impl("nf4_quantize_absmax", &nf4_quantize_absmax_cpu);
  m.impl("nf4_dequantize", &nf4_dequantize_cpu);
  m.impl("nf4_linear", &nf4_linear_cpu);
}

}  // namespace nf4
}  // namespace memboost
