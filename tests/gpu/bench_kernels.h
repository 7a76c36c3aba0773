// Helper kernels for the GPU benchmarks: a pure-read bandwidth reference, an fp32 FMA throughput
// reference and a pseudo-random bf16 fill. Launchers only enqueue on `stream`; not thread-safe with
// respect to shared sinks.
#ifndef HELIX_TESTS_GPU_BENCH_KERNELS_H_
#define HELIX_TESTS_GPU_BENCH_KERNELS_H_

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace helix::gpu_testing {

// Reads `bytes` bytes from `src` with coalesced 16-byte streaming loads (several in flight per
// thread, a full-occupancy grid) and folds them into a value that is stored to *sink only
// when it equals a constant, so the loads cannot be dropped.
// REQUIRES: src 16-byte aligned, bytes a multiple of 16, sink a device pointer.
cudaError_t LaunchReadReduce(const void* src, size_t bytes, unsigned* sink, cudaStream_t stream);

// Enqueues a compute-only kernel of independent fp32 FMA chains (a full-occupancy grid, nothing
// read from memory) whose result is stored to *sink only when it equals a constant, and sets
// *flops to the floating-point operations it does (2 per FMA). Timing it gives the device's
// practical fp32 FMA peak.
// REQUIRES: iters > 0, sink a device pointer.
cudaError_t LaunchFmaPeak(int iters, float* sink, double* flops, cudaStream_t stream);

// Fills `count` bf16 elements at dst with values in [-1, 1) from a hash of (seed, index).
cudaError_t LaunchFillBf16(void* dst, size_t count, uint32_t seed, cudaStream_t stream);

}  // namespace helix::gpu_testing

#endif  // HELIX_TESTS_GPU_BENCH_KERNELS_H_
