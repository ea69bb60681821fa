#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <cstring>

#include "common/rms_norm.h"

using namespace memboost::rms;

// Rounds a float to bfloat16 (round to nearest even) and back, as torch does.
static float round_bf16(float v) {
  uint32_t bits;
  std::memcpy(&bits, &v, 4);
  bits += 0x7FFFu + ((bits >> 16) & 1u);
  bits &= 0xFFFF0000u;
  float out;
  std::memcpy(&out, &bits, 4);
  return out;
}

TEST(RmsNorm, InverseRms) {
  // x = [3, 4]: mean of squares 12.5
  EXPECT_FLOAT_EQ(inverse_rms(25.f, 2, 0.f), 1.f / std::sqrt(12.5f));
  EXPECT_FLOAT_EQ(inverse_rms(0.f, 8, 1e-6f), 1.f / std::sqrt(1e-6f));  // an all-zero row stays finite with eps
}

TEST(RmsNorm, LlamaRoundsTheNormalizedValueBeforeTheWeight) {
  const float x = 1.2345678f, r = 0.987654f, w = 1.5f;
  const float llama = output(x, r, w, false, round_bf16);
  EXPECT_EQ(llama, round_bf16(w * round_bf16(x * r)));
  const float identity = output(x, r, w, false, [](float v) { return v; });
  EXPECT_EQ(identity, w * (x * r));  // float32: no rounding step
}

TEST(RmsNorm, GemmaScalesByOnePlusWeightAndRoundsOnce) {
  const float x = -0.75f, r = 1.25f, w = -0.125f;
  EXPECT_EQ(output(x, r, w, true, round_bf16), x * r * (1.f + w));  // the caller rounds the result once
}
