// CUDA kernels of the ternary (BitNet b1.58) format; layout in common/trits.h.
//
// ternary_linear, batch <= kMaxGemvBatch: one warp owns kRowsPerWarp output
// rows; each lane streams 16-byte pieces of the packed rows (half a chunk: 64
// trits, the loads of all its rows issued before any is decoded) and reuses
// each activation load across the rows. A 16-byte piece holds 16 consecutive
// columns at each of the four shifts, so activations are read as 16
// consecutive values too. act_bits=0 multiplies floats (t = code - 1);
// act_bits=8 takes the activations as int8 (quantized per row as the CPU
// does) and multiplies four trits by four int8 values with one signed __dp4a:
// the word (w >> 2s) & 0x03030303 is four codes t + 1, and a bytewise
// subtraction of 0x01010101 (__vsub4, no borrow between bytes) turns them
// into the signed trits. The dot is then exact in int32, as on the CPU;
// multiplying the codes and subtracting s * sum(q) in float after the
// reduction cancelled two large sums. Activations are copied into
// a zero-padded float32 (or int8) buffer of whole chunks first, so loads are
// aligned and the padding trits meet zeros.
// Larger batches dequantize once and use cuBLAS through at::linear (the int8
// path multiplies the integer-valued activations, exact in float32, and
// applies the activation scale after).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "common/ternary_args.h"
#include "cuda/dtype.cuh"
#include "cuda/launch.cuh"

namespace memboost {
namespace ternary {
namespace {

constexpr int kRowsPerWarp = 4;
constexpr int kWarpsPerBlock = 8;
constexpr int64_t kMaxGemvBatch = 8;

struct DeviceView {
  const uint8_t* __restrict__ packed;
  const float* __restrict__ scales;
  int64_t rows, cols, row_bytes, groups, chunks_per_group, scale_rows;
};

DeviceView make_view(const at::Tensor& packed, const at::Tensor& scales, const TernaryDims& d) {
  return DeviceView{packed.data_ptr<uint8_t>(), scales.data_ptr<float>(), d.rows,   d.cols,
                    d.row_bytes,                 d.groups,                 d.chunks_per_group, d.scale_rows};
}

__device__ __forceinline__ float row_scale(const DeviceView& v, int64_t row, int64_t group) {
  return __ldg(v.scales + trits::scale_offset(row, v.scale_rows, v.groups) + group);
}

// Byte j (0..15) of a 16-byte piece.
__device__ __forceinline__ uint32_t piece_byte(const uint4& w, int j) {
  const uint32_t word = j < 4 ? w.x : j < 8 ? w.y : j < 12 ? w.z : w.w;
  return (word >> (8 * (j & 3))) & 0xFFu;
}

__device__ __forceinline__ uint32_t piece_word(const uint4& w, int i) { return i == 0 ? w.x : i == 1 ? w.y : i == 2 ? w.z : w.w; }

// The four trits at shift `sh` of a packed word as four signed bytes (-1, 0, +1).
__device__ __forceinline__ int signed_trits(uint32_t word, int sh) {
  return static_cast<int>(__vsub4((word >> (2 * sh)) & 0x03030303u, 0x01010101u));
}

// x: float32 [m_rows, padded] (act_bits 0) or int8 [m_rows, padded] (act_bits 8).
template <int BT, bool INT8>
__global__ void __launch_bounds__(kWarpsPerBlock * 32)
    ternary_gemv_kernel(DeviceView v, const void* __restrict__ x, int64_t padded, const float* __restrict__ xscale,
                        int64_t m_rows, float* __restrict__ y) {
  constexpr int R = kRowsPerWarp;
  const int lane = threadIdx.x & 31;
  const int64_t warp = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) >> 5;
  const int64_t row0 = warp * R;
  if (row0 >= v.rows) return;
  const int64_t m0 = int64_t(blockIdx.y) * BT;
  const int bt = static_cast<int>(m_rows - m0 < BT ? m_rows - m0 : BT);

  float acc[R][BT];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int b = 0; b < BT; ++b) acc[r][b] = 0.f;

  const int64_t pieces = v.row_bytes / 16;
  for (int64_t u = lane; u < pieces; u += 32) {
    uint4 w[R];
#pragma unroll
    for (int r = 0; r < R; ++r)
      w[r] = row0 + r < v.rows ? __ldg(reinterpret_cast<const uint4*>(v.packed + (row0 + r) * v.row_bytes) + u)
                               : make_uint4(0x55555555u, 0x55555555u, 0x55555555u, 0x55555555u);
    const int64_t chunk = u >> 1;
    const int64_t col0 = chunk * trits::kChunkTrits + (u & 1) * 16;
    const int64_t group = chunk / v.chunks_per_group;
    float s[R];
#pragma unroll
    for (int r = 0; r < R; ++r) s[r] = row0 + r < v.rows ? row_scale(v, row0 + r, group) : 0.f;
#pragma unroll
    for (int b = 0; b < BT; ++b) {
      if (b >= bt) break;
      if constexpr (INT8) {
        const int8_t* xq = static_cast<const int8_t*>(x) + (m0 + b) * padded;
        int dot[R];
#pragma unroll
        for (int r = 0; r < R; ++r) dot[r] = 0;
        // Not unrolled: unrolled, the loads of all four shifts of every batch
        // row are hoisted together and the kernel spills (ptxas -v).
#pragma unroll 1
        for (int sh = 0; sh < 4; ++sh) {
          const int4 q = __ldg(reinterpret_cast<const int4*>(xq + col0 + 32 * sh));
          const int qv[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
          for (int r = 0; r < R; ++r)
#pragma unroll
            for (int i = 0; i < 4; ++i)
              dot[r] = __dp4a(signed_trits(piece_word(w[r], i), sh), qv[i], dot[r]);
        }
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r][b] += s[r] * static_cast<float>(dot[r]);
      } else {
        const float* xf = static_cast<const float*>(x) + (m0 + b) * padded;
        float part[R];
#pragma unroll
        for (int r = 0; r < R; ++r) part[r] = 0.f;
#pragma unroll 1  // as above: unrolled, this spills even at a batch tile of 2
        for (int sh = 0; sh < 4; ++sh) {
          float xv[16];
          load16<float>(xf + col0 + 32 * sh, xv);
#pragma unroll
          for (int r = 0; r < R; ++r)
#pragma unroll
            for (int j = 0; j < 16; ++j)
              part[r] = fmaf(static_cast<float>(static_cast<int>((piece_byte(w[r], j) >> (2 * sh)) & 3u) - 1), xv[j],
                             part[r]);
        }
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r][b] += s[r] * part[r];
      }
    }
  }

#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int b = 0; b < BT; ++b) {
      const float total = warp_sum(acc[r][b]);
      const int64_t row = row0 + r;
      if (lane == 0 && row < v.rows && b < bt) y[(m0 + b) * v.rows + row] = INT8 ? xscale[m0 + b] * total : total;
    }
  }
}

// One thread per packed byte: its four trits (32 columns apart) decoded.
template <typename T>
__global__ void ternary_dequant_kernel(DeviceView v, T* __restrict__ out) {
  const int64_t total = v.rows * v.row_bytes;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total; i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / v.row_bytes, j = i % v.row_bytes;
    const int64_t chunk = j / trits::kChunkBytes;
    const float s = row_scale(v, row, chunk / v.chunks_per_group);
    const uint32_t byte = __ldg(v.packed + i);
#pragma unroll
    for (int sh = 0; sh < 4; ++sh) {
      const int64_t col = chunk * trits::kChunkTrits + 32 * sh + j % trits::kChunkBytes;
      if (col < v.cols) out[row * v.cols + col] = from_float<T>(s * static_cast<float>(trits::decode((byte >> (2 * sh)) & 3u)));
    }
  }
}

__global__ void ternary_pack_kernel(const int8_t* __restrict__ t, int64_t rows, int64_t cols, int64_t row_bytes,
                                    uint8_t* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < rows * row_bytes;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / row_bytes, j = i % row_bytes;
    const int64_t base = (j / trits::kChunkBytes) * trits::kChunkTrits + j % trits::kChunkBytes;
    uint32_t byte = 0;
#pragma unroll
    for (int sh = 0; sh < 4; ++sh) {
      const int64_t col = base + 32 * sh;
      const uint32_t code = col < cols ? trits::encode(t[row * cols + col]) : trits::kZeroCode;
      byte |= code << (2 * sh);
    }
    out[i] = static_cast<uint8_t>(byte);
  }
}

__global__ void ternary_unpack_kernel(const uint8_t* __restrict__ packed, int64_t rows, int64_t cols,
                                      int64_t row_bytes, int8_t* __restrict__ out) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < rows * cols;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / cols, col = i % cols;
    out[i] = static_cast<int8_t>(trits::decode(trits::code_at(packed + row * row_bytes, col)));
  }
}

at::Tensor ternary_pack_cuda(const at::Tensor& trits_in) {
  const auto sizes = packed_sizes(trits_in);
  const c10::cuda::CUDAGuard guard(trits_in.device());
  // One reduction (and a sync) to refuse values outside -1..1, as the CPU op does.
  MB_CHECK(!at::logical_or(trits_in < -1, trits_in > 1).any().item<bool>(), "'trits' must hold only -1, 0 and +1");
  auto out = at::empty(sizes, trits_in.options().dtype(at::kByte));
  const auto t = trits_in.contiguous();
  const int64_t cols = t.size(-1), row_bytes = sizes.back(), rows = t.numel() / cols;
  if (out.numel() == 0) return out;
  ternary_pack_kernel<<<grid_for(rows * row_bytes, 256), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
      t.data_ptr<int8_t>(), rows, cols, row_bytes, out.data_ptr<uint8_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor ternary_unpack_cuda(const at::Tensor& packed, int64_t cols) {
  const auto sizes = unpacked_sizes(packed, cols);
  const c10::cuda::CUDAGuard guard(packed.device());
  auto out = at::empty(sizes, packed.options().dtype(at::kChar));
  if (out.numel() == 0) return out;
  const auto p = packed.contiguous();
  const int64_t rows = out.numel() / cols;
  ternary_unpack_kernel<<<grid_for(rows * cols, 256), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
      p.data_ptr<uint8_t>(), rows, cols, p.size(-1), out.data_ptr<int8_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor ternary_dequantize_cuda(const at::Tensor& packed, const at::Tensor& scales, int64_t cols,
                                   int64_t group_size, at::ScalarType dtype) {
  const TernaryDims d = check_ternary_args(packed, scales, cols, group_size);
  MB_CHECK_FLOAT_DTYPE(dtype, "dtype");
  const c10::cuda::CUDAGuard guard(packed.device());
  auto out = at::empty({d.rows, d.cols}, packed.options().dtype(dtype));
  if (out.numel() == 0) return out;
  const DeviceView v = make_view(packed, scales, d);
  MB_DISPATCH_FLOAT_TYPES(dtype, T, [&] {
    ternary_dequant_kernel<T><<<grid_for(d.rows * d.row_bytes, 256), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
        v, reinterpret_cast<T*>(out.data_ptr()));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// Per-row int8 activations, the same float operations as the CPU quantizer
// (cpu/int8/act_quant.h): scale = amax / 127, q = rint(x * (127 / amax)).
struct DeviceInt8 {
  at::Tensor q;       // int8 [M, padded], zero past cols
  at::Tensor qf;      // the same values as float32
  at::Tensor scale;   // float32 [M]
};

DeviceInt8 quantize_activations_cuda(const at::Tensor& xpad) {
  DeviceInt8 a;
  const auto amax = xpad.abs().amax(1, /*keepdim=*/true);
  const auto inv = at::where(amax > 0, at::full_like(amax, 127.f).div(amax), at::zeros_like(amax));
  a.qf = xpad.mul(inv).round();
  a.q = a.qf.to(at::kChar);
  a.scale = amax.div(127.f).reshape({-1}).contiguous();
  return a;
}

template <int BT, bool INT8>
void launch_gemv(const DeviceView& v, const void* x, int64_t padded, const float* xscale, int64_t m_rows, float* y,
                 cudaStream_t stream) {
  const int64_t warps = (v.rows + kRowsPerWarp - 1) / kRowsPerWarp;
  const dim3 grid(static_cast<unsigned>((warps + kWarpsPerBlock - 1) / kWarpsPerBlock),
                  static_cast<unsigned>((m_rows + BT - 1) / BT));
  ternary_gemv_kernel<BT, INT8><<<grid, kWarpsPerBlock * 32, 0, stream>>>(v, x, padded, xscale, m_rows, y);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool INT8>
void gemv(const DeviceView& v, const void* x, int64_t padded, const float* xscale, int64_t m_rows, float* y,
          cudaStream_t stream) {
  if (m_rows == 1) launch_gemv<1, INT8>(v, x, padded, xscale, m_rows, y, stream);
  else if (m_rows <= 2) launch_gemv<2, INT8>(v, x, padded, xscale, m_rows, y, stream);
  else if (m_rows <= 4) launch_gemv<4, INT8>(v, x, padded, xscale, m_rows, y, stream);
  else launch_gemv<8, INT8>(v, x, padded, xscale, m_rows, y, stream);
}

at::Tensor ternary_linear_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                               const c10::optional<at::Tensor>& bias, int64_t cols, int64_t group_size,
                               int64_t act_bits) {
  const TernaryDims d = check_ternary_linear_args(x, packed, scales, bias, cols, group_size, act_bits);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto out_shape = linear_output_shape(x, d.rows);
  const int64_t padded = trits::padded_cols(d.cols);
  // float32 activations padded with zeros to whole chunks (fresh, so aligned)
  const auto xpad = at::constant_pad_nd(x.reshape({-1, d.cols}).to(at::kFloat), {0, padded - d.cols}, 0.0).contiguous();
  const int64_t m_rows = xpad.size(0);
  at::Tensor y;
  if (m_rows > kMaxGemvBatch || m_rows == 0 || d.rows == 0) {
    // Compute-bound regime: one dequantization (float32: the weight is not
    // rounded again), then cuBLAS.
    const auto w = ternary_dequantize_cuda(packed, scales, cols, group_size, at::kFloat);
    if (act_bits == 8) {
      const DeviceInt8 a = quantize_activations_cuda(xpad);
      y = at::linear(a.qf.narrow(1, 0, d.cols), w).mul(a.scale.unsqueeze(1));
    } else {
      y = at::linear(xpad.narrow(1, 0, d.cols), w);
    }
  } else {
    y = at::empty({m_rows, d.rows}, xpad.options());
    const auto packed16 = aligned(packed, 16);  // kept alive until the kernels are queued
    const DeviceView v = make_view(packed16, scales, d);
    const auto stream = at::cuda::getCurrentCUDAStream();
    if (act_bits == 8) {
      const DeviceInt8 a = quantize_activations_cuda(xpad);
      gemv<true>(v, a.q.data_ptr(), padded, a.scale.data_ptr<float>(), m_rows, y.data_ptr<float>(), stream);
    } else {
      gemv<false>(v, xpad.data_ptr(), padded, nullptr, m_rows, y.data_ptr<float>(), stream);
    }
  }
  if (bias.has_value()) y = y.add(bias->to(at::kFloat));
  return y.to(x.scalar_type()).reshape(out_shape);
}

// LoRT: the ternary GEMV, then the low-rank part as two cuBLAS GEMMs on the
// float32 factors, in float32 until the one conversion to x's dtype.
at::Tensor lort_linear_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& alpha,
                            const at::Tensor& a, const at::Tensor& b, const c10::optional<at::Tensor>& bias,
                            int64_t cols, int64_t act_bits) {
  int64_t rank = 0;
  const TernaryDims d = check_lort_args(x, packed, alpha, a, b, bias, cols, act_bits, &rank);
  const c10::cuda::CUDAGuard guard(x.device());
  const auto xf = x.reshape({-1, d.cols}).to(at::kFloat);
  at::Tensor y = ternary_linear_cuda(xf, packed, alpha, c10::nullopt, cols, 0, act_bits);
  if (rank > 0 && xf.size(0) > 0 && d.rows > 0) y.addmm_(at::mm(xf, b.to(at::kFloat)), a.to(at::kFloat).t());
  if (bias.has_value()) y.add_(bias->to(at::kFloat));
  return y.to(x.scalar_type()).reshape(linear_output_shape(x, d.rows));
}

}  // namespace

TORCH_LIBRARY_IMPL(memboost, CUDA, m) {
  m.impl("ternary_pack", &ternary_pack_cuda);
  m.impl("ternary_unpack", &ternary_unpack_cuda);
  m.impl("ternary_dequantize", &ternary_dequantize_cuda);
  m.impl("ternary_linear", &ternary_linear_cuda);
  m.impl("lort_linear", &lort_linear_cuda);
}

}  // namespace ternary
}  // namespace memboost
