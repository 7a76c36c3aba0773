#include "kernels/gemm.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "kernels/test_util.h"

namespace helix::kernels {
namespace {

using testing::RandomVector;

void CheckGemm(int64_t m, int64_t n, int64_t k, bool with_bias, ThreadPool* pool, uint32_t seed,
               DType w_dtype = DType::kF32) {
  std::mt19937 rng(seed);
  const std::vector<float> x = RandomVector(rng, m * k);
  std::vector<float> w = RandomVector(rng, n * k);
  const std::vector<float> bias = RandomVector(rng, n);
  // 16-bit weights: the kernel must compute with exactly the stored values.
  std::vector<uint16_t> w16(w.size());
  for (size_t i = 0; i < w.size(); ++i) {
    if (w_dtype == DType::kF16) {
      w16[i] = FloatToHalf(w[i]);
      w[i] = HalfToFloat(w16[i]);
    } else if (w_dtype == DType::kBF16) {
      w16[i] = FloatToBf16(w[i]);
      w[i] = Bf16ToFloat(w16[i]);
    }
  }
  std::vector<float> y(m * n, -12345.0f);
  GemmCpu({.x = x.data(),
           .w = w_dtype == DType::kF32 ? static_cast<const void*>(w.data()) : w16.data(),
           .bias = with_bias ? bias.data() : nullptr,
           .y = y.data(),
           .m = m,
           .n = n,
           .k = k,
           .w_dtype = w_dtype},
          pool);
  const std::string what = "m=" + std::to_string(m) + " n=" + std::to_string(n) +
                           " k=" + std::to_string(k) + (with_bias ? " bias " : " ") +
                           DTypeName(w_dtype);
  int failures = 0;
  for (int64_t r = 0; r < m; ++r) {
    for (int64_t c = 0; c < n; ++c) {
      double want = with_bias ? bias[c] : 0.0;
      double mag = std::abs(want);
      for (int64_t i = 0; i < k; ++i) {
        want += static_cast<double>(x[r * k + i]) * w[c * k + i];
        mag += std::abs(static_cast<double>(x[r * k + i]) * w[c * k + i]);
      }
      // fp32 accumulation error grows with the sum of |terms|.
      const double tol = 1e-6 + 2e-6 * mag;
      if (std::abs(y[r * n + c] - want) > tol && failures++ < 5) {
        ADD_FAILURE() << what << " y[" << r << "][" << c << "] = " << y[r * n + c] << " want "
                      << want;
      }
    }
  }
}

TEST(GemmTest, MatchesFloat64Reference) {
  ThreadPool pool(3);
  uint32_t seed = 1;
  for (ThreadPool* p : {static_cast<ThreadPool*>(nullptr), &pool}) {
    for (int64_t m : {1, 3, 17}) {
      for (auto [n, k] :
           {std::pair<int64_t, int64_t>{1, 1}, {5, 7}, {37, 67}, {131, 1031}, {9, 16}}) {
        for (bool bias : {false, true}) {
          for (DType t : {DType::kF32, DType::kF16, DType::kBF16}) {
            CheckGemm(m, n, k, bias, p, seed++, t);
          }
        }
      }
    }
  }
}

TEST(GemmTest, DecodeShapeManyRowsOfW) {
  // Enough output features that every thread gets several tiles.
  ThreadPool pool(4);
  CheckGemm(1, 1027, 257, true, &pool, 99);
  CheckGemm(64, 203, 129, false, &pool, 100);
}

TEST(GemmTest, ZeroKGivesBias) {
  const std::vector<float> bias = {1.5f, -2.0f, 3.0f};
  std::vector<float> y(6, 7.0f);
  GemmCpu({.x = nullptr, .w = nullptr, .bias = bias.data(), .y = y.data(), .m = 2, .n = 3, .k = 0},
          nullptr);
  EXPECT_EQ(y, (std::vector<float>{1.5f, -2.0f, 3.0f, 1.5f, -2.0f, 3.0f}));
}

TEST(GemmTest, ThreadCountDoesNotChangeResult) {
  std::mt19937 rng(5);
  const int64_t m = 3, n = 301, k = 777;
  const std::vector<float> x = RandomVector(rng, m * k);
  const std::vector<float> w = RandomVector(rng, n * k);
  std::vector<float> y1(m * n), y4(m * n);
  ThreadPool pool(4);
  GemmCpu({x.data(), w.data(), nullptr, y1.data(), m, n, k}, nullptr);
  GemmCpu({x.data(), w.data(), nullptr, y4.data(), m, n, k}, &pool);
  EXPECT_EQ(y1, y4);
}

// Strided batched GEMM: each entry against a double-precision reference, over interleaved
// rows (ldx, ldy wider than k, n) and per-entry weight slices; the gaps of y stay untouched.
TEST(GemmBatchedCpuTest, StridedEntriesMatchReference) {
  std::mt19937 rng(77);
  for (DType dt : {DType::kF32, DType::kBF16}) {
    const int64_t m = 3, n = 5, k = 7, batch = 4, ldx = batch * k + 2, ldy = batch * n + 1;
    const std::vector<float> x = RandomVector(rng, m * ldx);
    std::vector<float> w = RandomVector(rng, batch * n * k);
    std::vector<uint16_t> w16(w.size());
    for (size_t i = 0; i < w.size(); ++i) {
      if (dt == DType::kBF16) {
        w16[i] = FloatToBf16(w[i]);
        w[i] = Bf16ToFloat(w16[i]);
      }
    }
    std::vector<float> y(m * ldy, -7.0f);
    GemmBatchedCpu(
        {x.data(), ldx, k, dt == DType::kF32 ? static_cast<const void*>(w.data()) : w16.data(),
         n * k, y.data(), ldy, n, m, n, k, batch, dt},
        nullptr);
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t i = 0; i < m; ++i) {
        for (int64_t j = 0; j < n; ++j) {
          double want = 0;
          for (int64_t t = 0; t < k; ++t) {
            want += static_cast<double>(x[i * ldx + b * k + t]) * w[(b * n + j) * k + t];
          }
          EXPECT_NEAR(y[i * ldy + b * n + j], want, 1e-5) << DTypeName(dt) << " b=" << b;
        }
      }
    }
    for (int64_t i = 0; i < m; ++i) EXPECT_EQ(y[i * ldy + batch * n], -7.0f);  // the gap
  }
}

}  // namespace
}  // namespace helix::kernels
