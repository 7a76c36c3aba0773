// Dense y = x w^T (+ bias) on the GPU through cuBLAS, with GemmCpu's contract
// (kernels/gemm.h): fp32 activations, bias and output; weights fp32, fp16 or bf16; fp32
// accumulation. For 16-bit weights the activations are first rounded (nearest even) to the
// weight type into the caller's workspace (cuBLAS multiplies equal input types), so results
// agree with the CPU to bf16 / fp16 tolerance, not fp32's. fp32 weights use plain fp32 (no
// TF32). Stateless; thread-safe for distinct handles.
#ifndef HELIX_KERNELS_CUDA_GEMM_CUDA_H_
#define HELIX_KERNELS_CUDA_GEMM_CUDA_H_

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstddef>

#include "kernels/gemm.h"

namespace helix::kernels::cuda {

// Workspace bytes GemmCuda needs: m * k of the weight type for 16-bit weights without
// p.x_lowp, else 0.
size_t GemmCudaWorkspaceBytes(const GemmParams& p);

// REQUIRES: device pointers; workspace of GemmCudaWorkspaceBytes(p) bytes (256-byte aligned);
//   `handle` is the caller's (created once; give it its own workspace with cublasSetWorkspace
//   before capturing CUDA graphs, so that cuBLAS allocates nothing). Sets the handle's stream
//   when it is another one (which also drops such a workspace: set the stream first).
// Returns cudaErrorUnknown (after printing the cuBLAS status) when cuBLAS fails, and
// cudaErrorInvalidValue for a dimension (m, n, k; with GemmBatchedCuda also batch, ldy, and
// ldx with fp32 weights) above cuBLAS's int range.
// x_converted: the workspace already holds x converted to the weight type (by the previous
// GemmCuda call with the same x, m, k and w_dtype, which nothing wrote in between): no
// conversion kernel. With p.x_lowp (16-bit weights) the GEMM reads that, converts nothing and
// leaves the workspace as it was.
cudaError_t GemmCuda(cublasHandle_t handle, const GemmParams& p, void* workspace,
                     cudaStream_t stream, bool x_converted = false);

// Workspace bytes GemmBatchedCuda needs: batch * m * k of the weight type for 16-bit weights
// (the activations converted into contiguous rows), else 0.
size_t GemmBatchedCudaWorkspaceBytes(const GemmBatchedParams& p);
// GemmBatchedCpu's contract (kernels/gemm.h) with GemmCuda's numerics, as one
// cublasGemmStridedBatchedEx (plus one conversion kernel for 16-bit weights).
cudaError_t GemmBatchedCuda(cublasHandle_t handle, const GemmBatchedParams& p, void* workspace,
                            cudaStream_t stream);

}  // namespace helix::kernels::cuda

#endif  // HELIX_KERNELS_CUDA_GEMM_CUDA_H_
