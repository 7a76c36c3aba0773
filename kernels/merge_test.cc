#include "kernels/merge.h"

#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <random>
#include <vector>

#include "kernels/test_util.h"

namespace helix::kernels {
namespace {

using testing::ExpectAllNear;
using testing::RandomVector;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

TEST(MergeTest, MatchesFloat64Reference) {
  ThreadPool pool(3);
  std::mt19937 rng(1);
  for (ThreadPool* p : {static_cast<ThreadPool*>(nullptr), &pool}) {
    for (int64_t parts : {1, 2, 5}) {
      for (int64_t head_dim : {1, 8, 67}) {
        const int64_t rows = 41;
        const std::vector<float> o = RandomVector(rng, parts * rows * head_dim);
        std::vector<float> lse = RandomVector(rng, parts * rows, -30.0f, 30.0f);
        // Some empty parts, and one row where every part is empty.
        for (int64_t i = 0; i < parts * rows; i += 3) {
          lse[i] = kNegInf;
        }
        for (int64_t i = 0; i < parts; ++i) {
          lse[i * rows + 7] = kNegInf;
        }
        std::vector<float> out(rows * head_dim), out_lse(rows);
        MergeStatesCpu({o.data(), lse.data(), out.data(), out_lse.data(), parts, rows, head_dim},
                       p);
        std::vector<double> want(rows * head_dim, 0.0), want_lse(rows);
        for (int64_t r = 0; r < rows; ++r) {
          double sum = 0;
          for (int64_t i = 0; i < parts; ++i) {
            sum += std::exp(static_cast<double>(lse[i * rows + r]));
          }
          want_lse[r] = std::log(sum);  // log(0) = -inf for the all-empty row
          if (sum == 0) {
            continue;
          }
          for (int64_t i = 0; i < parts; ++i) {
            const double w = std::exp(lse[i * rows + r] - want_lse[r]);
            for (int64_t e = 0; e < head_dim; ++e) {
              want[r * head_dim + e] += w * o[(i * rows + r) * head_dim + e];
            }
          }
        }
        ExpectAllNear(want, out.data(), 1e-5, 1e-6, "out");
        ExpectAllNear(want_lse, out_lse.data(), 1e-6, 1e-6, "lse");
      }
    }
  }
}

TEST(MergeTest, EmptyPartChangesNothing) {
  std::mt19937 rng(2);
  const int64_t rows = 6, d = 16;
  std::vector<float> o = RandomVector(rng, 2 * rows * d);
  std::vector<float> lse = RandomVector(rng, 2 * rows, -5.0f, 5.0f);
  // Part 1 is empty; its O holds NaN garbage that must never be read into the sum.
  for (int64_t i = rows * d; i < 2 * rows * d; ++i) {
    o[i] = std::numeric_limits<float>::quiet_NaN();
  }
  for (int64_t r = 0; r < rows; ++r) {
    lse[rows + r] = kNegInf;
  }
  std::vector<float> out(rows * d), out_lse(rows);
  MergeStatesCpu({o.data(), lse.data(), out.data(), out_lse.data(), 2, rows, d}, nullptr);
  for (int64_t i = 0; i < rows * d; ++i) {
    EXPECT_FLOAT_EQ(out[i], o[i]);
  }
  for (int64_t r = 0; r < rows; ++r) {
    EXPECT_FLOAT_EQ(out_lse[r], lse[r]);
  }
}

TEST(MergeTest, AllEmptyGivesZerosAndNegInf) {
  const int64_t parts = 3, rows = 4, d = 9;
  const std::vector<float> o(parts * rows * d, std::numeric_limits<float>::quiet_NaN());
  const std::vector<float> lse(parts * rows, kNegInf);
  std::vector<float> out(rows * d, 5.0f), out_lse(rows, 5.0f);
  MergeStatesCpu({o.data(), lse.data(), out.data(), out_lse.data(), parts, rows, d}, nullptr);
  for (float v : out) {
    EXPECT_EQ(v, 0.0f);
  }
  for (float v : out_lse) {
    EXPECT_EQ(v, kNegInf);
  }
  // out_lse is optional.
  std::fill(out.begin(), out.end(), 5.0f);
  MergeStatesCpu({o.data(), lse.data(), out.data(), nullptr, parts, rows, d}, nullptr);
  for (float v : out) {
    EXPECT_EQ(v, 0.0f);
  }
}

// A part whose softmax saw a NaN (its LSE NaN) makes the whole row NaN, LSE included, wherever
// it is among the parts and whatever the others hold (finite, empty or NaN); a NaN inside a
// finite part's O only its own dimension. Rows without a NaN are unharmed.
TEST(MergeTest, NanPartMakesTheRowNan) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const int64_t parts = 3, d = 8;
  // Row r: the LSEs of its three parts.
  const std::vector<std::vector<float>> rows_lse = {{nan, 0.5f, -1.0f},      {0.5f, -1.0f, nan},
                                                    {kNegInf, nan, kNegInf}, {nan, nan, nan},
                                                    {0.25f, kNegInf, -0.5f}, {1.0f, 2.0f, 3.0f}};
  const int64_t rows = static_cast<int64_t>(rows_lse.size());
  std::mt19937 rng(4);
  std::vector<float> o = RandomVector(rng, parts * rows * d);
  std::vector<float> lse(parts * rows);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t i = 0; i < parts; ++i) {
      lse[i * rows + r] = rows_lse[r][i];
    }
  }
  o[(2 * rows + 5) * d + 3] = nan;  // row 5, part 2, dimension 3
  std::vector<float> out(rows * d, 5.0f), out_lse(rows, 5.0f);
  MergeStatesCpu({o.data(), lse.data(), out.data(), out_lse.data(), parts, rows, d}, nullptr);
  for (int64_t r = 0; r < 4; ++r) {
    EXPECT_TRUE(std::isnan(out_lse[r])) << "row " << r;
    for (int64_t e = 0; e < d; ++e) {
      EXPECT_TRUE(std::isnan(out[r * d + e])) << "row " << r << " dim " << e;
    }
  }
  EXPECT_TRUE(std::isfinite(out_lse[4]));
  for (int64_t e = 0; e < d; ++e) {
    EXPECT_TRUE(std::isfinite(out[4 * d + e])) << "dim " << e;
    EXPECT_EQ(std::isnan(out[5 * d + e]), e == 3) << "dim " << e;
  }
  EXPECT_TRUE(std::isfinite(out_lse[5]));
}

TEST(MergeTest, SplittingASoftmaxAndMergingIsExact) {
  // Two halves of one softmax over scores s: merging their (O, LSE) gives the whole.
  std::mt19937 rng(3);
  const int64_t n = 50, d = 8;
  const std::vector<float> s = RandomVector(rng, n, -4.0f, 4.0f);
  const std::vector<float> v = RandomVector(rng, n * d);
  auto attend = [&](int64_t b, int64_t e, float* o, float* lse) {
    double mx = -1e300, sum = 0;
    for (int64_t i = b; i < e; ++i) {
      mx = std::max(mx, static_cast<double>(s[i]));
    }
    std::vector<double> acc(d, 0.0);
    for (int64_t i = b; i < e; ++i) {
      const double w = std::exp(s[i] - mx);
      sum += w;
      for (int64_t k = 0; k < d; ++k) {
        acc[k] += w * v[i * d + k];
      }
    }
    for (int64_t k = 0; k < d; ++k) {
      o[k] = static_cast<float>(acc[k] / sum);
    }
    *lse = static_cast<float>(mx + std::log(sum));
  };
  std::vector<float> parts_o(2 * d), parts_lse(2), whole_o(d), whole_lse(1), out(d), out_lse(1);
  attend(0, 20, parts_o.data(), &parts_lse[0]);
  attend(20, n, parts_o.data() + d, &parts_lse[1]);
  attend(0, n, whole_o.data(), whole_lse.data());
  MergeStatesCpu({parts_o.data(), parts_lse.data(), out.data(), out_lse.data(), 2, 1, d}, nullptr);
  for (int64_t k = 0; k < d; ++k) {
    EXPECT_NEAR(out[k], whole_o[k], 1e-6);
  }
  EXPECT_NEAR(out_lse[0], whole_lse[0], 1e-6);
}

}  // namespace
}  // namespace helix::kernels
