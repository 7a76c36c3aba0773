// Dense fp32 matrix multiply y = x * w^T (+ bias) for the CPU backend: projections and
// the LM head. Stateless; thread-safe for distinct outputs (parallelism comes from the pool).
#ifndef HELIX_KERNELS_GEMM_H_
#define HELIX_KERNELS_GEMM_H_

#include <cstdint>

#include "kernels/thread_pool.h"

namespace helix::kernels {

struct GemmParams {
  const float* x;     // [m][k] activations, row-major
  const float* w;     // [n][k] weights, row-major (llama2.c / PyTorch [out][in])
  const float* bias;  // [n], or nullptr
  float* y;           // [m][n]; must not alias x, w or bias
  int64_t m, n, k;
};

// Parallel over n; each weight row is read from memory once per call for all m rows, which
// is what makes decode (m = batch) run at weight-streaming bandwidth.
// pool may be nullptr (runs on the calling thread).
void GemmCpu(const GemmParams& p, ThreadPool* pool);

}  // namespace helix::kernels

#endif  // HELIX_KERNELS_GEMM_H_
