// Every memboost op schema lives here (one TORCH_LIBRARY block); kernels are
// registered per device in csrc/cpu/*.cpp and csrc/cuda/*.cu, fake (meta)
// kernels in memboost/ops.py.
#include <Python.h>
#include <torch/library.h>

namespace memboost {
int add_bound_op(PyObject* module);  // csrc/bound_op.cpp
}

// Importing memboost._C loads the library, whose static initializers register
// the ops with the dispatcher; the module itself holds bind_op (bound_op.cpp).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  PyObject* module = PyModule_Create(&module_def);
  if (module != nullptr && memboost::add_bound_op(module) < 0) {
    Py_DECREF(module);
    return nullptr;
  }
  return module;
}

TORCH_LIBRARY(memboost, m) {
  // values uint8 [..., n] -> int32 [..., ceil(n/16)]; 16 two-bit values per
  // word, element j at bits 2j..2j+1 (LSB first); the tail is zero-padded.
  m.def("pack_2bit(Tensor values) -> Tensor");
  // int32 [..., w] -> uint8 [..., num_elements], num_elements <= 16*w.
  m.def("unpack_2bit(Tensor packed, int num_elements) -> Tensor");
  // Same with 8 four-bit values per word, element j at bits 4j..4j+3.
  m.def("pack_4bit(Tensor values) -> Tensor");
  m.def("unpack_4bit(Tensor packed, int num_elements) -> Tensor");
  // Mixed 2/4/16-bit weight (layout: csrc/common/mixed_format.h) -> W [N, K].
  m.def(
      "mixed_dequantize(Tensor plane2, Tensor lowbits, Tensor meta, Tensor mask, Tensor row_scale, "
      "Tensor outlier_rowptr, Tensor outlier_cols, Tensor outlier_vals, int group_size, ScalarType dtype) -> Tensor");
  // y = x @ W.T + bias straight from the mixed format, any leading batch shape.
  // act_bits 0: exact float products; 8 (CPU, group sizes that are multiples
  // of 64, any batch; an int8 GEMM from 12 rows): int8 activations with one scale per 32 values times
  // the integer codes. CUDA always computes exactly.
  m.def(
      "mixed_linear(Tensor x, Tensor plane2, Tensor lowbits, Tensor meta, Tensor mask, Tensor row_scale, "
      "Tensor outlier_rowptr, Tensor outlier_cols, Tensor outlier_vals, Tensor? bias, int group_size, "
      "int act_bits=0) -> Tensor");
  // Ternary (BitNet b1.58) weights, layout in csrc/common/trits.h: code t+1,
  // 4 trits per byte, rows padded to 128-trit chunks of 32 bytes.
  // int8 trits [..., cols] in {-1, 0, 1} -> uint8 [..., ceil(cols/128)*32].
  m.def("ternary_pack(Tensor trits) -> Tensor");
  // uint8 [..., ceil(cols/128)*32] -> int8 trits [..., cols].
  m.def("ternary_unpack(Tensor packed, int cols) -> Tensor");
  // packed uint8 [N, ceil(K/128)*32], scales float32 [N or 1, groups] -> W [N, K];
  // group_size 0: one scale per row (or tensor), else a multiple of 128.
  m.def("ternary_dequantize(Tensor packed, Tensor scales, int cols, int group_size, ScalarType dtype) -> Tensor");
  // y = x @ W.T + bias from the packed form, any leading batch shape;
  // act_bits 0: exact float activations, 8: per-row int8 activations (W1.58A8).
  m.def(
      "ternary_linear(Tensor x, Tensor packed, Tensor scales, Tensor? bias, int cols, int group_size, "
      "int act_bits) -> Tensor");
  // LoRT (ternary + low rank): y = x @ (alpha * T + A @ B.T).T + bias, T the
  // packed trits (as ternary_linear with group_size 0: alpha float32 [N or 1,
  // 1]), A float16 [N, rank], B float16 [cols, rank] (rank may be 0); act_bits
  // as ternary_linear's for the ternary part, the low-rank part in float32.
  m.def(
      "lort_linear(Tensor x, Tensor packed, Tensor alpha, Tensor A, Tensor B, Tensor? bias, int cols, "
      "int act_bits) -> Tensor");
  // base + (x @ B) @ A.T: a low-rank product added to an op's output (a
  // healed layer's corrector, memboost.heal). x [..., cols]; A [N, rank] and
  // B [cols, rank] of one dtype, float16 or float32; base [..., N] of x's
  // dtype or None (zeros). float32 sums, one rounding to x's dtype.
  m.def("low_rank_linear(Tensor x, Tensor A, Tensor B, Tensor? base) -> Tensor");
  // NF4 (layout and rounding: csrc/common/nf4.h). w (any shape, flattened)
  // -> codes uint8 [ceil(n/2)], absmax float32 [ceil(n/block_size)]; block_size even.
  m.def("nf4_quantize(Tensor w, int block_size) -> (Tensor, Tensor)");
  // Double quantization of absmax: (absmax - offset) in blocks of block_size
  // to the nearest entry of nested_map -> codes uint8 [len], nested_absmax
  // float32 [ceil(len/block_size)].
  m.def("nf4_quantize_absmax(Tensor absmax, Tensor offset, Tensor nested_map, int block_size) -> (Tensor, Tensor)");
  // -> the flattened weight [numel]; absmax float32 (plain) or uint8 codes
  // with nested_absmax / nested_map / nested_offset (double quantization;
  // empty tensors otherwise).
  m.def(
      "nf4_dequantize(Tensor codes, Tensor absmax, Tensor nested_absmax, Tensor nested_map, Tensor nested_offset, "
      "int numel, int block_size, int nested_block_size, ScalarType dtype) -> Tensor");
  // y = x @ W.T + bias, W = the NF4 weight [out_features, x.size(-1)], any
  // leading batch shape; act_bits 0: exact float, 8: int8 activations (CPU).
  m.def(
      "nf4_linear(Tensor x, Tensor codes, Tensor absmax, Tensor nested_absmax, Tensor nested_map, "
      "Tensor nested_offset, int out_features, int block_size, int nested_block_size, Tensor? bias, "
      "int act_bits) -> Tensor");
  // RMSNorm over the last dimension as transformers' modules compute it
  // (rounding rules in csrc/common/rms_norm.h): x float16/bfloat16/float32
  // [..., n], weight [n] of x's dtype; weight_offset: scale by (1 + weight)
  // in float32 (Gemma) instead of weight times the rounded normalized value.
  m.def("rms_norm(Tensor x, Tensor weight, float eps, bool weight_offset) -> Tensor");
  // One decode step of attention over a static KV cache (memboost.runtime):
  // q [B, 1, H*D], k and v [B, 1, KV*D] as the projections give them, cos and
  // sin [B, 1, D] at each row's position. Rotates q and k (transformers'
  // rotate_half convention, csrc/common/decode_attention.h), writes k and v to
  // the caches [Bmax, KV, Lmax, D] at position start, and attends each of the
  // H heads (grouped: head h reads key/value head h / (H / KV)) over keys
  // 0..start where key_mask [>= B, >= start+1] is true (all when none), in
  // float32 with softmax(scale * q.k). Returns [B, 1, H*D] in q's dtype; a row
  // that sees no key gets NaN, as scaled_dot_product_attention gives.
  m.def(
      "decode_attention(Tensor q, Tensor k, Tensor v, Tensor cos, Tensor sin, Tensor(a!) key_cache, "
      "Tensor(b!) value_cache, int start, Tensor? key_mask, float scale) -> Tensor");
  // int8 weights (layout: csrc/common/int8_args.h, llama.cpp's Q8_0): values
  // int8 [N, K], scales float16 [N, K/32], W[r, c] = values[r, c] * scales[r, c/32].
  m.def("int8_dequantize(Tensor values, Tensor scales, ScalarType dtype) -> Tensor");
  // y = x @ W.T + bias, any leading batch shape; act_bits 0: exact float;
  // 8 (CPU): x quantized to int8 per block of 32, int8 x int8 block dot
  // products (llama.cpp's Q8_0 x Q8_0). CUDA always computes exactly.
  m.def("int8_linear(Tensor x, Tensor values, Tensor scales, Tensor? bias, int act_bits=0) -> Tensor");
}

