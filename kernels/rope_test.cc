#include "kernels/rope.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "kernels/test_util.h"

namespace helix::kernels {
namespace {

using testing::ExpectAllNear;
using testing::RandomVector;

// Reference in long double: the angle pos * theta^(-2i/rotary_dim) is where precision matters.
std::vector<double> ReferenceRope(const std::vector<float>& x, const std::vector<int32_t>& pos,
                                  int64_t heads, int64_t head_dim, int64_t rotary_dim, float theta,
                                  RopeStyle style) {
  std::vector<double> out(x.begin(), x.end());
  const int64_t half = rotary_dim / 2;
  for (size_t t = 0; t < pos.size(); ++t) {
    for (int64_t h = 0; h < heads; ++h) {
      const int64_t base = (static_cast<int64_t>(t) * heads + h) * head_dim;
      for (int64_t i = 0; i < half; ++i) {
        const long double angle = static_cast<long double>(pos[t]) *
                                  std::pow(static_cast<long double>(theta),
                                           -2.0L * i / static_cast<long double>(rotary_dim));
        const long double c = std::cos(angle), s = std::sin(angle);
        const int64_t i0 = style == RopeStyle::kInterleaved ? base + 2 * i : base + i;
        const int64_t i1 = style == RopeStyle::kInterleaved ? base + 2 * i + 1 : base + i + half;
        const long double a = x[i0], b = x[i1];
        out[i0] = static_cast<double>(a * c - b * s);
        out[i1] = static_cast<double>(a * s + b * c);
      }
    }
  }
  return out;
}

TEST(RopeTest, MatchesReferenceBothStyles) {
  ThreadPool pool(3);
  std::mt19937 rng(1);
  const std::vector<int32_t> positions = {0, 1, 7, 4095, 500000, 1000000, 123457};
  struct Shape {
    int64_t heads, head_dim, rotary_dim;
  };
  for (RopeStyle style : {RopeStyle::kInterleaved, RopeStyle::kHalf}) {
    for (Shape s : {Shape{3, 16, 16}, Shape{2, 64, 32}, Shape{4, 128, 128}, Shape{1, 10, 6},
                    Shape{2, 256, 200}}) {
      for (float theta : {10000.0f, 1000000.0f}) {
        for (ThreadPool* p : {static_cast<ThreadPool*>(nullptr), &pool}) {
          const int64_t tokens = static_cast<int64_t>(positions.size());
          std::vector<float> x = RandomVector(rng, tokens * s.heads * s.head_dim);
          const std::vector<double> want =
              ReferenceRope(x, positions, s.heads, s.head_dim, s.rotary_dim, theta, style);
          RopeCpu({.x = x.data(),
                   .positions = positions.data(),
                   .tokens = tokens,
                   .heads = s.heads,
                   .head_dim = s.head_dim,
                   .rotary_dim = s.rotary_dim,
                   .theta = theta,
                   .style = style},
                  p);
          const std::string what = std::string(style == RopeStyle::kHalf ? "half" : "interleaved") +
                                   " head_dim=" + std::to_string(s.head_dim) +
                                   " rotary_dim=" + std::to_string(s.rotary_dim);
          // |x| <= 1: a few fp32 roundings of the rotation and of sin/cos.
          ExpectAllNear(want, x.data(), 0, 6e-7, what);
          // Dims past rotary_dim pass through bit-exactly (the tolerance above is absolute).
          for (int64_t t = 0; t < tokens; ++t) {
            for (int64_t h = 0; h < s.heads; ++h) {
              for (int64_t e = s.rotary_dim; e < s.head_dim; ++e) {
                const int64_t i = (t * s.heads + h) * s.head_dim + e;
                ASSERT_EQ(static_cast<double>(x[i]), want[i]) << what;
              }
            }
          }
        }
      }
    }
  }
}

TEST(RopeTest, LargePositionFirstPairRotatesByPosition) {
  // Pair 0 has frequency 1, so at position p it rotates by exactly p radians: a float angle
  // would be off by ~0.03 rad at p = 500000.
  const int32_t pos = 500000;
  std::vector<float> x = {1.0f, 0.0f, 1.0f, 0.0f};
  RopeCpu({x.data(), &pos, 1, 1, 4, 4, 10000.0f, RopeStyle::kInterleaved}, nullptr);
  EXPECT_NEAR(x[0], std::cos(500000.0), 1e-7);
  EXPECT_NEAR(x[1], std::sin(500000.0), 1e-7);
  std::vector<float> y = {1.0f, 1.0f, 0.0f, 0.0f};
  RopeCpu({y.data(), &pos, 1, 1, 4, 4, 10000.0f, RopeStyle::kHalf}, nullptr);
  EXPECT_NEAR(y[0], std::cos(500000.0), 1e-7);
  EXPECT_NEAR(y[2], std::sin(500000.0), 1e-7);
}

TEST(RopeTest, PositionZeroIsIdentity) {
  std::mt19937 rng(2);
  std::vector<float> x = RandomVector(rng, 3 * 32);
  const std::vector<float> before = x;
  const int32_t pos = 0;
  RopeCpu({x.data(), &pos, 1, 3, 32, 32, 10000.0f, RopeStyle::kHalf}, nullptr);
  EXPECT_EQ(x, before);
}

}  // namespace
}  // namespace helix::kernels
