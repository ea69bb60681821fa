#include <ATen/Parallel.h>
#include <torch/library.h>

#include "common/bitpack.h"
#include "common/pack_args.h"

namespace memboost {
namespace {

template <int BITS>
at::Tensor pack_cpu(const at::Tensor& values) {
  constexpr int kPer = WordLayout<BITS>::kValuesPerWord;
  const PackShape s = pack_shape(values, kPer);
  auto out = at::empty(s.out_sizes, values.options().dtype(at::kInt));
  if (out.numel() == 0) return out;
  const auto v = values.contiguous();
  const uint8_t* src = v.data_ptr<uint8_t>();
  uint32_t* dst = reinterpret_cast<uint32_t*>(out.data_ptr<int32_t>());
  const int64_t total = s.rows * s.words;
  at::parallel_for(0, total, 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = i / s.words, word = i % s.words;
      const int64_t first = word * kPer;
      const int count = static_cast<int>(std::min<int64_t>(kPer, s.length - first));
      dst[i] = pack_word<BITS>(src + row * s.length + first, count);
    }
  });
  return out;
}

template <int BITS>
at::Tensor unpack_cpu(const at::Tensor& packed, int64_t num_elements) {
  constexpr int kPer = WordLayout<BITS>::kValuesPerWord;
  const PackShape s = unpack_shape(packed, num_elements, kPer);
  auto out = at::empty(s.out_sizes, packed.options().dtype(at::kByte));
  if (out.numel() == 0) return out;
  const auto p = packed.contiguous();
  const uint32_t* src = reinterpret_cast<const uint32_t*>(p.data_ptr<int32_t>());
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, s.rows * s.length, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t row = i / s.length, col = i % s.length;
      dst[i] = static_cast<uint8_t>(extract_value<BITS>(src[row * s.words + col / kPer], static_cast<int>(col % kPer)));
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(memboost, CPU, m) {
  m.impl("pack_2bit", &pack_cpu<2>);
  m.impl("unpack_2bit", &unpack_cpu<2>);
  m.impl("pack_4bit", &pack_cpu<4>);
  m.impl("unpack_4bit", &unpack_cpu<4>);
}

}  // namespace memboost
