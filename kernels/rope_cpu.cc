#include <algorithm>
#include <cmath>

#include "kernels/rope.h"

namespace helix::kernels {
namespace {

// Pairs whose sin/cos are computed at once and then applied to every head of a token.
constexpr int64_t kPairChunk = 64;

}  // namespace

void RopeCpu(const RopeParams& p, ThreadPool* pool) {
  if (p.tokens <= 0 || p.heads <= 0 || p.rotary_dim < 2) {
    return;
  }
  const int64_t half = p.rotary_dim / 2;
  const int64_t min_tokens = std::max<int64_t>(1, 16384 / (p.heads * p.rotary_dim + 32 * half));
  ParallelForMin(pool, p.tokens, min_tokens, [&](int64_t tb, int64_t te) {
    float cos_v[kPairChunk];
    float sin_v[kPairChunk];
    for (int64_t t = tb; t < te; ++t) {
      const double pos = static_cast<double>(p.positions[t]);
      float* xt = p.x + t * p.heads * p.head_dim;
      for (int64_t i0 = 0; i0 < half; i0 += kPairChunk) {
        const int64_t cnt = std::min(kPairChunk, half - i0);
        for (int64_t j = 0; j < cnt; ++j) {
          const double inv_freq =
              p.inv_freq != nullptr
                  ? p.inv_freq[i0 + j]
                  : std::pow(static_cast<double>(p.theta), -2.0 * static_cast<double>(i0 + j) /
                                                               static_cast<double>(p.rotary_dim));
          const double angle = pos * inv_freq;
          cos_v[j] = static_cast<float>(std::cos(angle) * p.mscale);
          sin_v[j] = static_cast<float>(std::sin(angle) * p.mscale);
        }
        for (int64_t h = 0; h < p.heads; ++h) {
          float* xh = xt + h * p.head_dim;
          if (p.style == RopeStyle::kInterleaved) {
            for (int64_t j = 0; j < cnt; ++j) {
              const int64_t i = i0 + j;
              const float a = xh[2 * i], b = xh[2 * i + 1];
              xh[2 * i] = a * cos_v[j] - b * sin_v[j];
              xh[2 * i + 1] = a * sin_v[j] + b * cos_v[j];
            }
          } else {
            for (int64_t j = 0; j < cnt; ++j) {
              const int64_t i = i0 + j;
              const float a = xh[i], b = xh[i + half];
              xh[i] = a * cos_v[j] - b * sin_v[j];
              xh[i + half] = a * sin_v[j] + b * cos_v[j];
            }
          }
        }
      }
    }
  });
}

}  // namespace helix::kernels
