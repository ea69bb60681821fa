// CPU kernel of decode_attention (arithmetic: csrc/common/decode_attention.h).
// One task per (row, key/value head): it writes that head's rotated key and
// its value into the caches, then attends every query head of the group over
// the cached keys (scores, softmax, weighted sum of values, all float32). A
// decode step of a small model is a few hundred thousand multiply-adds: it
// runs on the calling thread (cpu/linear_io.h's task size). The query-key dot
// product and the value accumulation run 16 (AVX-512) or 8 (AVX2) lanes wide
// on float32 caches, chosen at run time (cpu/int8/isa.h); 16-bit caches are
// converted per element (portable).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <vector>

#include "common/decode_attention.h"
#include "common/decode_attention_args.h"
#include "cpu/int8/isa.h"
#include "cpu/linear_io.h"

namespace memboost {
namespace attention {
namespace {

template <typename T>
float dot_portable(const float* a, const T* b, int64_t n) {
  float s = 0.f;
  for (int64_t i = 0; i < n; ++i) s += a[i] * static_cast<float>(b[i]);
  return s;
}

template <typename T>
void axpy_portable(float* acc, float p, const T* v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) acc[i] += p * static_cast<float>(v[i]);
}

#if MB_HAVE_X86_KERNELS
MB_TARGET_AVX2 float dot_avx2(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float total = cpu::hsum_ps256(acc);
  for (; i < n; ++i) total += a[i] * b[i];
  return total;
}

MB_TARGET_AVX2 void axpy_avx2(float* acc, float p, const float* v, int64_t n) {
  const __m256 pv = _mm256_set1_ps(p);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(pv, _mm256_loadu_ps(v + i), _mm256_loadu_ps(acc + i)));
  for (; i < n; ++i) acc[i] += p * v[i];
}

MB_TARGET_AVX512 float dot_avx512(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + i), _mm512_loadu_ps(b + i), acc);
  if (i < n) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - i)) - 1);
    acc = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, a + i), _mm512_maskz_loadu_ps(tail, b + i), acc);
  }
  return _mm512_reduce_add_ps(acc);
}

MB_TARGET_AVX512 void axpy_avx512(float* acc, float p, const float* v, int64_t n) {
  const __m512 pv = _mm512_set1_ps(p);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    _mm512_storeu_ps(acc + i, _mm512_fmadd_ps(pv, _mm512_loadu_ps(v + i), _mm512_loadu_ps(acc + i)));
  if (i < n) {
    const __mmask16 tail = static_cast<__mmask16>((1u << (n - i)) - 1);
    _mm512_mask_storeu_ps(acc + i, tail,
                          _mm512_fmadd_ps(pv, _mm512_maskz_loadu_ps(tail, v + i), _mm512_maskz_loadu_ps(tail, acc + i)));
  }
}
#endif

template <typename T>
float dot(cpu::Isa isa, const float* a, const T* b, int64_t n) {
#if MB_HAVE_X86_KERNELS
  if constexpr (std::is_same<T, float>::value) {
    if (isa == cpu::Isa::Avx512Vnni) return dot_avx512(a, b, n);
    if (isa == cpu::Isa::Avx2) return dot_avx2(a, b, n);
  }
#endif
  return dot_portable(a, b, n);
}

template <typename T>
void axpy(cpu::Isa isa, float* acc, float p, const T* v, int64_t n) {
#if MB_HAVE_X86_KERNELS
  if constexpr (std::is_same<T, float>::value) {
    if (isa == cpu::Isa::Avx512Vnni) return axpy_avx512(acc, p, v, n);
    if (isa == cpu::Isa::Avx2) return axpy_avx2(acc, p, v, n);
  }
#endif
  axpy_portable(acc, p, v, n);
}

template <typename T>
void run(const DecodeDims& d, const T* q, const T* k, const T* v, const T* cos, const T* sin, T* key_cache,
         T* value_cache, const bool* mask, int64_t mask_stride, float scale, T* out, cpu::Isa isa) {
  const int64_t D = d.head_dim, group = d.heads / d.kv_heads, keys = d.start + 1;
  const int64_t tasks = d.batch * d.kv_heads;
  at::parallel_for(0, tasks, cpu::task_grain(group * keys * D * 2), [&](int64_t begin, int64_t end) {
    std::vector<float> qr(D), acc(D), scores(keys);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / d.kv_heads, g = task % d.kv_heads;
      const T* cb = cos + b * D;
      const T* sb = sin + b * D;
      const int64_t head_base = (b * d.kv_heads + g) * d.max_length;
      T* kc = key_cache + (head_base + d.start) * D;
      T* vc = value_cache + (head_base + d.start) * D;
      const T* kh = k + (b * d.kv_heads + g) * D;
      const T* vh = v + (b * d.kv_heads + g) * D;
      const auto key_at = [kh](int64_t j) { return static_cast<float>(kh[j]); };
      for (int64_t i = 0; i < D; ++i) {
        kc[i] = static_cast<T>(rotated(key_at, i, D, static_cast<float>(cb[i]), static_cast<float>(sb[i])));
        vc[i] = vh[i];
      }
      const T* K = key_cache + head_base * D;
      const T* V = value_cache + head_base * D;
      const bool* mrow = mask ? mask + b * mask_stride : nullptr;
      for (int64_t h = g * group; h < (g + 1) * group; ++h) {
        const T* qh = q + (b * d.heads + h) * D;
        const auto query_at = [qh](int64_t j) { return static_cast<float>(qh[j]); };
        for (int64_t i = 0; i < D; ++i)
          qr[i] = rotated(query_at, i, D, static_cast<float>(cb[i]), static_cast<float>(sb[i]));
        float top = -std::numeric_limits<float>::infinity();
        for (int64_t j = 0; j < keys; ++j) {
          scores[j] = (mrow && !mrow[j]) ? -std::numeric_limits<float>::infinity()
                                         : scale * dot(isa, qr.data(), K + j * D, D);
          top = std::max(top, scores[j]);
        }
        std::fill(acc.begin(), acc.end(), 0.f);
        float total = 0.f;
        for (int64_t j = 0; j < keys; ++j) {
          const float p = std::exp(scores[j] - top);  // NaN for every key when none is seen, as SDPA gives
          if (p == 0.f) continue;
          total += p;
          axpy(isa, acc.data(), p, V + j * D, D);
        }
        if (!(total > 0.f)) total = std::numeric_limits<float>::quiet_NaN();
        T* o = out + (b * d.heads + h) * D;
        for (int64_t i = 0; i < D; ++i) o[i] = static_cast<T>(acc[i] / total);
      }
    }
  });
}

at::Tensor decode_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cos,
                                const at::Tensor& sin, at::Tensor& key_cache, at::Tensor& value_cache, int64_t start,
                                const c10::optional<at::Tensor>& key_mask, double scale) {
  const DecodeDims d = check_decode_attention_args(q, k, v, cos, sin, key_cache, value_cache, start, key_mask, scale);
  const auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous(), cc = cos.contiguous(),
             sc = sin.contiguous();
  at::Tensor mask;
  if (key_mask.has_value()) mask = key_mask->contiguous();
  auto out = at::empty({d.batch, 1, d.heads * d.head_dim}, q.options());
  const cpu::Isa isa = cpu::active_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "decode_attention", [&] {
    run<scalar_t>(d, qc.data_ptr<scalar_t>(), kc.data_ptr<scalar_t>(), vc.data_ptr<scalar_t>(),
                  cc.data_ptr<scalar_t>(), sc.data_ptr<scalar_t>(), key_cache.data_ptr<scalar_t>(),
                  value_cache.data_ptr<scalar_t>(), mask.defined() ? mask.data_ptr<bool>() : nullptr,
                  mask.defined() ? mask.size(1) : 0, static_cast<float>(scale), out.data_ptr<scalar_t>(), isa);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(memboost, CPU, m) { m.impl("decode_attention", &decode_attention_cpu); }

}  // namespace attention
}  // namespace memboost
