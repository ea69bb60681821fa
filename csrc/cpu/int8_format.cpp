// CPU kernels of the int8 weight format (layout: csrc/common/int8_args.h;
// llama.cpp's Q8_0: int8 values, a float16 scale per block of 32).
//
// int8_linear, fewer than kGemmMinRows activation rows (decoding: the
// output layer of a language model at batch 1 reads a 49152 x 576 weight per
// token, so its rows are spread over the thread pool):
//  - act_bits = 0, exact float path: 8 (AVX2) or 16 (AVX-512) int8 values
//    widened to float per step, multiplied with x by FMA, the block's sum
//    scaled once per block of 32. Each weight block is used for up to 4
//    activation rows.
//  - act_bits = 8, integer path (llama.cpp's Q8_0 x Q8_0 dot product): x is
//    quantized to int8 with one scale per block of 32 (cpu/int8/act_quant.h,
//    the one activation path of every kernel), a block's 32 int8 x int8
//    products are summed exactly in int32 and scaled by the weight scale times
//    the activation block scale. AVX2 multiplies signed by signed with the
//    sign trick (|w| and sign(w) * x) through maddubs; AVX-512 VNNI offsets
//    the weights by 128 to unsigned for vpdpbusd and removes 128 * sum(x) per
//    block with the activation block sums.
// From kGemmMinRows rows on (act_bits = 0), blocks of weight rows are decoded
// into a cache-sized float buffer and multiplied with ATen's GEMM
// (cpu/decoded_gemm.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <vector>

#include "common/int8_args.h"
#include "cpu/decoded_gemm.h"
#include "cpu/int8/act_quant.h"
#include "cpu/int8/dot.h"
#include "cpu/int8/isa.h"
#include "cpu/linear_io.h"

namespace memboost {
namespace int8w {
namespace {

constexpr int64_t kGemmMinRows = 32;
static_assert(kBlock == cpu::kActBlock, "weight and activation blocks coincide (Q8_0 x Q8_0)");

struct View {
  const int8_t* values;
  const uint16_t* scales;  // float16 bits
  Int8Dims d;
};

inline float half_to_float(uint16_t bits) { return static_cast<float>(c10::Half(bits, c10::Half::from_bits())); }

// Weight rows [begin, end) as float32, row r at out + (r - first) * cols.
void decode_rows(const View& v, int64_t begin, int64_t end, float* out, int64_t first) {
  for (int64_t r = begin; r < end; ++r) {
    const int8_t* row = v.values + r * v.d.cols;
    float* o = out + (r - first) * v.d.cols;
    for (int64_t b = 0; b < v.d.blocks; ++b) {
      const float s = half_to_float(v.scales[r * v.d.blocks + b]);
      for (int64_t j = 0; j < kBlock; ++j) o[b * kBlock + j] = static_cast<float>(row[b * kBlock + j]) * s;
    }
  }
}

template <typename T>
void dequantize_into(const View& v, T* out) {
  at::parallel_for(0, v.d.rows, cpu::task_grain(v.d.cols, 16), [&](int64_t begin, int64_t end) {
    std::vector<float> row(v.d.cols);
    for (int64_t r = begin; r < end; ++r) {
      decode_rows(v, r, r + 1, row.data(), r);
      for (int64_t c = 0; c < v.d.cols; ++c) out[r * v.d.cols + c] = static_cast<T>(row[c]);
    }
  });
}

at::Tensor int8_dequantize_cpu(const at::Tensor& values, const at::Tensor& scales, at::ScalarType dtype) {
  const Int8Dims d = check_int8_state(values, scales);
  MB_CHECK_FLOAT_DTYPE(dtype, "dtype");
  const auto vals = values.contiguous(), sc = scales.contiguous();
  const View v{vals.data_ptr<int8_t>(), reinterpret_cast<const uint16_t*>(sc.data_ptr<at::Half>()), d};
  auto out = at::empty({d.rows, d.cols}, values.options().dtype(dtype));
  if (dtype == at::kFloat) dequantize_into(v, out.data_ptr<float>());
  else if (dtype == at::kHalf) dequantize_into(v, out.data_ptr<at::Half>());
  else dequantize_into(v, out.data_ptr<at::BFloat16>());
  return out;
}

// ------------------------------------------------------------------ linear
// Portable paths: one weight row at a time against every activation row.
void linear_float_portable(const View& v, int64_t begin, int64_t end, const float* x, int64_t m_rows, float* y) {
  const int64_t k = v.d.cols, n = v.d.rows;
  std::vector<float> acc(m_rows);
  for (int64_t r = begin; r < end; ++r) {
    const int8_t* row = v.values + r * k;
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t b = 0; b < v.d.blocks; ++b) {
      const float s = half_to_float(v.scales[r * v.d.blocks + b]);
      for (int64_t m = 0; m < m_rows; ++m) {
        const float* xb = x + m * k + b * kBlock;
        float part = 0.f;
        for (int64_t j = 0; j < kBlock; ++j) part += static_cast<float>(row[b * kBlock + j]) * xb[j];
        acc[m] += part * s;
      }
    }
    for (int64_t m = 0; m < m_rows; ++m) y[m * n + r] = acc[m];
  }
}

void linear_int8_portable(const View& v, int64_t begin, int64_t end, const int8_t* xq, const float* xscale,
                          int64_t m_rows, float* y) {
  const int64_t k = v.d.cols, n = v.d.rows, blocks = v.d.blocks;
  std::vector<float> acc(m_rows);
  for (int64_t r = begin; r < end; ++r) {
    const int8_t* row = v.values + r * k;
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t b = 0; b < blocks; ++b) {
      const float s = half_to_float(v.scales[r * blocks + b]);
      for (int64_t m = 0; m < m_rows; ++m) {
        const int8_t* xb = xq + m * k + b * kBlock;
        int32_t dot = 0;
        for (int64_t j = 0; j < kBlock; ++j) dot += static_cast<int32_t>(row[b * kBlock + j]) * xb[j];
        acc[m] += s * xscale[m * blocks + b] * static_cast<float>(dot);
      }
    }
    for (int64_t m = 0; m < m_rows; ++m) y[m * n + r] = acc[m];
  }
}

#if MB_HAVE_X86_KERNELS
// Every AVX2 CPU has F16C (the float16 scales are converted with it).
#define MB_TARGET_AVX2_F16C __attribute__((target("avx2,fma,f16c")))
#define MB_TARGET_AVX512_F16C __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

using cpu::hsum_ps256;

// Exact float path, AVX2: a block of 32 as four vectors of 8.
template <int MT>
MB_TARGET_AVX2_F16C void linear_float_avx2(const View& v, int64_t begin, int64_t end, const float* x, float* y) {
  const int64_t k = v.d.cols, n = v.d.rows, blocks = v.d.blocks;
  for (int64_t r = begin; r < end; ++r) {
    const int8_t* row = v.values + r * k;
    __m256 acc[MT];
    for (int i = 0; i < MT; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      _mm_prefetch(reinterpret_cast<const char*>(row + b * kBlock + cpu::kPrefetchBytes), _MM_HINT_T0);
      const __m256 s = _mm256_set1_ps(_cvtsh_ss(v.scales[r * blocks + b]));
      __m256 w[4];
      for (int q = 0; q < 4; ++q)
        w[q] = _mm256_cvtepi32_ps(
            _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + b * kBlock + 8 * q))));
      for (int i = 0; i < MT; ++i) {
        const float* xb = x + i * k + b * kBlock;
        __m256 part = _mm256_mul_ps(w[0], _mm256_loadu_ps(xb));
        for (int q = 1; q < 4; ++q) part = _mm256_fmadd_ps(w[q], _mm256_loadu_ps(xb + 8 * q), part);
        acc[i] = _mm256_fmadd_ps(part, s, acc[i]);
      }
    }
    for (int i = 0; i < MT; ++i) y[i * n + r] = hsum_ps256(acc[i]);
  }
}

// Exact float path, AVX-512: a block of 32 as two vectors of 16.
template <int MT>
MB_TARGET_AVX512_F16C void linear_float_avx512(const View& v, int64_t begin, int64_t end, const float* x, float* y) {
  const int64_t k = v.d.cols, n = v.d.rows, blocks = v.d.blocks;
  for (int64_t r = begin; r < end; ++r) {
    const int8_t* row = v.values + r * k;
    __m512 acc[MT];
    for (int i = 0; i < MT; ++i) acc[i] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      _mm_prefetch(reinterpret_cast<const char*>(row + b * kBlock + cpu::kPrefetchBytes), _MM_HINT_T0);
      const __m512 s = _mm512_set1_ps(_cvtsh_ss(v.scales[r * blocks + b]));
      const __m512 w0 = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * kBlock))));
      const __m512 w1 = _mm512_cvtepi32_ps(
          _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + b * kBlock + 16))));
      for (int i = 0; i < MT; ++i) {
        const float* xb = x + i * k + b * kBlock;
        const __m512 part = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xb + 16), _mm512_mul_ps(w0, _mm512_loadu_ps(xb)));
        acc[i] = _mm512_fmadd_ps(part, s, acc[i]);
      }
    }
    for (int i = 0; i < MT; ++i) y[i * n + r] = _mm512_reduce_add_ps(acc[i]);
  }
}

// Integer path, AVX2: signed x signed through the sign trick, which keeps
// maddubs exact (|w| <= 128, |x| <= 127: pair sums below 2^15).
template <int MT>
MB_TARGET_AVX2_F16C void linear_int8_avx2(const View& v, int64_t begin, int64_t end, const int8_t* xq,
                                          const float* xscale, float* y) {
  const int64_t k = v.d.cols, n = v.d.rows, blocks = v.d.blocks;
  for (int64_t r = begin; r < end; ++r) {
    const int8_t* row = v.values + r * k;
    __m256 acc[MT];
    for (int i = 0; i < MT; ++i) acc[i] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
      _mm_prefetch(reinterpret_cast<const char*>(row + b * kBlock + cpu::kPrefetchBytes), _MM_HINT_T0);
      const float s = _cvtsh_ss(v.scales[r * blocks + b]);
      const __m256i w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * kBlock));
      const __m256i w_abs = _mm256_sign_epi8(w, w);
      for (int i = 0; i < MT; ++i) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + i * k + b * kBlock));
        const __m256i dot = cpu::dpbusd_avx2(_mm256_setzero_si256(), w_abs, _mm256_sign_epi8(xv, w));
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(s * xscale[i * blocks + b]), acc[i]);
      }
    }
    for (int i = 0; i < MT; ++i) y[i * n + r] = hsum_ps256(acc[i]);
  }
}

// Integer path, AVX-512 VNNI: w + 128 (unsigned) times x by vpdpbusd; the
// 128 * sum(x) the offset adds is removed once per block from the
// activation block sums.
template <int MT>
MB_TARGET_AVX512_F16C void linear_int8_vnni(const View& v, int64_t begin, int64_t end, const int8_t* xq,
                                            const float* xscale, const int32_t* sums, float* y) {
  const int64_t k = v.d.cols, n = v.d.rows, blocks = v.d.blocks;
  const __m256i offset = _mm256_set1_epi8(static_cast<char>(0x80));
  for (int64_t r = begin; r < end; ++r) {
    const int8_t* row = v.values + r * k;
    __m256 acc[MT];
    float corr[MT];
    for (int i = 0; i < MT; ++i) acc[i] = _mm256_setzero_ps(), corr[i] = 0.f;
    for (int64_t b = 0; b < blocks; ++b) {
      _mm_prefetch(reinterpret_cast<const char*>(row + b * kBlock + cpu::kPrefetchBytes), _MM_HINT_T0);
      const float s = _cvtsh_ss(v.scales[r * blocks + b]);
      const __m256i u = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + b * kBlock)),
                                         offset);  // w + 128
      for (int i = 0; i < MT; ++i) {
        const __m256i xv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + i * k + b * kBlock));
        const __m256i dot = cpu::dpbusd_vnni256(_mm256_setzero_si256(), u, xv);
        const float step = s * xscale[i * blocks + b];
        acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), _mm256_set1_ps(step), acc[i]);
        corr[i] += step * static_cast<float>(128 * sums[i * blocks + b]);
      }
    }
    for (int i = 0; i < MT; ++i) y[i * n + r] = hsum_ps256(acc[i]) - corr[i];
  }
}
#endif

// kernel(std::integral_constant<int, MT>, m0) for activation rows m0..m0+MT-1, MT <= 4.
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

at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& values, const at::Tensor& scales,
                           const c10::optional<at::Tensor>& bias, int64_t act_bits) {
  MB_CHECK(act_bits == 0 || act_bits == 8, "'act_bits' must be 0 (exact float) or 8 (int8 activations), got ",
           act_bits);
  const Int8Dims d = check_int8_state(values, scales);
  check_linear_input(x, d.cols, d.rows, bias, values, "values");
  const auto xf = cpu::float_rows(x, d.cols);
  const int64_t m_rows = xf.size(0), n = d.rows, k = d.cols;
  auto y = at::empty({m_rows, n}, xf.options());
  const auto vals = values.contiguous(), sc = scales.contiguous();
  const View v{vals.data_ptr<int8_t>(), reinterpret_cast<const uint16_t*>(sc.data_ptr<at::Half>()), d};
  const cpu::Isa isa = cpu::active_isa();
  float* yp = y.data_ptr<float>();
  // Weight rows per parallel task (cpu/linear_io.h): a small layer runs on the calling thread.
  const int64_t grain = cpu::task_grain(k * m_rows, 16);
  if (m_rows == 0 || n == 0 || k == 0) {
    y.zero_();
  } else if (act_bits == 8) {
    const cpu::Int8Activations act = cpu::quantize_activations(xf, k, cpu::kActBlock);
    const int8_t* xq = act.values.data_ptr<int8_t>();
    const float* xs = act.scales.data_ptr<float>();
    const int32_t* sums = act.sums.data_ptr<int32_t>();
    const int64_t blocks = d.blocks;
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      if (isa == cpu::Isa::Portable) return linear_int8_portable(v, begin, end, xq, xs, m_rows, yp);
#if MB_HAVE_X86_KERNELS
      for_row_tiles(m_rows, [&](auto mt, int64_t m0) {
        constexpr int MT = decltype(mt)::value;
        if (isa == cpu::Isa::Avx512Vnni)
          linear_int8_vnni<MT>(v, begin, end, xq + m0 * k, xs + m0 * blocks, sums + m0 * blocks, yp + m0 * n);
        else
          linear_int8_avx2<MT>(v, begin, end, xq + m0 * k, xs + m0 * blocks, yp + m0 * n);
      });
#endif
    });
  } else if (m_rows >= kGemmMinRows) {
    cpu::linear_decoded_blocks(n, k, xf, y, [&](int64_t begin, int64_t end, float* out, int64_t r0) {
      decode_rows(v, begin, end, out, r0);
    });
  } else {
    const float* xp = xf.data_ptr<float>();
    at::parallel_for(0, n, grain, [&](int64_t begin, int64_t end) {
      if (isa == cpu::Isa::Portable) return linear_float_portable(v, begin, end, xp, m_rows, yp);
#if MB_HAVE_X86_KERNELS
      for_row_tiles(m_rows, [&](auto mt, int64_t m0) {
        constexpr int MT = decltype(mt)::value;
        if (isa == cpu::Isa::Avx512Vnni)
          linear_float_avx512<MT>(v, begin, end, xp + m0 * k, yp + m0 * n);
        else
          linear_float_avx2<MT>(v, begin, end, xp + m0 * k, yp + m0 * n);
      });
#endif
    });
  }
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  return cpu::linear_result(y, x, n);
}

}  // namespace

TORCH_LIBRARY_IMPL(memboost, CPU, m) {
  m.impl("int8_dequantize", &int8_dequantize_cpu);
  m.impl("int8_linear", &int8_linear_cpu);
}

}  // namespace int8w
}  // namespace memboost
