#include "kernels/rmsnorm.h"

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

void CheckRmsNorm(int64_t rows, int64_t dim, bool with_residual, ThreadPool* pool, uint32_t seed) {
  std::mt19937 rng(seed);
  const std::vector<float> x = RandomVector(rng, rows * dim, -3.0f, 3.0f);
  const std::vector<float> weight = RandomVector(rng, dim, 0.5f, 1.5f);
  std::vector<float> residual = RandomVector(rng, rows * dim, -3.0f, 3.0f);
  const std::vector<float> residual_in = residual;
  std::vector<float> out(rows * dim);
  const float eps = 1e-5f;
  RmsNormCpu({.x = x.data(),
              .residual = with_residual ? residual.data() : nullptr,
              .weight = weight.data(),
              .out = out.data(),
              .rows = rows,
              .dim = dim,
              .eps = eps},
             pool);
  std::vector<double> want(rows * dim);
  std::vector<double> want_residual(rows * dim);
  for (int64_t r = 0; r < rows; ++r) {
    double ss = 0;
    for (int64_t i = 0; i < dim; ++i) {
      // The residual update happens in fp32 (it is stored as fp32).
      const float v = with_residual ? residual_in[r * dim + i] + x[r * dim + i] : x[r * dim + i];
      want_residual[r * dim + i] = v;
      ss += static_cast<double>(v) * v;
    }
    const double inv = 1.0 / std::sqrt(ss / dim + eps);
    for (int64_t i = 0; i < dim; ++i) {
      want[r * dim + i] = want_residual[r * dim + i] * inv * weight[i];
    }
  }
  const std::string what = "rows=" + std::to_string(rows) + " dim=" + std::to_string(dim) +
                           (with_residual ? " residual" : "");
  ExpectAllNear(want, out.data(), 2e-6, 1e-6, what);
  if (with_residual) {
    ExpectAllNear(want_residual, residual.data(), 0, 0, what + " residual");
  }
}

TEST(RmsNormTest, MatchesFloat64Reference) {
  ThreadPool pool(3);
  uint32_t seed = 1;
  for (ThreadPool* p : {static_cast<ThreadPool*>(nullptr), &pool}) {
    for (int64_t rows : {1, 5, 33}) {
      for (int64_t dim : {1, 7, 64, 4099}) {
        for (bool res : {false, true}) {
          CheckRmsNorm(rows, dim, res, p, seed++);
        }
      }
    }
  }
}

TEST(RmsNormTest, InPlaceOutput) {
  std::mt19937 rng(3);
  const int64_t dim = 19;
  std::vector<float> x = RandomVector(rng, 2 * dim);
  const std::vector<float> weight(dim, 1.0f);
  std::vector<float> expected(2 * dim);
  RmsNormCpu({x.data(), nullptr, weight.data(), expected.data(), 2, dim, 1e-6f}, nullptr);
  RmsNormCpu({x.data(), nullptr, weight.data(), x.data(), 2, dim, 1e-6f}, nullptr);
  EXPECT_EQ(x, expected);
}

TEST(RmsNormTest, ZeroInputGivesZeroNotNaN) {
  const std::vector<float> x(16, 0.0f), weight(16, 1.0f);
  std::vector<float> out(16, 1.0f);
  RmsNormCpu({x.data(), nullptr, weight.data(), out.data(), 1, 16, 1e-6f}, nullptr);
  for (float v : out) {
    EXPECT_EQ(v, 0.0f);
  }
}

// The optional 16-bit copy of the output (for the next GEMM): exactly the output rounded, both
// types, with and without the residual.
TEST(RmsNormTest, LowpCopyIsTheRoundedOutput) {
  std::mt19937 rng(5);
  ThreadPool pool(3);
  const int64_t rows = 9, dim = 2050;
  const std::vector<float> x = RandomVector(rng, rows * dim, -3.0f, 3.0f);
  const std::vector<float> weight = RandomVector(rng, dim, 0.5f, 1.5f);
  for (DType dt : {DType::kBF16, DType::kF16}) {
    for (bool with_residual : {false, true}) {
      std::vector<float> residual = RandomVector(rng, rows * dim), out(rows * dim);
      std::vector<uint16_t> lowp(rows * dim), want(rows * dim);
      RmsNormParams p{
          x.data(), with_residual ? residual.data() : nullptr, weight.data(), out.data(), rows, dim,
          1e-5f};
      p.out_lowp = lowp.data();
      p.out_lowp_dtype = dt;
      RmsNormCpu(p, &pool);
      StoreLowp(out.data(), rows * dim, dt, want.data());
      EXPECT_EQ(lowp, want) << DTypeName(dt) << (with_residual ? " residual" : "");
    }
  }
}

}  // namespace
}  // namespace helix::kernels
