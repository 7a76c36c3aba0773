// A test kernel for programmatic dependent launch (cuda_ops_test): the "kernel before" whose
// output a programmatically launched kernel may only read after its launch wait.
#ifndef HELIX_TESTS_GPU_PDL_TEST_KERNELS_H_
#define HELIX_TESTS_GPU_PDL_TEST_KERNELS_H_

#include <cuda_runtime.h>

#include <cstdint>

namespace helix::gpu_testing {

struct CopyOp {
  void* dst;
  const void* src;
  uint64_t bytes;
};

// One thread block that passes its own launch wait (PdlEnter: the next kernel in the stream may
// then start), spins for delay_ns of the GPU's global timer, then does the n copies `ops` (a
// device array) names: a kernel before that writes late, so that a dependent kernel reading any
// of those bytes before its own wait would see their old values. Launched as a programmatic
// dependent (HELIX_LAUNCH_PDL) itself.
cudaError_t LaunchDelayedCopies(const CopyOp* ops, int n, int64_t delay_ns, cudaStream_t stream);

}  // namespace helix::gpu_testing

#endif  // HELIX_TESTS_GPU_PDL_TEST_KERNELS_H_
