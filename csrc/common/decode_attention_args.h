// Validation of the decode_attention op arguments, shared by the CPU and CUDA ops.
#pragma once
#include <cmath>
#include <vector>

#include "common/checks.h"

namespace memboost {
namespace attention {

struct DecodeDims {
  int64_t batch, heads, kv_heads, head_dim, max_batch, max_length, start;
};

// q [B, 1, H*D], k and v [B, 1, KV*D], cos and sin [B, 1, D] of one float dtype;
// key_cache and value_cache [Bmax >= B, KV, Lmax > start, D] contiguous of that dtype;
// key_mask bool [>= B, >= start + 1] (true: the key is seen) or none; all on one device.
inline DecodeDims check_decode_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                              const at::Tensor& cos, const at::Tensor& sin,
                                              const at::Tensor& key_cache, const at::Tensor& value_cache,
                                              int64_t start, const c10::optional<at::Tensor>& key_mask,
                                              double scale) {
  MB_CHECK_FLOAT_DTYPE(q.scalar_type(), "q");
  const auto dt = q.scalar_type();
  MB_CHECK_DIM(q, 3, "q");
  MB_CHECK_DIM(key_cache, 4, "key_cache");
  const int64_t batch = q.size(0), kv_heads = key_cache.size(1), max_length = key_cache.size(2),
                head_dim = key_cache.size(3);
  MB_CHECK(q.size(1) == 1, "'q' must hold one query per row ([batch, 1, heads * head_dim]), got shape ", q.sizes());
  MB_CHECK(head_dim >= 2 && head_dim % 2 == 0, "'key_cache' must have an even head_dim >= 2, got shape ",
           key_cache.sizes());
  MB_CHECK(kv_heads >= 1 && q.size(2) % head_dim == 0 && (q.size(2) / head_dim) % kv_heads == 0,
           "'q' last dimension must be heads * head_dim with heads a multiple of the cache's ", kv_heads,
           " key/value heads of width ", head_dim, ", got shape ", q.sizes());
  const int64_t heads = q.size(2) / head_dim;
  const std::array<int64_t, 3> kv_shape{batch, 1, kv_heads * head_dim}, rot_shape{batch, 1, head_dim};
  MB_CHECK_SHAPE(k, kv_shape, "k");
  MB_CHECK_SHAPE(v, kv_shape, "v");
  MB_CHECK_SHAPE(cos, rot_shape, "cos");
  MB_CHECK_SHAPE(sin, rot_shape, "sin");
  MB_CHECK(value_cache.sizes() == key_cache.sizes(), "'value_cache' must have key_cache's shape ",
           key_cache.sizes(), ", got ", value_cache.sizes());
  MB_CHECK(key_cache.size(0) >= batch, "the caches hold ", key_cache.size(0), " rows but 'q' has ", batch);
  MB_CHECK(start >= 0 && start < max_length, "'start' must be in [0, ", max_length, ") (the cache length), got ",
           start);
  for (const auto* t : {&k, &v, &cos, &sin, &key_cache, &value_cache}) {
    MB_CHECK(t->scalar_type() == dt, "every tensor must have q's dtype ", torch_dtype_name(dt), ", got ",
             torch_dtype_name(t->scalar_type()));
    MB_CHECK_SAME_DEVICE(*t, q, "k/v/cos/sin/key_cache/value_cache", "q");
  }
  MB_CHECK(key_cache.is_contiguous() && value_cache.is_contiguous(),
           "'key_cache' and 'value_cache' must be contiguous (they are written in place)");
  if (key_mask.has_value()) {
    const auto& m = *key_mask;
    MB_CHECK_DTYPE(m, at::kBool, "key_mask");
    MB_CHECK_DIM(m, 2, "key_mask");
    MB_CHECK(m.size(0) >= batch && m.size(1) >= start + 1, "'key_mask' must cover [", batch, ", ", start + 1,
             "] (rows, keys up to start), got shape ", m.sizes());
    MB_CHECK_SAME_DEVICE(m, q, "key_mask", "q");
  }
  MB_CHECK(std::isfinite(scale), "'scale' must be finite, got ", scale);
  return DecodeDims{batch, heads, kv_heads, head_dim, key_cache.size(0), max_length, start};
}

}  // namespace attention
}  // namespace memboost
