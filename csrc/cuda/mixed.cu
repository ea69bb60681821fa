// CUDA kernels of the mixed 2/4/16-bit format.
//
// mixed_linear, batch <= kMaxGemvBatch: one warp owns kRowsPerWarp output
// rows; each lane streams 16-byte pieces of the regular 2-bit plane of all
// its rows (loads for every row issued before any is decoded), decodes them
// in registers and reuses each activation load across the rows. The rare
// 4-bit groups fetch their low bits from the side plane; the row's sparse
// outliers are added before the warp reduction, so nothing but y is written.
// Larger batches dequantize once and use cuBLAS through at::linear.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/mixed_args.h"
#include "cuda/dtype.cuh"
#include "cuda/launch.cuh"

namespace memboost {
namespace mixed {
namespace {

constexpr int kRowsPerWarp = 4;
constexpr int kWarpsPerBlock = 8;
constexpr int64_t kMaxGemvBatch = 32;

struct DeviceView {
  const uint32_t* __restrict__ plane2;
  const uint32_t* __restrict__ lowbits;
  const uint8_t* __restrict__ meta;
  const uint32_t* __restrict__ mask;
  const float2* __restrict__ row_scale;
  const int32_t* __restrict__ rowptr;
  const uint16_t* __restrict__ cols;
  const __half* __restrict__ vals;
  int64_t rows, plane_words, low_words, mask_words, groups;
  int words_per_group;
};

DeviceView make_view(const at::Tensor& plane2, const at::Tensor& lowbits, const at::Tensor& meta,
                     const at::Tensor& mask, const at::Tensor& row_scale, const at::Tensor& rowptr,
                     const at::Tensor& cols, const at::Tensor& vals, const MixedDims& d) {
  // plane2 is read 16 bytes at a time, row_scale as float2: callers pass
  // tensors that went through aligned().
  return DeviceView{reinterpret_cast<const uint32_t*>(plane2.data_ptr<int32_t>()),
                    reinterpret_cast<const uint32_t*>(lowbits.data_ptr<int32_t>()),
                    meta.data_ptr<uint8_t>(),
                    reinterpret_cast<const uint32_t*>(mask.data_ptr<int32_t>()),
                    reinterpret_cast<const float2*>(row_scale.data_ptr<float>()),
                    rowptr.data_ptr<int32_t>(),
                    reinterpret_cast<const uint16_t*>(cols.data_ptr<int16_t>()),
                    reinterpret_cast<const __half*>(vals.data_ptr<at::Half>()),
                    d.rows,
                    d.plane_words,
                    d.low_words,
                    d.mask_words,
                    d.groups,
                    static_cast<int>(d.group_size / kWeightsPerWord)};
}

// What decoding one plane word of one row needs besides the word itself: its
// group's step and zero*step, and (4-bit groups) the matching low-bits word.
struct WordContext {
  GroupParams params;
  uint32_t low;
};

__device__ __forceinline__ WordContext word_context(const DeviceView& v, int64_t row, int64_t word_index, float2 scale) {
  const int group = static_cast<int>(word_index / v.words_per_group);
  const uint32_t* mask_row = v.mask + row * v.mask_words;
  const bool four = test_bit(mask_row, group);
  WordContext c{group_params(__ldg(v.meta + row * v.groups + group), four, scale.x, scale.y), 0u};
  if (four) {
    const int low_group = count_set_before(mask_row, group);
    c.low = __ldg(v.lowbits + row * v.low_words + int64_t(low_group) * v.words_per_group +
                  word_index % v.words_per_group);
  }
  return c;
}

// One plane word of one row decoded: the 16 codes as floats, step, zero*step.
struct DecodedWord {
  float q[16];
  float step, zero_step;

  // Element j as the reference computes it: a product, then a difference,
  // each rounded (no contraction to an FMA, which rounds once).
  __device__ __forceinline__ float weight(int j) const { return __fsub_rn(__fmul_rn(q[j], step), zero_step); }
};

__device__ __forceinline__ void decode_word(const DeviceView& v, int64_t row, int64_t word_index, uint32_t plane_word,
                                            float2 scale, DecodedWord& out) {
  const WordContext c = word_context(v, row, word_index, scale);
#pragma unroll
  for (int j = 0; j < 16; ++j) out.q[j] = static_cast<float>(code_at(plane_word, c.low, c.params.four_bit, j));
  out.step = c.params.step;
  out.zero_step = c.params.zero_step;
}

template <int WPL>
__device__ __forceinline__ void load_words(const uint32_t* __restrict__ p, uint32_t (&w)[WPL]) {
  if constexpr (WPL == 4) {
    const uint4 raw = __ldg(reinterpret_cast<const uint4*>(p));
    w[0] = raw.x; w[1] = raw.y; w[2] = raw.z; w[3] = raw.w;
  } else {
#pragma unroll
    for (int i = 0; i < WPL; ++i) w[i] = __ldg(p + i);
  }
}

template <typename T, int BT, int WPL>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    mixed_gemv_kernel(DeviceView v, const T* __restrict__ x, int64_t m_rows, const T* __restrict__ bias,
                      T* __restrict__ y) {
  constexpr int R = kRowsPerWarp;
  const int lane = threadIdx.x & 31;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t row0 = warp * R;
  if (row0 >= v.rows) return;
  const int64_t m0 = int64_t(blockIdx.y) * BT;
  const int bt = static_cast<int>(m_rows - m0 < BT ? m_rows - m0 : BT);
  const int64_t K = v.plane_words * kWeightsPerWord;

  float acc[R][BT];
  float2 scale[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    scale[r] = row0 + r < v.rows ? v.row_scale[row0 + r] : make_float2(0.f, 0.f);
#pragma unroll
    for (int b = 0; b < BT; ++b) acc[r][b] = 0.f;
  }

  const int64_t units = v.plane_words / WPL;
  for (int64_t u = lane; u < units; u += 32) {
    uint32_t words[R][WPL];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (row0 + r < v.rows) {
        load_words<WPL>(v.plane2 + (row0 + r) * v.plane_words + u * WPL, words[r]);
      } else {
#pragma unroll
        for (int i = 0; i < WPL; ++i) words[r][i] = 0;
      }
    }
#pragma unroll
    for (int i = 0; i < WPL; ++i) {
      const int64_t word_index = u * WPL + i;
      if constexpr (BT == 1) {
        // Batch 1: load the 16 activations once and decode each row's codes
        // straight into the FMAs (fewer live registers, more warps per SM).
        float xv[16];
        load16<T>(x + m0 * K + word_index * kWeightsPerWord, xv);
        float xsum = 0.f;
#pragma unroll
        for (int j = 0; j < 16; ++j) xsum += xv[j];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if (row0 + r < v.rows) {
            const WordContext c = word_context(v, row0 + r, word_index, scale[r]);
            float dotq = 0.f;
#pragma unroll
            for (int j = 0; j < 16; ++j)
              dotq = fmaf(static_cast<float>(code_at(words[r][i], c.low, c.params.four_bit, j)), xv[j], dotq);
            acc[r][0] += c.params.step * dotq - c.params.zero_step * xsum;
          }
        }
      } else {
        // Small batch: decode each row's word once, reuse it for every activation row.
        DecodedWord dw[R];
#pragma unroll
        for (int r = 0; r < R; ++r) {
          if (row0 + r < v.rows) decode_word(v, row0 + r, word_index, words[r][i], scale[r], dw[r]);
        }
#pragma unroll
        for (int b = 0; b < BT; ++b) {
          if (b < bt) {
            float xv[16];
            load16<T>(x + (m0 + b) * K + word_index * kWeightsPerWord, xv);
            float xsum = 0.f;
#pragma unroll
            for (int j = 0; j < 16; ++j) xsum += xv[j];
#pragma unroll
            for (int r = 0; r < R; ++r) {
              float dotq = 0.f;
#pragma unroll
              for (int j = 0; j < 16; ++j) dotq = fmaf(dw[r].q[j], xv[j], dotq);
              acc[r][b] += dw[r].step * dotq - dw[r].zero_step * xsum;
            }
          }
        }
      }
    }
  }

  // Sparse 16-bit outliers of these rows, fused before the reduction.
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int64_t row = row0 + r;
    if (row >= v.rows) break;
    for (int32_t e = v.rowptr[row] + lane; e < v.rowptr[row + 1]; e += 32) {
      const float val = __half2float(v.vals[e]);
      const int64_t col = v.cols[e];
#pragma unroll
      for (int b = 0; b < BT; ++b)
        if (b < bt) acc[r][b] += val * to_float<T>(x[(m0 + b) * K + col]);
    }
  }

#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int b = 0; b < BT; ++b) {
      const float s = warp_sum(acc[r][b]);
      const int64_t row = row0 + r;
      if (lane == 0 && row < v.rows && b < bt) {
        y[(m0 + b) * v.rows + row] = from_float<T>(s + (bias ? to_float<T>(bias[row]) : 0.f));
      }
    }
  }
}

// One thread per plane word: 16 weights decoded and stored with wide stores.
template <typename T>
__global__ void mixed_dequant_kernel(DeviceView v, T* __restrict__ out) {
  const int64_t total = v.rows * v.plane_words;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / v.plane_words, word_index = i % v.plane_words;
    DecodedWord dw;
    decode_word(v, row, word_index, __ldg(v.plane2 + i), v.row_scale[row], dw);
    float w[16];
#pragma unroll
    for (int j = 0; j < 16; ++j) w[j] = dw.weight(j);
    store16<T>(out + i * kWeightsPerWord, w);
  }
}

// A warp per row adds that row's outliers. The base weight is decoded again
// in float32, so an fp16/bf16 output is rounded once (base + outliers), as in
// the reference, not twice. A column may appear more than once in a row (the
// op is public; only checkpoint validation refuses it): its first entry's
// lane adds all of them in entry order, as the CPU and the reference do, and
// the others write nothing, so no two lanes store to one position.
template <typename T>
__global__ void add_outliers_kernel(DeviceView v, T* __restrict__ out) {
  const int lane = threadIdx.x & 31;
  const int64_t K = v.plane_words * kWeightsPerWord;
  for (int64_t row = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5; row < v.rows;
       row += (int64_t(gridDim.x) * blockDim.x) >> 5) {
    const int32_t begin = v.rowptr[row], end = v.rowptr[row + 1];
    for (int32_t e = begin + lane; e < end; e += 32) {
      const uint16_t col = v.cols[e];
      bool first = true;
      for (int32_t p = begin; p < e && first; ++p) first = v.cols[p] != col;
      if (!first) continue;
      const int64_t word_index = col / kWeightsPerWord;
      DecodedWord dw;
      decode_word(v, row, word_index, __ldg(v.plane2 + row * v.plane_words + word_index), v.row_scale[row], dw);
      float w = dw.weight(static_cast<int>(col % kWeightsPerWord));
      for (int32_t p = e; p < end; ++p)
        if (v.cols[p] == col) w += __half2float(v.vals[p]);
      out[row * K + col] = from_float<T>(w);
    }
  }
}

at::Tensor mixed_dequantize_cuda(const at::Tensor& plane2, const at::Tensor& lowbits, const at::Tensor& meta,
                                 const at::Tensor& mask, const at::Tensor& row_scale, const at::Tensor& rowptr,
                                 const at::Tensor& cols, const at::Tensor& vals, int64_t group_size,
                                 at::ScalarType dtype) {
  const MixedDims d = check_mixed_args(plane2, lowbits, meta, mask, row_scale, rowptr, cols, vals, group_size);
  MB_CHECK_FLOAT_DTYPE(dtype, "dtype");
  const c10::cuda::CUDAGuard guard(plane2.device());
  auto out = at::empty({d.rows, d.cols}, plane2.options().dtype(dtype));
  if (out.numel() == 0) return out;
  const auto plane = aligned(plane2, 16), scales = aligned(row_scale, 8);
  const DeviceView v = make_view(plane, lowbits, meta, mask, scales, rowptr, cols, vals, d);
  const auto stream = at::cuda::getCurrentCUDAStream();
  MB_DISPATCH_FLOAT_TYPES(dtype, T, [&] {
    T* o = reinterpret_cast<T*>(out.data_ptr());
    mixed_dequant_kernel<T><<<grid_for(d.rows * d.plane_words, 256), 256, 0, stream>>>(v, o);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    if (vals.numel() > 0) {
      add_outliers_kernel<T><<<grid_for(d.rows * 32, 256), 256, 0, stream>>>(v, o);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  return out;
}

template <typename T, int BT>
void launch_gemv(const DeviceView& v, const T* x, int64_t m_rows, const T* bias, T* y, cudaStream_t stream) {
  const int64_t warps = (v.rows + kRowsPerWarp - 1) / kRowsPerWarp;
  const dim3 grid(static_cast<unsigned>((warps + kWarpsPerBlock - 1) / kWarpsPerBlock),
                  static_cast<unsigned>((m_rows + BT - 1) / BT));
  if (v.plane_words % 4 == 0) {
    mixed_gemv_kernel<T, BT, 4><<<grid, kWarpsPerBlock * 32, 0, stream>>>(v, x, m_rows, bias, y);
  } else {
    mixed_gemv_kernel<T, BT, 1><<<grid, kWarpsPerBlock * 32, 0, stream>>>(v, x, m_rows, bias, y);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor mixed_linear_cuda(const at::Tensor& x, const at::Tensor& plane2, const at::Tensor& lowbits,
                             const at::Tensor& meta, const at::Tensor& mask, const at::Tensor& row_scale,
                             const at::Tensor& rowptr, const at::Tensor& cols, const at::Tensor& vals,
                             const c10::optional<at::Tensor>& bias, int64_t group_size, int64_t act_bits) {
  const MixedDims d = check_mixed_args(plane2, lowbits, meta, mask, row_scale, rowptr, cols, vals, group_size);
  check_activation(x, d, bias, plane2);
  // The GPU kernels are memory bound in float: act_bits=8 is accepted and computed exactly.
  MB_CHECK(act_bits == 0 || act_bits == 8, "'act_bits' must be 0 (exact float) or 8, got ", act_bits);
  const c10::cuda::CUDAGuard guard(x.device());
  auto x2 = x.reshape({-1, d.cols}).contiguous();
  x2 = aligned(x2, 16);
  const int64_t m_rows = x2.size(0);
  const auto out_shape = linear_output_shape(x, d.rows);
  if (m_rows > kMaxGemvBatch) {
    // Compute-bound regime: one dequantization, then cuBLAS. The weight stays
    // float32 (a bf16/fp16 copy would round it again) and the product is
    // float32 like the reference's; it uses TF32 only if the user enabled
    // torch.backends.cuda.matmul.allow_tf32.
    const auto w = mixed_dequantize_cuda(plane2, lowbits, meta, mask, row_scale, rowptr, cols, vals, group_size,
                                         at::kFloat);
    const auto b = bias.has_value() ? c10::optional<at::Tensor>(bias->to(at::kFloat)) : c10::nullopt;
    return at::linear(x2.to(at::kFloat), w, b).to(x.scalar_type()).reshape(out_shape);
  }
  auto y = at::empty({m_rows, d.rows}, x2.options());
  if (y.numel() == 0) return y.reshape(out_shape);
  const auto plane = aligned(plane2, 16), scales = aligned(row_scale, 8);
  const DeviceView v = make_view(plane, lowbits, meta, mask, scales, rowptr, cols, vals, d);
  const auto b = bias.has_value() ? bias->contiguous() : at::Tensor();
  const auto stream = at::cuda::getCurrentCUDAStream();
  MB_DISPATCH_FLOAT_TYPES(x.scalar_type(), T, [&] {
    const T* xp = reinterpret_cast<const T*>(x2.data_ptr());
    const T* bp = b.defined() ? reinterpret_cast<const T*>(b.data_ptr()) : nullptr;
    T* yp = reinterpret_cast<T*>(y.data_ptr());
    if (m_rows == 1) launch_gemv<T, 1>(v, xp, m_rows, bp, yp, stream);
    else if (m_rows == 2) launch_gemv<T, 2>(v, xp, m_rows, bp, yp, stream);
    else if (m_rows <= 4) launch_gemv<T, 4>(v, xp, m_rows, bp, yp, stream);
    else launch_gemv<T, 8>(v, xp, m_rows, bp, yp, stream);
  });
  return y.reshape(out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(memboost, CUDA, m) {
  m.impl("mixed_dequantize", &mixed_dequantize_cuda);
  m.impl("mixed_linear", &mixed_linear_cuda);
}

}  // namespace mixed
}  // namespace memboost
