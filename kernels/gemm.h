// Dense matrix multiply y = x * w^T (+ bias) for the CPU backend: projections and the LM head.
// Activations, bias and output are fp32; weights fp32, fp16 or bf16 (converted as they are
// loaded, fp32 accumulation). Stateless; thread-safe for distinct outputs (parallelism comes
// from the pool).
#ifndef HELIX_KERNELS_GEMM_H_
#define HELIX_KERNELS_GEMM_H_

#include <cstdint>

#include "kernels/dtype.h"
#include "kernels/thread_pool.h"

namespace helix::kernels {

struct GemmParams {
  const float* x;     // [m][k] activations, row-major
  const void* w;      // [n][k] weights of w_dtype, row-major (llama2.c / PyTorch [out][in])
  const float* bias;  // [n], or nullptr
  float* y;           // [m][n]; must not alias x, w or bias
  int64_t m, n, k;
  DType w_dtype = DType::kF32;
};

// Parallel over n; each weight row is read from memory once per call for all m rows, which
// is what makes decode (m = batch) run at weight-streaming bandwidth.
// pool may be nullptr (runs on the calling thread).
void GemmCpu(const GemmParams& p, ThreadPool* pool);

}  // namespace helix::kernels

#endif  // HELIX_KERNELS_GEMM_H_
