#include <algorithm>
#include <cmath>
#include <limits>

#include "kernels/merge.h"

namespace helix::kernels {

void MergeStatesCpu(const MergeStatesParams& p, ThreadPool* pool) {
  if (p.rows <= 0) {
    return;
  }
  const float neg_inf = -std::numeric_limits<float>::infinity();
  const int64_t min_rows =
      std::max<int64_t>(1, 16384 / std::max<int64_t>(1, p.num_parts * p.head_dim));
  ParallelForMin(pool, p.rows, min_rows, [&](int64_t rb, int64_t re) {
    for (int64_t r = rb; r < re; ++r) {
      float* out = p.out + r * p.head_dim;
      // A NaN LSE (a part whose softmax saw a NaN) makes the row NaN: max_lse NaN, and with
      // it every weight, the sum and the LSE.
      float max_lse = neg_inf;
      for (int64_t i = 0; i < p.num_parts; ++i) {
        const float l = p.lse[i * p.rows + r];
        max_lse = std::isnan(l) ? l : std::max(max_lse, l);  // std::max keeps a NaN max_lse
      }
      std::fill(out, out + p.head_dim, 0.0f);
      if (max_lse == neg_inf) {
        if (p.out_lse != nullptr) {
          p.out_lse[r] = neg_inf;
        }
        continue;
      }
      float sum = 0.0f;
      for (int64_t i = 0; i < p.num_parts; ++i) {
        const float l = p.lse[i * p.rows + r];
        if (l == neg_inf) {
          continue;
        }
        const float w = std::exp(l - max_lse);
        sum += w;
        const float* o = p.o + (i * p.rows + r) * p.head_dim;
        for (int64_t e = 0; e < p.head_dim; ++e) {
          out[e] += w * o[e];
        }
      }
      const float inv = 1.0f / sum;
      for (int64_t e = 0; e < p.head_dim; ++e) {
        out[e] *= inv;
      }
      if (p.out_lse != nullptr) {
        p.out_lse[r] = max_lse + std::log(sum);
      }
    }
  });
}

}  // namespace helix::kernels
