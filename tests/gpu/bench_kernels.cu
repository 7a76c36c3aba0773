#include "tests/gpu/bench_kernels.h"

#include <cstdint>

namespace helix::gpu_testing {
namespace {

constexpr int kReadThreads = 256;
constexpr int kReadUnroll = 8;  // independent 16-byte loads in flight per thread

__global__ void __launch_bounds__(kReadThreads)
    ReadReduceKernel(const uint4* __restrict__ src, size_t n, unsigned* sink) {
  const size_t stride = static_cast<size_t>(gridDim.x) * kReadThreads;
  size_t i = static_cast<size_t>(blockIdx.x) * kReadThreads + threadIdx.x;
  unsigned acc = 0;
  for (; i + (kReadUnroll - 1) * stride < n; i += kReadUnroll * stride) {
    uint4 v[kReadUnroll];
#pragma unroll
    for (int u = 0; u < kReadUnroll; ++u) {
      v[u] = __ldcs(src + i + u * stride);
    }
#pragma unroll
    for (int u = 0; u < kReadUnroll; ++u) {
      acc ^= v[u].x + v[u].y + v[u].z + v[u].w;
    }
  }
  for (; i < n; i += stride) {
    const uint4 v = __ldcs(src + i);
    acc ^= v.x + v.y + v.z + v.w;
  }
  if (acc == 0x9e3779b9u) {
    *sink = acc;
  }
}

__global__ void FillBf16Kernel(uint32_t* dst, size_t pairs, uint32_t seed) {
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < pairs;
       i += stride) {
    uint32_t h[2];
#pragma unroll
    for (int k = 0; k < 2; ++k) {
      uint64_t x = (static_cast<uint64_t>(seed) << 40) ^ (2 * i + k);
      x ^= x >> 33;
      x *= 0xff51afd7ed558ccdull;
      x ^= x >> 33;
      x *= 0xc4ceb9fe1a85ec53ull;
      x ^= x >> 33;
      // 2 * u - 1 with u uniform in [0, 1), as bf16 (truncated).
      const float f = static_cast<float>(x >> 40) * (2.0f / 16777216.0f) - 1.0f;
      h[k] = __float_as_uint(f) >> 16;
    }
    dst[i] = h[0] | (h[1] << 16);
  }
}

constexpr int kFmaThreads = 256;
constexpr int kFmaChains = 8;  // independent accumulators per thread (hides the FMA latency)

__global__ void __launch_bounds__(kFmaThreads)
    FmaPeakKernel(int iters, float b, float c, float* sink) {
  float acc[kFmaChains];
#pragma unroll
  for (int k = 0; k < kFmaChains; ++k) {
    acc[k] = static_cast<float>(threadIdx.x + k);
  }
  for (int i = 0; i < iters; ++i) {
#pragma unroll
    for (int u = 0; u < 16; ++u) {
#pragma unroll
      for (int k = 0; k < kFmaChains; ++k) {
        acc[k] = fmaf(acc[k], b, c);
      }
    }
  }
  float sum = 0.0f;
#pragma unroll
  for (int k = 0; k < kFmaChains; ++k) {
    sum += acc[k];
  }
  if (sum == 1234.5f) {
    *sink = sum;
  }
}

int GridFor(const void* fn, int threads) {
  int device = 0, sms = 0, per_sm = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess ||
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, fn, threads, 0) != cudaSuccess) {
    return 1024;
  }
  return sms * (per_sm > 0 ? per_sm : 1);
}

}  // namespace

cudaError_t LaunchReadReduce(const void* src, size_t bytes, unsigned* sink, cudaStream_t stream) {
  static const int grid = GridFor(reinterpret_cast<const void*>(&ReadReduceKernel), kReadThreads);
  ReadReduceKernel<<<grid, kReadThreads, 0, stream>>>(static_cast<const uint4*>(src), bytes / 16,
                                                      sink);
  return cudaGetLastError();
}

cudaError_t LaunchFmaPeak(int iters, float* sink, double* flops, cudaStream_t stream) {
  static const int grid = GridFor(reinterpret_cast<const void*>(&FmaPeakKernel), kFmaThreads);
  // b < 1 keeps the chains finite: they converge to c / (1 - b).
  FmaPeakKernel<<<grid, kFmaThreads, 0, stream>>>(iters, 0.999f, 0.001f, sink);
  *flops = 2.0 * grid * kFmaThreads * kFmaChains * 16.0 * iters;
  return cudaGetLastError();
}

cudaError_t LaunchFillBf16(void* dst, size_t count, uint32_t seed, cudaStream_t stream) {
  FillBf16Kernel<<<1024, 256, 0, stream>>>(static_cast<uint32_t*>(dst), count / 2, seed);
  return cudaGetLastError();
}

}  // namespace helix::gpu_testing
