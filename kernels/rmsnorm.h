// RMSNorm over the last dimension, optionally fused with the residual add, for the CPU
// backend. Stateless; thread-safe for distinct outputs.
#ifndef HELIX_KERNELS_RMSNORM_H_
#define HELIX_KERNELS_RMSNORM_H_

#include <cstdint>

#include "kernels/dtype.h"
#include "kernels/thread_pool.h"

namespace helix::kernels {

struct RmsNormParams {
  const float* x;       // [rows][dim]
  float* residual;      // [rows][dim] or nullptr: if set, residual += x first (in place) and the
                        // norm is taken of the updated residual
  const float* weight;  // [dim]
  float* out;           // [rows][dim]; may alias x
  int64_t rows, dim;
  float eps;
  // Optional second output: out rounded to out_lowp_dtype (kF16 or kBF16, to nearest even),
  // [rows][dim], for a GEMM with 16-bit weights that takes it as its x (GemmParams::x_lowp)
  // instead of rounding out itself. nullptr = not written.
  void* out_lowp = nullptr;
  DType out_lowp_dtype = DType::kBF16;
};

// out = v / sqrt(mean(v^2) + eps) * weight, v = x or the updated residual. The sum of
// squares is accumulated in double. pool may be nullptr.
void RmsNormCpu(const RmsNormParams& p, ThreadPool* pool);

}  // namespace helix::kernels

#endif  // HELIX_KERNELS_RMSNORM_H_
