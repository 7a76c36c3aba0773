#include "kernels/cuda/gemm_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <cstdio>
#include <initializer_list>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_util.cuh"

namespace helix::kernels::cuda {
namespace {

constexpr int kThreads = 256;

unsigned GridFor(int64_t n) {
  return static_cast<unsigned>(std::clamp<int64_t>((n + kThreads - 1) / kThreads, 1, 1 << 20));
}

template <typename T>
__global__ void ConvertKernel(const float* x, T* out, int64_t n) {
  PdlEnter();  // first: see HELIX_LAUNCH_PDL
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = FromFloat<T>(x[i]);
  }
}

// out[b][i][j] = x[b * x_stride + i * ldx + j] for j < k, rounded to T.
template <typename T>
__global__ void ConvertStridedKernel(const float* x, int64_t ldx, int64_t x_stride, T* out,
                                     int64_t m, int64_t k, int64_t batch) {
  PdlEnter();  // first: see HELIX_LAUNCH_PDL
  const int64_t n = batch * m * k;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t j = i % k, row = i / k;
    const int64_t r = row % m, b = row / m;
    out[i] = FromFloat<T>(x[b * x_stride + r * ldx + j]);
  }
}

__global__ void AddBiasKernel(float* y, const float* bias, int64_t m, int64_t n) {
  PdlEnter();  // first: see HELIX_LAUNCH_PDL
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < m * n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    y[i] += bias[i % n];
  }
}

cudaError_t CublasError(cublasStatus_t st, const char* what) {
  std::fprintf(stderr, "cuBLAS error %d (%s) in %s\n", static_cast<int>(st),
               cublasGetStatusString(st), what);
  return cudaErrorUnknown;
}

// Puts the handle on `stream`, only when it is on another one: setting the stream drops a
// workspace given with cublasSetWorkspace.
cudaError_t UseStream(cublasHandle_t handle, cudaStream_t stream) {
  cudaStream_t current = nullptr;
  cublasStatus_t st = cublasGetStream(handle, &current);
  if (st == CUBLAS_STATUS_SUCCESS && current == stream) {
    return cudaSuccess;
  }
  st = cublasSetStream(handle, stream);
  return st == CUBLAS_STATUS_SUCCESS ? cudaSuccess : CublasError(st, "cublasSetStream");
}

// Whether every value fits the int that cuBLAS's (non-64-bit) API takes.
bool FitsInt(std::initializer_list<int64_t> values) {
  for (int64_t v : values) {
    if (v > INT_MAX) return false;
  }
  return true;
}

}  // namespace

size_t GemmCudaWorkspaceBytes(const GemmParams& p) {
  return p.w_dtype == DType::kF32 || p.x_lowp != nullptr ? 0 : static_cast<size_t>(p.m * p.k) * 2;
}

cudaError_t GemmCuda(cublasHandle_t handle, const GemmParams& p, void* workspace,
                     cudaStream_t stream, bool x_converted) {
  if (p.m <= 0 || p.n <= 0) {
    return cudaSuccess;
  }
  if (!FitsInt({p.m, p.n, p.k})) {
    return cudaErrorInvalidValue;
  }
  if (p.k <= 0) {
    HELIX_CUDA_RETURN_IF_ERROR(
        cudaMemsetAsync(p.y, 0, static_cast<size_t>(p.m * p.n) * sizeof(float), stream));
  } else {
    HELIX_CUDA_RETURN_IF_ERROR(UseStream(handle, stream));
    const void* x = p.x;
    cudaDataType_t in_type = CUDA_R_32F;
    if (p.w_dtype != DType::kF32 && p.x_lowp != nullptr) {
      x = p.x_lowp;  // the op that made x rounded it already
      in_type = p.w_dtype == DType::kBF16 ? CUDA_R_16BF : CUDA_R_16F;
    } else if (p.w_dtype == DType::kBF16) {
      if (!x_converted) {
        HELIX_LAUNCH_PDL(ConvertKernel<__nv_bfloat16>, GridFor(p.m * p.k), kThreads, 0, stream, p.x,
                         static_cast<__nv_bfloat16*>(workspace), p.m * p.k);
        HELIX_CUDA_CHECK_LAUNCH(stream);
      }
      x = workspace;
      in_type = CUDA_R_16BF;
    } else if (p.w_dtype == DType::kF16) {
      if (!x_converted) {
        HELIX_LAUNCH_PDL(ConvertKernel<__half>, GridFor(p.m * p.k), kThreads, 0, stream, p.x,
                         static_cast<__half*>(workspace), p.m * p.k);
        HELIX_CUDA_CHECK_LAUNCH(stream);
      }
      x = workspace;
      in_type = CUDA_R_16F;
    }
    // Row-major y[m][n] = x[m][k] w[n][k]^T is column-major y^T (n x m) = w^T x^T with w seen
    // as a column-major k x n matrix (ld k) and x as k x m (ld k).
    const float one = 1.0f, zero = 0.0f;
    const cublasStatus_t st =
        cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(p.n), static_cast<int>(p.m),
                     static_cast<int>(p.k), &one, p.w, in_type, static_cast<int>(p.k), x, in_type,
                     static_cast<int>(p.k), &zero, p.y, CUDA_R_32F, static_cast<int>(p.n),
                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
    if (st != CUBLAS_STATUS_SUCCESS) {
      return CublasError(st, "cublasGemmEx");
    }
  }
  if (p.bias != nullptr) {
    HELIX_LAUNCH_PDL(AddBiasKernel, GridFor(p.m * p.n), kThreads, 0, stream, p.y, p.bias, p.m, p.n);
    HELIX_CUDA_CHECK_LAUNCH(stream);
  }
  return cudaSuccess;
}

size_t GemmBatchedCudaWorkspaceBytes(const GemmBatchedParams& p) {
  return p.w_dtype == DType::kF32 ? 0 : static_cast<size_t>(p.batch * p.m * p.k) * 2;
}

cudaError_t GemmBatchedCuda(cublasHandle_t handle, const GemmBatchedParams& p, void* workspace,
                            cudaStream_t stream) {
  if (p.m <= 0 || p.n <= 0 || p.batch <= 0) {
    return cudaSuccess;
  }
  // ldx reaches cuBLAS only with fp32 weights (16-bit ones read the converted rows, ld k).
  if (!FitsInt({p.m, p.n, p.k, p.batch, p.ldy, p.w_dtype == DType::kF32 ? p.ldx : 0})) {
    return cudaErrorInvalidValue;
  }
  if (p.k <= 0) {
    for (int64_t b = 0; b < p.batch; ++b) {
      HELIX_CUDA_RETURN_IF_ERROR(cudaMemset2DAsync(p.y + b * p.y_stride, p.ldy * sizeof(float), 0,
                                                   p.n * sizeof(float), p.m, stream));
    }
    return cudaSuccess;
  }
  HELIX_CUDA_RETURN_IF_ERROR(UseStream(handle, stream));
  const void* x = p.x;
  int64_t ldx = p.ldx, x_stride = p.x_stride;
  cudaDataType_t in_type = CUDA_R_32F;
  const int64_t conv = p.batch * p.m * p.k;
  if (p.w_dtype == DType::kBF16) {
    HELIX_LAUNCH_PDL(ConvertStridedKernel<__nv_bfloat16>, GridFor(conv), kThreads, 0, stream, p.x,
                     p.ldx, p.x_stride, static_cast<__nv_bfloat16*>(workspace), p.m, p.k, p.batch);
    HELIX_CUDA_CHECK_LAUNCH(stream);
    in_type = CUDA_R_16BF;
  } else if (p.w_dtype == DType::kF16) {
    HELIX_LAUNCH_PDL(ConvertStridedKernel<__half>, GridFor(conv), kThreads, 0, stream, p.x, p.ldx,
                     p.x_stride, static_cast<__half*>(workspace), p.m, p.k, p.batch);
    HELIX_CUDA_CHECK_LAUNCH(stream);
    in_type = CUDA_R_16F;
  }
  if (p.w_dtype != DType::kF32) {
    x = workspace;
    ldx = p.k;
    x_stride = p.m * p.k;
  }
  // Per entry, as in GemmCuda: column-major y^T (n x m, ld ldy) = w^T (k x n, ld k, op T) x^T
  // (k x m, ld ldx).
  const float one = 1.0f, zero = 0.0f;
  const cublasStatus_t st = cublasGemmStridedBatchedEx(
      handle, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(p.n), static_cast<int>(p.m),
      static_cast<int>(p.k), &one, p.w, in_type, static_cast<int>(p.k), p.w_stride, x, in_type,
      static_cast<int>(ldx), x_stride, &zero, p.y, CUDA_R_32F, static_cast<int>(p.ldy), p.y_stride,
      static_cast<int>(p.batch), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  if (st != CUBLAS_STATUS_SUCCESS) {
    return CublasError(st, "cublasGemmStridedBatchedEx");
  }
  return cudaSuccess;
}

}  // namespace helix::kernels::cuda
