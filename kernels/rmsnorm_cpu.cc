#include <algorithm>
#include <cmath>

#include "kernels/rmsnorm.h"

namespace helix::kernels {

void RmsNormCpu(const RmsNormParams& p, ThreadPool* pool) {
  if (p.rows <= 0 || p.dim <= 0) {
    return;
  }
  const int64_t min_rows = std::max<int64_t>(1, 32768 / p.dim);
  ParallelForMin(pool, p.rows, min_rows, [&](int64_t rb, int64_t re) {
    for (int64_t r = rb; r < re; ++r) {
      const float* x = p.x + r * p.dim;
      const float* v = x;
      if (p.residual != nullptr) {
        float* res = p.residual + r * p.dim;
        for (int64_t i = 0; i < p.dim; ++i) {
          res[i] += x[i];
        }
        v = res;
      }
      // Four double accumulators: exact squares, and short dependency chains.
      double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
      int64_t i = 0;
      for (; i + 4 <= p.dim; i += 4) {
        s0 += static_cast<double>(v[i]) * v[i];
        s1 += static_cast<double>(v[i + 1]) * v[i + 1];
        s2 += static_cast<double>(v[i + 2]) * v[i + 2];
        s3 += static_cast<double>(v[i + 3]) * v[i + 3];
      }
      for (; i < p.dim; ++i) {
        s0 += static_cast<double>(v[i]) * v[i];
      }
      const double mean = ((s0 + s1) + (s2 + s3)) / static_cast<double>(p.dim);
      const float inv = static_cast<float>(1.0 / std::sqrt(mean + static_cast<double>(p.eps)));
      float* out = p.out + r * p.dim;
      for (int64_t j = 0; j < p.dim; ++j) {
        out[j] = v[j] * inv * p.weight[j];
      }
      if (p.out_lowp != nullptr) {
        StoreLowp(out, p.dim, p.out_lowp_dtype, static_cast<uint16_t*>(p.out_lowp) + r * p.dim);
      }
    }
  });
}

}  // namespace helix::kernels
