#include "kernels/silu_mul.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <string>
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

// Non-finite and huge gates give what the scalar formula gives in float (std::exp overflowing
// to +inf: silu(-inf) = -inf / inf = NaN), whichever lane of the 8-wide path or the scalar tail
// they fall in.
TEST(SiluMulTest, NonFiniteAndHugeGatesAlikeOnEveryLane) {
  const float inf = std::numeric_limits<float>::infinity();
  // -88.72283935546875 is the first float whose e^-x overflows.
  const float gates[] = {-inf,   inf,          -100.0f, 100.0f, -88.6f, -88.72283935546875f,
                         -89.0f, std::nanf("")};
  const float ups[] = {1.0f, -2.0f, inf, -inf, 0.5f};
  for (float g0 : gates) {
    for (float u0 : ups) {
      const int64_t n = 19;  // two 8-wide steps and a tail of 3
      std::vector<float> gate(n, g0), up(n, u0), out(n);
      SiluMulCpu({gate.data(), up.data(), out.data(), n}, nullptr);
      const float want = g0 / (1.0f + std::exp(-g0)) * u0;
      std::vector<double> w(n, want);
      ExpectAllNear(w, out.data(), 1e-6, 1e-30,
                    "gate " + std::to_string(g0) + " up " + std::to_string(u0));
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

// Rows of a fused gate|up GEMM output: row r's gate at r * ld, its up `cols` further.
TEST(SiluMulTest, StridedRowsOfAFusedGemm) {
  std::mt19937 rng(3);
  const int64_t rows = 5, cols = 19, ld = 2 * cols;
  const std::vector<float> h13 = RandomVector(rng, rows * ld, -6.0f, 6.0f);
  std::vector<float> gate(rows * cols), up(rows * cols);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      gate[r * cols + c] = h13[r * ld + c];
      up[r * cols + c] = h13[r * ld + cols + c];
    }
  }
  std::vector<float> want(rows * cols), got(rows * cols);
  SiluMulCpu({gate.data(), up.data(), want.data(), rows * cols}, nullptr);
  SiluMulCpu({h13.data(), h13.data() + cols, got.data(), rows * cols, cols, ld}, nullptr);
  // Not bitwise: rows of 19 split into vector and scalar parts differently.
  std::vector<double> want_d(want.begin(), want.end());
  ExpectAllNear(want_d, got.data(), 1e-6, 1e-7, "strided");
}

// The optional 16-bit copy of the output (for the next GEMM): exactly the output rounded, both
// types, plain and strided (a pool splits the plain range).
TEST(SiluMulTest, LowpCopyIsTheRoundedOutput) {
  std::mt19937 rng(4);
  ThreadPool pool(3);
  const int64_t rows = 3, cols = 40000, ld = 2 * cols, n = rows * cols;
  const std::vector<float> h13 = RandomVector(rng, rows * ld, -6.0f, 6.0f);
  for (DType dt : {DType::kBF16, DType::kF16}) {
    for (bool strided : {false, true}) {
      std::vector<float> out(n);
      std::vector<uint16_t> lowp(n), want(n);
      SiluMulParams p{h13.data(), h13.data() + n, out.data(), n};
      if (strided) p = {h13.data(), h13.data() + cols, out.data(), n, cols, ld};
      p.out_lowp = lowp.data();
      p.out_lowp_dtype = dt;
      SiluMulCpu(p, &pool);
      StoreLowp(out.data(), n, dt, want.data());
      EXPECT_EQ(lowp, want) << DTypeName(dt) << (strided ? " strided" : "");
    }
  }
}

}  // namespace
}  // namespace helix::kernels
