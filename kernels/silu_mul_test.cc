#include "kernels/silu_mul.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "kernels/test_util.h"

namespace helix::kernels {
namespace {

using testing::ExpectAllNear;
using testing::RandomVector;

TEST(SiluMulTest, MatchesFloat64Reference) {
  ThreadPool pool(3);
  std::mt19937 rng(1);
  for (ThreadPool* p : {static_cast<ThreadPool*>(nullptr), &pool}) {
    for (int64_t n : {1, 7, 8, 1003, 70001}) {
      std::vector<float> gate = RandomVector(rng, n, -12.0f, 12.0f);
      const std::vector<float> up = RandomVector(rng, n, -2.0f, 2.0f);
      // Extremes: saturation on both sides and exact zero.
      const float extremes[] = {0.0f, -0.0f, 100.0f, -100.0f, 88.0f, -88.0f, 1e-30f, -200.0f};
      for (int64_t i = 0; i < n && i < 8; ++i) {
        gate[(i * 5) % n] = extremes[i];
      }
      std::vector<float> out(n);
      SiluMulCpu({gate.data(), up.data(), out.data(), n}, p);
      std::vector<double> want(n);
      for (int64_t i = 0; i < n; ++i) {
        const double g = gate[i];
        want[i] = g / (1.0 + std::exp(-g)) * up[i];
      }
      ExpectAllNear(want, out.data(), 1e-6, 1e-7, "n=" + std::to_string(n));
    }
  }
}

TEST(SiluMulTest, InPlace) {
  std::mt19937 rng(2);
  std::vector<float> gate = RandomVector(rng, 37, -4.0f, 4.0f);
  const std::vector<float> up = RandomVector(rng, 37);
  std::vector<float> expected(37);
  SiluMulCpu({gate.data(), up.data(), expected.data(), 37}, nullptr);
  SiluMulCpu({gate.data(), up.data(), gate.data(), 37}, nullptr);
  EXPECT_EQ(gate, expected);
}

}  // namespace
}  // namespace helix::kernels
