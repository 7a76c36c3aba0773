// Helpers shared by the kernels/ unit tests (not part of the library): seeded random inputs
// and element-wise comparison with a relative + absolute bound. Not thread-safe (test-only).
#ifndef HELIX_KERNELS_TEST_UTIL_H_
#define HELIX_KERNELS_TEST_UTIL_H_

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

namespace helix::kernels::testing {

inline std::vector<float> RandomVector(std::mt19937& rng, int64_t n, float lo = -1.0f,
                                       float hi = 1.0f) {
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) {
    x = dist(rng);
  }
  return v;
}

// Checks |got - want| <= atol + rtol * |want| element-wise, after checking that infinities
// and NaNs sit at the same places. Reports the first few mismatches.
inline void ExpectAllNear(const std::vector<double>& want, const float* got, double rtol,
                          double atol, const std::string& what) {
  int reported = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    const double g = got[i], w = want[i];
    bool ok;
    if (std::isnan(w) || std::isnan(g)) {
      ok = std::isnan(w) && std::isnan(g);
    } else if (std::isinf(w) || std::isinf(g)) {
      ok = w == g;
    } else {
      ok = std::abs(g - w) <= atol + rtol * std::abs(w);
    }
    if (!ok && reported++ < 5) {
      ADD_FAILURE() << what << ": element " << i << " got " << g << " want " << w;
    }
  }
}

}  // namespace helix::kernels::testing

#endif  // HELIX_KERNELS_TEST_UTIL_H_
