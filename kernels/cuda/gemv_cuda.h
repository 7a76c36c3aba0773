// Decode-sized products with 16-bit weights without cuBLAS: y = x w^T (+ bias) for a few rows
// of x (GemmCpu's contract, kernels/gemm.h). x stays fp32 (no conversion kernel, and the
// numerics are the CPU's up to summation order), weights are read once with 16-byte loads, fp32
// accumulation; one warp per weight row, the bias added as the row's sum is written.
#ifndef HELIX_KERNELS_CUDA_GEMV_CUDA_H_
#define HELIX_KERNELS_CUDA_GEMV_CUDA_H_

#include <cuda_runtime.h>

#include "kernels/gemm.h"

namespace helix::kernels::cuda {

// The most rows of x GemvCuda takes (each row of x is read from cache once per weight row).
constexpr int64_t kGemvMaxRows = 4;

// Whether GemvCuda takes p: fp16 or bf16 weights, 1 <= m <= kGemvMaxRows, n >= 1, k >= 1 and
// a multiple of 8, x and w 16-byte aligned. p.x_lowp and p.same_x are not used.
bool GemvApplies(const GemmParams& p);

// REQUIRES: GemvApplies(p); device pointers.
cudaError_t GemvCuda(const GemmParams& p, cudaStream_t stream);

}  // namespace helix::kernels::cuda

#endif  // HELIX_KERNELS_CUDA_GEMV_CUDA_H_
