#include <cmath>

#include "kernels/cpu_vec.h"
#include "kernels/silu_mul.h"

namespace helix::kernels {

void SiluMulCpu(const SiluMulParams& p, ThreadPool* pool) {
  if (p.cols > 0) {
    for (int64_t r = 0; r < p.n / p.cols; ++r) {
      SiluMulParams row{p.gate + r * p.ld, p.up + r * p.ld, p.out + r * p.cols, p.cols};
      if (p.out_lowp != nullptr) {
        row.out_lowp = static_cast<uint16_t*>(p.out_lowp) + r * p.cols;
        row.out_lowp_dtype = p.out_lowp_dtype;
      }
      SiluMulCpu(row, pool);
    }
    return;
  }
  ParallelForMin(pool, p.n, 16384, [&](int64_t b, int64_t e) {
    int64_t i = b;
    const vec::V8 one = vec::Set1(1.0f);
    for (; i + 8 <= e; i += 8) {
      const vec::V8 g = vec::Load(p.gate + i);
      const vec::V8 u = vec::Load(p.up + i);
      const vec::V8 den = vec::Add(one, vec::Exp(vec::Sub(vec::Zero(), g)));
      vec::Store(p.out + i, vec::Div(vec::Mul(g, u), den));
    }
    for (; i < e; ++i) {
      const float g = p.gate[i];
      p.out[i] = g * p.up[i] / (1.0f + std::exp(-g));
    }
    if (p.out_lowp != nullptr) {
      StoreLowp(p.out + b, e - b, p.out_lowp_dtype, static_cast<uint16_t*>(p.out_lowp) + b);
    }
  });
}

}  // namespace helix::kernels
