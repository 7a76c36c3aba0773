#include "kernels/cuda/gemv_cuda.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_util.cuh"

namespace helix::kernels::cuda {
namespace {

constexpr int kWarpsPerBlock = 8;
constexpr int kChunk = 8;               // weights per 16-byte load
constexpr int kUnroll = 4;              // loads in flight per lane
constexpr int64_t kStep = 32 * kChunk;  // weights a warp reads per load

// y[r][row] = x[r] . w[row] (+ bias[row]) for r < m <= M; one warp per weight row. Lane l reads
// the 16-byte chunks l, l + 32, ... of the row (kUnroll of them issued together), and the same
// eight floats of each row of x (from cache: x is small and every warp reads it).
template <typename W, int M>
__global__ void GemvKernel(const GemmParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  const int lane = static_cast<int>(threadIdx.x % 32);
  if (row >= p.n) {
    return;
  }
  const W* __restrict__ w = static_cast<const W*>(p.w) + row * p.k;
  float acc[M];
#pragma unroll
  for (int r = 0; r < M; ++r) {
    acc[r] = 0.0f;
  }
  for (int64_t k0 = lane * kChunk; k0 < p.k; k0 += kUnroll * kStep) {
    uint4 raw[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = k0 + u * kStep;
      raw[u] = k < p.k ? *reinterpret_cast<const uint4*>(w + k) : make_uint4(0, 0, 0, 0);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t k = k0 + u * kStep;
      if (k >= p.k) {
        break;
      }
      float wf[kChunk];
      ChunkToFloats<W>(raw[u], wf);
#pragma unroll
      for (int r = 0; r < M; ++r) {
        if (r < p.m) {
          const float4* xr = reinterpret_cast<const float4*>(p.x + r * p.k + k);
          const float4 a = xr[0];
          const float4 b = xr[1];
          float s = acc[r];
          s = fmaf(a.x, wf[0], s);
          s = fmaf(a.y, wf[1], s);
          s = fmaf(a.z, wf[2], s);
          s = fmaf(a.w, wf[3], s);
          s = fmaf(b.x, wf[4], s);
          s = fmaf(b.y, wf[5], s);
          s = fmaf(b.z, wf[6], s);
          s = fmaf(b.w, wf[7], s);
          acc[r] = s;
        }
      }
    }
  }
#pragma unroll
  for (int r = 0; r < M; ++r) {
    float s = acc[r];
#pragma unroll
    for (int off = 16; off > 0; off /= 2) {
      s += __shfl_xor_sync(0xffffffffu, s, off);
    }
    if (lane == 0 && r < p.m) {
      p.y[r * p.n + row] = p.bias != nullptr ? s + p.bias[row] : s;
    }
  }
}

template <typename W>
cudaError_t Launch(const GemmParams& p, cudaStream_t stream) {
  const unsigned grid = static_cast<unsigned>((p.n + kWarpsPerBlock - 1) / kWarpsPerBlock);
  const unsigned block = 32 * kWarpsPerBlock;
  if (p.m == 1) {
    HELIX_LAUNCH((GemvKernel<W, 1>), grid, block, 0, stream, p);
  } else if (p.m == 2) {
    HELIX_LAUNCH((GemvKernel<W, 2>), grid, block, 0, stream, p);
  } else {
    HELIX_LAUNCH((GemvKernel<W, 4>), grid, block, 0, stream, p);
  }
  HELIX_CUDA_CHECK_LAUNCH(stream);
  return cudaSuccess;
}

}  // namespace

bool GemvApplies(const GemmParams& p) {
  const auto aligned = [](const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; };
  return (p.w_dtype == DType::kBF16 || p.w_dtype == DType::kF16) && p.m >= 1 &&
         p.m <= kGemvMaxRows && p.n >= 1 && p.k >= 1 && p.k % kChunk == 0 && aligned(p.x) &&
         aligned(p.w);
}

cudaError_t GemvCuda(const GemmParams& p, cudaStream_t stream) {
  if (!GemvApplies(p)) {
    return cudaErrorInvalidValue;
  }
  return p.w_dtype == DType::kBF16 ? Launch<__nv_bfloat16>(p, stream) : Launch<__half>(p, stream);
}

}  // namespace helix::kernels::cuda
