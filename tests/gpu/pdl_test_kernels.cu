#include "tests/gpu/pdl_test_kernels.h"

#include "kernels/cuda/cuda_check.h"
#include "kernels/cuda/cuda_util.cuh"

namespace helix::gpu_testing {
namespace {

__device__ inline uint64_t GlobalTimerNs() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__global__ void DelayedCopiesKernel(const CopyOp* ops, int n, int64_t delay_ns) {
  kernels::cuda::PdlEnter();
  if (threadIdx.x == 0) {
    const uint64_t t0 = GlobalTimerNs();
    while (GlobalTimerNs() - t0 < static_cast<uint64_t>(delay_ns)) {
    }
  }
  __syncthreads();
  for (int i = 0; i < n; ++i) {
    unsigned char* dst = static_cast<unsigned char*>(ops[i].dst);
    const unsigned char* src = static_cast<const unsigned char*>(ops[i].src);
    for (uint64_t b = threadIdx.x; b < ops[i].bytes; b += blockDim.x) {
      dst[b] = src[b];
    }
  }
}

}  // namespace

cudaError_t LaunchDelayedCopies(const CopyOp* ops, int n, int64_t delay_ns, cudaStream_t stream) {
  HELIX_LAUNCH_PDL(DelayedCopiesKernel, 1u, 256u, 0, stream, ops, n, delay_ns);
  return cudaGetLastError();
}

}  // namespace helix::gpu_testing
