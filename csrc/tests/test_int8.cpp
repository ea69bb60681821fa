#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#define MEMBOOST_NO_TORCH 1
#include "cpu/int8/act_quant.h"
#include "cpu/int8/dot.h"

using namespace memboost::cpu;

TEST(Int8Activations, RowScaleRoundingPaddingAndBlockSums) {
  std::mt19937 rng(3);
  std::normal_distribution<float> normal(0.f, 2.f);
  const int64_t cols = 70, padded = 96;
  std::vector<float> x(cols);
  for (auto& v : x) v = normal(rng);
  x[5] = -9.5f;  // the absmax, negative
  std::vector<int8_t> q(padded, 99);
  std::vector<int32_t> sums(padded / kActBlock);
  const float scale = quantize_row_int8(x.data(), cols, padded, q.data(), sums.data());
  EXPECT_FLOAT_EQ(scale, 9.5f / 127.f);
  EXPECT_EQ(q[5], -127);
  for (int64_t i = 0; i < cols; ++i) {
    EXPECT_LE(std::fabs(q[i] * scale - x[i]), 0.5f * scale + 1e-6f) << i;
  }
  for (int64_t i = cols; i < padded; ++i) EXPECT_EQ(q[i], 0);
  for (int64_t b = 0; b < padded / kActBlock; ++b) {
    int32_t s = 0;
    for (int64_t j = 0; j < kActBlock; ++j) s += q[b * kActBlock + j];
    EXPECT_EQ(sums[b], s);
  }
}

TEST(Int8Activations, RoundingEqualsNearbyintTiesToEven) {
  // every quarter in the int8 range (ties included), then random values
  for (float v = -128.f; v <= 128.f; v += 0.25f) EXPECT_EQ(round_half_even_small(v), std::nearbyint(v)) << v;
  EXPECT_EQ(round_half_even_small(2.5f), 2.f);
  EXPECT_EQ(round_half_even_small(-3.5f), -4.f);
  std::mt19937 rng(5);
  std::uniform_real_distribution<float> uniform(-127.f, 127.f);
  for (int i = 0; i < 100000; ++i) {
    const float v = uniform(rng);
    ASSERT_EQ(round_half_even_small(v), std::nearbyint(v)) << v;
  }
}

TEST(Int8Activations, ZeroRowHasZeroScale) {
  std::vector<float> x(32, 0.f);
  std::vector<int8_t> q(32);
  std::vector<int32_t> sums(1);
  EXPECT_EQ(quantize_row_int8(x.data(), 32, 32, q.data(), sums.data()), 0.f);
  EXPECT_EQ(sums[0], 0);
}

#if MB_HAVE_X86_KERNELS
MB_TARGET_AVX2 static int32_t dot32_avx2(const uint8_t* u, const int8_t* s) {
  const __m256i acc = dpbusd_avx2(_mm256_setzero_si256(), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u)),
                                  _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
  return hsum_epi32_avx2(acc);
}

MB_TARGET_AVX512 static int32_t dot32_vnni(const uint8_t* u, const int8_t* s) {
  const __m256i acc = dpbusd_vnni256(_mm256_setzero_si256(), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u)),
                                     _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s)));
  return hsum_epi32_avx2(acc);
}

MB_TARGET_AVX512 static int32_t dot64_vnni(const uint8_t* u, const int8_t* s) {
  return hsum_epi32_512(dpbusd_vnni512(_mm512_setzero_si512(), _mm512_loadu_si512(u), _mm512_loadu_si512(s)));
}

// The SIMD building blocks equal the portable dot product (run only where
// this CPU has the instruction set).
TEST(Int8Dot, SimdMatchesPortable) {
  std::mt19937 rng(7);
  std::uniform_int_distribution<int> code(0, 127), act(-128, 127);
  uint8_t u[64];
  int8_t s[64];
  const bool avx2 = __builtin_cpu_supports("avx2");
  const bool vnni = __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
                    __builtin_cpu_supports("avx512bw");
  for (int trial = 0; trial < 100; ++trial) {
    for (int i = 0; i < 64; ++i) {
      u[i] = static_cast<uint8_t>(trial % 2 ? code(rng) : code(rng) % 4);
      s[i] = static_cast<int8_t>(act(rng));
    }
    if (avx2) EXPECT_EQ(dot32_avx2(u, s), dot_u8s8(u, s, 32));
    if (vnni) {
      EXPECT_EQ(dot32_vnni(u, s), dot_u8s8(u, s, 32));
      EXPECT_EQ(dot64_vnni(u, s), dot_u8s8(u, s, 64));
    }
  }
}

// The AVX2 activation quantizer gives the scalar one's scale, codes and sums
// bit for bit: odd lengths (vector body + scalar tail), ties, a NaN, an inf row.
TEST(Int8Activations, Avx2RowEqualsScalar) {
  if (!__builtin_cpu_supports("avx2")) GTEST_SKIP() << "this CPU has no AVX2";
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.f, 1.5f);
  for (int64_t cols : {1, 7, 31, 32, 33, 70, 576, 1000}) {
    const int64_t padded = (cols + kActBlock - 1) / kActBlock * kActBlock + kActBlock;
    for (int trial = 0; trial < 4; ++trial) {
      std::vector<float> x(cols);
      for (auto& v : x) v = normal(rng);
      if (trial == 1) {  // ties: amax 127 makes x * inv the value itself
        for (int64_t i = 0; i < cols; ++i) x[i] = 0.5f * static_cast<float>(static_cast<int>(i % 255) - 127);
        x[0] = 127.f;
      }
      if (trial == 2) x[cols / 2] = std::nanf("");
      if (trial == 3) x[cols - 1] = INFINITY;
      std::vector<int8_t> q0(padded, 9), q1(padded, 9);
      std::vector<int32_t> s0(padded / kActBlock), s1(padded / kActBlock);
      const float a = quantize_row_int8(x.data(), cols, padded, q0.data(), s0.data());
      const float b = quantize_row_int8_avx2(x.data(), cols, padded, q1.data(), s1.data());
      EXPECT_EQ(std::memcmp(&a, &b, sizeof a), 0) << cols << " " << trial;
      EXPECT_EQ(q0, q1) << cols << " " << trial;
      EXPECT_EQ(s0, s1) << cols << " " << trial;
    }
  }
}
#endif

TEST(Int8Activations, BlockScalesKeepSmallValuesBesideAHugeChannel) {
  // One huge channel spoils a row scale but only its own block's scale.
  std::vector<float> x(128, 0.01f);
  x[3] = 500.f;
  std::vector<int8_t> q(128);
  std::vector<float> scales(2);
  std::vector<int32_t> sums(4);
  quantize_row_int8_blocks(x.data(), 128, 128, 64, q.data(), scales.data(), sums.data());
  EXPECT_FLOAT_EQ(scales[0], 500.f / 127.f);
  EXPECT_FLOAT_EQ(scales[1], 0.01f / 127.f);
  EXPECT_EQ(q[70], 127);  // second block: full precision
  EXPECT_EQ(q[10], 0);    // first block: lost beside the huge channel
  EXPECT_EQ(sums[2], 32 * 127);
  // a tail shorter than a block is zero-padded
  std::vector<float> y(80, 1.f);
  std::vector<int8_t> qy(128, 5);
  quantize_row_int8_blocks(y.data(), 80, 128, 64, qy.data(), scales.data(), sums.data());
  EXPECT_EQ(qy[79], 127);
  EXPECT_EQ(qy[80], 0);
  EXPECT_EQ(sums[3], 0);
}

#if MB_HAVE_X86_KERNELS
// cpu::exp2_ps256 (the mixed kernels' per-row scale table) against std::exp2:
// within 1.5e-7 relative over every exponent a row's scales can take, and
// the same rounding into subnormals near float's normal range.
MB_TARGET_AVX2 static void exp2_ps256_into(const float* v, float* out) {
  _mm256_storeu_ps(out, exp2_ps256(_mm256_loadu_ps(v)));
}

TEST(IsaMath, Exp2Ps256MatchesExp2) {
  if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma")) GTEST_SKIP() << "this CPU has no AVX2/FMA";
  std::vector<float> v;
  for (float x = -149.f; x <= 127.f; x += 0.0371f) v.push_back(x);
  for (float x : {0.f, -0.f, 0.5f, -0.5f, 1.f, -126.f, -126.6f, 126.9f}) v.push_back(x);
  while (v.size() % 8) v.push_back(1.f);
  std::vector<float> got(v.size());
  for (size_t i = 0; i < v.size(); i += 8) exp2_ps256_into(v.data() + i, got.data() + i);
  for (size_t i = 0; i < v.size(); ++i) {
    const double want = std::exp2(static_cast<double>(v[i]));
    if (want >= 1.1754944e-38) {
      EXPECT_LE(std::fabs(got[i] - want) / want, 1.5e-7) << v[i];
    } else {  // subnormal results: within one subnormal step
      EXPECT_LE(std::fabs(got[i] - want), 1.5e-45) << v[i];
    }
  }
}
#endif
